"""How ``train.export`` should write PReLU for onnxruntime: as ONNX's PRelu node (``--onnx-prelu``) or as
relu(x) + (-a) * relu(-x) (its default), or as other forms of the same values. For r18, r50 and mbf at
112 px (random weights, BatchNorm statistics from synthetic faces, as ``bench_int8.py`` makes them): each
form's embeddings against the PRelu graph's (bit for bit?) and PyTorch's, and onnxruntime's latency of each
form in fp32 and in int8 (quantized as ``train.export --int8`` quantizes: PReLU left float; and, to show why,
with the decomposition's Mul and Add quantized too) at batch 1 and 16, all graphs' runs interleaved, in
several rounds whose ratios are printed one by one with the machine's load. ``--optimization`` times them at
onnxruntime's graph optimisation levels too (its default is all). With ``--checkpoint`` also a trained model,
for the int8 graphs' agreement with the fp32 one (the cosine of each face's embeddings).

    python benchmarks/bench_prelu.py --checkpoint runs/mbf/checkpoint.pt \\
        --output benchmarks/results/<machine>-prelu-<date>.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_int8 import run_about, with_batchnorm_statistics, write_rows  # noqa: E402
from train import checkpoint, export, quantize  # noqa: E402
from train.models import get_model  # noqa: E402


class Form(torch.nn.Module):
    """An nn.PReLU written otherwise (the forms train.export does not use)."""

    def __init__(self, prelu: torch.nn.PReLU, kind: str):
        super().__init__()
        self.weight, self.kind, self.per_channel = prelu.weight, kind, prelu.weight.numel() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.weight.reshape(-1, *[1] * (x.dim() - 2)) if self.per_channel else self.weight
        if self.kind == "relu_sub":
            return torch.relu(x) - a * torch.relu(-x)
        if self.kind == "clip":
            return torch.relu(x) + a * torch.clamp(x, max=0)
        return torch.where(x > 0, x, a * x)


@contextlib.contextmanager
def written_as(model: torch.nn.Module, kind: str):
    replaced = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                if type(child) is torch.nn.PReLU]
    try:
        for parent, name, prelu in replaced:
            setattr(parent, name, Form(prelu, kind))
        yield
    finally:
        for parent, name, prelu in replaced:
            setattr(parent, name, prelu)


# Each form: how it is exported. "prelu" and "decomposed" are train.export's (--onnx-prelu, the default).
FORMS = {
    "prelu": "PRelu node",
    "decomposed": "relu(x) + (-a) * relu(-x)",
    "relu_sub": "relu(x) - a * relu(-x)",
    "clip": "relu(x) + a * clip(x, max=0)",
    "where": "where(x > 0, x, a * x)",
}
# The int8 graphs: train.export's of each of its forms, and the decomposition with its Mul and Add quantized.
INT8 = ("prelu", "decomposed", "decomposed_quantized")


def export_form(model: torch.nn.Module, kind: str, path: str, image_size: int) -> None:
    if kind in ("prelu", "decomposed"):
        export.export_onnx(model, path, image_size, prelu_node=kind == "prelu")
    else:
        with written_as(model, kind):
            export.export_onnx(model, path, image_size, prelu_node=True)


def session(path: str, threads: int, level: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = {
        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    return onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def run(s, x: np.ndarray) -> np.ndarray:
    return s.run(None, {"input": x})[0]


def rounds_ms(sessions: dict, x: np.ndarray, repeats: int, rounds: int) -> list[dict]:
    """For each round, each graph's median time of one batch, their runs interleaved (a load that changes
    slows all alike)."""
    for s in sessions.values():  # (the first runs allocate and pick kernels)
        for _ in range(2):
            run(s, x)
    results = []
    for _ in range(rounds):
        times = {name: [] for name in sessions}
        load = os.getloadavg()[0]
        for _ in range(repeats):
            for name, s in sessions.items():
                started = time.perf_counter()
                run(s, x)
                times[name].append(time.perf_counter() - started)
        results.append({"load": (load + os.getloadavg()[0]) / 2,
                        **{name: 1000 * float(np.median(t)) for name, t in times.items()}})
    return results


def measure(name: str, model: torch.nn.Module, image_size: int, folder: str, args, *, run_args: dict | None = None):
    faces = quantize.read_faces("synthetic", args.faces, image_size=image_size, run=run_args or {})
    fp32 = {kind: os.path.join(folder, f"{name}-{kind}.onnx") for kind in args.forms}
    for kind, path in fp32.items():
        export_form(model, kind, path, image_size)
    int8 = {kind: os.path.join(folder, f"{name}-{kind}_int8.onnx") for kind in INT8} if args.int8 else {}
    quantize_s = {}
    for kind, path in int8.items():
        started = time.perf_counter()
        if kind == "decomposed_quantized":
            with mock.patch.object(quantize, "decomposed_prelu_nodes", lambda graph: []):
                quantize.quantize(fp32["decomposed"], path, faces.calibration)
        else:
            quantize.quantize(fp32[kind], path, faces.calibration)
        quantize_s[kind] = time.perf_counter() - started
    row = {"network": name, "image_size": image_size, "quantize_s": quantize_s, "correctness": {}}

    # Correctness: each graph's embeddings of the check faces against the PRelu graph's (fp32: and PyTorch's).
    x = faces.check[:args.batch]
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    outputs = {kind: run(session(path, args.threads, "all"), x) for kind, path in fp32.items()}
    for kind in fp32:
        got, reference = outputs[kind], outputs["prelu"]
        row["correctness"][kind] = {"equal_to_prelu": bool(np.array_equal(got, reference)),
                                    "max_abs_vs_prelu": float(np.abs(got - reference).max()),
                                    "max_abs_vs_pytorch": float(np.abs(got - expected).max()),
                                    "embedding_scale": float(np.abs(expected).max())}
    int8_outputs = {kind: run(session(path, args.threads, "all"), x) for kind, path in int8.items()}
    for kind in int8:
        got, reference = int8_outputs[kind], int8_outputs["prelu"]
        row["correctness"][f"{kind}_int8"] = {"equal_to_prelu": bool(np.array_equal(got, reference)),
                                              "max_abs_vs_prelu": float(np.abs(got - reference).max())}
        if run_args is not None:  # (a model of random weights is no guide to the agreement)
            agreement = quantize.agreement(fp32["prelu"], int8[kind], faces.check)
            row["correctness"][f"{kind}_int8"].update(faces=agreement.faces, cosine_mean=agreement.mean,
                                                      cosine_min=agreement.min)
    for kind, result in row["correctness"].items():
        print(f"{name} {kind}: " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                             for key, value in result.items()), flush=True)

    graphs = {**fp32, **{f"{kind}_int8": path for kind, path in int8.items()}}
    row["latency"] = {}
    for level in args.optimization:
        sessions = {kind: session(path, args.threads, level) for kind, path in graphs.items()}
        for batch, repeats in ((1, args.repeats), (args.batch, max(3, args.repeats // 4))):
            results = rounds_ms(sessions, faces.check[:batch], repeats, args.rounds)
            row["latency"][f"{level}_batch{batch}"] = results
            for result in results:
                print(f"{name} optimization {level} batch {batch} (load {result['load']:.1f}): " + ", ".join(
                    f"{kind} {result[kind]:.1f} ms" + ("" if kind in ("prelu", "prelu_int8") else
                                                        f" ({ratio(result, kind):.2f}x)") for kind in graphs),
                      flush=True)
        del sessions
    return row


def ratio(result: dict, kind: str) -> float:
    """How many times faster ``kind`` ran than the PRelu graph of its precision."""
    return result["prelu_int8" if kind.endswith("_int8") else "prelu"] / result[kind]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="r18,r50,mbf")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="also a trained model, calibrated and checked on its run's synthetic faces; repeatable")
    p.add_argument("--forms", default=",".join(FORMS), help=f"of {', '.join(FORMS)} (prelu and decomposed always)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="fp32 graphs only")
    p.add_argument("--optimization", default="all",
                   help="onnxruntime's graph optimisation levels to time at, of all, extended, basic, none")
    p.add_argument("--faces", type=int, default=quantize.DEFAULT_FACES, help="faces that calibrate, as many check")
    p.add_argument("--batch", type=int, default=16, help="the larger batch")
    p.add_argument("--repeats", type=int, default=20, help="timed runs of each graph a round at batch 1 (a "
                   "quarter of it at --batch)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime's intra-op threads")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args()
    args.forms = ["prelu", "decomposed"] + [kind for kind in args.forms.split(",")
                                            if kind not in ("prelu", "decomposed")]
    for kind in args.forms:
        if kind not in FORMS:
            p.error(f"--forms: {kind} is not one of {', '.join(FORMS)}")
    args.optimization = args.optimization.split(",")
    import onnxruntime

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.networks.split(",") if args.networks else []:
            model = with_batchnorm_statistics(get_model(name, image_size=112, embedding_size=512), 112)
            rows.append(measure(name, model, 112, folder, args))
        for path in args.checkpoint:
            from train.verify import _run_args

            model, settings = checkpoint.load_backbone(path)
            rows.append(measure(f"{settings['network']} (trained)", model, settings["image_size"], folder, args,
                                run_args=_run_args(path)))
    about = {**run_about(args), "forms": {kind: FORMS[kind] for kind in args.forms}}
    print(f"\nonnxruntime {onnxruntime.__version__}, {args.threads} threads, {os.cpu_count()} cores, load "
          f"{about['load_average'][0]:.1f} (git {about['git']}); the median over {args.rounds} rounds of each round's "
          "median time (ms), and how many times faster than the PRelu graph (the rounds' lowest to highest)")
    for level in args.optimization:
        print(f"\noptimization {level}")
        kinds = args.forms + [f"{kind}_int8" for kind in INT8] if args.int8 else args.forms
        print("| network | batch | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for row in rows:
            for batch in (1, args.batch):
                results = row["latency"][f"{level}_batch{batch}"]
                cells = []
                for kind in kinds:
                    ms = float(np.median([result[kind] for result in results]))
                    ratios = [ratio(result, kind) for result in results]
                    cells.append(f"{ms:.1f}" if kind in ("prelu", "prelu_int8") else
                                 f"{ms:.1f} ({min(ratios):.2f}-{max(ratios):.2f}x)")
                print(f"| {row['network']} {row['image_size']}px | {batch} | " + " | ".join(cells) + " |")
    if args.output:
        write_rows(args.output, about, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
