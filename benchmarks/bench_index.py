"""What a training set's index costs at scale, without the images: the memory a forked DataLoader
worker copies when it reads every ImageFolder path (a Python list of strings against the trainer's
numpy-backed PathList), and the time to parse a RecordIO ``.idx`` (numpy's parse against the
line-by-line one). Linux only (it reads /proc/self/smaps_rollup).

    python benchmarks/bench_index.py --images 5000000 --output benchmarks/results/<machine>-index.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_loss import git_sha  # noqa: E402
from train.data.imagefolder import PathList  # noqa: E402
from train.checkpoint import write_json_atomic  # noqa: E402
from train.data.recordio import _read_index_by_line, read_index  # noqa: E402

ROOT = "/data/webface42m/images"


def private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty line in /proc/self/smaps_rollup")


def worker_copy_mb(paths) -> float:
    """The memory a forked process makes its own by reading every path once, as a worker does over
    an epoch."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_dirty_mb()
        total = sum(len(paths[i]) for i in range(len(paths)))
        os.write(write_end, json.dumps([private_dirty_mb() - before, total]).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        copied, _ = json.loads(f.read())
    os.waitpid(pid, 0)
    return copied


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5_000_000)
    p.add_argument("--output", default=None, help="also write the results as JSON")
    args = p.parse_args()
    n = args.images
    # WebFace42M-like names: an identity folder of ~100 images each.
    names = [f"m.0{i // 100:07d}/{i % 100:03d}-{i:08d}.jpg" for i in range(n)]
    rows = {}

    listed = [os.path.join(ROOT, name) for name in names]
    rows["list_worker_copy_mb"] = worker_copy_mb(listed)
    del listed
    started = time.perf_counter()
    paths = PathList(ROOT, names)
    rows["pathlist_build_s"] = time.perf_counter() - started
    rows["pathlist_mb"] = (paths._buffer.nbytes + paths._ends.nbytes) / 2**20
    rows["pathlist_worker_copy_mb"] = worker_copy_mb(paths)
    del paths, names

    rng = np.random.default_rng(0)
    offsets = np.cumsum(rng.integers(3000, 9000, n))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "train.idx")
        with open(path, "w") as f:
            f.writelines(f"{k}\t{o}\n" for k, o in zip(range(n), offsets.tolist()))
        for name, parse in (("idx_numpy_s", read_index), ("idx_by_line_s", _read_index_by_line)):
            started = time.perf_counter()
            keys, parsed = parse(path)
            rows[name] = time.perf_counter() - started
            assert keys.size == n and np.array_equal(parsed, offsets)

    sha = git_sha()
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "numpy": np.__version__, "git": sha, "images": n, **{k: round(v, 3) for k, v in rows.items()}}
    print(f"{n} images (git {sha}, numpy {np.__version__}):")
    print(f"  a forked worker reading every path copies: list of str {rows['list_worker_copy_mb']:.0f} MB, "
          f"PathList {rows['pathlist_worker_copy_mb']:.0f} MB (PathList holds {rows['pathlist_mb']:.0f} MB, "
          f"built in {rows['pathlist_build_s']:.2f} s)")
    print(f"  parsing train.idx: numpy {rows['idx_numpy_s']:.2f} s, line by line {rows['idx_by_line_s']:.2f} s")
    if args.output:
        write_json_atomic(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
