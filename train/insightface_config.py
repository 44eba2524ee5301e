"""insightface ``arcface_torch`` config files (``configs/*.py``), read as they are and turned into
this trainer's options, so that ``--config configs/wf42m_pfc02_r100.py`` runs what arcface_torch's
``train_v2.py`` would.

The file is parsed, never executed: only assignments ``config.<key> = <value>`` count, where a
value is a literal (numbers, strings, booleans, None, tuples, lists) or arithmetic on literals and
earlier ``config.<key>`` values (``config.num_epoch // 10``), and ``from configs.<name> import config``,
which applies the assignments of ``<name>.py`` beside it. Keys the file leaves out take the
defaults of the ``base.py`` beside it, as arcface_torch's ``get_config`` merges its ``configs/base.py``
(those of arcface_torch's own ``base.py`` when there is none).

How its settings map:

- ``margin_list`` (m1, m2, m3) with its fixed s = 64 -> ``--loss combined --m1 --m2 --m3``; an
  angular margin alone (m1 = 1, m3 = 0) also ``--margin-grad straight_through``, as its loss applies
  it under ``no_grad``; with m3 > 0 its loss applies m3 only (m2 is dropped), this trainer both, with
  a note;
- ``num_image``, ``num_epoch``, ``warmup_epoch`` -> ``--max-steps`` / ``--warmup-steps``, counted
  as ``train_v2.py`` counts them (``num_image // (batch_size * world_size) * epochs``) but in
  optimiser steps: divided by ``gradient_acc`` (its scheduler steps every pass); ``--batch-size``
  and ``--gradient-acc`` on the command line stand for ``batch_size`` and ``gradient_acc`` there; a negative
  ``warmup_epoch`` is no warm-up at a lower ``--lr``, what its PolyScheduler makes of it;
- ``verbose`` / ``frequent`` (in passes) -> ``--eval-every`` / ``--log-every`` (in steps), and
  checkpoints every ``verbose`` as well;
- ``fp16`` -> ``--amp fp16`` (the trunk; the loss stays fp32 here, where its partial FC computes the
  cosines with fp16 GEMMs);
- its partial FC always splits the class centres across the GPUs: ``--sharded-classes`` when
  torchrun starts more than one process (``WORLD_SIZE``), replicated otherwise;
- ``output`` None -> ``work_dirs/<config name>``, as its ``get_config`` does;
- ``resume`` -> ``--resume auto``: a run of this trainer in the output folder, or arcface_torch's own there
  (its ``checkpoint_gpu_<rank>.pt``, continued with their step, optimizer state and schedule);
- ``num_classes`` -> ``--num-classes``, checked against the data;
- ``rec = "synthetic"`` (its configs/speed.py: one fixed random tensor, no decoding) -> ``--data random``,
  fixed random images on the device and labels drawn each step over ``num_classes`` (was ``--data
  synthetic``, the demo's drawn faces, whose identities ``--synthetic-identities`` had to match);
- ``using_wandb`` -> ``--wandb``, with ``wandb_project``, ``wandb_entity`` and ``suffix_run_name``
  (the run is named ``<output folder>_<suffix>``); the main process logs (``wandb_log_all`` is not
  followed), a resumed run continues its W&B run by itself (``wandb_resume`` is not needed), and
  ``wandb_key`` is not read: log in with ``wandb login`` or ``WANDB_API_KEY``; ``save_artifacts`` ->
  ``--wandb-artifacts`` (checkpoint.pt at each save, as versions of one artifact, where train_v2.py logs
  model.pt as an artifact of its own each epoch);
- ``dali`` and ``save_all_states`` have no counterpart and are reported as ignored;
- ``interclass_filtering_threshold`` -> ``--interclass-filter`` (the chunked PyTorch path, sharded
  like the rest with more than one process).
"""

from __future__ import annotations

import ast
import difflib
import operator
import os
import sys
from typing import Any

# arcface_torch's configs/base.py: what a config file that leaves a key out gets.
BASE = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": "ms1mv3_arcface_r50", "embedding_size": 512, "sample_rate": 1.0,
    "interclass_filtering_threshold": 0, "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1,
    "momentum": 0.9, "weight_decay": 5e-4, "verbose": 2000, "frequent": 10, "dali": False, "gradient_acc": 1,
    "seed": 2048, "num_workers": 2, "val_targets": ["lfw", "cfp_fp", "agedb_30"], "warmup_epoch": 0,
}
# Switches with no counterpart here, reported when a config turns them on, with what happens instead
# (a bare "ignored" read as if checkpoints of every state were not written).
IGNORED = {"dali": "PyTorch's DataLoader reads the data",
           "dali_aug": "DALI's augmentations; --blur-augmentation, --hue-augmentation, --grayscale-augmentation and "
                       "--low-res-augmentation are their kinds here",
           "save_all_states": "checkpoint.pt holds every state anyway, for --resume"}
REQUIRED = ("rec", "num_classes", "num_image", "num_epoch")
# Keys of arcface_torch's configs that are read above, or that only its wandb logger reads.
KNOWN = {*BASE, *IGNORED, *REQUIRED, "using_wandb", "wandb_key", "suffix_run_name", "wandb_entity",
         "wandb_project", "wandb_log_all", "wandb_resume", "save_artifacts", "notes"}

# The numeric keys, integers or any number: anything else (None, a string, a boolean) is named as an
# error rather than failing inside a conversion.
INTEGERS = ("gradient_acc", "batch_size", "num_image", "num_epoch", "verbose", "frequent", "num_classes",
            "embedding_size", "seed", "num_workers")
NUMBERS = ("warmup_epoch", "lr", "sample_rate", "interclass_filtering_threshold", "weight_decay", "momentum")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def is_insightface_config(path: str) -> bool:
    return path.endswith(".py")


def _note(text: str) -> None:
    """A note on how the config was read, said as the trainer's are ("note: ...") and by the main process
    alone: under torchrun every process reads the config, and each said it (8 times on 8 GPUs)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {text}", file=sys.stderr)


def read(path: str) -> dict[str, Any]:
    """The ``config.<key>`` assignments of an arcface_torch config file, over base.py's defaults: the
    ``base.py`` beside it when there is one (``get_config`` merges the checkout's own ``configs/base.py``,
    which a user may have edited), else :data:`BASE`."""
    defaults = dict(BASE)
    base = os.path.join(os.path.dirname(os.path.abspath(path)), "base.py")
    if os.path.isfile(base) and not os.path.samefile(base, path):
        # Older arcface_torch's base.py chose its data with `if` blocks and held functions: what is not a
        # `config.<key> = <value>` line of it is left to the defaults (the file given is another), with a note.
        skipped: list[int] = []
        try:
            defaults = _assignments(base, defaults, defaults, (), skipped)
        except SystemExit as error:  # (a base.py that does not parse: said why it was read, the file given is another)
            raise SystemExit(f"{error} (read as the defaults of {path}, as arcface_torch's get_config merges the "
                             "configs/base.py beside a config)") from None
        if skipped:
            _note(f"{base}, read as the defaults of {path} (as arcface_torch's get_config merges it), has lines "
                  f"that are not `config.<key> = <value>`, left out: {', '.join(map(str, skipped[:10]))}"
                  + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
    return _assignments(path, dict(defaults), defaults, ())


def _assignments(path: str, values: dict[str, Any], defaults: dict[str, Any],
                 importers: tuple[str, ...], skipped: list[int] | None = None) -> dict[str, Any]:
    """``values`` updated by the file's ``config.<key>`` lines, in order; ``from configs.<name> import
    config`` (a config made by editing another) applies ``<name>.py``'s lines, from beside the file.
    A line that cannot be read is an error, or with ``skipped`` given, its number is added there."""
    with open(path, "rb") as f:
        source = f.read()
    try:  # (from bytes: a `# -*- coding: ... -*-` line is followed, and a file in another encoding is named)
        tree = ast.parse(source, filename=path)
    except SyntaxError as error:
        raise SystemExit(f"{path}: not a Python config file: {error}") from None
    importers = (*importers, os.path.abspath(path))
    for node in tree.body:
        try:
            if isinstance(node, ast.ImportFrom) and any(alias.name == "config" and alias.asname in (None, "config")
                                                        for alias in node.names):
                # Python would bind `config` to the other file's object, edits and all: skipping the
                # line trained on base.py's values instead of that file's (its fp16, margins, decay).
                values = _assignments(_imported_config(node, path, importers), values, defaults, importers)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name) and target.id == "config":
                    values = dict(defaults)  # config = edict(): what came before is dropped
                    continue
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == "config"):
                    values[target.attr] = _evaluate(node.value, values, path)
                    continue
            raise SystemExit(f"{path}:{node.lineno}: only `config.<key> = <value>` lines are read from an "
                             "arcface_torch config (the file is parsed, not run)")
        except SystemExit:
            if skipped is None:
                raise
            skipped.append(node.lineno)
    return values


def _imported_config(node: ast.ImportFrom, path: str, importers: tuple[str, ...]) -> str:
    """The file of ``from configs.<name> import config`` (or ``from .<name> import config``): arcface_torch's
    configs are modules of one folder, so ``<name>.py`` beside the importing file."""
    module = "." * node.level + (node.module or "")
    name = (node.module or "").rsplit(".", 1)[-1]
    other = os.path.join(os.path.dirname(os.path.abspath(path)), f"{name}.py")
    if not name or not os.path.isfile(other):
        raise SystemExit(f"{path}:{node.lineno}: `from {module} import config` takes another config's settings, "
                         f"which are read from {name or '?'}.py beside this file, and there is none")
    if os.path.abspath(other) in importers:
        raise SystemExit(f"{path}:{node.lineno}: `from {module} import config` imports a config that imports "
                         "this one")
    return other


def _evaluate(node: ast.AST, values: dict[str, Any], path: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(item, values, path) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, values, path))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, values, path), _evaluate(node.right, values, path))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        if node.attr not in values:
            raise SystemExit(f"{path}:{node.lineno}: config.{node.attr} is used before it is set")
        return values[node.attr]
    raise SystemExit(f"{path}:{node.lineno}: cannot read `{ast.unparse(node)}`: only literals and arithmetic "
                     "on earlier config values are read from an arcface_torch config")


def to_options(config: dict[str, Any], path: str, world_size: int | None = None) -> dict[str, Any]:
    """This trainer's options (flag names without dashes) for an arcface_torch config."""
    for key in sorted(config):
        # A key a letter or two from one of train_v2.py's (config.smaple_rate) is a misspelling: read as
        # a foreign key, its value was dropped and the run took the default (sample rate 1, not 0.2).
        close = [] if key in KNOWN else difflib.get_close_matches(key, KNOWN, n=1, cutoff=0.8)
        if close:
            raise SystemExit(f"{path}: config.{key} is no key of arcface_torch's train_v2.py: config.{close[0]} "
                             f"misspelt? (its value would be dropped, and {close[0]} left at "
                             f"{config.get(close[0], 'unset')!r})")
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise SystemExit(f"{path}: arcface_torch configs set {', '.join(REQUIRED)}; this one lacks "
                         f"{', '.join(missing)}")
    for key in INTEGERS + NUMBERS:
        value = config.get(key, 0)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (key in INTEGERS and value != int(value))):
            raise SystemExit(f"{path}: config.{key} = {value!r}: {'an integer' if key in INTEGERS else 'a number'} "
                             "expected")
    # Strings and lists of them, named rather than read letter by letter (val_targets = 'lfw' as l, f, w).
    for key, kind, wanted in (("rec", str, "a path"), ("output", (str, type(None)), "a path or None")):
        if not isinstance(config[key], kind):
            raise SystemExit(f"{path}: config.{key} = {config[key]!r}: {wanted} expected")
    if not (isinstance(config["val_targets"], (list, tuple))
            and all(isinstance(v, str) for v in config["val_targets"])):
        raise SystemExit(f"{path}: config.val_targets = {config['val_targets']!r}: a list of names expected "
                         "(['lfw', 'cfp_fp', 'agedb_30'])")
    for key in ("batch_size", "gradient_acc"):  # (the divisors of the step counts below)
        if config[key] < 1:
            raise SystemExit(f"{path}: config.{key} = {config[key]!r}: at least 1 expected")
    margin_list = config["margin_list"]
    if (not isinstance(margin_list, (tuple, list)) or len(margin_list) != 3
            or any(isinstance(m, bool) or not isinstance(m, (int, float)) for m in margin_list)):
        raise SystemExit(f"{path}: config.margin_list = {margin_list!r}: three numbers (m1, m2, m3) expected")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    m1, m2, m3 = (float(m) for m in config["margin_list"])
    passes = int(config["gradient_acc"])
    batch = int(config["batch_size"])
    steps_per_epoch = int(config["num_image"]) // (batch * world_size)
    max_steps = steps_per_epoch * int(config["num_epoch"]) // passes
    if max_steps < 1:  # (was a run of one step, without a word)
        _note(f"{path}: config.num_image {config['num_image']} in batches of {batch} x {world_size} process(es)"
              f"{f' x {passes} passes' if passes > 1 else ''} for {config['num_epoch']} epoch(s) is no step, as "
              "train_v2.py counts them: one here (a smaller --batch-size, or --max-steps)")
        max_steps = 1
    warmup_steps = int(steps_per_epoch * config["warmup_epoch"]) // passes
    lr = float(config["lr"])
    if warmup_steps < 0:
        # A negative warm-up (configs/3millions.py: warmup_epoch = -1) never warms up in
        # arcface_torch's PolyScheduler (`last_epoch < warmup_steps` never holds); its decay
        # base_lr * (1 - (t - w) / (T - w))^2 at w = -W is base_lr * ((T - t) / (T + W))^2: the decay
        # of a run W steps longer, entered W steps in. Here that is no warm-up at the base rate
        # scaled by (T / (T + W))^2. (Its later PolynomialLRWarmup gives no warm-up at base_lr.)
        lr *= (max_steps / (max_steps - warmup_steps)) ** 2
        _note(f"{path}: warmup_epoch {config['warmup_epoch']} < 0, which arcface_torch's PolyScheduler reads as no "
              f"warm-up and a decay from lr x (T / (T + W))^2: --warmup-steps 0 --lr {lr:.6g}")
        warmup_steps = 0
    if m3 > 0 and m2 != 0:
        _note(f"{path}: margin_list {tuple(config['margin_list'])}: arcface_torch's CombinedMarginLoss applies only "
              f"m3 when m3 > 0 (m2 is dropped); this trainer applies cos(m1·θ + m2) - m3 as written (add --m2 0 "
              "to train as arcface_torch did)")
    every = max(1, int(config["verbose"]) // passes)
    output = config.get("output") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(path))[0])
    options = {
        # (arcface_torch's "synthetic", one fixed random tensor and labels, configs/speed.py: --data random)
        "data": "random" if config["rec"] == "synthetic" else config["rec"],
        "num-classes": int(config["num_classes"]), "network": config["network"],
        "embedding-size": int(config["embedding_size"]), "image-size": 112,
        "loss": "combined", "m1": m1, "m2": m2, "m3": m3, "arcface-s": 64.0,
        "margin-grad": "straight_through" if (m1, m3) == (1.0, 0.0) and m2 != 0.0 else "exact",
        "sample-rate": float(config["sample_rate"]), "sharded-classes": world_size > 1,
        # (arcface_torch filters when the threshold is > 0: a negative one is off there too)
        "interclass-filter": max(0.0, float(config["interclass_filtering_threshold"])),
        "optimizer": config["optimizer"], "lr": lr, "decay": float(config["weight_decay"]),
        "lr-schedule": "poly", "max-steps": max_steps, "warmup-steps": warmup_steps,
        "batch-size": batch, "gradient-acc": passes, "amp": "fp16" if config["fp16"] else "none",
        "grad-clip": 5.0, "seed": int(config["seed"]), "num-workers": int(config["num_workers"]),
        "val-targets": ",".join(config["val_targets"]) or "none", "eval-every": every,
        "save-every": every, "log-every": max(1, int(config["frequent"]) // passes), "output": output,
    }
    if config.get("resume"):
        options["resume"] = "auto"
    if config.get("using_wandb"):
        options["wandb"] = True
        for key in ("wandb_project", "wandb_entity"):
            # (configs/base.py's placeholders "project" and "entity", read from a base.py beside the
            # config, are no W&B names: this trainer's defaults stand instead)
            if config.get(key) and config[key] != key.removeprefix("wandb_"):
                options[key.replace("_", "-")] = str(config[key])
        if config.get("suffix_run_name"):
            options["wandb-run-name"] = f"{{output}}_{config['suffix_run_name']}"  # the --output in force
        if config.get("wandb_key") and set(str(config["wandb_key"])) != {"X"}:  # (base.py's placeholder)
            _note(f"{path}: config.wandb_key is not read: log in once with `wandb login`, or set WANDB_API_KEY")
        if config.get("save_artifacts"):
            options["wandb-artifacts"] = True
    ignored = [f"{key} ({why})" for key, why in IGNORED.items() if config.get(key)]
    if config.get("save_artifacts") and not config.get("using_wandb"):
        ignored.append("save_artifacts (without using_wandb, as in train_v2.py: no W&B run to log to)")
    if float(config.get("momentum", 0.9)) != 0.9:
        ignored.append("momentum (train_v2.py's SGD uses 0.9 whatever it says)")
    if ignored:
        _note(f"{path}: ignored arcface_torch settings: {', '.join(ignored)}")
    # Older arcface_torch (train.py) chose the margin by name; train_v2.py reads margin_list alone, so
    # a config of that time trains base.py's ArcFace there, and here: said, with the line that keeps it.
    older = {"cosface": (1.0, 0.0, 0.4), "arcface": (1.0, 0.5, 0.0)}.get(str(config.get("loss", "")).lower())
    if "loss" in config and older != (m1, m2, m3):
        keep = f"config.margin_list = {older}" if older else "a margin_list"
        _note(f"{path}: config.loss = {config['loss']!r} is older arcface_torch's (train.py); train_v2.py reads "
              f"margin_list alone, {tuple(config['margin_list'])} here: for the loss it names, set {keep}")
    unknown = sorted(key for key in config if key not in KNOWN and not (key == "loss" and older != (m1, m2, m3)))
    if unknown:  # an older arcface_torch's key (config.loss, config.decay_epoch), or another fork's
        _note(f"{path}: keys arcface_torch's train_v2.py does not have, ignored: {', '.join(unknown)}")
    return options
