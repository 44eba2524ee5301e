"""``python -m train.verify``: a model's verification accuracy on LFW, CFP-FP, AgeDB-30 and the other
sets of insightface's ``.bin`` format (or pairs lists, LFW's ``pairs.txt``, CALFW's and CPLFW's pair files,
RFW's four races), measured as training measures it.

    python -m train.verify --model MODEL --data FOLDER [--targets lfw,cfp_fp,agedb_30]
    python -m train.verify --model MODEL --targets /data/lfw.bin,pairs.txt
    python -m train.verify --model MODEL --targets /data/RFW

MODEL is what ``train.embed`` takes: a training checkpoint, ``train.export``'s ``backbone.pt`` or
``backbone.onnx``, insightface's ``backbone.pth`` or its released ONNX models. Each pair is scored as
``train.verification`` scores it (embedding(image) + embedding(mirrored image), L2-normalised; 10-fold
accuracy, each fold judged at the squared-distance threshold best on the other nine), which is
insightface's ``Accuracy-Flip``. RFW's four races are followed by their summary (``train.rfw``): the
mean of their accuracies, their standard deviation and the skewed error ratio.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import warnings

from .signals import run_tool, signals_held, stop_while_importing  # (the standard library only)

with stop_while_importing(__name__, "verify: "):
    from . import checkpoint, rfw
    from .data import SYNTHETIC, build_verification_sets, data_folders, find_target, is_target_path
    from .embed import AMP_HELP, add_amp_option, load_model, refuse_amp_of_an_onnx_model, run_options, set_amp
    from .tools import ArgumentParser, check_outputs, path_arg, torch_device
    from .verification import evaluate, read_pairs_list

DEFAULT_TARGETS = ("lfw", "cfp_fp", "agedb_30")


def _targets(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m train.verify", name="verify", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=path_arg, required=True,
                   help="a training checkpoint, backbone.pt or backbone.onnx from python -m train.export, "
                   "insightface's backbone.pth or arcface_torch's checkpoint_gpu_<rank>.pt, or an ONNX model")
    p.add_argument("--data", type=path_arg, default=None,
                   help="the folder a target's name is looked for in (<data>/<name>.bin, a training set's folder "
                   "as insightface ships them; a training list file (.lst, .txt): its folder, as the trainer's "
                   "--data takes it; several separated by commas, as a run's --data a,b: each one's folder in turn); "
                   "'synthetic' for the demo's synthetic sets")
    p.add_argument("--targets", type=_targets, default=None,
                   help=f"names (with --data; default {','.join(DEFAULT_TARGETS)}) or paths of .bin files and "
                   "pairs files: a pairs list (image1 image2 0|1 a line), LFW's pairs.txt over <its folder>/<name>/"
                   "<name>_<NNNN>.jpg, CALFW's or CPLFW's pair file over its folder's images; or RFW's folder "
                   "(test/txts/<Race>/<Race>_pairs.txt and test/data/, or the four <Race>_test.bin): its four "
                   "races, then their mean, std and skewed error ratio")
    p.add_argument("--seed", type=int, default=None,
                   help="with --data synthetic: the training run's --seed (default: a checkpoint's own, else 0)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, cuda, cuda:1, mps, xpu, ... (default: cpu)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                   help="images per forward pass (twice as many rows with the mirror; default: 64)")
    add_amp_option(p, AMP_HELP)
    p.add_argument("--output", type=path_arg, default=None, help="also write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it exists; without it it is kept")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.seed is not None and args.seed < 0:  # (was numpy's "expected non-negative integer")
        p.error(f"--seed must be at least 0, got {args.seed}")
    if args.seed is not None and args.data != SYNTHETIC:  # (was taken without a word)
        p.error("--seed goes with --data synthetic: it draws the synthetic sets")
    targets = args.targets or (["synthetic"] if args.data == SYNTHETIC else list(DEFAULT_TARGETS))
    if args.data is None and not args.targets:
        p.error(f"name the sets: --data FOLDER (holding {', '.join(t + '.bin' for t in DEFAULT_TARGETS)}) or "
                "--targets with paths")
    names = [t for t in targets if not is_target_path(t)]
    if args.data is None and names:
        folder = f" ({names[0]} is a folder here: write its path, ./{names[0]})" if os.path.isdir(names[0]) else ""
        p.error(f"--targets {names[0]}: a name is looked for in --data FOLDER; pass --data, or the path of a .bin "
                f"or pairs list or of RFW's folder{folder}")
    # Ctrl-C and SIGTERM: a one-line stop, --output written whole or not at all.
    return run_tool(lambda: run(args, targets), tool="verify", errors=(OSError, ValueError, pickle.UnpicklingError),
                    whole=f": {args.output} was written" if args.output else ": nothing written",
                    said=None if args.output else lambda stop: "")


def run(args: argparse.Namespace, targets: list[str]) -> int:
    """``main`` after parsing; raises OSError or ValueError naming what is at fault."""
    device = torch_device(args.device)
    refuse_amp_of_an_onnx_model(args.amp, args.model)
    if args.output:
        # Not the model, its settings, a set it reads (found as the sets are; of an RFW folder, its pairs and
        # landmarks files), an image a pairs list names, nor an image's name in a pairs list's folder (or under
        # an RFW folder's data/).
        found = [find_target(data_folders(args.data) if args.data else None, t, "--targets") for t in targets]
        files = [f for f in found if f and not os.path.isdir(f)]
        releases = [rfw.find_release(f) for f in found if f and os.path.isdir(f)]
        lists = [f for f in files if not f.endswith(".bin")]
        images = [path for f in lists for pair in read_pairs_list(f)[0] for path in pair]
        check_outputs([args.output], args.overwrite,
                      inputs=(args.model, checkpoint.settings_path(args.model), *files,
                              *(f for r in releases for f in r.files()), *images),
                      image_folders=tuple(os.path.dirname(os.path.abspath(f)) for f in lists)
                      + tuple(folder for r in releases for folder in r.image_folders()))
    folders = data_folders(args.data) if args.data else []  # (several: a training run's --data a,b)
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--data {args.data} is not a folder{checkpoint.dangling(folder)}"
                                    if len(folders) == 1 else
                                    f"--data {args.data}: {folder} is not a folder{checkpoint.dangling(folder)}")
    model, settings = load_model(args.model, device)
    size = settings["image_size"]
    run_args = _run_args(args.model)
    # (on any device, fp16 too: the run's own figures come on its device type)
    set_amp(model, args.amp, args.model, run_args, done="verified",
            figures="on the run's device type, its figures; ")
    if getattr(model, "amp", "none") == "fp16" and device.type == "cpu":
        # Kept, where the tools that embed refuse it or embed in fp32 (5-30x slower, vit_t to r18): said, as the
        # trainer says it of a CPU run under fp16 (the default command on an fp16 run's checkpoint said nothing).
        print("note: --amp fp16 on the CPU runs several times slower than fp32 (torch's CPU fp16 convolutions); "
              "--amp bf16 or none for speed", file=sys.stderr)
    seed = args.seed if args.seed is not None else 0
    if args.data == SYNTHETIC and args.seed is None and not all(map(is_target_path, targets)):  # (paths alone: none)
        run_seed = run_args.get("seed") if isinstance(run_args.get("seed"), int) else None
        seed = run_seed if run_seed is not None else 0
        print(f"synthetic sets of --seed {seed}"
              + (" (the run's)" if run_seed is not None else " (the model holds no run's: pass it with --seed)"),
              file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sets = build_verification_sets(args.data or "", targets, image_size=size, seed=seed, flag="--targets")
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    if not sets:
        raise FileNotFoundError(f"none of {', '.join(targets)} found in --data {args.data}")

    model = model.to(device)
    results = {}
    print(f"{args.model}: {settings['network']}, {settings['embedding_size']}-D, {size}px, on {device}", flush=True)
    for name, vset in sets.items():
        started = time.monotonic()
        bar = _progress(vset.images.shape[0], name)
        try:
            result = evaluate(model, vset, device=device, batch_size=args.batch_size,
                              on_batch=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        result = {k: float(v) for k, v in result.items()}
        result["pairs"] = int(vset.num_pairs)
        results[name] = result
        # A graph that normalises its output has no feature norm to show (xnorm is 1 by construction).
        xnorm = "" if settings.get("unit_length") else f", xnorm {result['xnorm']:.2f}"
        print(f"{name}: accuracy {result['accuracy']:.4f} ± {result['accuracy_std']:.4f} (threshold "
              f"{result['threshold']:.3f}{xnorm}; {vset.num_pairs} pairs, {time.monotonic() - started:.1f} s)",
              flush=True)
    summaries = rfw.summaries(rfw.grouped_accuracies(sets, results))
    for group, summary in summaries.items():
        print(rfw.summary_line(group, summary), flush=True)
    if args.output:
        record = {"model": args.model, "image_size": size, "network": settings["network"], "targets": results}
        if summaries:
            record["summaries"] = summaries
        with signals_held():
            checkpoint.write_json_atomic(args.output, record)
        print(f"wrote {args.output}")
    return 0


def _progress(total: int, name: str):
    """A bar of a set's images on a terminal, gone when done (the result line follows)."""
    from .progress import progress_bar

    return progress_bar(total, name, "image", leave=False)


def _run_args(path: str) -> dict:
    """The options of the run whose training checkpoint ``path`` is; {} for other models."""
    return run_options(path)[0]


if __name__ == "__main__":
    sys.exit(main())
