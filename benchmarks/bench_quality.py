"""Does the feature norm rank face image quality? ``python -m train.tools.quality`` on synthetic faces
of people the demo did not train on, a share of them degraded in known ways (Gaussian blur, downscale then
upscale, an occluding patch, Gaussian noise), for the demo's model trained with ``--loss arcface`` and
with ``--loss magface``: the area under the error-versus-reject characteristic (ERC) of the norm as the
quality against random rejection, the oracle and the known degradations as a quality (``--quality-file``),
and how many of the faces of lowest norm are the degraded ones.

    python benchmarks/bench_quality.py --runs runs/quality-bench \\
        --output benchmarks/results/<machine>-quality-<date>.json

Models that are not under ``--runs/<loss>/checkpoint.pt`` are trained there first (``python -m train
--loss <loss>``, the demo's 300 steps on synthetic faces, about 75 s each on 2 CPU cores); ``--arcface``
and ``--magface`` take models trained elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_loss import git_sha  # noqa: E402
from train import checkpoint  # noqa: E402
from train.data.synthetic import render_face  # noqa: E402
from train.tools import quality, summary_path  # noqa: E402

FIRST_PERSON = 5000  # the demo trains on synthetic identities 0..99
DEGRADATIONS = ("blur", "downscale", "occlusion", "noise")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (uint8 H x W x 3) degraded: ``blur`` Gaussian of radius 2 px at 64 px; ``downscale`` to a
    quarter of its side and back (bilinear); ``occlusion`` a grey square of 40% of the side over the face's
    middle; ``noise`` Gaussian of sigma 25 levels."""
    size = image.shape[0]
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(2 * size / 64)))
    if kind == "downscale":
        small = Image.fromarray(image).resize((size // 4, size // 4), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR))
    if kind == "occlusion":
        side = int(0.4 * size)
        top, left = rng.integers(size // 4, size - side - size // 8, 2)
        out = image.copy()
        out[top:top + side, left:left + side] = 128
        return out
    noisy = image.astype(np.float64) + rng.normal(0, 25, image.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def make_set(root: str, people: int, faces: int, share: float, impostors: int, image_size: int, seed: int
             ) -> tuple[str, dict[str, str]]:
    """``root/personNNN/NN.png``: ``faces`` faces of each of ``people`` synthetic people, each degraded
    with probability ``share`` by one of DEGRADATIONS; a pairs list of each person's faces two by two
    (genuine) and ``impostors`` pairs of two people's faces, in random order. Returns (the pairs list,
    {image: its degradation, "" for none})."""
    rng = np.random.default_rng(seed)
    kinds = {}
    for person in range(people):
        folder = os.path.join(root, f"person{person:03d}")
        os.makedirs(folder)
        for sample in range(faces):
            image = render_face(0, FIRST_PERSON + person, sample, image_size)
            kind = DEGRADATIONS[rng.integers(len(DEGRADATIONS))] if rng.random() < share else ""
            if kind:
                image = degrade(image, kind, rng)
            name = f"person{person:03d}/{sample:02d}.png"
            Image.fromarray(image).save(os.path.join(root, name))
            kinds[name] = kind
    lines = [f"person{p:03d}/{s:02d}.png person{p:03d}/{s + 1:02d}.png 1"
             for p in range(people) for s in range(0, faces - 1, 2)]
    for _ in range(impostors):
        a, b = rng.choice(people, 2, replace=False)
        lines.append(f"person{a:03d}/{rng.integers(faces):02d}.png person{b:03d}/{rng.integers(faces):02d}.png 0")
    pairs = os.path.join(root, "pairs.txt")
    with open(pairs, "w") as f:
        f.writelines(lines[i] + "\n" for i in rng.permutation(len(lines)))
    return pairs, kinds


def model_for(loss: str, given: str | None, runs: str, steps: int) -> tuple[str, list[str] | None]:
    """The checkpoint of ``loss``'s model: ``given``, else ``runs/<loss>/checkpoint.pt``, trained there first
    when it is not (the command returned)."""
    if given:
        return given, None
    path = os.path.join(runs, loss, "checkpoint.pt")
    command = [sys.executable, "-m", "train", "--loss", loss, "--output", os.path.join(runs, loss), "--max-steps",
               str(steps), "--no-plots", "--no-tensorboard"]
    if not os.path.isfile(path):
        print(f"training {loss}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return path, command[1:]


def detection(kinds: dict[str, str], rows: list[list[str]]) -> dict:
    """How the norm ranks the degraded faces: their share among the lowest 10% and 25% (against their
    share of all), the chance that a degraded face scores below a clean one (AUROC, ties half), and each
    kind's median norm and median rank (as a share: 0 lowest)."""
    names = [r[0] for r in rows]
    norm = np.array([float(r[1]) for r in rows])
    degraded = np.array([bool(kinds[n]) for n in names])
    order = np.argsort(norm, kind="stable")
    rank = np.empty(len(norm))
    rank[order] = np.arange(len(norm)) / (len(norm) - 1)
    result = {"faces": len(names), "degraded": int(degraded.sum()), "degraded_share": float(degraded.mean())}
    for share in (0.1, 0.25):
        lowest = order[:int(share * len(norm))]
        result[f"degraded_among_lowest_{int(100 * share)}pct"] = float(degraded[lowest].mean())
    below = (norm[degraded][:, None] < norm[~degraded][None, :]).mean()
    ties = (norm[degraded][:, None] == norm[~degraded][None, :]).mean()
    result["auroc_degraded_below_clean"] = float(below + ties / 2)
    result["by_kind"] = {kind or "none": {"faces": int(sum(kinds[n] == kind for n in names)),
                                        "median_norm": float(np.median(norm[[kinds[n] == kind for n in names]])),
                                        "median_rank": float(np.median(rank[[kinds[n] == kind for n in names]]))}
                         for kind in ("",) + DEGRADATIONS}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/quality-bench", help="where the models are, or are trained")
    p.add_argument("--arcface", default=None, help="a model trained with --loss arcface (else trained under --runs)")
    p.add_argument("--magface", default=None, help="a model trained with --loss magface (else trained under --runs)")
    p.add_argument("--steps", type=int, default=300, help="training steps of a model trained here (the demo's 300)")
    p.add_argument("--people", type=int, default=300, help="synthetic people of the verification set")
    p.add_argument("--faces", type=int, default=4, help="faces of each person (genuine pairs: two by two)")
    p.add_argument("--degraded", type=float, default=0.25, help="the share of faces degraded")
    p.add_argument("--impostors", type=int, default=3000, help="impostor pairs")
    p.add_argument("--fmr", default="0.001,0.01", help="the FMRs of the ERC's threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the results as JSON")
    args = p.parse_args()
    sha = git_sha()
    started = time.monotonic()
    models = {loss: model_for(loss, getattr(args, loss), args.runs, args.steps) for loss in ("arcface", "magface")}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        sizes = {quality.load_model(path, "cpu")[1]["image_size"] for path, _ in models.values()}
        if len(sizes) != 1:
            raise SystemExit(f"the two models take different image sizes: {sorted(sizes)}")
        faces = os.path.join(work, "faces")
        pairs, kinds = make_set(faces, args.people, args.faces, args.degraded, args.impostors, sizes.pop(), args.seed)
        # The known degradations as a quality score: clean faces above degraded ones, ties in random order.
        rng = np.random.default_rng(args.seed + 1)
        known = os.path.join(work, "degradations.csv")
        with open(known, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "quality"])
            writer.writerows([name, f"{(0 if kind else 1) + 0.5 * rng.random():.6f}"] for name, kind in kinds.items())
        for loss, (path, trained) in models.items():
            scores = os.path.join(work, f"{loss}-quality.csv")
            assert quality.main(["--model", path, "--images", faces, "--output", scores, "--workers", "0"]) == 0
            with open(scores, newline="") as f:
                found = detection(kinds, list(csv.reader(f))[1:])
            erc = os.path.join(work, f"{loss}-erc.csv")
            assert quality.main(["--model", path, "--pairs", pairs, "--output", erc, "--quality-file", known,
                                 "--fmr", args.fmr, "--no-plot"]) == 0
            with open(summary_path(erc)) as f:
                summary = json.load(f)
            with open(summary_path(scores)) as f:
                scored = json.load(f)
            row = {"loss": loss, "model": os.path.abspath(path), "trained_with": trained,
                   "pairs": summary["pairs_count"], "genuine": summary["genuine"], "impostors": summary["impostors"],
                   "norm_quantiles": scored["quantiles"], "degradations": found,
                   "thresholds": summary["thresholds"]}
            rows.append(row)
            print(f"\n{loss}: {found['faces']} faces, {found['degraded']} degraded ({found['degraded_share']:.1%}); "
                  f"norm median {scored['quantiles']['0.5']:.2f} (5% {scored['quantiles']['0.05']:.2f}, 95% "
                  f"{scored['quantiles']['0.95']:.2f})", flush=True)
            print(f"  degraded among the lowest 10% by norm: {found['degraded_among_lowest_10pct']:.1%}, lowest 25%: "
                  f"{found['degraded_among_lowest_25pct']:.1%}; P(a degraded face's norm < a clean one's) "
                  f"{found['auroc_degraded_below_clean']:.3f}")
            print("  median norm (median rank, 0 = lowest) by kind: " + ", ".join(
                f"{kind} {at['median_norm']:.2f} ({at['median_rank']:.2f})" for kind, at in found["by_kind"].items()))
            for threshold in summary["thresholds"]:
                print(f"  FMR {threshold['fmr']:.3g} (threshold {threshold['threshold']:.4f}): FNMR "
                      f"{threshold['fnmr']:.4f} before rejecting; ERC area 0-20% (0-100%), FNMR at 20% rejected:")
                for name, at in threshold["orderings"].items():
                    print(f"    {'degradations' if name == 'degradations.csv' else name:>13}  {at['auc_0_20']:.5f}  "
                          f"({at['auc_0_100']:.5f})  {at['fnmr_at_20']:.4f}")
    seconds = time.monotonic() - started
    print(f"\n{seconds:.0f} s", flush=True)
    if args.output:
        about = {"git": sha, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                 "load": os.getloadavg(), "seconds": round(seconds, 1),
                 "set": {"people": args.people, "faces": args.faces, "degraded": args.degraded,
                         "impostors": args.impostors, "degradations": list(DEGRADATIONS), "seed": args.seed},
                 "command": " ".join(sys.argv)}
        checkpoint.write_json_atomic(args.output, {"about": about, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
