"""How well ``python -m train.tools.search`` tells who a face is, and what a large gallery costs:
synthetic faces of people the demo did not train on, a gallery of ``--people`` of them (1 to
``--gallery-faces`` faces each) and probes of those and of ``--unseen`` others (not enrolled: non-mated
searches), searched with person templates and with ``--per-image`` at each threshold; scored as the
tool scores them (rank-1, rank-5, DIR at the threshold, FPIR), and the tool's operating points (the
threshold and DIR at FPIR 1%, 5%, 10%, 20% of the non-mated searches) for each. Then the time to search
``--random-probes`` random unit embeddings among a gallery of ``--random`` (of ``--random-people`` people).

    python -m train --output runs/demo  # the demo's model (64 px)
    python benchmarks/bench_search.py --model runs/demo/checkpoint.pt --people 200 --unseen 100 \\
        --thresholds model,0.5,0.6 --random 100000 --random-probes 10000 --random-people 20000 \\
        --output benchmarks/results/<machine>-search.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_cluster import people_table, person_faces, write_rows  # noqa: E402
from benchmarks.bench_loss import git_sha  # noqa: E402
from train.embed import main as embed_main, write_table  # noqa: E402
from train.tools import search  # noqa: E402
from train.tools import summary_path  # noqa: E402


def run_search(argv: list[str]) -> tuple[dict | None, float]:
    """(summary, wall seconds; the summary None for a run that writes no results) of ``python -m
    train.tools.search argv``."""
    started = time.perf_counter()
    status = search.main(argv)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"search {' '.join(argv)} exited with {status}")
    if "--output" not in argv:
        return None, seconds
    with open(summary_path(argv[argv.index("--output") + 1])) as f:
        return json.load(f), seconds


def synthetic_sets(work: str, people: int, unseen: int, gallery_faces: int, probe_faces: int, image_size: int,
                   seed: int) -> tuple[str, str, int]:
    """``work/gallery/personNNN/``: 1 to ``gallery_faces`` faces of each of ``people`` people;
    ``work/probes/personNNN/``: ``probe_faces`` other faces of each of them and of ``unseen`` more.
    Returns (gallery, probes, gallery faces)."""
    counts = np.random.default_rng(seed).integers(1, gallery_faces + 1, people)
    gallery, probes = os.path.join(work, "gallery"), os.path.join(work, "probes")
    for k in range(people + unseen):
        if k < people:
            person_faces(os.path.join(gallery, f"person{k:03d}"), k, range(counts[k]), image_size)
        person_faces(os.path.join(probes, f"person{k:03d}"), k, range(50, 50 + probe_faces), image_size)
    return gallery, probes, int(counts.sum())


def random_rows(work: str, n: int, probes: int, people: int, dim: int, device: str) -> list[dict]:
    """The time to search ``probes`` random unit ``dim``-D embeddings among ``n`` (of ``people`` people:
    each a random direction plus noise, drawn together and split, so that most probes have a mate),
    with templates and per image, at cosine 0.3."""
    unit, truth = people_table(n + probes, people, dim=dim)
    names = [f"person{p:05d}/{i:07d}.jpg" for i, p in enumerate(truth.tolist())]
    gallery, probe_table = os.path.join(work, "random_gallery.npy"), os.path.join(work, "random_probes.npy")
    write_table(gallery, names[:n], unit[:n].numpy())
    write_table(probe_table, names[n:], unit[n:].numpy())
    del unit
    rows = []
    for per_image in (False, True):
        out = os.path.join(work, "random.csv")
        argv = ["--gallery", gallery, "--probes", probe_table, "--output", out, "--overwrite", "--threshold", "0.3",
                "--probe-labels", "folder", "--device", device] + (["--per-image"] if per_image else [])
        summary, seconds = run_search(argv)
        rates = summary["identification"]
        row = {"set": f"{probes} random {dim}-D probes among {n} of {summary['people']} people",
               "gallery_images": n, "people": summary["people"], "probes": probes, "scoring": summary["scoring"],
               "search_seconds": summary["seconds"], "wall_seconds": seconds, **rates}
        rows.append(row)
        print(f"{row['set']} ({row['scoring']}): searched in {row['search_seconds']:.1f} s ({seconds:.1f} s with "
              f"reading the tables and writing the results); rank-1 {rates['rank_1']:.4f}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the model that embeds the faces (skip the faces without it)")
    p.add_argument("--people", type=int, default=200, help="people enrolled in the gallery")
    p.add_argument("--unseen", type=int, default=100, help="people among the probes only (non-mated searches)")
    p.add_argument("--gallery-faces", type=int, default=5, help="each enrolled person has 1 to this many faces")
    p.add_argument("--probe-faces", type=int, default=2, help="probe faces of each person")
    p.add_argument("--thresholds", default="model", help="cosines to decide at, comma-separated; 'model': its own")
    p.add_argument("--random", type=int, default=0, help="also time a gallery of this many random embeddings")
    p.add_argument("--random-probes", type=int, default=10000, help="probes searched in the random gallery")
    p.add_argument("--random-people", type=int, default=20000, help="people of the random gallery and probes")
    p.add_argument("--dim", type=int, default=512, help="the random embeddings' size (default 512)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args()
    sha = git_sha()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if args.model:
            _, settings = search.load_model(args.model, "cpu")
            gallery, probes, count = synthetic_sets(work, args.people, args.unseen, args.gallery_faces,
                                                    args.probe_faces, settings["image_size"], seed=0)
            saved, probe_table = os.path.join(work, "gallery.npy"), os.path.join(work, "probes.npy")
            out = os.path.join(work, "results.csv")
            run_search(["--model", args.model, "--gallery", gallery, "--save-gallery", saved, "--device",
                        args.device])
            assert embed_main(["--model", args.model, "--images", probes, "--output", probe_table, "--device",
                               args.device]) == 0
            points = {}
            for threshold in args.thresholds.split(","):
                for per_image in (False, True):
                    argv = ["--gallery", saved, "--probes", probe_table, "--output", out, "--overwrite",
                            "--probe-labels", "folder", "--device", args.device]
                    argv += ["--model", args.model] if threshold == "model" else ["--threshold", threshold]
                    summary, _ = run_search(argv + (["--per-image"] if per_image else []))
                    rates = summary["identification"]
                    row = {"set": f"{args.people} people enrolled ({count} faces), {args.unseen} not",
                           "people": args.people, "gallery_faces": count, "unseen": args.unseen,
                           "probes": summary["searches"], "threshold": summary["threshold"],
                           "threshold_from": summary["threshold_from"], "scoring": summary["scoring"], **rates}
                    rows.append(row)
                    points[summary["scoring"]] = summary["operating_points"]  # (the same at every threshold)
                    print(f"{row['set']}  t {row['threshold']:.4f}  {row['scoring']:9s}  rank-1 {rates['rank_1']:.4f}"
                          f"  rank-5 {rates['rank_5']:.4f}  DIR {rates['dir']:.4f}  FPIR {rates['fpir']:.4f}  "
                          f"another person {rates['misidentified']:.4f}  ({rates['mated_searches']} mated, "
                          f"{rates['non_mated_searches']} non-mated searches)", flush=True)
            for scoring, at in points.items():
                rows.append({"set": f"{args.people} people enrolled ({count} faces), {args.unseen} not",
                             "scoring": scoring, "operating_points": at})
                for point in at:
                    said = ("not measured" if point["threshold"] is None else
                            f"t {point['threshold']:.4f}  DIR {point['dir']:.4f}  strangers in {point['false_alarms']}"
                            f"  another person {point['misidentified']:.4f}")
                    print(f"{scoring:9s}  FPIR {point['fpir']:.3f}:  {said}", flush=True)
        if args.random:
            rows += random_rows(work, args.random, args.random_probes, args.random_people, args.dim, args.device)
    if args.output:
        write_rows(args.output, sha, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
