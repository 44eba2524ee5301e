"""What ``train.export --int8`` gives on a CPU: onnxruntime's latency of ``backbone.onnx`` (fp32) against
``backbone_int8.onnx`` at batch 1 and a larger batch, on a fixed number of threads, the two files' sizes,
and, for trained models, the two graphs' agreement (the cosine of each face's embeddings, on faces not used
for calibration).

The networks are r18, r50 and mbf at 112 px with random weights (latency does not depend on the weights):
their BatchNorm statistics are taken from a few batches of synthetic faces, so that the activations, and
the calibration ranges, have a trained network's scale rather than growing layer after layer. With
``--checkpoint`` a trained model is measured too, at its own size (the demo's run; its verification
in both forms is ``train.export --int8``'s own report).

    python benchmarks/bench_int8.py --checkpoint runs/small/checkpoint.pt \\
        --output benchmarks/results/<machine>-int8-<date>.json
    python benchmarks/bench_int8.py --networks mbf --profile
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
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_loss import git_sha  # noqa: E402
from train import checkpoint, export, quantize  # noqa: E402
from train.models import get_model  # noqa: E402


def session(path: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def latencies_ms(paths: dict[str, str], images: np.ndarray, batch: int, repeats: int, threads: int) -> dict:
    """The median time of one batch, each graph's runs interleaved with the other's (a machine whose load
    changes slows both alike)."""
    sessions = {name: session(path, threads) for name, path in paths.items()}
    x = images[:batch]
    for s in sessions.values():  # (the first runs allocate and pick kernels)
        for _ in range(3):
            s.run(None, {"input": x})
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            started = time.perf_counter()
            s.run(None, {"input": x})
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def profile_ms(path: str, images: np.ndarray, threads: int, runs: int = 30) -> dict[str, float]:
    """onnxruntime's own profile of the graph at ``path`` at batch 1: the time of each kind of node (its
    kernels after onnxruntime's fusions: QLinearConv for a DequantizeLinear-Conv-QuantizeLinear), ms a run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.splitext(path)[0]
    s = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {"input": images[:1]})
    trace = s.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    kinds: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kind = event["args"]["op_name"]
            kinds[kind] = kinds.get(kind, 0.0) + event["dur"] / 1000 / runs  # (microseconds)
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def measure(name: str, model: torch.nn.Module, image_size: int, folder: str, args, *, run: dict | None = None) -> dict:
    """A row of the table: ``model`` exported, quantized as ``train.export --int8`` quantizes it (calibrated
    on synthetic faces: those of ``run``, a trained model's, else the default ones), and timed. The agreement
    only for a trained model: one of random weights is no guide to it (mbf: a mean cosine of 0.85 here)."""
    fp32, int8 = os.path.join(folder, f"{name}.onnx"), os.path.join(folder, f"{name}_int8.onnx")
    export.export_onnx(model, fp32, image_size)
    faces = quantize.read_faces("synthetic", args.faces, image_size=image_size, run=run or {})
    started = time.perf_counter()
    quantize.quantize(fp32, int8, faces.calibration)
    quantize_s = time.perf_counter() - started
    row = {"network": name, "image_size": image_size, "fp32_mb": os.path.getsize(fp32) / 1e6,
           "int8_mb": os.path.getsize(int8) / 1e6, "quantize_s": quantize_s}
    if run is not None:
        agreement = quantize.agreement(fp32, int8, faces.check)
        row.update(faces=agreement.faces, cosine_mean=agreement.mean, cosine_min=agreement.min)
    for batch, repeats in ((1, args.repeats), (args.batch, max(3, args.repeats // 4))):
        ms = latencies_ms({"fp32": fp32, "int8": int8}, faces.check, batch, repeats, args.threads)
        row[f"fp32_ms_batch{batch}"], row[f"int8_ms_batch{batch}"] = ms["fp32"], ms["int8"]
    if args.profile:
        for kind, path in (("fp32", fp32), ("int8", int8)):
            row[f"{kind}_profile_ms"] = profile_ms(path, faces.check, args.threads)
            print(f"{name} {kind} at batch 1, ms a run by kind of node: "
                  + ", ".join(f"{op} {ms:.2f}" for op, ms in row[f"{kind}_profile_ms"].items()), flush=True)
    return row


def with_batchnorm_statistics(model: torch.nn.Module, image_size: int) -> torch.nn.Module:
    """``model`` after a few training-mode passes over synthetic faces: its BatchNorms' running statistics
    those of its own activations (cumulative averages), as a trained network's are."""
    faces = torch.from_numpy(quantize.read_faces("synthetic", 64, image_size=image_size, run={}).calibration)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(faces), 16):
            model(faces[start:start + 16])
    return model.eval()


def run_about(args) -> dict:
    """Where and with what the rows were timed (bench_int8's and bench_prelu's --output): the machine, its
    load, the versions, the commit and onnxruntime's --threads."""
    import onnxruntime

    return {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "git": git_sha(), "threads": args.threads}


def write_rows(path: str, about: dict, rows: list[dict]) -> None:
    """--output's JSON of bench_int8 and bench_prelu: ``about`` (:func:`run_about`'s), then the rows."""
    checkpoint.write_json_atomic(path, {**about, "rows": rows})
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="r18,r50,mbf")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="also a trained model (the demo's checkpoint.pt), calibrated and checked on its run's "
                   "synthetic faces; may be given more than once")
    p.add_argument("--faces", type=int, default=quantize.DEFAULT_FACES, help="faces that calibrate, as many check")
    p.add_argument("--batch", type=int, default=16, help="the larger batch")
    p.add_argument("--repeats", type=int, default=40, help="timed runs at batch 1 (a quarter of it at --batch)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime's intra-op threads")
    p.add_argument("--profile", action="store_true",
                   help="also onnxruntime's profile of each graph at batch 1: the time of each kind of node")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args()
    import onnxruntime

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.networks.split(","):
            model = with_batchnorm_statistics(get_model(name, image_size=112, embedding_size=512), 112)
            rows.append(measure(name, model, 112, folder, args))
            print(rows[-1], flush=True)
        for path in args.checkpoint:
            from train.verify import _run_args

            model, settings = checkpoint.load_backbone(path)
            rows.append(measure(f"{settings['network']} (trained)", model, settings["image_size"], folder, args,
                                run=_run_args(path)))
            print(rows[-1], flush=True)
    about = run_about(args)
    print(f"\nonnxruntime {onnxruntime.__version__}, {args.threads} threads, {os.cpu_count()} cores, load "
          f"{about['load_average'][0]:.1f} (git {about['git']})")
    print(f"| network | fp32 MB | int8 MB | batch 1 fp32 / int8 ms | batch {args.batch} fp32 / int8 ms | "
          "cosine mean / min |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        one, many = (f"{row[f'fp32_ms_batch{b}']:.1f} / {row[f'int8_ms_batch{b}']:.1f} "
                     f"({row[f'fp32_ms_batch{b}'] / row[f'int8_ms_batch{b}']:.2f}x)" for b in (1, args.batch))
        cosine = f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f}" if "cosine_mean" in row else "-"
        print(f"| {row['network']} {row['image_size']}px | {row['fp32_mb']:.1f} | {row['int8_mb']:.1f} | {one} | "
              f"{many} | {cosine} |")
    if args.output:
        write_rows(args.output, about, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
