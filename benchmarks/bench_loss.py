"""How fast, and in how much memory, does the fused loss run forward+backward against its baselines?

Compares, in one interleaved run: `ours` (arcface_ext.combined_margin_loss; on CUDA with 16-bit inputs
its fused tensor-core kernels; for bf16 where the N x C gradient block fits the workspace, its forward
keeps that block and its backward recomputes no cosine), `ours-recompute` (CUDA only: the same with
ARCFACE_EXT_KEEP_BLOCK=0, the backward recomputing the cosines in its own fused kernel),
`ours-one-row-tile` (CUDA only: the same with ARCFACE_EXT_ROW_TILES=1, a block of the fused kernels for
each row tile, each summing the class norms again, as before session 13; the forward and the fused
backward walk several row tiles a block otherwise), `ours-wgmma` (CUDA, compute capability 9.0 only: the
same with ARCFACE_EXT_WGMMA=1, the fused kernels' tiles on Hopper's wgmma in 64-deep slices),
`ours-wgmma32` (the same with ARCFACE_EXT_WGMMA=32: 32-deep slices, a wgmma group in flight across the
barrier), `ours-wgmma-resident` (ARCFACE_EXT_WGMMA=resident: the forward's and the backward's x tile
resident in shared memory, so that only W streams from L2), `ours-wgmma-weight`
(ARCFACE_EXT_WGMMA=resident-weight: the same, and where the bf16 backward recomputes (C = 1M here) it
forms d loss / d W in its own class-outer tile instead of a cuBLAS GEMM and a correction pass),
`ours-unchecked` (CUDA only: `ours` with check_labels=False, no label check and so no device sync in the
step, the host free to run ahead), `ours-graphed` (CUDA only: `ours`'s step captured once in a CUDA
graph and replayed, what the step costs with no host work; its memory is not measured: the graph's pool
holds it from the capture on), `ours-cublas` (CUDA only: the same op with ARCFACE_EXT_CUDA_FUSED=0, i.e.
cuBLAS GEMMs on class chunks + separate epilogue kernels), `eager` (the pure-PyTorch reference),
`compiled` (torch.compile(reference, fullgraph=True)) and `floor` (the three GEMMs any implementation
must do, x̂·ŵᵀ, G·ŵ and Gᵀ·x̂, alone on pre-normalised matrices with torch.mm). `subcenter`
(arcface_ext.subcenter_margin_loss, sub-center ArcFace's chunked PyTorch path) and `subcenter-eager`
(reference.subcenter_margin_loss, the whole N x C matrix) read the C rows as C / k classes of k
sub-centres (--subcenters, default 3; C mod k rows left out): the same matrix products as the others;
they are not in the default set. Nor are `filtered` / `curricular` (arcface_ext.chunked_margin_loss with
Partial FC's inter-class filtering at 0.4, or CurricularFace's hard negatives at t = 0.3) and their
whole-matrix `-eager` forms (reference.chunked_margin_loss). `other-device` is
arcface_ext.combined_margin_loss with the device's type taken out of the op's
(arcface_ext.ops.OP_DEVICES): the plain-PyTorch path it takes on a device without a kernel (Apple's mps,
Intel's xpu), the chunked path for these scalar margins; not in the default set. `--row-margins` gives
every impl that takes margins (all but floor, which has none, and ours-graphed) per-row m2 and m3, (N,)
tensors as AdaFace makes them (float64, no gradient), in place of the scalar m2 = 0.5. `ours-sampled`
and `eager-sampled` are partial FC at --sample-rate (default 0.1, what insightface runs for millions of
identities): each step draws its sample (arcface_ext.sample_classes), gathers those centres and runs
ours or the reference on them; the draw and the gather are timed too. Prints a table with ratios and
writes its rows to benchmarks/results/<device-name>-<YYYY-MM-DD>.json (overwriting a file of the same
name).

    python benchmarks/bench_loss.py                                   # CPU: N=256 D=512 C=50000 fp32
    python benchmarks/bench_loss.py --device cuda --max-c 50000000    # N=512 D=512 C=1e5,1e6 bf16
                                                                      # + the largest C that fits

Timing: every impl runs --warmup times first (torch.compile compiles there), then the impls take turns,
--repeats rounds, the first impl of each round rotating; `ms` is the median over rounds of one
forward+backward (on CUDA, each round is a run of back-to-back steps lasting about 20 ms, timed with
CUDA events and divided by its length, `steps_per_sample`; on the CPU, one step by the host clock) (both
embeddings and weight need gradients, as in training). For 16-bit dtypes the references run under
torch.autocast, as insightface's training does; ours and the chunked path take the 16-bit tensors
directly. Ratios are time ratios: `x floor` = ms / floor's ms, and so on (< 1 is faster); `mem x eager`
= peak_extra_mb / eager's.

Peak extra memory (peak_extra_mb): the most memory held at any moment of one forward+backward
beyond what was held just before it, less the returned gradients' own size (they are the result,
not overhead). Measured after warm-up, so torch.compile's compile-time memory never counts.
  - CUDA: torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats().
  - CPU: each impl runs in a child process of this script with glibc's mmap threshold pinned at
    64 KiB (MALLOC_MMAP_THRESHOLD_), so every buffer of 64 KiB or more is mapped when allocated
    and unmapped when freed, and the resident set follows the live heap (without the pin, glibc
    recycles freed heap and hides new peaks). The child warms up, resets the kernel's peak-RSS
    counter (writing 5 to /proc/self/clear_refs), runs once and reports VmHWM minus the VmRSS
    read just before. Worker threads and memory that never passes through a torch allocator
    (std::vector scratch) count too. torch.profiler's memory events cannot do this: an op's own
    allocations are netted into one figure per op, so a kernel's internal workspace is invisible.
"""
import argparse
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import arcface_ext  # noqa: E402
from arcface_ext import ops, reference  # noqa: E402
# (numpy: a missing one said at the start, not after the run)
from train.checkpoint import write_json_atomic  # noqa: E402

IMPLS = ("ours", "ours-recompute", "ours-one-row-tile", "ours-wgmma", "ours-wgmma32", "ours-wgmma-resident",
         "ours-wgmma-weight", "ours-unchecked", "ours-graphed", "ours-cublas", "eager", "compiled", "floor",
         "ours-sampled", "eager-sampled", "subcenter", "subcenter-eager", "filtered", "filtered-eager", "curricular",
         "curricular-eager", "other-device")
# The chunked path's options for the filtered and curricular impls: a filtering threshold and a
# CurricularFace t of this benchmark's choosing (the cost does not depend on them).
CHUNKED_OPTIONS = {"filtered": dict(interclass_filtering_threshold=0.4), "curricular": dict(curricular_t=0.3)}
CUDA_ONLY = ("ours-recompute", "ours-one-row-tile", "ours-wgmma", "ours-wgmma32", "ours-wgmma-resident",
             "ours-wgmma-weight", "ours-unchecked", "ours-graphed", "ours-cublas")
# The CUDA op's switches (read at every call) that the comparison variants of `ours` set.
SWITCHES = {"ours-cublas": ("ARCFACE_EXT_CUDA_FUSED", "0"), "ours-recompute": ("ARCFACE_EXT_KEEP_BLOCK", "0"),
            "ours-one-row-tile": ("ARCFACE_EXT_ROW_TILES", "1"), "ours-wgmma": ("ARCFACE_EXT_WGMMA", "1"),
            "ours-wgmma32": ("ARCFACE_EXT_WGMMA", "32"), "ours-wgmma-resident": ("ARCFACE_EXT_WGMMA", "resident"),
            "ours-wgmma-weight": ("ARCFACE_EXT_WGMMA", "resident-weight")}
DEFAULT_IMPLS = {"cpu": ("ours", "eager", "compiled", "floor"), "cuda": IMPLS}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {
    "cpu": dict(N=256, D=512, C=[50_000], dtype="fp32"),
    "cuda": dict(N=512, D=512, C=[100_000, 1_000_000], dtype="bf16"),
}
MMAP_THRESHOLD_BYTES = 64 * 1024


# ---- the implementations ---------------------------------------------------------------------

def make_inputs(n, dim, num_classes, dtype, device, seed=0):
    # Drawn on the device itself, in the target dtype where it is 16-bit: the largest-C search
    # asks for tens of millions of classes, whose fp32 copy on the host would not fit.
    generator = torch.Generator(device=device).manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator, device=device).to(dtype).requires_grad_(True)
    weight = torch.randn(num_classes, dim, generator=generator, device=device, dtype=dtype)
    weight = weight.mul_(0.01).requires_grad_(True)
    labels = torch.randint(0, num_classes, (n,), generator=generator, device=device)
    return embeddings, weight, labels


def sampled(loss_fn, sample_rate):
    """loss_fn over partial FC's sample of the classes, drawn anew at every call."""
    def sampled_loss(embeddings, weight, labels, **kwargs):
        index, positions = arcface_ext.sample_classes(labels, weight.shape[0], sample_rate)
        return loss_fn(embeddings, weight.index_select(0, index), positions, **kwargs)
    return sampled_loss


def graphed_step(embeddings, weight, labels, reduction):
    """`ours`'s forward+backward captured in a CUDA graph at the first call (after two warm-up steps on
    a side stream, as torch.cuda.graph asks), then replayed; returns the graph's gradient tensors."""
    state = {}

    def run():
        arcface_ext.combined_margin_loss(embeddings, weight, labels, reduction=reduction).sum().backward()

    def step():
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run()
                    embeddings.grad = weight.grad = None
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            state.update(graph=graph, grads=(embeddings.grad, weight.grad))
            embeddings.grad = weight.grad = None
        state["graph"].replay()
        return state["grads"]
    return step


def row_margins(n, device):
    """--row-margins: per-row (m2, m3) as AdaFace's, spread over its ranges (the cost does not depend
    on the values), float64 as the modules make them on CPU and CUDA."""
    m2 = torch.linspace(0.3, 0.6, n, dtype=torch.float64, device=device)
    m3 = torch.linspace(0.0, 0.2, n, dtype=torch.float64, device=device)
    return dict(m2=m2, m3=m3)


def make_step(impl, embeddings, weight, labels, reduction="mean", sample_rate=0.1, subcenters=3,
              per_row_margins=False):
    """One forward+backward of `impl`; returns the gradients (the result whose size is excluded
    from peak extra memory). ``per_row_margins``: the loss takes per-row m2 and m3 (row_margins)."""
    device_type = embeddings.device.type
    margins = row_margins(embeddings.shape[0], embeddings.device) if per_row_margins else {}
    autocast = embeddings.dtype in (torch.float16, torch.bfloat16)

    if impl == "floor":
        x_hat = torch.nn.functional.normalize(embeddings.detach(), dim=1)
        w_hat = torch.nn.functional.normalize(weight.detach(), dim=1)

        def floor_step():
            grad_logits = torch.mm(x_hat, w_hat.t())  # stands in for G: same shape, same GEMM
            return torch.mm(grad_logits, w_hat), torch.mm(grad_logits.t(), x_hat)
        return floor_step

    if impl == "ours-graphed":
        return graphed_step(embeddings, weight, labels, reduction)
    if impl in ("ours", "ours-cublas") or impl in SWITCHES:
        loss_fn = arcface_ext.combined_margin_loss
    elif impl == "ours-unchecked":
        loss_fn = functools.partial(arcface_ext.combined_margin_loss, check_labels=False)
    elif impl == "eager":
        loss_fn = reference.combined_margin_loss
    elif impl == "ours-sampled":
        loss_fn = sampled(arcface_ext.combined_margin_loss, sample_rate)
    elif impl == "eager-sampled":
        loss_fn = sampled(reference.combined_margin_loss, sample_rate)
    elif impl == "compiled":
        loss_fn = torch.compile(reference.combined_margin_loss, fullgraph=True, dynamic=False)
    elif impl in ("subcenter", "subcenter-eager"):
        # The C rows as C // k classes of k sub-centres (the last C mod k rows left out): the same
        # matrix products as the other impls.
        classes = weight.shape[0] // subcenters
        if classes == 0:
            raise ValueError(f"C = {weight.shape[0]} is fewer than --subcenters {subcenters}")
        labels = labels % classes
        chunked_fn = arcface_ext.subcenter_margin_loss if impl == "subcenter" else reference.subcenter_margin_loss

        def loss_fn(x, w, y, **kwargs):
            # (a slice only when it leaves rows out: its backward is a whole zero-filled gradient more)
            rows = classes * subcenters
            return chunked_fn(x, w if rows == w.shape[0] else w[:rows], y, k=subcenters, **kwargs)
    elif impl == "other-device":
        def loss_fn(*args, **kwargs):
            # This device taken out of the op's: the PyTorch path an mps or xpu device runs.
            served = ops.OP_DEVICES
            ops.OP_DEVICES = served - {device_type}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    return arcface_ext.combined_margin_loss(*args, **kwargs)
            finally:
                ops.OP_DEVICES = served
    elif impl.split("-")[0] in CHUNKED_OPTIONS:
        loss_fn = functools.partial(reference.chunked_margin_loss if impl.endswith("-eager")
                                    else arcface_ext.chunked_margin_loss, **CHUNKED_OPTIONS[impl.split("-")[0]])
    else:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")
    use_autocast = autocast and not impl.startswith(("ours", "subcenter", "filtered", "curricular", "other-device"))
    # ours-cublas / ours-recompute / ours-one-row-tile / ours-wgmma(32, -resident): the CUDA op with its fused
    # tensor-core kernels, its kept gradient block or its blocks' shared class norms switched off, or
    # its forward on the wgmma tile, for comparison (SWITCHES).
    switch, setting = SWITCHES.get(impl, (None, None))

    def step():
        saved = os.environ.get(switch) if switch else None
        if switch:
            os.environ[switch] = setting
        try:
            with torch.autocast(device_type, dtype=embeddings.dtype, enabled=use_autocast):
                loss = loss_fn(embeddings, weight, labels, reduction=reduction, **margins)
            loss.sum().backward()
        finally:
            if switch:
                if saved is None:
                    del os.environ[switch]
                else:
                    os.environ[switch] = saved
        # Handed to the caller, not left on the leaves: dropping the result frees them.
        grads = embeddings.grad, weight.grad
        embeddings.grad = None
        weight.grad = None
        return grads
    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps, *, device, warmup, repeats, sample_ms=20.0):
    """{impl: [ms per step, one value per round]}: warm-up first, then round-robin with a rotating
    first impl.

    CPU: each round times one step with the host clock (a step takes tens of milliseconds or more).
    CUDA: a step can take a fraction of a millisecond, less than launching it costs the host, so each
    round times `inner` back-to-back steps between two CUDA events and divides; `inner` is chosen per
    impl after warm-up so that a round lasts about `sample_ms` (at most 200 steps). The returned
    {impl: inner} says how many."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    names = list(steps)
    inner = {name: 1 for name in names}
    if device.type == "cuda":
        for name in names:
            once = _cuda_ms(steps[name], 1)
            inner[name] = max(1, min(200, int(sample_ms / max(once, 1e-3))))
    times = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            gc.collect()
            if device.type == "cuda":
                times[name].append(_cuda_ms(steps[name], inner[name]))
                continue
            synchronize(device)
            start = time.perf_counter()
            result = steps[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            del result
    return times, inner


def _cuda_ms(step, count):
    """Mean GPU time of `count` back-to-back calls of `step`, from CUDA events on the current stream."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        result = step()
        del result
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / count


# ---- peak extra memory -------------------------------------------------------------------------

def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cuda_peak_extra_mb(step, device):
    step()  # warm-up (compiles) outside the measured window
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    grads = step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (peak - before - _nbytes(grads)) / 2**20


def _proc_status_mb(*keys):
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) / 1024  # kB
    return values


def _memory_child(spec):
    """Runs in the child process: see the module docstring (CPU). Impls listed together are
    measured one after another, each from its own baseline."""
    torch.set_num_threads(spec["threads"])
    if spec.get("workspace_bytes"):
        arcface_ext.set_workspace_bytes(spec["workspace_bytes"])
    tensors = make_inputs(spec["N"], spec["D"], spec["C"], DTYPES[spec["dtype"]], torch.device("cpu"))
    peaks = {}
    for impl in spec["impls"]:
        step = make_step(impl, *tensors, reduction=spec.get("reduction", "mean"), sample_rate=spec["sample_rate"],
                         subcenters=spec.get("subcenters", 3), per_row_margins=spec.get("row_margins", False))
        for _ in range(spec.get("warmup", 1)):
            step()
        gc.collect()
        before = _proc_status_mb("VmRSS")["VmRSS"]
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        grads = step()
        peak = _proc_status_mb("VmHWM")["VmHWM"]
        peaks[impl] = peak - before - _nbytes(grads) / 2**20
        del step, grads
        gc.collect()
    print(json.dumps(peaks))


def cpu_peak_extra_mb(impls, n, dim, num_classes, dtype="fp32", *, reduction="mean", threads=None,
                      workspace_bytes=None, warmup=1, sample_rate=0.1, subcenters=3, row_margins=False, timeout=900):
    """{impl: peak extra memory (MiB) of one forward+backward}, measured in one child process
    (the benchmark gives each impl its own)."""
    spec = dict(impls=list(impls), N=n, D=dim, C=num_classes, dtype=dtype, reduction=reduction,
                warmup=warmup, threads=threads or torch.get_num_threads(), workspace_bytes=workspace_bytes,
                sample_rate=sample_rate, subcenters=subcenters, row_margins=row_margins)
    return run_child(__file__, "--memory-child", spec, timeout, f"memory child for {impls}")


def run_child(script, flag, spec, timeout, what):
    """The JSON that ``script`` run as ``script flag <spec as JSON>`` prints last, in a fresh process with
    glibc's mmap threshold pinned (MMAP_THRESHOLD_BYTES), so that its resident set follows its live heap;
    RuntimeError with its stderr's end, naming ``what``, when it fails."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
    child = subprocess.run([sys.executable, os.path.abspath(script), flag, json.dumps(spec)],
                           env=env, capture_output=True, text=True, timeout=timeout)
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# ---- largest C that fits (CUDA) ----------------------------------------------------------------

def fits(impl, n, dim, num_classes, dtype, device):
    try:
        step = make_step(impl, *make_inputs(n, dim, num_classes, dtype, device))
        step()
        synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        step = None
        gc.collect()
        torch.cuda.empty_cache()


def largest_c(impl, n, dim, dtype, device, start, limit, deadline=None):
    """(fits, fails): doubles C from `start` until it no longer fits (or passes `limit`), then bisects
    to 1%. `fits` is the largest C seen to fit (0 if not even `start` does), `fails` the smallest
    seen not to (None if every C up to `limit` fit). Past `deadline` (time.monotonic()) the search
    stops where it is and returns the bracket it has."""
    def out_of_time():
        return deadline is not None and time.monotonic() > deadline

    if not fits(impl, n, dim, start, dtype, device):
        return 0, start
    low, high = start, None
    while high is None:
        if low >= limit or out_of_time():
            return low, None
        candidate = min(low * 2, limit)
        if fits(impl, n, dim, candidate, dtype, device):
            low = candidate
        else:
            high = candidate
    while high - low > max(1, low // 100) and not out_of_time():
        middle = (low + high) // 2
        if fits(impl, n, dim, middle, dtype, device):
            low = middle
        else:
            high = middle
    return low, high


# ---- environment and output --------------------------------------------------------------------

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_sha():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows, header=True):
    title = (f"{'impl':<13} {'N':>5} {'D':>5} {'C':>9} {'dtype':>5} {'ms':>9} {'x floor':>8} "
             f"{'x eager':>8} {'x compiled':>10} {'peak MB':>9} {'mem x eager':>11}")
    if header:
        print(title)
        print("-" * len(title))
    by_key = {(r["impl"], r["C"]): r for r in rows}

    def ratio(row, base, field):
        other = by_key.get((base, row["C"]))
        if other is None or other[field] in (None, 0) or row[field] is None:
            return "-"
        return f"{row[field] / other[field]:.2f}"

    for r in rows:
        peak = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        print(f"{r['impl']:<13} {r['N']:>5} {r['D']:>5} {r['C']:>9} {r['dtype']:>5} {r['ms']:>9.3f} "
              f"{ratio(r, 'floor', 'ms'):>8} {ratio(r, 'eager', 'ms'):>8} {ratio(r, 'compiled', 'ms'):>10} "
              f"{peak:>9} {ratio(r, 'eager', 'peak_extra_mb'):>11}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--N", type=int, help="rows (embeddings); default 256 on CPU, 512 on CUDA")
    parser.add_argument("--D", type=int, help="embedding size; default 512")
    parser.add_argument("--C", type=int, nargs="+", help="class counts; default 50000 on CPU, 100000 1000000 on CUDA")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impls", help=f"comma-separated subset of {','.join(IMPLS)} (default: all on CUDA; "
                        "on CPU all but the CUDA-only " + ", ".join(CUDA_ONLY) + ")")
    parser.add_argument("--workspace-bytes", type=int, help="arcface_ext.set_workspace_bytes (default: the op's)")
    parser.add_argument("--sample-rate", type=float, default=0.1, help="partial FC's rate for the *-sampled impls")
    parser.add_argument("--subcenters", type=int, default=3,
                        help="k of the subcenter impls, which read the C rows as C / k classes of k sub-centres")
    parser.add_argument("--max-c", type=int,
                        help="CUDA: also search the largest C that fits, up to this, for ours and eager")
    parser.add_argument("--max-c-seconds", type=float, default=120.0,
                        help="time for the largest-C search, shared between ours and eager (default 120)")
    parser.add_argument("--row-margins", action="store_true",
                        help="per-row m2 and m3 ((N,) tensors, AdaFace's form) for every impl that takes margins "
                             "(not ours-graphed; floor has none)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", help="output JSON path (default benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        _memory_child(json.loads(args.memory_child))
        return
    impls = [name.strip() for name in (args.impls or ",".join(DEFAULT_IMPLS[args.device])).split(",")
             if name.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"unknown impls {unknown}; choose from {IMPLS}")
    if args.device != "cuda" and set(impls) & set(CUDA_ONLY):
        raise SystemExit(f"{', '.join(sorted(set(impls) & set(CUDA_ONLY)))}: CUDA only")
    if any(impl.startswith("ours") for impl in impls) and not arcface_ext.extension_available():
        raise SystemExit("arcface_ext's compiled kernels are not built: pip install --no-build-isolation -e .")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    if args.row_margins and "ours-graphed" in impls:
        raise SystemExit("--row-margins: ours-graphed's captured step takes no margins")
    if args.row_margins and args.max_c:
        raise SystemExit("--row-margins: the --max-c search runs scalar margins only")
    if args.max_c and args.device != "cuda":
        raise SystemExit("--max-c searches GPU memory; use it with --device cuda")
    defaults = DEFAULTS[args.device]
    n = args.N or defaults["N"]
    dim = args.D or defaults["D"]
    class_counts = args.C or defaults["C"]
    dtype_name = args.dtype or defaults["dtype"]
    dtype = DTYPES[dtype_name]
    device = torch.device(args.device)
    if args.workspace_bytes:
        arcface_ext.set_workspace_bytes(args.workspace_bytes)

    # gpu_check.sh passes the sources' own hash: the device tool's copy can carry a stale .git.
    environment = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                       git_sha=git_sha(), source_hash=os.environ.get("ARCFACE_EXT_SOURCE_HASH"),
                       threads=torch.get_num_threads())
    print(f"{environment['device']} | torch {environment['torch']} | CUDA {environment['cuda']} | "
          f"{environment['threads']} threads | git {environment['git_sha']} | "
          f"workspace {arcface_ext.get_workspace_bytes()} B")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"{slug(environment['device'])}-{datetime.date.today().isoformat()}.json")
    rows = []
    for num_classes in class_counts:
        tensors = make_inputs(n, dim, num_classes, dtype, device)
        steps = {}
        for impl in impls:
            step = make_step(impl, *tensors, sample_rate=args.sample_rate, subcenters=args.subcenters,
                             per_row_margins=args.row_margins)
            try:
                step()
                synchronize(device)
            except Exception as error:  # e.g. a CUDA graph capture the GPU refuses: the other rows still count
                print(f"{impl} at C = {num_classes} failed and is left out: {type(error).__name__}: {error}")
                continue
            steps[impl] = step
        times, inner = time_interleaved(steps, device=device, warmup=args.warmup, repeats=args.repeats)
        for impl in steps:
            peak = None
            if not args.no_memory and impl != "ours-graphed":
                if device.type == "cuda":
                    peak = cuda_peak_extra_mb(steps[impl], device)
                else:
                    peak = cpu_peak_extra_mb([impl], n, dim, num_classes, dtype_name,
                                             workspace_bytes=args.workspace_bytes,
                                             sample_rate=args.sample_rate, subcenters=args.subcenters,
                                             row_margins=args.row_margins)[impl]
            extra = {"sample_rate": args.sample_rate} if impl.endswith("-sampled") else {}
            if impl.startswith("subcenter"):
                extra["subcenters"] = args.subcenters
            if args.row_margins and impl not in ("floor", "ours-graphed"):  # (neither takes margins)
                extra["row_margins"] = True
            rows.append(dict(impl=impl, N=n, D=dim, C=num_classes, dtype=dtype_name, **extra,
                             ms=statistics.median(times[impl]), ms_all=[round(t, 4) for t in times[impl]],
                             steps_per_sample=inner[impl],
                             peak_extra_mb=peak, **environment))
        del steps, tensors
        gc.collect()
        # What is measured is kept, and printed, if a later C fails or the time runs out.
        write_rows(rows, out)
        print_table([row for row in rows if row["C"] == num_classes], header=num_classes == class_counts[0])
    if args.max_c:
        deadline = time.monotonic() + args.max_c_seconds
        searched = [name for name in ("ours", "eager") if name in impls]
        for position, impl in enumerate(searched):
            # Each impl gets an equal share of the time that is left.
            share = (deadline - time.monotonic()) / (len(searched) - position)
            found, failed = largest_c(impl, n, dim, dtype, device, start=min(class_counts), limit=args.max_c,
                                      deadline=time.monotonic() + share)
            if failed is not None:
                bracket = f"{failed} does not fit"
            elif found >= args.max_c:
                bracket = "every C up to --max-c fits"
            else:
                bracket = "the search ran out of time before a C failed"
            print(f"largest C that fits, {impl}: {found} ({bracket})")
            rows.append(dict(impl=impl, N=n, D=dim, C=found, dtype=dtype_name, kind="max_c",
                             max_c_limit=args.max_c, smallest_c_not_fitting=failed, ms=None,
                             peak_extra_mb=None, **environment))

    write_rows(rows, out)


def write_rows(rows, out):
    write_json_atomic(out, rows)  # (a run killed at its time limit as it writes keeps the file of before)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
