"""How fast, and in how much memory, does a whole training step run as the number of identities grows?

One step is what the trainer does with `--data random` (train/data/random.py): a fixed batch of uint8
noise on the device, scaled as the trainer scales it, the backbone's forward and backward, the margin
loss, the gradient clipping at 5 and the SGD step (momentum 0.9, weight decay 5e-4) over the backbone
and the class centres, with an fp16 gradient scaler where --amp or --loss-amp is fp16. Labels are drawn
uniformly over C each step. Two losses, each over the same backbone:

- `ours`: arcface_ext's module as the trainer builds it (train.trainer.build_margin_loss; ArcFace, s = 64,
  m = 0.5; --loss-amp and --sample-rate as the trainer takes them; --loss-amp defaults to --amp, so that
  both losses' GEMMs run in one dtype);
- `eager-pfc`: an eager loss after the design of insightface's PartialFC_V2 at world size 1, written
  here: with --sample-rate below 1 the batch's classes plus random others up to rate x C; the
  embeddings and centres normalised, the whole N x C cosine matrix (under autocast where --amp is
  fp16 or bf16, as PartialFC_V2 runs its linear under fp16), cos(θ + m) on the target, x s, and
  cross-entropy in fp32.

Prints a table and writes its rows (device, torch and CUDA versions, git sha, network, batch, C,
images/s, peak memory) to benchmarks/results/<device-name>-step-<YYYY-MM-DD>.json.

    python benchmarks/bench_step.py                                  # CPU: small, batch 32, C = 1000 10000
    python benchmarks/bench_step.py --device cuda --network r50 --amp fp16 --max-c 20000000
                                                                     # C = 1e4 1e5 1e6 2e6, batch 128

Timing: each (C, loss) builds its model and optimiser afresh from the same seed, runs --warmup steps,
then --repeats timed steps; `images/s` is the batch over the median step (on CUDA between two CUDA
events, on the CPU by the host clock). On the CPU both losses' models are built together and their
steps take turns, the first of each round rotating, as bench_loss.py times; on CUDA one loss at a time,
alone in GPU memory (two models of millions of classes need not fit at once, and each peak is its
own). `x eager` = ours' images/s over eager-pfc's (> 1 is faster).

Memory: `state MB` is what the step keeps between steps, counted from the tensors: the parameters,
their gradients and the optimiser's momentum (the class centres are most of it at large C). `peak MB`:
  - CUDA: torch.cuda.max_memory_allocated() over the timed steps, reset after the warm-up (everything:
    state and activations);
  - CPU: the most resident memory a step adds to what was resident just before it (VmHWM after resetting
    it through /proc/self/clear_refs, less VmRSS before), with glibc's mmap threshold pinned at 64 KiB
    as bench_loss.py pins it, so that freed buffers leave the resident set (the script re-runs itself
    with MALLOC_MMAP_THRESHOLD_ set). Without /proc it is left out (null).
--max-c (CUDA) searches the largest C whose step fits, for each loss (a model and two steps; doubling,
then bisection to 1%), within --max-c-seconds shared between the losses.
"""
import argparse
import contextlib
import datetime
import io
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # (the checkout's packages, and bench_loss.py beside this one when imported by path)
    if path not in sys.path:
        sys.path.insert(0, path)

import arcface_ext  # noqa: E402
from bench_loss import (MMAP_THRESHOLD_BYTES, _proc_status_mb, device_name, git_sha, slug,  # noqa: E402
                        synchronize, write_rows)
from train.config import parse_args as trainer_args  # noqa: E402
from train.data import RandomFaces  # noqa: E402
from train.data.transforms import to_model_input  # noqa: E402
from train.models import get_model  # noqa: E402
from train.trainer import build_margin_loss, build_optimizer  # noqa: E402

IMPLS = ("ours", "eager-pfc")
DEFAULTS = {
    "cpu": dict(network="small", batch_size=32, C=[1000, 10_000]),
    "cuda": dict(network="r50", batch_size=128, C=[10_000, 100_000, 1_000_000, 2_000_000]),
}
AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_CLIP = 5.0  # the trainer's default --grad-clip


class EagerPartialFC(nn.Module):
    """A margin loss after PartialFC_V2's design at world size 1, in eager PyTorch: the class centres (C x D,
    initialised N(0, 0.01)), a sample of them at ``sample_rate`` < 1, the whole N x C cosine matrix, ArcFace's
    cos(θ + m) on the target and cross-entropy. ``amp``: the dtype its cosine GEMM autocasts to (None: fp32)."""

    def __init__(self, num_classes, embedding_size, *, s=64.0, m=0.5, sample_rate=1.0, amp=None):
        super().__init__()
        self.num_classes, self.s, self.m, self.sample_rate, self.amp = num_classes, s, m, sample_rate, amp
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def sample(self, labels):
        """(the centres' rows to use, the labels as positions among them): every class of the batch, and
        others drawn uniformly up to sample_rate x C."""
        count = int(self.sample_rate * self.num_classes)
        positives = torch.unique(labels, sorted=True)
        if count <= positives.numel():
            return positives, torch.searchsorted(positives, labels)
        scores = torch.rand(self.num_classes, device=labels.device)
        scores[positives] = 2.0  # (above any draw: always kept)
        index = torch.topk(scores, k=count).indices.sort().values
        return index, torch.searchsorted(index, labels)

    def forward(self, embeddings, labels):
        weight = self.weight
        if self.sample_rate < 1.0:
            index, labels = self.sample(labels)
            weight = weight[index]
        with torch.autocast(embeddings.device.type, dtype=self.amp, enabled=self.amp is not None):
            cosine = F.linear(F.normalize(embeddings), F.normalize(weight))
        cosine = cosine.float().clamp(-1.0, 1.0)
        rows = torch.arange(labels.numel(), device=labels.device)
        target = cosine[rows, labels]
        theta = torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        logits = cosine.index_put((rows, labels), torch.cos(theta + self.m)) * self.s
        return F.cross_entropy(logits, labels)


def trainer_options(num_classes, options, device):
    """The trainer's options for this step (its parser: the network, the loss, the optimiser as it makes them).
    What it refuses (argparse's usage and error, or its own line) is one line, without the trainer's usage."""
    argv = ["--data", "random", "--num-classes", str(num_classes), "--network", options.network,
            "--image-size", str(options.image_size), "--embedding-size", str(options.embedding_size),
            "--batch-size", str(options.batch_size), "--amp", options.amp, "--loss-amp", options.loss_amp,
            "--sample-rate", str(options.sample_rate), "--device", str(device), "--val-targets", "none",
            "--num-workers", "0"]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = trainer_args(argv)
    except SystemExit as error:
        lines = said.getvalue().strip().splitlines()
        raise SystemExit(lines[-1].split(": error: ", 1)[-1] if lines else error.code) from None
    sys.stderr.write(said.getvalue())  # (its notes)
    return args


class Step:
    """One impl's training step at one C: its backbone, loss, optimiser and gradient scaler."""

    def __init__(self, impl, num_classes, options, device):
        args = trainer_options(num_classes, options, device)
        self.args, self.device, self.impl = args, device, impl
        torch.manual_seed(options.seed)
        with device:  # (made on the device: millions of centres drawn on the host first took seconds each)
            self.backbone = get_model(args.network, embedding_size=args.embedding_size, image_size=args.image_size,
                                      amp=args.amp).to(device)
            if impl == "ours":
                self.loss = build_margin_loss(args, num_classes).to(device)
                self.loss_dtype = AMP_DTYPES[args.loss_amp]
            else:
                self.loss = EagerPartialFC(num_classes, args.embedding_size, s=args.arcface_s, m=args.arcface_m,
                                           sample_rate=args.sample_rate, amp=AMP_DTYPES[args.amp]).to(device)
                self.loss_dtype = None
        self.optimizer = build_optimizer(args, self.backbone, self.loss)
        self.scaler = torch.amp.GradScaler(device.type, enabled="fp16" in (args.amp, args.loss_amp))
        data = RandomFaces(num_classes, image_size=args.image_size, seed=options.seed)
        self.images, self.data, self.step_index = data.images(args.batch_size, device), data, 0

    def __call__(self):
        labels = self.data.labels(self.step_index, self.args.batch_size).to(self.device, non_blocking=True)
        self.step_index += 1
        self.optimizer.zero_grad(set_to_none=True)
        embeddings = self.backbone(to_model_input(self.images))
        with torch.autocast(self.device.type, dtype=self.loss_dtype, enabled=self.loss_dtype is not None):
            loss = self.loss(embeddings, labels)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.backbone.parameters(), GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_mb(self):
        """Parameters, their gradients and the optimiser's state, in MB."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        tensors += list(self.backbone.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def time_steps(steps, device, warmup, repeats):
    """{impl: [ms of each timed step]}: ``warmup`` steps of each first, then ``repeats`` rounds in which the
    impls take turns, the first of each round rotating (as bench_loss.py times them). On CUDA the peak memory
    is reset after the warm-up, so that max_memory_allocated is the timed steps' (the first step's cuDNN
    autotuning, with its trial workspaces, would be the first impl's alone: the second finds its cache)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    names = list(steps)
    times = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            gc.collect()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                steps[name]()
                times[name].append((time.perf_counter() - begin) * 1e3)
    return times


def cpu_peak_extra_mb(step):
    """The resident memory one more step adds at its peak (VmHWM reset before it), or None without /proc."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _proc_status_mb("VmRSS")["VmRSS"]
    except (OSError, KeyError):
        return None
    step()
    return max(0.0, _proc_status_mb("VmHWM")["VmHWM"] - before)  # (a step that frees more than it takes: 0)


def fits(impl, num_classes, options, device):
    step = None
    try:
        step = Step(impl, num_classes, options, device)
        step()
        step()
        synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()


def largest_c(impl, options, device, start, limit, deadline=None):
    """(largest C seen to fit, smallest seen not to or None): doubling from ``start``, then bisection to 1%.
    Past ``deadline`` (time.monotonic()) the search stops where it is and returns the bracket it has."""
    def out_of_time():
        return deadline is not None and time.monotonic() > deadline

    if not fits(impl, start, options, device):
        return 0, start
    low, high = start, None
    while high is None:
        if low >= limit or out_of_time():
            return low, None
        candidate = min(low * 2, limit)
        if fits(impl, candidate, options, device):
            low = candidate
        else:
            high = candidate
    while high - low > max(1, low // 100) and not out_of_time():
        middle = (low + high) // 2
        if fits(impl, middle, options, device):
            low = middle
        else:
            high = middle
    return low, high


def print_table(rows, header=True):
    title = (f"{'impl':<10} {'network':>8} {'batch':>5} {'C':>9} {'amp':>5} {'ms':>9} {'images/s':>9} "
             f"{'x eager':>8} {'state MB':>9} {'peak MB':>9}")
    if header:
        print(title)
        print("-" * len(title))
    eager = {r["C"]: r for r in rows if r["impl"] == "eager-pfc"}
    for r in rows:
        other = eager.get(r["C"])
        ratio = f"{r['images_per_s'] / other['images_per_s']:.2f}" if other else "-"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        print(f"{r['impl']:<10} {r['network']:>8} {r['batch_size']:>5} {r['C']:>9} {r['amp']:>5} {r['ms']:>9.2f} "
              f"{r['images_per_s']:>9.1f} {ratio:>8} {r['state_mb']:>9.1f} {peak:>9}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--network", help="the trainer's --network; default small on CPU, r50 on CUDA")
    parser.add_argument("--batch-size", type=int, help="images a step; default 32 on CPU, 128 on CUDA")
    parser.add_argument("--C", type=int, nargs="+",
                        help="identity counts; default 1000 10000 on CPU, 10000 100000 1000000 2000000 on CUDA")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none",
                        help="the backbone's autocast (the trainer's --amp), and eager-pfc's cosine GEMM's")
    parser.add_argument("--loss-amp", choices=sorted(AMP_DTYPES),
                        help="ours' loss dtype (the trainer's --loss-amp); default --amp's, the dtype of eager-pfc's "
                        "cosine GEMM, so that both losses' GEMMs run in one dtype (none: ours in fp32, the trainer's "
                        "default)")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="partial FC's rate, for both losses")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-c", type=int, help="CUDA: also search the largest C that fits, up to this")
    parser.add_argument("--max-c-seconds", type=float, default=120.0,
                        help="time for the largest-C search, shared between the impls (default 120)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory measurement")
    parser.add_argument("--out", help="output JSON path (default benchmarks/results/<device>-step-<date>.json)")
    args = parser.parse_args(argv)
    args.loss_amp = args.loss_amp or args.amp
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--max-c", args.max_c, 1),
                               *(("--C", count, 1) for count in args.C or ())):
        if value is not None and value < least:
            raise SystemExit(f"{flag} {value}: at least {least}")
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"unknown impls {unknown}; choose from {IMPLS}")
    if "ours" in impls and not arcface_ext.extension_available():
        raise SystemExit("arcface_ext's compiled kernels are not built: pip install --no-build-isolation -e .")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    if args.max_c and args.device != "cuda":
        raise SystemExit("--max-c searches GPU memory; use it with --device cuda")
    if (args.device == "cpu" and not args.no_memory and os.path.exists("/proc/self/clear_refs")
            and "MALLOC_MMAP_THRESHOLD_" not in os.environ):
        # (glibc reads it at start-up: the script runs again with it, as bench_loss.py's memory children do)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    defaults = DEFAULTS[args.device]
    args.network = args.network or defaults["network"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    class_counts = args.C or defaults["C"]
    device = torch.device(args.device)
    trainer_options(class_counts[0], args, device)  # (what it refuses, before the first model is made)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # (as the trainer sets it)

    environment = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                       git_sha=git_sha(), source_hash=os.environ.get("ARCFACE_EXT_SOURCE_HASH"),
                       threads=torch.get_num_threads())
    print(f"{environment['device']} | torch {environment['torch']} | CUDA {environment['cuda']} | "
          f"{environment['threads']} threads | git {environment['git_sha']}")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"{slug(environment['device'])}-step-{datetime.date.today().isoformat()}.json")
    setting = dict(network=args.network, batch_size=args.batch_size, image_size=args.image_size,
                   D=args.embedding_size, amp=args.amp, loss_amp=args.loss_amp, sample_rate=args.sample_rate)
    rows = []
    # On the CPU the impls of a C are built together and timed in turns (a shared machine's load falls on
    # both); on CUDA one at a time, each alone in GPU memory, so that its peak is its own and a C that fits
    # one impl is not lost to the other's centres.
    groups = [impls] if device.type == "cpu" else [[impl] for impl in impls]
    for num_classes in class_counts:
        measured = []
        for group in groups:
            try:
                steps = {impl: Step(impl, num_classes, args, device) for impl in group}
                times = time_steps(steps, device, args.warmup, args.repeats)
            except torch.cuda.OutOfMemoryError as error:
                print(f"{', '.join(group)} at C = {num_classes} does not fit and is left out: "
                      f"{str(error).splitlines()[0]}")
                steps = None
                gc.collect()
                torch.cuda.empty_cache()
                continue
            for impl, step in steps.items():
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                else:
                    peak = None if args.no_memory else cpu_peak_extra_mb(step)
                ms = statistics.median(times[impl])
                measured.append(dict(impl=impl, C=num_classes, **setting, ms=ms,
                                     ms_all=[round(t, 3) for t in times[impl]], images_per_s=args.batch_size / ms * 1e3,
                                     state_mb=step.state_mb(), peak_mb=peak,
                                     peak_kind="max_memory_allocated" if device.type == "cuda" else "step_rss_extra",
                                     **environment))
            del steps
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows += measured
        write_rows(rows, out)  # (what is measured is kept if a later C fails)
        print_table(measured, header=num_classes == class_counts[0])
    if args.max_c:
        deadline = time.monotonic() + args.max_c_seconds
        for position, impl in enumerate(impls):
            share = (deadline - time.monotonic()) / (len(impls) - position)  # (an equal share of what is left)
            found, failed = largest_c(impl, args, device, start=min(class_counts), limit=args.max_c,
                                      deadline=time.monotonic() + share)
            said = (f"{failed} does not fit" if failed is not None else "every C up to --max-c fits"
                    if found >= args.max_c else "the search ran out of time before a C failed")
            print(f"largest C that fits, {impl}: {found} ({said})")
            rows.append(dict(impl=impl, C=found, **setting, kind="max_c", max_c_limit=args.max_c,
                             smallest_c_not_fitting=failed, ms=None, images_per_s=None, peak_mb=None,
                             **environment))
        write_rows(rows, out)


if __name__ == "__main__":
    main()
