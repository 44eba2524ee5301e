"""Two-process DDP on CPU (gloo) through torchrun, as a multi-GPU run is launched: training,
logs written once, per-rank RNG states in the checkpoint, and resuming."""

import os
import subprocess
import sys

import pytest
import torch.distributed

import arcface_ext
from train import checkpoint

from trainer_fixtures import base_argv, make_face_folder, one_thread, read_jsonl  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def torchrun(args, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_two_process_gloo_training_and_resume(tmp_path):
    data = make_face_folder(str(tmp_path / "faces"))
    output = tmp_path / "run"
    args = base_argv(data, str(output), batch_size=8, max_steps=6, save_every=3, loss_impl=LOSS_IMPL)

    first = torchrun(args[:args.index("--max-steps")] + ["--max-steps", "3"] + args[args.index("--max-steps") + 2:])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batch 8 x 2 process(es) on cpu" in first.stderr
    state = checkpoint.load(str(output / "checkpoint.pt"))
    assert state["step"] == 3
    assert len(state["rng"]) == 2  # one generator state per rank
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    resumed = torchrun(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    steps = [r["step"] for r in read_jsonl(output / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log
    assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == 6
