"""insightface ``arcface_torch`` config files (``configs/*.py``), read as they are and turned into
this trainer's options, so that ``--config configs/wf42m_pfc02_r100.py`` runs what arcface_torch's
``train_v2.py`` would.

The file is parsed, never executed: only assignments ``config.<key> = <value>`` count, where a
value is a literal (numbers, strings, booleans, None, tuples, lists) or arithmetic on literals and
earlier ``config.<key>`` values (``config.num_epoch // 10``), and ``from configs.<name> import config``,
which applies the assignments of ``<name>.py`` beside it; a ``def`` is kept as data, read where
``config.lr_func`` names it (below). Values past :data:`LARGEST_SEQUENCE` items or :data:`LARGEST_INT_BITS`,
and an lr_func past :data:`LR_FUNC_STEPS`, are refused before they are made. Keys the file leaves out take the
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
- older arcface_torch's step schedule (its ``train.py``, before ``train_v2.py``'s PolyScheduler), where a
  config has one: ``decay_epoch`` (a list of epochs; ``train.py`` multiplied the learning rate by 0.1 at
  ``epoch * num_image // (batch_size * world_size)`` steps, after a linear warm-up of ``warmup_epoch``) or
  ``lr_func`` (``def lr_step_func(epoch): return ...``, its multiplier of each epoch, applied epoch by
  epoch) -> ``--lr-schedule step --lr-steps`` and ``--warmup-steps``, with ``--lr`` scaled as that
  ``train.py`` scaled it, by ``batch_size * world_size / 512``. The function is not run: its one returned
  expression is evaluated as the lines are (literals, arithmetic, ``config.<key>``), with the epoch, a
  comparison, ``x if c else y``, ``len`` and a list comprehension over literals besides, for each epoch;
  what is not a warm-up then powers of 0.1 is refused;
- ``interclass_filtering_threshold`` -> ``--interclass-filter`` (the chunked PyTorch path, sharded
  like the rest with more than one process).
"""

from __future__ import annotations

import ast
import collections
import difflib
import math
import operator
import os
import reprlib
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
# Older arcface_torch's step schedule (train.py), read where a config has one: train_v2.py ignores them.
STEP_SCHEDULE = ("decay_epoch", "lr_func")
# train.py's learning rate: the config's lr is for a batch of 512 (`config.lr = 0.1  # batch size is 512`).
STEP_SCHEDULE_BATCH = 512
# Switches with no counterpart here, reported when a config turns them on, with what happens instead
# (a bare "ignored" read as if checkpoints of every state were not written).
IGNORED = {"dali": "PyTorch's DataLoader reads the data",
           "dali_aug": "DALI's augmentations; --blur-augmentation, --hue-augmentation, --grayscale-augmentation and "
                       "--low-res-augmentation are their kinds here",
           "save_all_states": "checkpoint.pt holds every state anyway, for --resume"}
REQUIRED = ("rec", "num_classes", "num_image", "num_epoch")
# Keys of arcface_torch's configs that are read above, or that only its wandb logger reads.
KNOWN = {*BASE, *IGNORED, *REQUIRED, *STEP_SCHEDULE, "using_wandb", "wandb_key", "suffix_run_name", "wandb_entity",
         "wandb_project", "wandb_log_all", "wandb_resume", "save_artifacts", "notes"}

# The numeric keys, integers or any number: anything else (None, a string, a boolean) is named as an
# error rather than failing inside a conversion.
INTEGERS = ("gradient_acc", "batch_size", "num_image", "num_epoch", "verbose", "frequent", "num_classes",
            "embedding_size", "seed", "num_workers")
NUMBERS = ("warmup_epoch", "lr", "sample_rate", "interclass_filtering_threshold", "weight_decay", "momentum")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Read in an lr_func's expression alone: its comparisons and `not`.
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq,
            ast.NotEq: operator.ne}
# The largest values a line may make, refused before they are made (`9 ** 9 ** 9`, `[0] * 10 ** 10` held the
# reader for hours or all memory): no config needs more, and 3000 digits still print (Python's limit is 4300).
LARGEST_SEQUENCE = 10**6
LARGEST_INT_BITS = 10**4
# An lr_func is read by evaluating it for each epoch: the steps of the evaluator (a node each, and an item
# each of the lists it makes) over all of them, where a comprehension in a comprehension over a long list or
# a config.num_epoch of 10 ** 9 took hours. Older arcface_torch's lr_step_func takes ~30 an epoch.
LR_FUNC_STEPS = 2 * 10**5
_STEPS_LEFT = "<steps left>"  # (the key of an lr_func's count of them in `names`: no Python name)


class LrFunction:
    """A config's ``def lr_step_func(epoch): return <expression>`` (or a lambda) given as ``config.lr_func``:
    older arcface_torch's learning-rate multiplier of an epoch. Kept as its syntax tree; a call evaluates
    the one expression it returns with :func:`_evaluate`, never runs it."""

    def __init__(self, node: ast.FunctionDef | ast.Lambda, path: str):
        self.node, self.path = node, path
        self.name = node.name if isinstance(node, ast.FunctionDef) else "<lambda>"
        self.steps_left = [LR_FUNC_STEPS]  # (over all the epochs it is read for)

    def __repr__(self) -> str:
        return f"<function {self.name}>"

    def __call__(self, epoch: int, values: dict[str, Any]) -> Any:
        node, arguments = self.node, self.node.args
        if isinstance(node, ast.Lambda):
            expression = node.body
        else:
            body = node.body
            if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                body = body[1:]  # (a docstring)
            expression = body[0].value if len(body) == 1 and isinstance(body[0], ast.Return) else None
        parameters = arguments.posonlyargs + arguments.args
        # (A decorator is refused: Python would have called it and given config.lr_func what it returned.)
        if (expression is None or len(parameters) != 1 or arguments.vararg or arguments.kwarg
                or arguments.kwonlyargs or getattr(node, "decorator_list", None)):
            raise SystemExit(f"{self.path}:{node.lineno}: config.lr_func = {self.name}: only a function of the epoch "
                             "that returns one expression is read (older arcface_torch's lr_step_func); give its "
                             "epochs as config.decay_epoch instead")
        try:
            return _evaluate(expression, values, self.path, {parameters[0].arg: epoch, _STEPS_LEFT: self.steps_left})
        except (TypeError, ValueError, ArithmeticError, RecursionError) as error:  # (len of a number, 1 < 'a', 1 / 0)
            raise SystemExit(f"{self.path}:{node.lineno}: config.lr_func = {self.name} cannot be read at epoch "
                             f"{epoch}: {error}") from None


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
    except (SyntaxError, RecursionError) as error:  # (RecursionError: an expression nested a thousand deep)
        raise SystemExit(f"{path}: not a Python config file: {error}") from None
    importers = (*importers, os.path.abspath(path))
    functions: dict[str, ast.FunctionDef] = {}  # (older configs' lr_step_func, given as config.lr_func)
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
            if isinstance(node, ast.FunctionDef) and skipped is None:  # (data: read where config.lr_func names it)
                functions[node.name] = node
                continue
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name) and target.id == "config":
                    values = dict(defaults)  # config = edict(): what came before is dropped
                    continue
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == "config"):
                    if isinstance(node.value, ast.Name) and node.value.id in functions:
                        values[target.attr] = LrFunction(functions[node.value.id], path)
                    elif isinstance(node.value, ast.Lambda):
                        values[target.attr] = LrFunction(node.value, path)
                    else:
                        try:
                            values[target.attr] = _evaluate(node.value, values, path)
                        except (TypeError, ValueError, ArithmeticError, RecursionError) as error:  # ('a' + 1, 1 / 0)
                            raise SystemExit(f"{path}:{node.lineno}: config.{target.attr} cannot be read: "
                                             f"{error}") from None
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


def _evaluate(node: ast.AST, values: dict[str, Any], path: str, names: dict[str, Any] | None = None) -> Any:
    """The value of a config line's expression; with ``names`` (an lr_func's parameter, a comprehension's
    variable), of an lr_func's, which may also compare, choose (``x if c else y``), take ``len`` and build a
    list by a comprehension."""
    if names is not None:
        _spend(names, 1, node, path)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(item, values, path, names) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, values, path, names))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, values, path, names), _evaluate(node.right, values, path, names)
        _check_size(node, left, right, path)
        value = _BINARY[type(node.op)](left, right)
        if names is not None and isinstance(value, (str, bytes, list, tuple)):
            _spend(names, len(value), node, path)
        return value
    if names is not None:
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.IfExp):
            chosen = node.body if _evaluate(node.test, values, path, names) else node.orelse
            return _evaluate(chosen, values, path, names)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = _evaluate(node.left, values, path, names)
            for op, comparator in zip(node.ops, node.comparators):
                right = _evaluate(comparator, values, path, names)
                if not all(isinstance(v, (int, float)) for v in (left, right)):  # (lists compare item by item)
                    raise TypeError(f"`{ast.unparse(node)}` compares other than numbers")
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BoolOp):
            items = (_evaluate(item, values, path, names) for item in node.values)
            return all(items) if isinstance(node.op, ast.And) else any(items)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not _evaluate(node.operand, values, path, names)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"
                and len(node.args) == 1 and not node.keywords):
            return len(_evaluate(node.args[0], values, path, names))
        if (isinstance(node, ast.ListComp) and len(node.generators) == 1
                and isinstance(node.generators[0].target, ast.Name) and not node.generators[0].is_async):
            loop = node.generators[0]
            items = []
            for item in _evaluate(loop.iter, values, path, names):
                inner = {**names, loop.target.id: item}
                if all(_evaluate(condition, values, path, inner) for condition in loop.ifs):
                    items.append(_evaluate(node.elt, values, path, inner))
            return items
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        if node.attr not in values:
            raise SystemExit(f"{path}:{node.lineno}: config.{node.attr} is used before it is set")
        return values[node.attr]
    raise SystemExit(f"{path}:{node.lineno}: cannot read `{ast.unparse(node)}`: only literals and arithmetic "
                     "on earlier config values are read from an arcface_torch config")


def _check_size(node: ast.BinOp, left: Any, right: Any, path: str) -> None:
    """Refuses, before it is made, a value past :data:`LARGEST_SEQUENCE` items or :data:`LARGEST_INT_BITS`."""
    sequence, size = (str, bytes, list, tuple), 0
    integers = all(isinstance(v, int) for v in (left, right))
    if isinstance(node.op, ast.Mult):
        for items, times in ((left, right), (right, left)):
            if isinstance(items, sequence) and isinstance(times, int):
                size = len(items) * times
        bits = left.bit_length() + right.bit_length() if integers else 0
    elif isinstance(node.op, ast.Add) and isinstance(left, sequence) and isinstance(right, sequence):
        size, bits = len(left) + len(right), 0
    else:  # (a power of an integer: its bits; a negative power is a float)
        bits = left.bit_length() * right if isinstance(node.op, ast.Pow) and integers and abs(left) > 1 else 0
    if size > LARGEST_SEQUENCE or bits > LARGEST_INT_BITS:
        raise SystemExit(f"{path}:{node.lineno}: `{ast.unparse(node)}` would be larger than a config holds (at most "
                         f"{LARGEST_SEQUENCE} items, or integers of {LARGEST_INT_BITS} bits): not read")


def _spend(names: dict[str, Any], steps: int, node: ast.AST, path: str) -> None:
    """Counts ``steps`` of an lr_func's evaluation, refusing one past :data:`LR_FUNC_STEPS` in all."""
    left = names[_STEPS_LEFT]
    left[0] -= steps
    if left[0] < 0:
        raise SystemExit(f"{path}:{node.lineno}: config.lr_func takes more than {LR_FUNC_STEPS} steps to read for "
                         "its epochs (a long or nested list comprehension, or that many epochs): only older "
                         "arcface_torch's lr_step_func shape is read; give the schedule as --lr-steps or --lr-epochs")


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
    step_schedule = _step_schedule(config, path, batch * world_size, passes, warmup_steps, max_steps, lr)
    if step_schedule is not None:
        lr_steps, warmup_steps, lr, schedule_ignored = step_schedule
    elif warmup_steps < 0:
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
        "lr-schedule": "poly" if step_schedule is None else "step", "max-steps": max_steps,
        "warmup-steps": warmup_steps, "lr-steps": None if step_schedule is None else lr_steps,
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
    ignored += [] if step_schedule is None else schedule_ignored
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


def _step_schedule(config: dict[str, Any], path: str, total_batch: int, passes: int, warmup_steps: int,
                   max_steps: int, lr: float) -> tuple[list[int], int, float, list[str]] | None:
    """Older arcface_torch's step schedule (its train.py), where the config has one: ``--lr-steps``,
    ``--warmup-steps`` and ``--lr`` for it, and what of it is ignored; None where it has none.

    train.py took its learning rate as ``lr / 512 * batch_size * world_size`` and multiplied it by 0.1 at
    each of ``config.decay_epoch``, at ``epoch * num_image // (batch_size * world_size)`` steps, after a
    linear warm-up of ``warmup_epoch`` (none when negative); earlier, by ``config.lr_func(epoch)`` for each
    epoch (LambdaLR stepped once an epoch), its own warm-up inside."""
    decay_epoch, lr_func = config.get("decay_epoch"), config.get("lr_func")
    if decay_epoch is None and lr_func is None:
        return None
    num_image, num_epoch = int(config["num_image"]), int(config["num_epoch"])
    lr *= total_batch / STEP_SCHEDULE_BATCH
    ignored: list[str] = []
    if decay_epoch is not None:
        if not (isinstance(decay_epoch, (list, tuple)) and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) for e in decay_epoch)):
            raise SystemExit(f"{path}: config.decay_epoch = {reprlib.repr(decay_epoch)}: a list of epochs expected "
                             "([8, 14])")
        decays = [(e, int(e * num_image // total_batch) // passes) for e in decay_epoch]
        warmup_steps = max(0, warmup_steps)  # (train.py: `current_step < warmup_step` never holds below 0)
        key, given = "config.decay_epoch", f"config.decay_epoch {list(decay_epoch)}"
        if lr_func is not None:
            ignored.append("lr_func (train.py of decay_epoch's time read decay_epoch alone)")
    else:
        if not isinstance(lr_func, LrFunction):
            raise SystemExit(f"{path}: config.lr_func = {reprlib.repr(lr_func)}: a function of the epoch expected "
                             "(def lr_step_func(epoch): ...)")
        decays, warmup_epochs = _lr_func_decays(lr_func, config, path, num_epoch)
        steps_per_epoch = num_image // total_batch
        decays = [(e, e * steps_per_epoch // passes) for e in decays]
        warmup_steps = warmup_epochs * steps_per_epoch // passes
        key = "config.lr_func"
        given = f"config.lr_func ({lr_func.name}: x 0.1 from epoch{'s' if len(decays) != 1 else ''} " \
                f"{', '.join(str(e) for e, _ in decays) or 'none'} of 0-{num_epoch - 1})"
        if warmup_epochs:
            shape = ", ".join(f"{lr_func(e, config):.3g}" for e in range(warmup_epochs))
            ignored.append(f"lr_func's warm-up shape ({shape} of lr in epochs 0-{warmup_epochs - 1}, one value an "
                           f"epoch; linear over its {warmup_steps} steps here)")
    steps = [step for _, step in decays]
    lr *= 0.1 ** sum(step < 1 for step in steps)  # (a decay from the first step: a lower rate)
    lr_steps = sorted(step for step in steps if step >= 1)
    counts = collections.Counter(steps)  # (not steps.count: a crafted [8] * 10 ** 5 took hours)
    twice = sorted({(epoch, step) for epoch, step in decays if step >= 1 and counts[step] > 1})
    if twice:
        raise SystemExit(f"{path}: {key} divides the learning rate by 10 more than once at one step (epoch "
                         f"{twice[0][0]}, step {twice[0][1]}), which --lr-steps cannot: give --lr-steps and --lr")
    if not lr_steps:  # (no decay within the run: the base rate throughout)
        lr_steps = [max_steps]
    _note(f"{path}: {given} is older arcface_torch's step schedule (its train.py: lr x 0.1 at each, after the "
          f"warm-up, from lr x batch_size x world_size / {STEP_SCHEDULE_BATCH}): --lr-schedule step --lr-steps "
          f"{','.join(map(str, lr_steps))} --warmup-steps {warmup_steps} --lr {lr:.6g}")
    return lr_steps, warmup_steps, lr, ignored


def _lr_func_decays(lr_func: LrFunction, config: dict[str, Any], path: str, num_epoch: int) -> tuple[list[int], int]:
    """The epochs from which ``lr_func`` multiplies by 0.1 once more (an epoch twice for 0.01), and the
    epochs of its warm-up before them: older arcface_torch's lr_step_func, ``((epoch + 1) / (4 + 1)) ** 2
    if epoch < config.warmup_epoch else 0.1 ** len([m for m in [11, 17, 22] if m - 1 <= epoch])``. Any
    other shape is refused, naming the epoch where it departs."""
    multipliers = []
    for epoch in range(num_epoch):
        value = lr_func(epoch, config)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SystemExit(f"{path}: config.lr_func({epoch}) = {reprlib.repr(value)}: a number expected")
        multipliers.append(float(value))

    def decays(value: float) -> int | None:  # k where value is 0.1 ** k
        k = round(-math.log10(value)) if value > 0 else -1
        return k if k >= 0 and math.isclose(value, 0.1 ** k, rel_tol=1e-9) else None

    warmup = 0  # (rising, below 1, before the first power of 0.1)
    while (warmup < num_epoch and decays(multipliers[warmup]) is None and 0 < multipliers[warmup] < 1
           and (warmup == 0 or multipliers[warmup] > multipliers[warmup - 1])):
        warmup += 1
    epochs, before = [], 0
    for epoch in range(warmup, num_epoch):
        k = decays(multipliers[epoch])
        if k is None or k < before:
            raise SystemExit(f"{path}: config.lr_func({epoch}) = {multipliers[epoch]:g}: only older arcface_torch's "
                             "step shape is read, a rising warm-up then 0.1 ** (decays so far) for each epoch; give "
                             "this schedule as --lr-steps or --lr-epochs (and --warmup-steps)")
        epochs += [epoch] * (k - before)
        before = k
    if warmup == num_epoch:
        raise SystemExit(f"{path}: config.lr_func warms up for all {num_epoch} epochs: only older arcface_torch's step "
                         "shape is read, a rising warm-up then 0.1 ** (decays so far) for each epoch")
    return epochs, warmup
