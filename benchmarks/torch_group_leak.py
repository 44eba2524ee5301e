"""Does the installed torch keep a destroyed process group alive? (The leak train.tools.start_process_group works
around; benchmarks/NOTES.md, sessions 54-55.)

``torch/distributed/nn/functional.py`` gives its functions ``group=group.WORLD`` as a default argument, evaluated
when the module is imported. Imported after ``init_process_group`` (torch._dynamo imports it, and torch 2.13's
optimizers import torch._dynamo), those defaults hold the default group: ``destroy_process_group`` then frees
nothing, and its gloo connections stay open until the process ends, so another process learns it has gone only
then. Run ``python benchmarks/torch_group_leak.py``: for the module not imported, imported before and imported
after ``init_process_group``, whether the group outlives ``destroy_process_group`` (one process), and how long a
second process's next collective takes to fail once the first has left the group and lingers 8 s (two processes).
CPU and gloo only; a few seconds a case."""
from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import socket
import sys
import time
import weakref

import torch
import torch.distributed as dist

CASES = ("not imported", "imported before", "imported after")
LINGER = 8.0


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _start(case: str, rank: int, world_size: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if case == "imported before":
        importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if case == "imported after":
        importlib.import_module("torch.distributed.nn.functional")


def _one_process(case: str, port: str, answer) -> None:
    _start(case, 0, 1, port)
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    answer.put("freed" if group() is None else "still alive")


def _two_processes(case: str, rank: int, port: str, answer) -> None:
    _start(case, rank, 2, port)
    dist.barrier()
    if rank == 0:
        dist.destroy_process_group()
        time.sleep(LINGER)
        return
    time.sleep(1.0)  # (rank 0 has left by now)
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1))
        what = "returned"
    except RuntimeError:
        what = "failed"
    answer.put(f"{what} after {time.perf_counter() - start:.1f} s")


def main() -> int:
    context = multiprocessing.get_context("spawn")  # (a fresh interpreter each: nothing imported yet)
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    for case in CASES:
        answer = context.Queue()
        one = context.Process(target=_one_process, args=(case, _free_port(), answer))
        one.start()
        one.join(60)
        alone = answer.get(timeout=5)
        port = _free_port()
        ranks = [context.Process(target=_two_processes, args=(case, rank, port, answer)) for rank in (0, 1)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(60)
        print(f"torch.distributed.nn.functional {case}: the group after destroy_process_group: {alone}; "
              f"the other process's next all_reduce {answer.get(timeout=5)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
