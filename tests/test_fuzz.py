"""Random configurations of the CUDA op against the fp64 reference, for as long as
ARCFACE_FUZZ_SECONDS says (skipped without it): shapes, dtypes, margins (per-row ones too), reductions,
ignored rows, class shards (combined as the sharded loss combines them), the workspace, and the path
switches (cuBLAS, mma.sync, the wgmma tiles, the kept gradient block, row tiles, pipeline depth, the
upcast GEMMs of torch < 2.8). On the CPU emulator of the CUDA source or on a GPU:

    ARCFACE_EXT_EMULATE_CUDA=1 ARCFACE_FUZZ_SECONDS=600 python -m pytest -q tests/test_fuzz.py

A failing configuration is reported with its seed; ARCFACE_FUZZ_SEED=<seed> ARCFACE_FUZZ_SECONDS=0
runs that one alone. The fixed tests cover each switch on chosen shapes; this walks their
combinations."""
import os
import random
import time

import pytest
import torch

import arcface_ext
import emulator
from arcface_ext import reference
from conftest import MARGINS, loss_and_grads, margin_kwargs
from test_cuda import (DEVICE, GEMM_OPERAND_ROUNDINGS, OUTPUTS, assert_matches_table, make_inputs, op_and_grads,
                       run_both, upstream_gradient)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not arcface_ext.extension_available(), reason="arcface_ext._C is not built"),
              pytest.mark.skipif("ARCFACE_FUZZ_SECONDS" not in os.environ, reason="set ARCFACE_FUZZ_SECONDS to fuzz")]

SWITCHES = ("ARCFACE_EXT_CUDA_FUSED", "ARCFACE_EXT_WGMMA", "ARCFACE_EXT_KEEP_BLOCK", "ARCFACE_EXT_ROW_TILES",
            "ARCFACE_EXT_TILE_STAGES", "ARCFACE_EXT_GEMM_UPCAST", "ARCFACE_EXT_GEMM_UPCAST_SCRATCH")
# The emulator's time grows with N·C·D: a configuration past this is drawn again with fewer classes.
MAX_WORK = 2e7 if emulator.EMULATED else 1e10


def wgmma_runs():
    return emulator.EMULATED or torch.cuda.get_device_capability() == (9, 0)


def draw(seed):
    """One configuration: the inputs' shape and dtype, the loss's options and the path switches."""
    rng = random.Random(seed)
    dtype = rng.choices([torch.bfloat16, torch.float16, torch.float32, torch.float64], [4, 3, 2, 1])[0]
    n = rng.choice([1, 2, rng.randint(3, 70), rng.randint(100, 300)])
    dim = rng.choice([8, 16, 24, 64, 72, 128, 264, 512, 520, 60, 13])
    num_classes = rng.choice([1, 2, rng.randint(3, 300), rng.randint(300, 3000), rng.randint(3000, 10000)])
    num_classes = max(1, min(num_classes, int(MAX_WORK / (n * dim))))
    ignored = sorted(rng.sample(range(n), rng.randint(0, n))) if rng.random() < 0.3 else []
    margin = rng.choice([*MARGINS, "per-row"])
    options = dict(margin_grad=rng.choice(["exact", "straight_through"]),
                   reduction=rng.choice(["none", "none", "mean", "sum"]),
                   check_labels=rng.random() < 0.7)
    if margin == "per-row":  # AdaFace-like: per-row m2 around 0.4, some negative, and a CosFace m3
        options.update(s=64.0, m2=[rng.uniform(-0.3, 0.8) for _ in range(n)], m3=rng.choice([0.0, 0.2]))
    else:
        options.update(margin_kwargs(margin), s=rng.choice([16.0, 30.0, 64.0]))
    env = {"ARCFACE_EXT_CUDA_FUSED": rng.choice(["1", "1", "1", "0"]),
           "ARCFACE_EXT_KEEP_BLOCK": rng.choice(["1", "1", "0"]),
           "ARCFACE_EXT_WGMMA": (rng.choice(["0", "0", "1", "32", "resident", "resident-weight"]) if wgmma_runs()
                                 else "0"),
           "ARCFACE_EXT_ROW_TILES": rng.choice([None, None, "1", "2", "3"]),
           "ARCFACE_EXT_TILE_STAGES": rng.choice([None, None, "3", "4"])}
    workspace = rng.choice([None, None, 1, rng.randint(10_000, 4_000_000)])
    shards = None
    if margin != "per-row" and num_classes >= 2 and rng.random() < 0.2:
        cuts = sorted(rng.sample(range(1, num_classes), rng.randint(1, min(3, num_classes - 1))))
        shards = list(zip([0, *cuts], [*cuts, num_classes]))
    # Drawn last, so that the seeds drawn before these switches existed still give their configurations:
    # torch < 2.8's GEMMs (16-bit operands upcast to fp32), in one slice or many.
    env["ARCFACE_EXT_GEMM_UPCAST"] = rng.choice([None, None, None, "1"])
    env["ARCFACE_EXT_GEMM_UPCAST_SCRATCH"] = rng.choice([None, "4096"])
    return dict(seed=seed, dtype=dtype, n=n, dim=dim, num_classes=num_classes, ignored=ignored, margin=margin,
                options=options, env=env, workspace=workspace, shards=shards)


def assert_outputs_match(ours, expected, *, s, min_scale, roundings=GEMM_OPERAND_ROUNDINGS, grad_floors=(0.0, 0.0)):
    """test_cuda's assert_matches, except that the loss's error is measured against a scale of at
    least s/20: the loss is lse_i - s·ψ_i, a difference of fp32 numbers of magnitude ~s, so where it is
    tiny (the target's probability near 1; the fixed tests' batches always hold a large one) its error
    is their rounding, ~s·2^-24, not a fraction of the loss (found by this fuzz: 3.5e-8 at a loss of
    2.3e-5, with s = 64). The gradients carry that rounding too: their scales are at least
    `grad_floors` (see gradient_floors)."""
    assert_matches_table(ours[0], expected[0], name="loss", min_scale=max(min_scale, s / 20))
    floors = (0.0, *grad_floors)
    for name, a, e, floor in zip(OUTPUTS[1:], ours[1:], expected[1:], floors):
        assert_matches_table(a, e, name=name, roundings=roundings, min_scale=max(min_scale, floor))


def gradient_floors(x, w, s, row_weight):
    """The loss's floor (s/20) carried into the gradients, for (d/dx, d/dW). A row's gradient is
    s·(p - y)·∂cos/∂x scaled by its upstream weight; where its loss is tiny, 1 - p_t keeps the absolute
    error of lse - s·ψ instead of shrinking with it, and reaches an element of the gradient times
    s/(√D·‖x_i‖) (s/(√D·‖w_j‖) for a class centre). Found by this fuzz: a single row with a negative
    per-row margin, whose d/dx elements of ~6e-6 were off by 5e-8 in fp32, the fp64 reference's lse
    carried to the gradient."""
    root = x.shape[1] ** 0.5
    x_norm = max(float(x.double().norm(dim=1).max()), 1e-12) if x.numel() else 1.0
    w_norm = max(float(w.double().norm(dim=1).max()), 1e-12) if w.numel() else 1.0
    loss_floor = s / 20 * row_weight
    return loss_floor * s / (root * x_norm), loss_floor * s / (root * w_norm)


def check_shards(config, x, w, labels, options):
    """The op on each class shard, combined as the sharded loss combines them (reduction "none")."""
    from test_distributed import sharded_op

    upstream = upstream_gradient(config["n"], seed=config["seed"])
    margins = {key: options[key] for key in ("s", "m1", "m2", "m3", "lambda_")}
    straight_through = options["margin_grad"] == "straight_through"
    loss, cosine, gx, gw = sharded_op(x, w, labels, config["shards"], upstream, straight_through=straight_through,
                                      workspace_bytes=config["workspace"] or 1 << 20, **margins)
    expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels,
                            upstream=upstream.double(), margin_grad=options["margin_grad"], **margins)
    counted = labels != -1
    # 16-bit: each shard's part of d loss / d x is rounded (twice) before the parts are summed.
    assert_outputs_match((loss, cosine[counted], gx, gw), (expected[0], expected[1][counted], *expected[2:]),
                         s=options["s"], min_scale=1.0 if config["num_classes"] <= 2 else 0.0,
                         roundings=2 * GEMM_OPERAND_ROUNDINGS)


def check(config, monkeypatch):
    """The op on `config` against the fp64 reference, with the tests' tolerance table."""
    for name in SWITCHES:
        value = config["env"][name]
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    saved = arcface_ext.get_workspace_bytes()
    arcface_ext.set_workspace_bytes(config["workspace"])
    try:
        x, w, labels = make_inputs(config["n"], config["dim"], config["num_classes"], seed=config["seed"],
                                   dtype=config["dtype"], ignored=config["ignored"])
        options = dict(config["options"])
        if isinstance(options.get("m2"), list):
            options["m2"] = torch.tensor(options["m2"], dtype=torch.float32, device=DEVICE)
        reduction = options.pop("reduction")
        check_labels = options.pop("check_labels")
        # With one or two classes the exact gradients can be 0 where ours hold round-off: measured
        # against a scale of at least 1, as test_shapes does.
        min_scale = 1.0 if config["num_classes"] <= 2 else 0.0
        if config["shards"]:
            check_shards(config, x, w, labels, options)
            return
        if reduction == "none":
            ours, expected = run_both(x, w, labels, seed=config["seed"], check_labels=check_labels, **options)
            row_weight = float(upstream_gradient(config["n"], seed=config["seed"]).abs().max())
        else:
            ours = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction=reduction,
                                  return_target_cosine=True, check_labels=check_labels, **options)
            expected = loss_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels,
                                      reduction=reduction, return_target_cosine=True, **options)
            counted = max(int((labels != -1).sum()), 1)
            row_weight = 1.0 / counted if reduction == "mean" else 1.0
        assert_outputs_match(ours, expected, s=options["s"], min_scale=min_scale,
                             grad_floors=gradient_floors(x, w, options["s"], row_weight))
    finally:
        arcface_ext.set_workspace_bytes(saved)


def test_random_configurations(monkeypatch):
    budget = float(os.environ["ARCFACE_FUZZ_SECONDS"])
    seed = int(os.environ.get("ARCFACE_FUZZ_SEED", time.time_ns() % 2**31))
    deadline = time.monotonic() + budget
    failures, runs = [], 0
    while True:
        config = draw(seed)
        try:
            check(config, monkeypatch)
        except Exception as error:  # noqa: BLE001 - every failure is reported with its configuration
            failures.append(f"seed {seed}: {config}\n  {type(error).__name__}: {str(error)[:2000]}")
        runs += 1
        seed += 1
        if time.monotonic() >= deadline:
            break
    print(f"\n{runs} configurations, {len(failures)} failed")
    assert not failures, "\n".join(failures)
