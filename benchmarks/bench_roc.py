"""What ``python -m train.tools.roc`` measures on faces of known people, and what every pair of a large
collection costs: synthetic faces of ``--people`` people the demo did not train on (``--min-faces`` to
``--max-faces`` each), embedded with ``--model`` and scored (TAR and threshold at each FAR, the EER, and
the FAR and TAR the model's recorded 1:1 threshold gives on them); then ``--random`` collections of random
unit embeddings (``--per-person`` faces a person; with ``--large-person F``, F of them one person's, spread
``--large-spread`` about its direction), each given as a table and scored in a process of its own under
``/usr/bin/time -v`` (its time, pairs a second and peak memory; the second pass that counts each person's
rejected genuine pairs, where one runs, timed apart).

    python -m train --output runs/demo  # the demo's model (64 px)
    python benchmarks/bench_roc.py --model runs/demo/checkpoint.pt --people 300 --random 20000,100000 \\
        --output benchmarks/results/<machine>-roc.json
    python benchmarks/bench_roc.py --random 100000 --large-person 10000  # one person of 10,000 faces (5e7 pairs)
    python benchmarks/bench_roc.py --random 100000 --large-person 10000 --large-spread 3  # most of them rejected
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_cluster import people_table, person_faces, write_rows  # noqa: E402
from benchmarks.bench_loss import git_sha  # noqa: E402
from train.embed import load_model, write_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_roc(argv: list[str], timed: bool = False) -> tuple[dict, float, int | None, str]:
    """(summary, wall seconds, peak resident memory in KiB under /usr/bin/time -v (None without it or
    ``timed``), stderr) of ``python -m train.tools.roc argv`` in a process of its own."""
    command = [sys.executable, "-m", "train.tools.roc", *argv]
    if timed and os.path.exists("/usr/bin/time"):
        command = ["/usr/bin/time", "-v", *command]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"roc {' '.join(argv)} exited with {done.returncode}:\n{done.stderr}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    with open(argv[argv.index("--output") + 1][:-len(".csv")] + ".json") as f:
        return json.load(f), seconds, int(peak.group(1)) if peak else None, done.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the model that embeds the faces (skip the faces without it)")
    p.add_argument("--people", type=int, default=300, help="synthetic people")
    p.add_argument("--min-faces", type=int, default=2, help="each person has at least this many faces")
    p.add_argument("--max-faces", type=int, default=8, help="and at most this many")
    p.add_argument("--random", default="", help="sizes of random collections to time, comma-separated")
    p.add_argument("--per-person", type=int, default=10, help="faces a person in the random collections")
    p.add_argument("--large-person", type=int, default=0, metavar="FACES",
                   help="of each random collection's faces, this many are one person's (default 0: none)")
    p.add_argument("--large-spread", type=float, default=1.2, metavar="S",
                   help="the large person's noise, S times a unit vector's (default 1.2, as the others': cosine about "
                   "0.4 between two of its faces, every pair accepted; 3: about 0.1, most of its pairs rejected)")
    p.add_argument("--dim", type=int, default=512, help="the random embeddings' size (default 512)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args()
    sizes = [int(size) for size in args.random.split(",") if size]
    if args.large_person < 0 or any(args.large_person > n for n in sizes):
        p.error(f"--large-person {args.large_person}: from 0 to the size of each --random collection")
    if args.large_spread < 0:
        p.error(f"--large-spread {args.large_spread:g}: 0 or more")
    sha = git_sha()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if args.model:
            _, settings = load_model(args.model, "cpu")
            counts = np.random.default_rng(0).integers(args.min_faces, args.max_faces + 1, args.people)
            for k, count in enumerate(counts):
                person_faces(os.path.join(work, "people", f"person{k:03d}"), k, range(count), settings["image_size"])
            out = os.path.join(work, "roc.csv")
            summary, seconds, _, err = run_roc(["--model", args.model, "--images", os.path.join(work, "people"),
                                                "--output", out, "--far", "1e-4", "--device", args.device])
            print(err, end="", flush=True)
            model = summary.get("model_threshold")
            row = {"set": f"{args.people} synthetic people ({int(counts.sum())} faces, {args.min_faces} to "
                          f"{args.max_faces} each)", "faces": summary["faces"], "people": summary["people"],
                   "genuine_pairs": summary["genuine_pairs"], "impostor_pairs": summary["impostor_pairs"],
                   **{key: summary[key] for key in ("tar_at_far", "threshold_at_far", "threshold_exact_at_far",
                                                    "false_accepts_at_far", "eer", "operating_point")},
                   "model_threshold": model, "wall_seconds": seconds}
            rows.append(row)
        for n in sizes:
            rest = n - args.large_person
            unit, truth = people_table(rest, max(2, rest // args.per_person), dim=args.dim)
            names = [f"person{p:06d}/{i:07d}.jpg" for i, p in enumerate(truth.tolist())]
            if args.large_person:  # one more person (another seed: another direction), after the others
                large, _ = people_table(args.large_person, 1, seed=1, dim=args.dim, spread=args.large_spread)
                unit = torch.cat([unit, large])
                names += [f"large/{i:07d}.jpg" for i in range(args.large_person)]
            table = os.path.join(work, "random.npy")
            write_table(table, names, unit.numpy())
            del unit
            out = os.path.join(work, "random.csv")
            load = os.getloadavg()
            summary, seconds, peak, _ = run_roc(["--embeddings", table, "--output", out, "--overwrite", "--far",
                                                 "1e-4", "--device", args.device], timed=True)
            pairs = summary["genuine_pairs"] + summary["impostor_pairs"]
            large = (f", {args.large_person} of them one person's (spread {args.large_spread:g})"
                     if args.large_person else "")
            row = {"set": f"{n} random {args.dim}-D unit embeddings of {summary['people']} people{large}", "faces": n,
                   "large_person": args.large_person, "large_spread": args.large_spread if args.large_person else None,
                   "people": summary["people"],
                   "genuine_pairs": summary["genuine_pairs"],
                   "impostor_pairs": summary["impostor_pairs"], "pairs": pairs,
                   "score_seconds": summary["seconds"], "pairs_per_second": summary["pairs_per_second"],
                   "recount_seconds": summary.get("recount_seconds"),
                   "operating_point": summary["operating_point"],
                   "wall_seconds": seconds, "peak_rss_mib": None if peak is None else round(peak / 1024),
                   "threshold_exact_at_far": summary["threshold_exact_at_far"], "tar_at_far": summary["tar_at_far"],
                   "eer": summary["eer"], "genuine_histogram": summary.get("genuine_histogram"),
                   "load_before": load, "load_after": os.getloadavg()}
            rows.append(row)
            recount = row["recount_seconds"]
            print(f"{row['set']}: {pairs:,} pairs scored in {row['score_seconds']:.1f} s "
                  f"({row['pairs_per_second']:,.0f} pairs/s)"
                  + ("" if recount is None
                     else f", each person's rejected pairs counted in a second pass in {recount:.1f} s")
                  + f", {seconds:.1f} s in all, peak memory "
                  f"{row['peak_rss_mib']} MiB (load average {load[0]:.2f} before, {row['load_after'][0]:.2f} "
                  f"after); exact thresholds at {row['threshold_exact_at_far']}", flush=True)
    if args.output:
        write_rows(args.output, sha, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
