"""``train.tools.cluster --device cuda`` on a GPU: the same neighbours and clusters as on the CPU
(20,000 faces of 1,000 random people, and 20,000 random faces), the command line on a 20,000-row
table, and the time to cluster 1,000,000 random 512-D embeddings and tables of 300,000 and 1,000,000
faces of random people (as ``bench_cluster.py --random-people`` draws them), scored.

    python benchmarks/cluster_cuda_check.py  # from the repository root, on a machine with a GPU
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_cluster import people_table, scores  # noqa: E402
from train.embed import write_table  # noqa: E402
from train.tools import cluster  # noqa: E402
from train.tools.similarity import nearest_neighbours  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="the GPU to check against the CPU (default: cuda)")
    p.add_argument("--budget", type=float, default=330,
                   help="seconds after which the timed tables not yet started are skipped (default 330)")
    args = p.parse_args()
    started = time.monotonic()
    print(torch.__version__, torch.cuda.get_device_name(), "tf32", torch.backends.cuda.matmul.allow_tf32, flush=True)

    # 1. The CPU and the GPU agree (neighbours, cosines, clusters): 20k faces of 1,000 people, and 20k random at 0.12.
    for n, people, t in ((20000, 1000, 0.3), (20000, 0, 0.12)):
        x, truth = people_table(n, people)
        result = {}
        for device in ("cpu", args.device):
            s = time.perf_counter()
            index, cosine = nearest_neighbours(x, 10, t, device=device)
            if device != "cpu":
                torch.cuda.synchronize()
            result[device] = (index, cosine, time.perf_counter() - s)
        (ic, cc, tc), (ig, cg, tg) = result["cpu"], result[args.device]
        both = np.isfinite(cc) & np.isfinite(cg)
        print(f"agreement n={n} people={people} t={t}: found cpu {np.isfinite(cc).sum()} {args.device} "
              f"{np.isfinite(cg).sum()}, max |cos diff| {np.abs(cc[both] - cg[both]).max() if both.any() else 0:.2e}, "
              f"index mismatches {int((ic != ig).sum())} of {ic.size}; cpu {tc:.1f} s {args.device} {tg:.1f} s",
              flush=True)
        a, _ = cluster.cluster_embeddings(x, t, device="cpu")
        b, _ = cluster.cluster_embeddings(x, t, device=args.device)
        print(f"  clusters equal: {bool((a == b).all())} ({a.max() + 1} clusters)", flush=True)

    # 2. The command line on the GPU, a 20k table.
    x, truth = people_table(20000, 1000)
    table = os.path.join(os.environ.get("TMPDIR", "/tmp"), "cluster_check.npy")
    write_table(table, [f"{i:06d}.jpg" for i in range(len(x))], x.numpy())
    r = subprocess.run([sys.executable, "-m", "train.tools.cluster", "--embeddings", table, "--output",
                        table[:-4] + ".csv", "--threshold", "0.3", "--device", args.device], capture_output=True,
                       text=True)
    print("CLI rc", r.returncode, r.stderr.strip().splitlines()[-1], flush=True)

    # 3. Timings on the GPU: random and people's tables.
    for n, people in ((1000000, 0), (300000, 15000), (1000000, 50000)):
        if time.monotonic() - started > args.budget:
            print(f"skipped n={n} people={people}: out of time", flush=True)
            continue
        x, truth = people_table(n, people)
        torch.cuda.synchronize()
        s = time.perf_counter()
        found, _ = cluster.cluster_embeddings(x, 0.3, device=args.device)
        torch.cuda.synchronize()
        took = time.perf_counter() - s
        sc = scores(found, truth.numpy()) if truth is not None else {}
        print(f"{args.device} n={n} people={people}: {took:.1f} s, {found.max() + 1} clusters, noise "
              f"{(found < 0).sum()}" + (f", pairwise F {sc['pairwise_f']:.4f}, BCubed F {sc['bcubed_f']:.4f}"
                                        if sc else ""), flush=True)
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
