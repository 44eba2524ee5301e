"""Where does one forward+backward of the CUDA op spend its GPU time? A kernel table per path.

    python benchmarks/profile_loss.py                      # N=512 D=512 C=1e6 bf16, fused and cuBLAS paths
    python benchmarks/profile_loss.py --C 100000 --paths fused,recompute

For each path (fused: the tensor-core kernels, the default for 16-bit inputs, with the forward's kept
gradient block where it fits the workspace (bf16); recompute: the same with ARCFACE_EXT_KEEP_BLOCK=0,
the backward recomputing the cosines in its fused kernel; one-row-tile: fused with
ARCFACE_EXT_ROW_TILES=1, a block of the fused kernels for each row tile, each summing the class
norms again, as before session 13; wgmma: fused with ARCFACE_EXT_WGMMA=1, the fused kernels' tiles on
Hopper's wgmma (compute capability 9.0 only), wgmma32 the same in 32-deep slices (ARCFACE_EXT_WGMMA=32),
wgmma-resident the forward and backward with their x tile resident in shared memory
(ARCFACE_EXT_WGMMA=resident), wgmma-weight the same with the bf16 backward's d loss / d W formed in its
own class-outer tile (ARCFACE_EXT_WGMMA=resident-weight);
cublas: the same op with
ARCFACE_EXT_CUDA_FUSED=0) it warms up, then records one step with torch.profiler and prints
the kernels by total GPU time (count, total ms, share of the step's kernel time), plus the step's
wall time from CUDA events and the sum of kernel times (their difference is launch gaps or host
time). Then where the host's time goes in that step (the CPU-side ops and CUDA runtime calls by
self time: a device sync shows as the call that waits, e.g. cudaStreamSynchronize or
cudaMemcpyAsync under aten::item), and the step's time over 20 steps without the profiler.
torch.profiler only; no Nsight tools needed.
"""
import time
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import arcface_ext  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATHS = ("fused", "recompute", "one-row-tile", "wgmma", "wgmma32", "wgmma-resident", "wgmma-weight", "cublas")


def step(embeddings, weight, labels):
    loss = arcface_ext.combined_margin_loss(embeddings, weight, labels)
    loss.backward()
    embeddings.grad = None
    weight.grad = None


def profile_path(path, embeddings, weight, labels, top):
    os.environ["ARCFACE_EXT_CUDA_FUSED"] = "0" if path == "cublas" else "1"
    os.environ["ARCFACE_EXT_KEEP_BLOCK"] = "0" if path == "recompute" else "1"
    os.environ["ARCFACE_EXT_WGMMA"] = {"wgmma": "1", "wgmma32": "32", "wgmma-resident": "resident",
                                     "wgmma-weight": "resident-weight"}.get(path, "0")
    if path == "one-row-tile":
        os.environ["ARCFACE_EXT_ROW_TILES"] = "1"
    else:
        os.environ.pop("ARCFACE_EXT_ROW_TILES", None)
    for _ in range(2):
        step(embeddings, weight, labels)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start.record()
        step(embeddings, weight, labels)
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end)
    kernels = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count, total = kernels.get(event.name, (0, 0.0))
        kernels[event.name] = (count + 1, total + event.device_time / 1000.0)
    kernel_ms = sum(total for _, total in kernels.values())
    print(f"\n[{path}] step {wall_ms:.3f} ms (CUDA events), kernels {kernel_ms:.3f} ms, "
          f"{sum(count for count, _ in kernels.values())} kernel launches")
    print(f"{'ms':>9} {'share':>6} {'count':>6}  kernel")
    for name, (count, total) in sorted(kernels.items(), key=lambda item: -item[1][1])[:top]:
        short = name if len(name) <= 110 else name[:107] + "..."
        print(f"{total:9.3f} {100 * total / max(kernel_ms, 1e-9):5.1f}% {count:6d}  {short}")
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)
    print(f"host, same step: {sum(e.self_cpu_time_total for e in host) / 1000:.3f} ms of CPU-side self time "
          "(profiler overhead included)")
    print(f"{'ms':>9} {'count':>6}  host op / runtime call (self time)")
    for event in host[:top]:
        print(f"{event.self_cpu_time_total / 1000:9.3f} {event.count:6d}  {event.key[:110]}")
    steps = 20
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(steps):
        step(embeddings, weight, labels)
    torch.cuda.synchronize()
    print(f"steady step without the profiler: {(time.perf_counter() - begin) * 1000 / steps:.3f} ms "
          f"(host clock, {steps} steps)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, default=512)
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--C", type=int, default=1_000_000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--paths", default="fused,cublas")
    parser.add_argument("--workspace-bytes", type=int)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:  # before any GPU work
        raise SystemExit(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_loss.py needs a CUDA GPU")
    if args.workspace_bytes:
        arcface_ext.set_workspace_bytes(args.workspace_bytes)
    generator = torch.Generator(device="cuda").manual_seed(0)
    dtype = DTYPES[args.dtype]
    embeddings = torch.randn(args.N, args.D, device="cuda", dtype=dtype, generator=generator).requires_grad_()
    weight = (0.01 * torch.randn(args.C, args.D, device="cuda", generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, args.C, (args.N,), device="cuda", generator=generator)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | N={args.N} D={args.D} C={args.C} "
          f"{args.dtype} | workspace {arcface_ext.get_workspace_bytes()} B")
    for path in paths:
        profile_path(path, embeddings, weight, labels, args.top)


if __name__ == "__main__":
    main()
