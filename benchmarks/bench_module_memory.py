"""How much memory does training a loss module with many class centres take in all, on the CPU?

bench_loss.py measures the loss's own extra memory (beyond its inputs and their gradients). What a user
must budget is more: the C x D centres, their C x D gradient, SGD's C x D momentum (AdamW's two
moments), and the optimizer step's own temporaries. Each configuration runs in a fresh child process
(glibc's mmap threshold pinned as in bench_loss.py, so that the resident set follows the live heap)
which builds `arcface_ext.CombinedMarginLoss(C, D)` (ArcFace, m = 0.5; `--impls reference` sets
use_reference=True, the pure-PyTorch loss; --label-smoothing its label_smoothing) and an SGD (momentum
0.9, weight decay --weight-decay, 5e-4 by default as the trainer's; --sgd: torch.optim.SGD as it is,
``torch`` (a copy of the gradient to add the decay to), with ``fused=True``, or
``arcface_ext.optim.SGD`` (the trainer's; ``trainer``), which adds the decay in place; or with --adamw
an AdamW (lr 0.001, the same weight decay): ``torch``, ``fused``, or ``arcface_ext.optim.AdamW`` (the
trainer's; ``trainer``), which steps the centres a slice at a time), then runs --steps steps of loss,
backward, optimizer step, zero_grad on random embeddings (N x D, requiring grad, as a backbone's
output). Reported, in MiB beyond the process's resident set before the module was built (torch imported,
threads set, one step of an 8-class module and its optimizer run):

  centres_mb   the module's weight alone (C x D x 4 bytes)
  state_mb     resident after the first step: centres and momentum or moments (zero_grad frees the
               gradient)
  peak_mb      the most resident at any moment of steps 2.. (the kernel's peak-RSS counter, reset
               before them): what the process needs for the loss and its optimizer
  step_peak_mb peak_mb - state_mb: what a step adds at its peak (gradient, the loss's scratch, the
               optimizer's temporaries)
  ms           median time of steps 2.. (loss, backward, optimizer step), by the host clock

    python benchmarks/bench_module_memory.py                  # C = 100k, 300k, 1M; N = 256; ours
    python benchmarks/bench_module_memory.py --impls ours,reference --C 100000 --sample-rate 1 0.1
    python benchmarks/bench_module_memory.py --C 100000 --label-smoothing 0 0.1
    python benchmarks/bench_module_memory.py --C 300000 --sgd torch fused trainer
    python benchmarks/bench_module_memory.py --C 300000 --sgd trainer --adamw torch fused trainer

Rows go to benchmarks/results/<device>-module-memory-<YYYY-MM-DD>.json (or --out).
"""
import argparse
import datetime
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import arcface_ext  # noqa: E402
from bench_loss import _proc_status_mb, device_name, git_sha, run_child, slug  # noqa: E402
from train.checkpoint import write_json_atomic  # noqa: E402

IMPLS = ("ours", "reference")
KINDS = ("torch", "fused", "trainer")


def _optimizer(name, params, weight_decay):
    """name: "sgd/<kind>" or "adamw/<kind>", kind one of KINDS."""
    algorithm, kind = name.split("/")
    if algorithm == "adamw":
        if kind == "trainer":
            # the trainer's: large tensors stepped a slice at a time
            return arcface_ext.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay, fused=kind == "fused" or None)
    if kind == "trainer":
        # the trainer's: the weight decay added to the gradient in place
        return arcface_ext.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=weight_decay, fused=kind == "fused" or None)


def _rss_mb():
    return _proc_status_mb("VmRSS")["VmRSS"]


def _child(spec):
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    # A step of a few classes first, so that what the first call sets up once (thread pools, lazy imports)
    # is in the baseline, not counted as the centres'.
    warm = arcface_ext.CombinedMarginLoss(8, spec["D"], use_reference=spec["impl"] == "reference")
    warm_optimizer = _optimizer(spec["optimizer"], warm.parameters(), 5e-4)
    warm(torch.randn(4, spec["D"], requires_grad=True), torch.arange(4)).backward()
    warm_optimizer.step()
    del warm, warm_optimizer
    gc.collect()
    baseline = _rss_mb()
    module = arcface_ext.CombinedMarginLoss(spec["C"], spec["D"], sample_rate=spec["sample_rate"],
                                            use_reference=spec["impl"] == "reference",
                                            label_smoothing=spec["label_smoothing"])
    optimizer = _optimizer(spec["optimizer"], module.parameters(), spec["weight_decay"])
    built = _rss_mb() - baseline
    embeddings = torch.randn(spec["N"], spec["D"], requires_grad=True)
    labels = torch.randint(0, spec["C"], (spec["N"],))
    embeddings_mb = _rss_mb() - baseline - built

    def step():
        loss = module(embeddings, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None

    step()
    gc.collect()
    state = _rss_mb() - baseline
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    times = []
    for _ in range(spec["steps"] - 1):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    peak = _proc_status_mb("VmHWM")["VmHWM"] - baseline
    print(json.dumps(dict(centres_mb=built, embeddings_mb=embeddings_mb, state_mb=state, peak_mb=peak,
                          step_peak_mb=peak - state, ms=statistics.median(times),
                          ms_all=[round(t, 3) for t in times])))


def measure(spec, timeout):
    return run_child(__file__, "--child", spec, timeout, f"child for {spec}")


def _described(name):
    algorithm, kind = name.split("/")
    return f"sgd momentum 0.9 ({kind})" if algorithm == "sgd" else f"adamw lr 0.001 ({kind})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--C", type=int, nargs="+", default=[100_000, 300_000, 1_000_000], help="class counts")
    parser.add_argument("--N", type=int, default=256, help="rows a step")
    parser.add_argument("--D", type=int, default=512, help="embedding size")
    parser.add_argument("--impls", default="ours", help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[1.0], help="partial FC's rates")
    parser.add_argument("--label-smoothing", type=float, nargs="+", default=[0.0],
                        help="the modules' label_smoothing (0: none)")
    parser.add_argument("--weight-decay", type=float, default=5e-4,
                        help="the optimizers' (the trainer's default 5e-4)")
    parser.add_argument("--sgd", nargs="*", default=None, choices=KINDS,
                        help="torch.optim.SGD as it is, with fused=True, or the trainer's (the decay in place); "
                             "default torch unless --adamw is given")
    parser.add_argument("--adamw", nargs="*", default=[], choices=KINDS,
                        help="torch.optim.AdamW as it is, with fused=True, or the trainer's (sliced)")
    parser.add_argument("--steps", type=int, default=4, help="steps a configuration (the first is not timed)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a configuration may take")
    parser.add_argument("--out", help="output JSON path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    optimizers = [f"sgd/{kind}" for kind in (args.sgd if args.sgd is not None else [] if args.adamw else ["torch"])]
    optimizers += [f"adamw/{kind}" for kind in args.adamw]
    if not optimizers:
        parser.error("--sgd and --adamw: name at least one optimizer")
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            parser.error(f"--impls: unknown implementation {impl!r} (choose from {', '.join(IMPLS)})")
    if args.steps < 2:
        parser.error(f"--steps: need at least 2 (the first is not timed), got {args.steps}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay: must be a finite number >= 0, got {args.weight_decay}")
    for rate in args.sample_rate:
        if not 0 < rate <= 1:
            parser.error(f"--sample-rate: each must lie in (0, 1], got {rate}")
    for epsilon in args.label_smoothing:
        if not 0 <= epsilon <= 1:
            parser.error(f"--label-smoothing: each must lie in [0, 1], got {epsilon}")
    environment = dict(device=device_name(torch.device("cpu")), torch=torch.__version__, git_sha=git_sha(),
                       threads=torch.get_num_threads())
    print(f"{environment['device']} | torch {environment['torch']} | {environment['threads']} threads | "
          f"git {environment['git_sha']}")
    out = args.out or os.path.join(HERE, "results", f"{slug(environment['device'])}-module-memory-"
                                                    f"{datetime.date.today().isoformat()}.json")
    title = (f"{'impl':<10} {'C':>9} {'N':>5} {'rate':>5} {'ls':>4} {'optimizer':>13} {'centres MB':>10} "
             f"{'state MB':>9} {'peak MB':>9} {'step peak MB':>12} {'ms':>9}")
    print(title)
    print("-" * len(title))
    rows = []
    for num_classes in args.C:
        for rate, epsilon, name in itertools.product(args.sample_rate, args.label_smoothing, optimizers):
            for impl in impls:
                spec = dict(impl=impl, C=num_classes, N=args.N, D=args.D, sample_rate=rate, label_smoothing=epsilon,
                            optimizer=name, steps=args.steps, weight_decay=args.weight_decay,
                            threads=environment["threads"])
                result = measure(spec, args.timeout)
                rows.append(dict(impl=impl, C=num_classes, N=args.N, D=args.D, dtype="fp32", sample_rate=rate,
                                 label_smoothing=epsilon, optimizer=_described(name),
                                 weight_decay=args.weight_decay, **result, **environment))
                print(f"{impl:<10} {num_classes:>9} {args.N:>5} {rate:>5} {epsilon:>4} {name:>13} "
                      f"{result['centres_mb']:>10.1f} {result['state_mb']:>9.1f} {result['peak_mb']:>9.1f} "
                      f"{result['step_peak_mb']:>12.1f} {result['ms']:>9.1f}", flush=True)
                write_json_atomic(out, rows)  # kept if a later configuration fails (whole, if killed as it writes)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
