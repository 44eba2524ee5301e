"""The run's figures, as PNG files in its output folder: the loss curve, verification accuracy
over steps, and the distribution of the target angle θ at the start, middle and end of
training (the ArcFace paper's picture of the margin at work).

The trainer draws them when a run ends. ``python -m train.plots RUN`` draws them again from what the
run folder holds: a run still training (its logs so far, the angles of its last checkpoint), one
stopped before its end, or one trained with ``--no-plots``."""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any

LOSS_PNG, VERIFICATION_PNG, ANGLE_PNG = "loss.png", "verification.png", "target_angle.png"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, extension: str = "png", together=None) -> None:
    """``fig`` at ``path`` in the format of ``extension``, written whole or not at all (a figure redrawn
    while a viewer reads it, or a stop mid-write, leaves the previous one); with ``together`` (a
    ``checkpoint.written_together()`` block's files), renamed into place with the others of that block."""
    from .checkpoint import write_atomic

    fig.tight_layout()
    if together is None:
        write_atomic(path, lambda f: fig.savefig(f, format=extension, dpi=120))
    else:
        together.write(path, lambda f: fig.savefig(f, format=extension, dpi=120))


def plot_loss(metrics: list[dict[str, Any]], path: str) -> None:
    plt = _pyplot()
    steps = [r["step"] for r in metrics]
    # A lone point (a run stopped after its first --log-every steps) is a line of no length: a marker shows it.
    marker = "o" if len(steps) == 1 else None
    # A run with --teacher logs its distillation term beside the margin loss, on another scale: a panel below.
    distilled = [r for r in metrics if isinstance(r.get("distill"), (int, float))]
    if distilled:
        fig, (ax, distill_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                               gridspec_kw={"height_ratios": (2, 1)})
        distill_ax.plot([r["step"] for r in distilled], [r["distill"] for r in distilled], color="tab:green", lw=1.5,
                        marker="o" if len(distilled) == 1 else None)
        distill_ax.set_ylabel("distill", color="tab:green")
        distill_ax.set_title("distillation term (--teacher), before its weight")
        distill_ax.set_xlabel("step")
        distill_ax.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_xlabel("step")
    ax.plot(steps, [r["loss"] for r in metrics], color="tab:blue", lw=1.5, marker=marker)
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in metrics], color="tab:gray", lw=1, ls="--", marker=marker and "x")
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    ax.set_title("training loss (solid) and learning rate (dashed)")
    _save(fig, path)
    plt.close(fig)


def plot_verification(records: list[dict[str, Any]], path: str) -> None:
    plt = _pyplot()
    by_target = defaultdict(list)
    for r in records:
        by_target[r["target"]].append(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    for target, rows in sorted(by_target.items()):
        rows.sort(key=lambda r: r["step"])
        ax.errorbar([r["step"] for r in rows], [100 * r["accuracy"] for r in rows],
                    yerr=[100 * r["accuracy_std"] for r in rows], marker="o", ms=4, capsize=3, label=target)
    ax.axhline(50, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("verification accuracy (%), 10-fold mean ± std")
    ax.set_ylim(top=100)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_target_angles(angles, path: str) -> None:
    """``angles``: a :class:`train.trainer.TargetAngles`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"start": "tab:blue", "middle": "tab:orange", "end": "tab:green"}
    for phase, colour in colours.items():
        degrees = angles.degrees(phase)
        if degrees.numel() == 0:
            continue
        lo, hi = angles.windows[phase]
        ax.hist(degrees.numpy(), bins=90, range=(0, 180), density=True, histtype="stepfilled", alpha=0.35,
                color=colour, label=f"{phase} (steps {lo}-{hi - 1}): mean {degrees.mean():.1f}°")
    ax.axvline(90, color="gray", lw=0.8, ls=":")
    ax.set_xlim(0, 120)
    ax.set_xlabel("θ between embedding and its class centre (degrees)")
    ax.set_ylabel("density")
    ax.set_title("target angle distribution")
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def write_plots(output: str, angles, into: str | None = None) -> list[str]:
    """Draw every figure the run's logs in ``output`` allow, into ``into`` (default ``output``);
    ``angles``: a :class:`train.trainer.TargetAngles`, or None. Returns the files written."""
    if _pyplot() is None:
        print("note: matplotlib is not installed; no plots written (pip install matplotlib)", file=sys.stderr)
        return []
    into = output if into is None else into
    written = []
    metrics = _logged(os.path.join(output, "metrics.jsonl"), ("step", "loss", "lr"))
    if metrics:
        plot_loss(metrics, os.path.join(into, LOSS_PNG))
        written.append(LOSS_PNG)
    records = _logged(os.path.join(output, "verification.jsonl"), ("step", "target", "accuracy", "accuracy_std"))
    if records:
        plot_verification(records, os.path.join(into, VERIFICATION_PNG))
        written.append(VERIFICATION_PNG)
    if angles is not None and any(angles.degrees(phase).numel() for phase in angles.windows):
        plot_target_angles(angles, os.path.join(into, ANGLE_PNG))
        written.append(ANGLE_PNG)
    return [os.path.join(into, name) for name in written]


def _logged(path: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records of a run's log with the ``keys`` a figure draws; ValueError naming the line of one
    without them (a file this trainer did not write). A last line cut short is left out, with a note."""
    from .trainer import read_jsonl

    records = read_jsonl(path)
    if os.path.exists(path):
        with open(path, "rb") as f:  # (as read_jsonl reads it: a torn last line may not be UTF-8)
            if sum(1 for line in f if line.strip()) > len(records):
                print(f"note: the last line of {path} is not JSON (a write cut short): left out", file=sys.stderr)
    for number, record in enumerate(records, 1):
        missing = [key for key in keys if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(f"{path}: record {number} has no {', '.join(repr(key) for key in missing)} "
                             "(not a log of this trainer?)")
    return records


class SavedAngles:
    """The target angles a checkpoint holds (``TargetAngles.state_dict``), for :func:`plot_target_angles`."""

    def __init__(self, state: dict[str, Any]):
        self.windows = {phase: tuple(window) for phase, window in state["windows"].items()}
        self._degrees = state["degrees"]

    def degrees(self, phase: str):
        return self._degrees[phase]


def saved_angles(run: str) -> SavedAngles | None:
    """The angles of ``run``'s checkpoint (those gathered up to its step); None without a checkpoint
    or one that holds none (a note says why when it does not load)."""
    from . import checkpoint

    path = os.path.join(run, checkpoint.CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        state = checkpoint.load(path, mmap=True)  # (only the angles are read: the weights stay on disk)
    except (OSError, ValueError) as error:  # (ValueError names the file)
        print(f"note: {ANGLE_PNG} not drawn: {error}", file=sys.stderr)
        return None
    try:
        return SavedAngles(state["target_angles"])
    except (KeyError, TypeError) as error:
        print(f"note: {path} holds no target angles ({type(error).__name__}: {error}); no {ANGLE_PNG}", file=sys.stderr)
    return None


def plot_ijb(path: str, title: str, roc=None, identification=None) -> None:
    """IJB-B/C curves, as ``train.ijb --plot`` draws them: ``roc`` (FARs, TARs) of 1:1 verification,
    and ``identification`` {gallery: (FPIRs, TPIRs)} of 1:N, each against a log-scale x axis. Written
    atomically; the format follows the file's extension (png, pdf, svg)."""
    plt = _pyplot()
    panels = [p for p in (roc, identification) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if roc:
        ax = axes.pop(0)
        ax.plot(roc[0], [100 * t for t in roc[1]], lw=1.5, drawstyle="steps-post")
        ax.set_xlabel("false accept rate (FAR)")
        ax.set_ylabel("true accept rate (TAR, %)")
        ax.set_title(f"{title} 1:1 verification")
    if identification:
        ax = axes.pop(0)
        for gallery, (fpirs, tpirs) in identification.items():
            ax.plot(fpirs, [100 * t for t in tpirs], lw=1.5, label=gallery, drawstyle="steps-post")
        ax.set_xlabel("false positive identification rate (FPIR)")
        ax.set_ylabel("true positive identification rate (TPIR, %)")
        ax.set_title(f"{title} 1:N identification, open set")
        ax.legend()
    for ax in fig.axes:
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, which="both")
    _save(fig, path, os.path.splitext(path)[1].lstrip(".").lower() or "png")
    plt.close(fig)


def plot_erc(path: str, curves: dict, max_reject: float, title: str, together=None) -> None:
    """Error-versus-reject characteristics, as ``train.tools.quality --pairs`` draws them: a panel an FMR,
    in it the FNMR against the share of pairs rejected of each ordering of ``curves`` ({(ordering, FMR):
    FNMR after rejecting k of the P pairs, k = 0..P}), random rejection and the oracle drawn apart; the
    range of the area reported (0 to ``max_reject``) shaded. Written atomically (``together``: see :func:`_save`)."""
    plt = _pyplot()
    fmrs = sorted({fmr for _, fmr in curves})
    fig, axes = plt.subplots(1, len(fmrs), figsize=(6 * len(fmrs), 4.5), squeeze=False)
    styles = {"random": dict(color="tab:gray", ls="--"), "oracle": dict(color="black", ls=":")}
    for ax, fmr in zip(axes[0], fmrs):
        for (name, at), fnmr in curves.items():
            if at == fmr:
                ax.plot([k / (len(fnmr) - 1) for k in range(len(fnmr))], [100 * v for v in fnmr], lw=1.5, label=name,
                        **styles.get(name, {}))
        ax.axvspan(0, max_reject, color="tab:blue", alpha=0.06)
        ax.set_xlabel("share of pairs rejected, lowest quality first")
        ax.set_ylabel("FNMR of the pairs left (%)")
        ax.set_title(f"{title}: ERC at FMR {fmr:.3g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    try:
        if together is None:
            _save(fig, path)
        else:
            _save(fig, path, together=together)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from .signals import readers_may_leave

    from .tools import taking_back_folders

    with readers_may_leave():  # (its reader gone, 2>&1 | head: its first line raised, exit status 120)
        return taking_back_folders(lambda: _main(argv))  # (a new --output of a failed or stopped drawing: none left)


def _main(argv: list[str] | None) -> int:
    from .signals import Stopped, stop_on_signals, stop_while_importing
    from .tools import ArgumentParser, folders_missing, made_for_outputs, path_arg

    p = ArgumentParser(prog="python -m train.plots", name="plots", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=path_arg,
                   help="a run's --output folder (its metrics.jsonl, verification.jsonl and checkpoint.pt)")
    p.add_argument("--output", type=path_arg, default=None,
                   help=f"the folder the figures go to (default: the run folder); there, {LOSS_PNG}, "
                   f"{VERIFICATION_PNG} or {ANGLE_PNG} already present are kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the figures in --output")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run):
        p.error(f"{args.run}: not a folder (a run's --output)")
    if args.output is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        p.error(f"--output {args.output}: not a folder")
    with stop_while_importing(__name__, "plots: "):  # (matplotlib and torch: seconds)
        plt = _pyplot()
        from train.checkpoint import check_output_folder
    if plt is None:
        print("plots: error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    into = args.run if args.output is None else args.output
    # Found before any drawing (was "[Errno 13] Permission denied: '<folder>/.loss.png...tmp'", or Errno 20).
    try:
        check_output_folder(into, f"--output {into}" if args.output is not None else into)
    except ValueError as error:
        p.error(str(error))
    if args.output is not None and not args.overwrite and os.path.realpath(into) != os.path.realpath(args.run):
        present = [name for name in (LOSS_PNG, VERIFICATION_PNG, ANGLE_PNG) if os.path.exists(os.path.join(into, name))]
        if present:
            p.error(f"--output {into} holds {', '.join(present)}: kept (--overwrite replaces them)")
    made_for_outputs(folders_missing(into))  # (made by the first figure's write)
    try:
        with stop_on_signals():  # (each figure is written whole or not at all)
            written = write_plots(args.run, saved_angles(args.run), into=into)
    except (OSError, ValueError) as error:  # (ValueError: a log's broken line too, trainer.LogUnreadable)
        print(f"plots: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"\nplots: stopped by {stop.name}", file=sys.stderr)
        return stop.exit_status
    if not written:
        print(f"plots: error: {args.run}: nothing to draw (no logged step in metrics.jsonl, no verification in "
              "verification.jsonl, no target angles in checkpoint.pt)", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
