"""The run's figures, as PNG files in its output folder: the loss curve, verification accuracy
over steps, and the distribution of the target angle θ at the start, middle and end of
training (the ArcFace paper's picture of the margin at work)."""

from __future__ import annotations

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


def plot_loss(metrics: list[dict[str, Any]], path: str) -> None:
    plt = _pyplot()
    steps = [r["step"] for r in metrics]
    # A lone point (a run stopped after its first --log-every steps) is a line of no length: a marker shows it.
    marker = "o" if len(steps) == 1 else None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in metrics], color="tab:blue", lw=1.5, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in metrics], color="tab:gray", lw=1, ls="--", marker=marker and "x")
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    ax.set_title("training loss (solid) and learning rate (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(output: str, angles) -> list[str]:
    """Draw every figure the run's logs allow; returns the files written."""
    from .trainer import read_jsonl

    if _pyplot() is None:
        print("note: matplotlib is not installed; no plots written (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    metrics = read_jsonl(os.path.join(output, "metrics.jsonl"))
    if metrics:
        plot_loss(metrics, os.path.join(output, LOSS_PNG))
        written.append(LOSS_PNG)
    records = read_jsonl(os.path.join(output, "verification.jsonl"))
    if records:
        plot_verification(records, os.path.join(output, VERIFICATION_PNG))
        written.append(VERIFICATION_PNG)
    if any(angles.degrees(phase).numel() for phase in angles.windows):
        plot_target_angles(angles, os.path.join(output, ANGLE_PNG))
        written.append(ANGLE_PNG)
    return [os.path.join(output, name) for name in written]


def plot_ijb(path: str, title: str, roc=None, identification=None) -> None:
    """IJB-B/C curves, as ``train.ijb --plot`` draws them: ``roc`` (FARs, TARs) of 1:1 verification,
    and ``identification`` {gallery: (FPIRs, TPIRs)} of 1:N, each against a log-scale x axis. Written
    atomically; the format follows the file's extension (png, pdf, svg)."""
    from .checkpoint import write_atomic

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
    fig.tight_layout()
    extension = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=extension, dpi=120))
    plt.close(fig)
