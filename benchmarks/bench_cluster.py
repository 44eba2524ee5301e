"""How well ``python -m train.tools.cluster`` finds the people of a collection, and what it costs at
scale: synthetic faces of known identities (uneven counts, 1 to 40 a person, people the demo did not
train on) embedded once with ``--model`` (``train.embed``), then clustered from that table at each
threshold by each method, scored against the truth (pairwise and BCubed precision, recall and F;
noise counts as clusters of one), with ``--duplicates K`` also with every face there K times; and the
time to cluster a table of random unit embeddings.

    python -m train --output runs/demo  # the demo's model (64 px)
    python benchmarks/bench_cluster.py --model runs/demo/checkpoint.pt --people 60,200 \\
        --thresholds model,0.6,0.7,0.8,0.85 --neighbours 5,10,20 --random 100000 --random-people 0,5000 \\
        --output benchmarks/results/<machine>-cluster.json
    python benchmarks/bench_cluster.py --model runs/demo/checkpoint.pt --people 60 --thresholds model,0.6 \\
        --duplicates 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_loss import git_sha  # noqa: E402
from train import checkpoint  # noqa: E402
from train.data.synthetic import render_face  # noqa: E402
from train.embed import main as embed_main, read_table, write_table  # noqa: E402
from train.tools import cluster, summary_path  # noqa: E402

FIRST_PERSON = 5000  # the demo trains on synthetic identities 0..99


def scores(found: np.ndarray, truth: np.ndarray) -> dict:
    """Pairwise precision, recall and F (over pairs of faces put together), BCubed precision, recall
    and F (a face's share of its cluster that is its person, and of its person in its cluster,
    averaged over the faces); noise (-1) each face a cluster of its own."""
    found = found.copy()
    noise = found < 0
    found[noise] = found.max(initial=-1) + 1 + np.arange(noise.sum())
    _, found = np.unique(found, return_inverse=True)
    _, truth = np.unique(truth, return_inverse=True)
    cells, together = np.unique(found * (truth.max() + 1) + truth, return_counts=True)
    cluster_of, person_of = cells // (truth.max() + 1), cells % (truth.max() + 1)
    cluster_sizes, person_sizes = np.bincount(found).astype(float), np.bincount(truth).astype(float)
    together = together.astype(float)
    right = (together * (together - 1) / 2).sum()
    put = (cluster_sizes * (cluster_sizes - 1) / 2).sum()
    should = (person_sizes * (person_sizes - 1) / 2).sum()
    precision, recall = right / put if put else 1.0, right / should if should else 1.0
    b_precision = (together ** 2 / cluster_sizes[cluster_of]).sum() / len(found)
    b_recall = (together ** 2 / person_sizes[person_of]).sum() / len(found)

    def f(p, r):
        return 2 * p * r / (p + r) if p + r else 0.0
    return {"pairwise_precision": precision, "pairwise_recall": recall, "pairwise_f": f(precision, recall),
            "bcubed_precision": b_precision, "bcubed_recall": b_recall, "bcubed_f": f(b_precision, b_recall)}


def person_faces(folder: str, person: int, samples, image_size: int) -> None:
    """``folder/NN.jpg``: the faces ``samples`` of synthetic person ``person`` (counted from FIRST_PERSON,
    so none the demo trained on)."""
    os.makedirs(folder, exist_ok=True)
    for sample in samples:
        image = render_face(0, FIRST_PERSON + person, sample, image_size)
        Image.fromarray(image).save(os.path.join(folder, f"{sample:02d}.jpg"), quality=95)


def faces(root: str, people: int, image_size: int, seed: int) -> int:
    """``root/personNNN/NN.jpg``: ``people`` synthetic people, 1 to 40 faces each; returns the count."""
    counts = np.random.default_rng(seed).integers(1, 41, people)
    for k, count in enumerate(counts):
        person_faces(os.path.join(root, f"person{k:03d}"), k, range(count), image_size)
    return int(counts.sum())


def run_cluster(argv: list[str]) -> tuple[dict, list[str], np.ndarray, float]:
    """(summary, names, clusters, wall seconds) of ``python -m train.tools.cluster argv`` (its --output
    the last two items)."""
    started = time.perf_counter()
    status = cluster.main(argv)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"cluster {' '.join(argv)} exited with {status}")
    output = argv[argv.index("--output") + 1]
    with open(summary_path(output)) as f:
        summary = json.load(f)
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    return summary, [name for name, _ in rows], np.array([int(c) for _, c in rows]), seconds


def people_table(n: int, people: int, *, seed: int = 0, dim: int = 512, spread: float = 1.2
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n random unit ``dim``-D embeddings, each one's person or None): of ``people`` people, each a random
    direction plus noise of ``spread`` times a unit vector's, or with 0 each on its own."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    truth = None
    if people:
        truth = torch.randint(people, (n,), generator=generator)
        centres = torch.nn.functional.normalize(torch.randn(people, dim, generator=generator), dim=1)
        x = centres[truth] + spread * x / dim ** 0.5
    return torch.nn.functional.normalize(x, dim=1), truth


def random_table(work: str, n: int, dim: int, people: int, spread: float, device: str) -> dict:
    """The row of the time to cluster ``n`` random unit ``dim``-D embeddings at cosine 0.3: of ``people``
    people (each a random direction plus noise of ``spread`` times a unit vector's; scored), or with 0
    each on its own (no pair near 0.3: the search alone)."""
    table = os.path.join(work, "random.npy")
    unit, truth = people_table(n, people, dim=dim, spread=spread)
    write_table(table, [f"{i:07d}.jpg" for i in range(n)], unit.numpy())
    del unit
    out = os.path.join(work, "random.csv")
    summary, _, found, seconds = run_cluster(["--embeddings", table, "--output", out, "--overwrite", "--threshold",
                                              "0.3", "--device", device])
    of = f" of {people} people (spread {spread:g})" if people else ""
    row = {"set": f"{n} random {dim}-D embeddings{of}", "faces": n, "threshold": 0.3, "method": summary["method"],
           "neighbours": summary["neighbours"], "clustering_seconds": summary["seconds"], "wall_seconds": seconds,
           "clusters": summary["clusters"], "noise": summary["noise"],
           **(scores(found, truth.numpy()) if truth is not None else {})}
    print(f"{row['set']}: clustered in {row['clustering_seconds']:.1f} s ({seconds:.1f} s with reading the table and "
          f"writing the outputs), {row['clusters']} clusters, {row['noise']} noise"
          + (f"; pairwise F {row['pairwise_f']:.3f}, BCubed F {row['bcubed_f']:.3f}" if truth is not None else ""),
          flush=True)
    return row


def write_rows(path: str, sha: str, args: argparse.Namespace, rows: list[dict], *, load: bool = True) -> None:
    """--output's JSON of bench_cluster, bench_roc and bench_search: where and with what the rows were
    measured (``load``: with the load average as they are written), then the rows."""
    about = {"git": sha, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
             "model": args.model, "date": time.strftime("%Y-%m-%d")}
    if load:
        about["load"] = os.getloadavg()
    checkpoint.write_json_atomic(path, {"about": about, "rows": rows})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the model that embeds the faces (skip the faces without it)")
    p.add_argument("--people", default="60,200", help="sets of this many synthetic people, comma-separated")
    p.add_argument("--thresholds", default="model,0.6,0.7",
                   help="cosines to cluster at, comma-separated; 'model': the model's own")
    p.add_argument("--neighbours", default=str(cluster.DEFAULT_NEIGHBOURS), help="values of --neighbours, "
                   "comma-separated")
    p.add_argument("--duplicates", type=int, default=1,
                   help="also cluster each set with every face this many times (its embedding's row repeated, as "
                   "an exact copy of a photo gives it), scored against the same people (default 1: not)")
    p.add_argument("--random", type=int, default=0, help="also time a table of this many random embeddings")
    p.add_argument("--dim", type=int, default=512, help="the random embeddings' size (default 512)")
    p.add_argument("--random-people", default="0",
                   help="a table of random embeddings for each of these counts of people, comma-separated: each "
                   "person a random direction plus noise of --spread times a unit vector's (0, the default: no "
                   "people, every embedding on its own)")
    p.add_argument("--spread", type=float, default=1.2, help="see --random-people (1.2: a person's faces at "
                   "cosine 0.4 or so, others' near 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args()
    sha = git_sha()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        if args.model:
            _, settings = cluster.load_model(args.model, "cpu")
            for seed, people in enumerate(int(v) for v in args.people.split(",")):
                folder, table = os.path.join(work, f"faces{people}"), os.path.join(work, f"faces{people}.npy")
                count = faces(folder, people, settings["image_size"], seed)
                assert embed_main(["--model", args.model, "--images", folder, "--output", table,
                                   "--device", args.device]) == 0
                table_names, embeddings = read_table(table)
                person = np.unique([name.split(os.sep)[0] for name in table_names], return_inverse=True)[1]
                cosines = embeddings @ embeddings.T
                others = person[:, None] != person[None, :]
                tables = [(table, count, 1)]
                if args.duplicates > 1:  # person/copyK_NN.jpg: the copies of person/NN.jpg
                    copied = os.path.join(work, f"faces{people}x{args.duplicates}.npy")
                    write_table(copied, [os.path.join(os.path.dirname(name), f"copy{k}_{os.path.basename(name)}")
                                         for k in range(args.duplicates) for name in table_names],
                                np.tile(embeddings, (args.duplicates, 1)))
                    tables.append((copied, count * args.duplicates, args.duplicates))
                for (table, faces_in_table, copies), threshold in ((t, v) for t in tables
                                                                   for v in args.thresholds.split(",")):
                    for k in args.neighbours.split(","):
                        for method in cluster.METHODS:
                            out = os.path.join(work, "clusters.csv")
                            argv = ["--embeddings", table, "--output", out, "--overwrite", "--method", method,
                                    "--neighbours", k, "--device", args.device]
                            argv += ["--model", args.model] if threshold == "model" else ["--threshold", threshold]
                            summary, names, found, seconds = run_cluster(argv)
                            truth = np.array([name.split(os.sep)[0] for name in names])
                            each = f", each {copies} times" if copies > 1 else ""
                            row = {"set": f"{people} people, {faces_in_table} faces{each}", "people": people,
                                   "faces": faces_in_table, "copies_of_each": copies,
                                   "duplicates": summary.get("duplicates"),
                                   "clustering_seconds": summary["seconds"], "wall_seconds": seconds,
                                   "people_of_2_or_more": int(np.sum(np.unique(truth, return_counts=True)[1] >= 2)),
                                   "threshold": summary["threshold"], "threshold_from": summary["threshold_from"],
                                   # (the links of different people that could chain them together)
                                   "others_at_threshold": float(np.mean(cosines[others] >= summary["threshold"])),
                                   "method": method, "neighbours": int(k), "clusters": summary["clusters"],
                                   "noise": summary["noise"], **scores(found, truth)}
                            rows.append(row)
                            print(f"{row['set']:>40s}  t {row['threshold']:.4f}  {method:16s} k {k:>3s}  "
                                  f"pairwise P {row['pairwise_precision']:.3f} R {row['pairwise_recall']:.3f} "
                                  f"F {row['pairwise_f']:.3f}  BCubed F {row['bcubed_f']:.3f}  clusters "
                                  f"{row['clusters']:4d} (people of 2 or more: {row['people_of_2_or_more']}), "
                                  f"noise {row['noise']}; pairs of different people at the threshold "
                                  f"{row['others_at_threshold']:.2%}", flush=True)
        for people in (int(v) for v in args.random_people.split(",") if args.random):
            rows.append(random_table(work, args.random, args.dim, people, args.spread, args.device))
    if args.output:
        write_rows(args.output, sha, args, rows, load=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
