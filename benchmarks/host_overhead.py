"""How much host time does the fused loss add to a training step, apart from its kernels?

    python benchmarks/host_overhead.py                  # CPU
    python benchmarks/host_overhead.py --device cuda

On inputs so small (default N=8, D=16, C=32; bf16 on CUDA, the dtype and path of a training step
there, with the kept gradient block; fp32 on the CPU) that the kernels take next to nothing, times one
forward+backward by the host clock, best of --repeats rounds of --steps steps (on CUDA with a
synchronisation at each round's end, so a round is as long as the host's launching or the GPU's
work, whichever is longer). Rows:
  - `ops`: the forward and backward ops called directly (the dispatcher, the C++ host code, the
    kernels), no autograd (the recomputing pair, not the kept-block one);
  - `step`: arcface_ext.combined_margin_loss (mean) and .backward(), both inputs needing gradients,
    through the forward op's autograd formula (the path CUDA takes; on the CPU the one-call training
    op is switched off for this row);
  - `step-train` (CPU only): the same call through the one-call training op, the CPU's default;
  - `torch-ce`: F.cross_entropy(F.linear(x̂, ŵ)·s) and .backward(), the unfused loss a user would
    otherwise write, for scale;
  - `mean`, `mean-aten`: the batch's mean alone, forward and backward from an (N,) per-row loss: the
    reduce_loss op the step uses, and the ATen expression it replaced (`(labels != -1).sum().clamp_min(1)`,
    `loss.sum() / count`: five launches forward and one backward, and on CUDA the backward op's copy of
    the expanded gradient, not in this row).
Rows (device, versions, git sha, µs per step) go to --out when given.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import arcface_ext  # noqa: E402
from arcface_ext import ops  # noqa: E402
from arcface_ext._checks import reduce_rows  # noqa: E402
from benchmarks.bench_loss import device_name, git_sha, write_rows  # noqa: E402


def make_steps(embeddings, weight, labels):
    workspace = arcface_ext.get_workspace_bytes()
    scalars = (64.0, 1.0, 0.5, 0.0, 0.0, -1, False, workspace)
    grad_loss = torch.ones(labels.shape[0], device=labels.device)

    def run_ops():
        x, w = embeddings.detach(), weight.detach()
        _, logsumexp, _ = torch.ops.arcface_ext.margin_softmax_forward(x, w, labels, *scalars, 0, -1, None)
        torch.ops.arcface_ext.margin_softmax_backward(grad_loss, x, w, labels, logsumexp, *scalars, True, True,
                                                      0, -1, None, False)

    def step():
        arcface_ext.combined_margin_loss(embeddings, weight, labels).backward()
        embeddings.grad = None
        weight.grad = None

    def torch_ce():
        logits = F.linear(F.normalize(embeddings), F.normalize(weight)) * 64.0
        F.cross_entropy(logits, labels).backward()
        embeddings.grad = None
        weight.grad = None

    loss_rows = torch.rand(labels.shape[0], device=labels.device).requires_grad_()

    def mean_of(reduce):
        def run():
            reduce(loss_rows, labels, -1, "mean").backward()
            loss_rows.grad = None
        return run

    return {"ops": run_ops, "step": step, "torch-ce": torch_ce, "mean": mean_of(ops.reduce_loss),
            "mean-aten": mean_of(reduce_rows)}


def best_us(fn, device, steps, repeats):
    # Not bench_loss.time_interleaved: on the CPU it times a single step a round, which suits
    # steps of milliseconds, not of microseconds; here the best of `repeats` rounds of `steps`.
    for _ in range(steps // 4 + 1):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - begin) / steps * 1e6)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--N", type=int, default=8)
    parser.add_argument("--D", type=int, default=16)
    parser.add_argument("--C", type=int, default=32)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", help="write the rows (JSON) here")
    args = parser.parse_args(argv)

    arcface_ext.functional.require_extension()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(args.N, args.D, generator=generator).to(device, dtype).requires_grad_()
    weight = torch.randn(args.C, args.D, generator=generator).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.C, (args.N,), generator=generator).to(device)
    steps = make_steps(embeddings, weight, labels)

    timings = {}
    train_devices = ops.TRAIN_DEVICES
    try:
        ops.TRAIN_DEVICES = frozenset()  # the forward op's autograd formula, as on CUDA
        timings["ops"] = best_us(steps["ops"], device, args.steps, args.repeats)
        timings["step"] = best_us(steps["step"], device, args.steps, args.repeats)
    finally:
        ops.TRAIN_DEVICES = train_devices
    if device.type in ops.TRAIN_DEVICES:
        timings["step-train"] = best_us(steps["step"], device, args.steps, args.repeats)
    timings["torch-ce"] = best_us(steps["torch-ce"], device, args.steps, args.repeats)
    for name in ("mean", "mean-aten"):
        timings[name] = best_us(steps[name], device, args.steps, args.repeats)

    common = dict(device=device_name(device), torch=torch.__version__, git=git_sha(), N=args.N, D=args.D,
                  C=args.C, dtype=dtype_name, threads=args.threads)
    print(f"{common['device']} | torch {common['torch']} | git {common['git']} | "
          f"N={args.N} D={args.D} C={args.C} {dtype_name} | {args.threads} thread(s)")
    print(f"{'row':<11} {'us/step':>9} {'x torch-ce':>11}")
    rows = []
    for name, us in timings.items():
        print(f"{name:<11} {us:9.1f} {us / timings['torch-ce']:11.2f}")
        rows.append(dict(common, row=name, us_per_step=round(us, 2)))
    if args.out:
        write_rows(rows, args.out)


if __name__ == "__main__":
    main()
