"""The fused CUDA op against the fp64 reference and against the CPU op: every margin, dtype and
reduction, edge rows, many class chunks, determinism, dispatcher registration (opcheck,
torch.compile), autocast, and the memory bound at C = 1M. Every test carries the `cuda` marker,
which conftest.py turns into a skip when no GPU is visible; nothing here touches the GPU at import
time.

With ARCFACE_EXT_EMULATE_CUDA=1 the same tests run the CUDA source on the CPU emulator
(tests/emulator) with DEVICE = "cpu"; those marked `gpu_only` (memory, streams, two devices) are
skipped there."""
import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import arcface_ext
import emulator
from arcface_ext import reference
from conftest import (MARGINS, NON_FINITE_CASES, TOLERANCES, assert_close_report, assert_matches_reference,
                      assert_non_finite_where_expected, load_benchmark, loss_and_grads, margin_kwargs,
                      put_non_finite, random_inputs)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not arcface_ext.extension_available(), reason="arcface_ext._C is not built")]

DEVICE = "cpu" if emulator.EMULATED else "cuda"
OUTPUTS = ("loss", "target_cosine", "grad_embeddings", "grad_weight")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
# The CUDA path rounds a 16-bit gradient twice: the gradient block is a 16-bit GEMM operand (the
# GEMM accumulates in fp32), and the result is rounded on the way out. The CPU op rounds once.
# Comparisons of 16-bit gradients therefore allow the table's tolerance once per rounding.
GEMM_OPERAND_ROUNDINGS = 2


def make_inputs(n, dim, num_classes, *, seed, dtype=torch.float32, ignored=()):
    """Embeddings, class centres and labels on the GPU; drawn in fp64 on the CPU, so every dtype
    and every device sees the same values (rounded once to `dtype`)."""
    return random_inputs(n, dim, num_classes, seed=seed, dtype=dtype, ignored=ignored, device=DEVICE)


def upstream_gradient(n, *, seed, dtype=torch.float32):
    """An uneven per-row gradient of the loss: signs of both kinds, one exact zero, one large."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=generator, dtype=torch.float64)
    if n > 2:
        grad[1] = 0.0
        grad[2] = 40.0
    return grad.to(DEVICE, dtype)


def op_and_grads(loss_fn, embeddings, weight, labels, *, upstream, **kwargs):
    """(loss, target_cosine, grad_embeddings, grad_weight) of reduction="none" back-propagated
    with the given per-row gradient."""
    x = embeddings.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss, target_cosine = loss_fn(x, w, labels, reduction="none", return_target_cosine=True, **kwargs)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), target_cosine, x.grad, w.grad


def run_both(embeddings, weight, labels, *, seed=0, **kwargs):
    """(op outputs, fp64 reference outputs on the same values), each (loss, target_cosine,
    grad_embeddings, grad_weight), with an uneven upstream gradient."""
    upstream = upstream_gradient(embeddings.shape[0], seed=seed, dtype=torch.float64)
    ours = op_and_grads(arcface_ext.combined_margin_loss, embeddings, weight, labels, upstream=upstream,
                        **kwargs)
    expected = op_and_grads(reference.combined_margin_loss, embeddings.double(), weight.double(), labels,
                            upstream=upstream, **kwargs)
    return ours, expected


def assert_matches_table(actual, expected, *, name, roundings=1, min_scale=0.0):
    """The tolerance table's entry for actual's dtype, atol scaled by max|expected| (at least
    min_scale); 16-bit tensors get it once per rounding they went through."""
    atol, rtol = TOLERANCES[actual.dtype]
    if actual.dtype in (torch.float16, torch.bfloat16):
        atol, rtol = atol * roundings, rtol * roundings
    finite = expected[expected.isfinite()]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, min_scale)
    assert_close_report(actual, expected, atol=atol * scale, rtol=rtol, name=name)


def assert_matches(ours, expected, rows=slice(None), classes=slice(None), roundings=GEMM_OPERAND_ROUNDINGS,
                   min_scale=0.0):
    for name, a, e, pick in zip(OUTPUTS, ours, expected, (rows, rows, rows, classes)):
        if a.dim() == 0:
            assert_matches_table(a, e, name=name, min_scale=min_scale)
        else:
            assert_matches_table(a[pick], e[pick], name=name, roundings=roundings, min_scale=min_scale)


def use_wgmma(monkeypatch, on):
    """ARCFACE_EXT_WGMMA=1 (on: the fused forward on Hopper's wgmma tile) or 0, read at every call. On a
    GPU the tile runs at compute capability 9.0 only (sm_90a code): elsewhere a test that asks for it
    is skipped."""
    if on and not emulator.EMULATED and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma tile runs on compute capability 9.0 only")
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", "1" if on else "0")


@pytest.fixture(params=["fused", "fused-wgmma", "cublas"])
def kernel(request, monkeypatch):
    """Runs a test on each CUDA path for 16-bit inputs: the fused tensor-core kernels (the default
    where D is a multiple of 8), the same with the forward on Hopper's wgmma tile ("fused-wgmma":
    ARCFACE_EXT_WGMMA=1, read at every call; on a GPU only compute capability 9.0 runs it, others
    skip it) and the cuBLAS path (ARCFACE_EXT_CUDA_FUSED=0). fp32/fp64 always take the cuBLAS path,
    so their other variants would repeat the "fused" one and are skipped."""
    dtype = getattr(request.node, "callspec", None) and request.node.callspec.params.get("dtype")
    if request.param != "fused" and dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("fp32/fp64 have one CUDA path")
    use_wgmma(monkeypatch, request.param == "fused-wgmma")
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "0" if request.param == "cublas" else "1")
    return request.param


@pytest.fixture
def workspace():
    """set_workspace_bytes, restored afterwards."""
    saved = arcface_ext.get_workspace_bytes()
    yield arcface_ext.set_workspace_bytes
    arcface_ext.set_workspace_bytes(saved)


# ---- against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_matches_reference(kernel, margin, margin_grad, dtype):
    x, w, labels = make_inputs(37, 64, 1001, seed=0, dtype=dtype, ignored=(3, 20))
    ours, expected = run_both(x, w, labels, margin_grad=margin_grad, **margin_kwargs(margin))
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours[0].dtype == loss_dtype and ours[1].dtype == loss_dtype
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    assert_matches(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction, dtype):
    x, w, labels = make_inputs(29, 32, 517, seed=1, dtype=dtype, ignored=(4,))
    ours = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction=reduction,
                          return_target_cosine=True)
    expected = loss_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels,
                              reduction=reduction, return_target_cosine=True)
    assert_matches(ours, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("workspace_bytes", [None, 1, 200_003], ids=["default", "min-chunk", "odd-chunk"])
def test_many_class_chunks(kernel, workspace, workspace_bytes, dtype):
    # C = 10007 is prime: no chunk width divides it. 1 byte forces the smallest chunk (256 classes,
    # 40 chunks), 200003 bytes an in-between width; the default holds all classes in one chunk
    # of three 4096-class segments.
    workspace(workspace_bytes)
    x, w, labels = make_inputs(37, 96, 10007, seed=2, dtype=dtype, ignored=(11,))
    labels[:4] = torch.tensor([0, 10006, 5003, 255], device=DEVICE)  # first, last, middle, chunk edge
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5)
    assert_matches(ours, expected)


GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def record_gemms(call):
    """call()'s outermost ATen GEMMs (those inside the op included) as (name, the tuple of their
    tensor arguments' dtypes, each "float" (fp32), "16-bit" or "other"); None where this torch's
    profiler records no dtypes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        call()
    names = {"float": "float", "c10::BFloat16": "16-bit", "c10::Half": "16-bit"}
    gemms = []
    for event in profile.events():
        if event.name not in GEMMS or (event.cpu_parent is not None and event.cpu_parent.name in GEMMS):
            continue
        if getattr(event, "input_dtypes", None) is None:
            return None
        gemms.append((event.name, tuple(names.get(d, "other") for d in event.input_dtypes
                                        if d not in ("Scalar", "ScalarType", ""))))
    return gemms


@pytest.mark.parametrize("scratch", [None, "4096"], ids=["one-slice", "many-slices"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["cublas", "fused-recompute", "fused-kept", "mixed"])
def test_upcast_gemms(monkeypatch, workspace, path, dtype, scratch):
    # Torch < 2.8 has no GEMM with fp32 output for 16-bit operands: the op then upcasts them to
    # fp32 a slice of the inner dimension at a time (ARCFACE_EXT_GEMM_UPCAST=1 forces it on newer
    # torch; ARCFACE_EXT_GEMM_UPCAST_SCRATCH=4096 bytes gives many slices). "mixed" is the control:
    # the mixed-dtype GEMM of torch >= 2.8, which the recording must see.
    if path == "fused-kept" and dtype == torch.float16:
        pytest.skip("only bf16 keeps the gradient block")
    if path == "mixed" and (scratch or torch.torch_version.TorchVersion(torch.__version__) < (2, 8)):
        pytest.skip("the control runs once, on torch >= 2.8")
    use_wgmma(monkeypatch, False)
    monkeypatch.setenv("ARCFACE_EXT_GEMM_UPCAST", "0" if path == "mixed" else "1")
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "0" if path == "cublas" else "1")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "1" if path == "fused-kept" else "0")
    if scratch:
        monkeypatch.setenv("ARCFACE_EXT_GEMM_UPCAST_SCRATCH", scratch)
    workspace(200_003)  # several class chunks on the recomputing paths
    x, w, labels = make_inputs(37, 96, 3001, seed=41, dtype=dtype, ignored=(5,))
    labels[:3] = torch.tensor([0, 3000, 1500], device=DEVICE)
    results = []
    gemms = record_gemms(lambda: results.extend(run_both(x, w, labels, s=64.0, m2=0.5)))
    ours, expected = results
    assert_matches(ours, expected)
    if gemms is None:
        return  # this torch's profiler records no dtypes: the results alone are checked
    mixed = [name for name, dtypes in gemms if "16-bit" in dtypes and "float" in dtypes]
    upcast = [name for name, dtypes in gemms if set(dtypes) == {"float"}]
    assert (bool(mixed), bool(upcast)) == ((True, False) if path == "mixed" else (False, True)), gemms
    # Many slices: an addmm_ accumulates every slice after the first.
    assert ("aten::addmm_" in upcast) == (scratch is not None), gemms


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (5, 7, 3), (3, 5, 4097), (64, 128, 8193),
                                   (300, 8, 50)], ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape):
    x, w, labels = make_inputs(*shape, seed=3, dtype=torch.float32)
    ours, expected = run_both(x, w, labels, s=32.0, m1=1.0, m2=0.3, m3=0.2)
    # With one class the gradient is exactly zero in exact arithmetic and fp32 round-off (p - 1
    # of about one ulp, times s) elsewhere: errors are measured against a scale of at least 1.
    assert_matches(ours, expected, min_scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_class_shards_combine_to_the_whole_loss(kernel, dtype):
    # The op on shards of the classes (labels of other shards counted without a target column),
    # combined as ShardedCombinedMarginLoss combines them; shards that cut a 128-class tile.
    from test_distributed import sharded_op

    x, w, labels = make_inputs(130, 24, 300, seed=41, dtype=dtype, ignored=(3,))
    labels[:3] = torch.tensor([0, 299, 130], device=DEVICE)
    upstream = upstream_gradient(130, seed=42)
    loss, cosine, gx, gw = sharded_op(x, w, labels, [(0, 129), (129, 131), (131, 300)], upstream, m2=0.5)
    expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels,
                            upstream=upstream.double(), m2=0.5)
    counted = labels != -1
    # 16-bit: each shard's part of d loss / d x is rounded (twice) before the parts are summed.
    assert_matches((loss, cosine[counted], gx, gw), (expected[0], expected[1][counted], *expected[2:]),
                   roundings=2 * GEMM_OPERAND_ROUNDINGS)


def test_sampled_module_on_the_gpu():
    # Partial FC's draw (rand, scatter_reduce, topk, searchsorted) on the GPU, then the op on the
    # sampled centres, against the fp64 reference on the same sample.
    x, w, labels = make_inputs(64, 32, 5000, seed=43, dtype=torch.float64, ignored=(2,))
    module = arcface_ext.CombinedMarginLoss(5000, 32, sample_rate=0.1, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(w)
    xs = x.clone().requires_grad_(True)
    loss = module(xs, labels)
    loss.backward()
    sample = module.last_sampled_classes
    assert sample.device.type == DEVICE and len(sample) == 500
    assert torch.isin(labels[labels >= 0], sample).all() and torch.all(sample[1:] > sample[:-1])
    positions = torch.where(labels >= 0, torch.searchsorted(sample, labels.clamp_min(0)), -1)
    expected = loss_and_grads(reference.combined_margin_loss, x, w[sample], positions)
    assert_matches_reference(loss.detach(), expected[0], name="loss")
    assert_matches_reference(xs.grad, expected[2], name="grad_embeddings")
    assert_matches_reference(module.weight.grad[sample], expected[3], name="grad_weight")
    assert int(module.weight.grad.abs().sum(dim=1).ne(0).sum()) <= 500


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_row_margins(kernel, dtype):
    # AdaFace-like per-row (m2, m3), negative angular margins included, some rows near their
    # centre (θ + m2 < 0: ψ held at 1), against the fp64 reference and against the CPU op.
    x, w, labels = make_inputs(37, 64, 1001, seed=44, dtype=torch.float64, ignored=(3,))
    generator = torch.Generator().manual_seed(44)
    m2 = (torch.rand(37, generator=generator, dtype=torch.float64) - 0.5).to(DEVICE)
    m3 = (0.4 * torch.rand(37, generator=generator, dtype=torch.float64)).to(DEVICE)
    m2[7] = 0.0
    with torch.no_grad():
        x[:4] = 3.0 * w[labels[:4].clamp_min(0)] + 0.01 * x[:4]
    x, w = x.to(dtype), w.to(dtype)
    ours, expected = run_both(x, w, labels, m2=m2, m3=m3)
    assert_matches(ours, expected)
    upstream = upstream_gradient(37, seed=0, dtype=torch.float64)
    with cpu_op():
        cpu = op_and_grads(arcface_ext.combined_margin_loss, x.cpu(), w.cpu(), labels.cpu(), upstream=upstream.cpu(),
                           m2=m2.cpu(), m3=m3.cpu())
    assert_matches_table(ours[0].cpu(), cpu[0], name="loss vs CPU op")


# ---- the fused tensor-core kernels --------------------------------------------------------------

FUSED_SHAPES = [(1, 8, 1), (37, 8, 129), (129, 72, 1000), (300, 520, 5003), (128, 32, 128)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_tile_edges(kernel, shape, dtype):
    # Rows past a 128-row tile (129, 300), classes past a 128-class tile (129, 1000, 5003), depths
    # that are not a multiple of the 32-wide slice (8, 72, 520), and exact tile multiples.
    x, w, labels = make_inputs(*shape, seed=30, dtype=dtype, ignored=(0,) if shape[0] > 1 else ())
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5)
    assert_matches(ours, expected, min_scale=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", FUSED_SHAPES + [(130, 512, 700)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tile", ["32", "resident"])
def test_fused_tile_edges_on_other_wgmma_tiles(monkeypatch, tile, shape, dtype):
    # The wgmma tile's other variants, at the same edges and at D = 512:
    # 32: 32-deep slices in the 64-byte swizzle, 6 stages, a wgmma group in flight across the barrier,
    #     forward and backward (the gradient block not kept, so that the backward runs its tile);
    # resident: the forward with its x tile resident in shared memory, one row tile a block (bf16
    #     keeps the gradient block, fp16 does not; D = 520 is past the resident tile's 512 and takes
    #     64-deep slices).
    use_wgmma(monkeypatch, True)
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", tile)
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "1")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "0" if tile == "32" else "1")
    x, w, labels = make_inputs(*shape, seed=30, dtype=dtype, ignored=(0,) if shape[0] > 1 else ())
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5)
    assert_matches(ours, expected, min_scale=1.0)


# (64, 64, 2) and (128, 128, 455): N·(C rounded up to 8) past C·(N rounded up to 8), where the row-major
# block's view did not fit the class-major buffer (found by tests/test_fuzz.py).
WEIGHT_TILE_SHAPES = [(1, 8, 1), (37, 8, 129), (129, 72, 1000), (130, 264, 700), (64, 512, 64), (300, 512, 5003),
                      (64, 64, 2), (128, 128, 455)]


@pytest.mark.parametrize("shape", WEIGHT_TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_wgmma_weight_gradient_tile(monkeypatch, workspace, shape):
    # ARCFACE_EXT_WGMMA=resident-weight: the bf16 backward forms d loss / d W in its own class-outer
    # tile (64 classes against every 64-row x tile: S = W·xᵀ, the gradient block G, P += G'·x with x
    # read MN-major). Rows past a 64-row tile (37, 129, 130, 300; odd N: the block's row pitch padded),
    # classes past a 64-class tile, depths of one warpgroup's half (8, 72) or both (264, 512), an exact
    # tile (64, 512, 64); ignored rows; the gradient block not kept, so that the backward runs its tile;
    # at C = 5003 a workspace of three chunks (the tile at chunk offsets).
    use_wgmma(monkeypatch, True)
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", "resident-weight")
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "1")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "0")
    n, dim, c = shape
    if c > 4096:
        workspace(n * 2 * 2048)
    x, w, labels = make_inputs(n, dim, c, seed=33, dtype=torch.bfloat16, ignored=(0,) if n > 1 else ())
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5)
    assert_matches(ours, expected, min_scale=1.0)


def test_fused_wgmma_weight_gradient_tile_margins_and_clamped_norms(monkeypatch):
    # The same tile with CosFace's and SphereFace's margins and per-row margins, a zero class centre
    # and a zero embedding (their norms clamped: no projection), a row whose target is its centre
    # (cosine clamped at 1), and only d loss / d W asked for.
    use_wgmma(monkeypatch, True)
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", "resident-weight")
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "1")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "0")
    x, w, labels = make_inputs(70, 136, 200, seed=34, dtype=torch.float64, ignored=(5,))
    with torch.no_grad():
        w[17] = 0.0
        x[3] = 0.0
        x[4] = 5.0 * w[labels[4]]
    generator = torch.Generator().manual_seed(35)
    m2 = (0.5 * torch.rand(70, generator=generator, dtype=torch.float64)).to(DEVICE)
    x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    for margins in (dict(m3=0.35, m2=0.0), dict(m1=1.35, m2=0.0, lambda_=0.5), dict(m2=m2)):
        ours, expected = run_both(x, w, labels, s=64.0, **margins)
        assert_matches(ours, expected, min_scale=1.0)
    upstream = upstream_gradient(70, seed=1, dtype=torch.float64)
    wr = w.detach().clone().requires_grad_(True)
    loss = arcface_ext.combined_margin_loss(x, wr, labels, reduction="none")
    loss.backward(upstream.to(loss.dtype))
    wd = w.double().requires_grad_(True)
    reference.combined_margin_loss(x.double(), wd, labels, reduction="none").backward(upstream)
    assert_matches_table(wr.grad, wd.grad, name="grad_weight alone", roundings=GEMM_OPERAND_ROUNDINGS, min_scale=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("per_segment", [2, 3])
def test_fused_wgmma_resident_tile_over_segments_of_several_tiles(monkeypatch, per_segment, dtype):
    # The resident x tile's blocks walk a segment of class tiles (about 4 blocks an SM), so that at
    # the sizes above, one tile a block, its run of tiles goes untested: the x tile read by every
    # tile of the run, and the forward's epilogue of each tile run beside the next tile's first
    # slice, two accumulator arrays in turn (2 or 3 tiles a segment: the last on either). C is sized
    # from the SM count (2 on the emulator, the GPU's own there) for segments of `per_segment` tiles,
    # the last class tile partial; N = 130 (two row tiles, the second of 2 rows), D = 200 (four
    # 64-deep slices, the last partial). bf16 keeps the gradient block (the forward writes it), fp16
    # runs the resident backward over the same segments.
    use_wgmma(monkeypatch, True)
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", "resident")
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "1")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "1")
    if emulator.EMULATED:
        monkeypatch.setenv("ARCFACE_EMU_SM_COUNT", "2")
        sm_count = 2
    else:
        sm_count = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    class_tiles = per_segment * 4 * sm_count // 2  # resident_tiles_per_segment with two row tiles
    x, w, labels = make_inputs(130, 200, 128 * class_tiles - 50, seed=32, dtype=dtype, ignored=(0,))
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5)
    assert_matches(ours, expected, min_scale=1.0)


@pytest.mark.parametrize("tile", ["64", "32", "resident"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_wgmma_tile_probe_reads_every_case(monkeypatch, tile, dtype):
    # One wgmma tile, register by register, on inputs whose products name their operands
    # (benchmarks/wgmma_probe.py): bit for bit where the values are integers. On a GPU this is where a
    # reading of the descriptors, the swizzles or the accumulator layout other than the emulator's
    # shows first, and the failure message decodes what each wrong register multiplied.
    use_wgmma(monkeypatch, True)  # the skip on GPUs other than compute capability 9.0
    probe = load_benchmark("wgmma_probe")
    results = probe.run(torch.ops.arcface_ext.wgmma_tile_probe, tile, dtype, DEVICE)
    failed = {case.name: case.problems for case in results if case.problems}
    assert not failed, "\n".join(f"{name}:\n  " + "\n  ".join(lines) for name, lines in failed.items())


def test_the_wgmma_weight_tile_probe_reads_every_case(monkeypatch):
    # The backward's class-outer tile's two GEMMs, register by register (benchmarks/wgmma_probe.py,
    # `weight`): S = w·xᵀ on m64n32k16 and P = g·x with x read along its depth (MN-major), the one
    # operand layout no other tile uses.
    use_wgmma(monkeypatch, True)
    probe = load_benchmark("wgmma_probe")
    results = probe.run_weight(torch.ops.arcface_ext.wgmma_weight_tile_probe, DEVICE)
    failed = {case.name: case.problems for case in results if case.problems}
    assert not failed, "\n".join(f"{name}:\n  " + "\n  ".join(lines) for name, lines in failed.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_and_cublas_paths_agree(monkeypatch, workspace, dtype):
    # Both paths compute the cosines in fp32 from the same 16-bit values; only the order of the
    # dot-product sums differs, so the losses agree to fp32 round-off.
    workspace(1 << 20)
    x, w, labels = make_inputs(200, 128, 20011, seed=31, dtype=dtype, ignored=(7,))
    upstream = upstream_gradient(200, seed=31)
    outputs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", setting)
        outputs[setting] = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    fused, cublas = outputs["1"], outputs["0"]
    assert_close_report(fused[0], cublas[0], atol=1e-4, rtol=1e-5, name="loss")
    for name, a, e in zip(OUTPUTS[2:], fused[2:], cublas[2:]):
        assert_matches_table(a, e.double(), name=name, roundings=GEMM_OPERAND_ROUNDINGS)


def synchronize():
    if not emulator.EMULATED:
        torch.cuda.synchronize()


def cpu_op():
    """Where the CPU op is the comparison: under the emulator, its real CPU kernels."""
    return emulator.suspended() if emulator.EMULATED else contextlib.nullcontext()


def cuda_kernel_names(fn):
    if emulator.EMULATED:
        emulator.take_launch_log()
        fn()
        return " ".join(emulator.take_launch_log())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(event.name for event in prof.events())


@pytest.mark.parametrize("case", ["bf16", "bf16-recompute", "fp16", "disabled", "fp32", "odd-depth", "misaligned",
                                  "wgmma", "wgmma-fp16", "wgmma-weight"])
def test_which_path_runs(monkeypatch, case):
    # The fused kernels run for 16-bit inputs with D a multiple of 8 and 16-byte aligned rows;
    # everything else (and ARCFACE_EXT_CUDA_FUSED=0) takes the cuBLAS path, with the same results.
    # A bf16 step keeps the forward's gradient block (it fits the workspace here), so its backward
    # runs no fused kernel, unless ARCFACE_EXT_KEEP_BLOCK=0. ARCFACE_EXT_WGMMA=resident-weight forms
    # d loss / d W in the backward's class-outer tile, with no class_gradient_kernel after it.
    dtype = {"fp16": torch.float16, "wgmma-fp16": torch.float16, "fp32": torch.float32}.get(case, torch.bfloat16)
    # ARCFACE_EXT_WGMMA=1 puts the fused kernels on Hopper's wgmma tile (compute capability 9.0 only).
    use_wgmma(monkeypatch, case.startswith("wgmma"))
    if case == "wgmma-weight":
        monkeypatch.setenv("ARCFACE_EXT_WGMMA", "resident-weight")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "0" if case in ("bf16-recompute", "wgmma-weight") else "1")
    dim = 60 if case == "odd-depth" else 64
    x, w, labels = make_inputs(33, dim, 700, seed=32, dtype=dtype)
    if case == "misaligned":  # a view two bytes into its storage
        x = torch.empty(x.numel() + 1, device=DEVICE, dtype=dtype)[1:].view_as(x).copy_(x)
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "0" if case == "disabled" else "1")
    x.requires_grad_(True)
    w.requires_grad_(True)
    names = cuda_kernel_names(lambda: arcface_ext.combined_margin_loss(x, w, labels).backward())
    fused = case in ("bf16", "bf16-recompute", "fp16", "wgmma", "wgmma-fp16", "wgmma-weight")
    wgmma = case.startswith("wgmma")
    assert ("fused_forward_kernel" in names) == (fused and not wgmma), names
    assert ("fused_forward_wgmma_kernel" in names) == wgmma, names
    assert ("fused_backward_kernel" in names) == (case in ("bf16-recompute", "fp16")), names
    assert ("fused_backward_wgmma_kernel" in names) == (case == "wgmma-fp16"), names
    assert ("kept_block_recompute_kernel" in names) == (case in ("bf16", "wgmma")), names
    assert ("margin_softmax_forward_kernel" in names) == (not fused), names
    assert ("fused_weight_gradient_wgmma_kernel" in names) == (case == "wgmma-weight"), names
    assert ("class_gradient_kernel" in names) == (case != "wgmma-weight"), names
    # The mean: one kernel each way (reduce_loss), in place of ATen's seven small ones.
    assert "reduce_loss_kernel" in names and "reduce_loss_backward_kernel" in names, names
    ours, expected = run_both(x.detach(), w.detach(), labels, s=64.0, m2=0.5)
    assert_matches(ours, expected)


@pytest.mark.parametrize("n, ignored", [(0, ()), (5, (0, 1, 2, 3, 4)), (1000, range(0, 1000, 3))],
                         ids=["empty", "all-ignored", "strided"])
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reduce_loss_matches_the_cpu_op(dtype, mean, n, ignored):
    # One block of 256 threads walks every row (1000 rows: four each), sums in double and counts in a
    # fixed order; its backward counts again and writes every row. A NaN at an ignored row must not
    # reach the sum.
    generator = torch.Generator().manual_seed(n)
    loss = (torch.rand(n, generator=generator, dtype=torch.float64) * 30).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=generator)
    labels[list(ignored)] = -1
    if ignored:
        loss[ignored[0]] = float("nan")
    grad = torch.tensor(3.0, dtype=dtype)
    op = torch.ops.arcface_ext
    reduced = op.reduce_loss(loss.to(DEVICE), labels.to(DEVICE), -1, mean)
    grad_rows = op.reduce_loss_backward(grad.to(DEVICE), labels.to(DEVICE), -1, mean)
    with cpu_op():
        expected = op.reduce_loss(loss, labels, -1, mean)
        expected_rows = op.reduce_loss_backward(grad, labels, -1, mean)
    assert reduced.shape == () and reduced.dtype == dtype and not torch.isnan(reduced)
    # Both sum in double, in different orders: fp32 may round the two sums to neighbours.
    assert_close_report(reduced.cpu().double(), expected.double(),
                        rtol=1e-12 if dtype == torch.float64 else 2.0 ** -23, atol=0, name="reduced loss")
    assert torch.equal(grad_rows.cpu(), expected_rows)


# ---- the kept gradient block (csrc/kept_block.h) ------------------------------------------------
# A bf16 training step whose N x C block fits the workspace keeps, from its forward, what the
# backward's GEMMs start from, and its backward recomputes no cosine.

def kept_parts(kept, n, c):
    """The kept tensor's parts (csrc/kept_block.h): H (N, C) bf16, the row factors, the class
    inverse norms, the recompute flags and the clamp flags."""
    pitch = (c + 7) // 8 * 8
    block = kept[:n * pitch * 2].view(torch.bfloat16).view(n, pitch)[:, :c]
    offset = n * pitch * 2
    factor = kept[offset:offset + 4 * n].view(torch.float32)
    inv_norm = kept[offset + 4 * n:offset + 4 * n + 4 * c].view(torch.float32)
    recompute = kept[offset + 4 * n + 4 * c:offset + 5 * n + 4 * c]
    unclamped = kept[offset + 5 * n + 4 * c:]
    assert unclamped.numel() == c
    return block, factor, inv_norm, recompute, unclamped


def step_kernel_names(x, w, labels, upstream, **kwargs):
    """The kernels of a reduction="none" step's forward and of its backward, separately."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    result = {}
    forward = cuda_kernel_names(lambda: result.setdefault(
        "loss", arcface_ext.combined_margin_loss(x, w, labels, reduction="none", **kwargs)))
    backward = cuda_kernel_names(lambda: result["loss"].backward(upstream.to(result["loss"].dtype)))
    return forward, backward


@pytest.mark.parametrize("margin", list(MARGINS))
def test_kept_block_matches_the_reference_and_the_recomputation(kernel, monkeypatch, margin):
    x, w, labels = make_inputs(150, 64, 1000, seed=41, dtype=torch.bfloat16, ignored=(4, 77))
    upstream = upstream_gradient(150, seed=41, dtype=torch.float64)
    kwargs = margin_kwargs(margin)
    outputs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", setting)
        forward, backward = step_kernel_names(x, w, labels, upstream, **kwargs)
        # The kept step's backward recomputes nothing: no cosine kernel, no class-norm pass.
        recomputes = any(name in backward for name in ("fused_backward_kernel", "fused_backward_wgmma_kernel",
                                                        "margin_softmax_backward_kernel", "class_inverse_norms_kernel"))
        assert recomputes == (setting == "0"), backward
        assert ("kept_block_recompute_kernel" in forward) == (setting == "1" and kernel != "cublas"), forward
        outputs[setting] = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream, **kwargs)
    expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels, upstream=upstream,
                            **kwargs)
    assert_matches(outputs["1"], expected)
    kept, recomputed = outputs["1"], outputs["0"]
    for name, a, e in zip(OUTPUTS[:2], kept[:2], recomputed[:2]):  # the forward's statistics are the same
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=name)
    for name, a, e in zip(OUTPUTS[2:], kept[2:], recomputed[2:]):
        assert_matches_table(a, e.double(), name=name, roundings=GEMM_OPERAND_ROUNDINGS)


@pytest.mark.parametrize("tile", ["mma", "wgmma"])
@pytest.mark.parametrize("keep", ["kept", "recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_blocks_walking_row_tiles_change_no_bit(monkeypatch, keep, dtype, tile):
    # The fused kernels' blocks walk several row tiles and sum the class norms once (the host's
    # choice for large grids; ARCFACE_EXT_ROW_TILES forces it here): the same segments, the same
    # norms and the same sums as one row tile a block, so the same bits. N = 300: three row tiles,
    # the last partial; bf16 keeps the gradient block ("kept") or recomputes it, fp16 recomputes.
    # The forward runs on the mma.sync tile or on Hopper's wgmma tile (compute capability 9.0 only).
    use_wgmma(monkeypatch, tile == "wgmma")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "1" if keep == "kept" else "0")
    x, w, labels = make_inputs(300, 72, 700, seed=43, dtype=dtype, ignored=(5, 130))
    upstream = upstream_gradient(300, seed=43, dtype=torch.float64)
    outputs = {}
    for setting in ("1", "3"):
        monkeypatch.setenv("ARCFACE_EXT_ROW_TILES", setting)
        outputs[setting] = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    for name, a, e in zip(OUTPUTS, outputs["3"], outputs["1"]):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=name)
    expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels, upstream=upstream)
    assert_matches(outputs["3"], expected)


def test_kept_block_backward_twice_with_a_retained_graph():
    # The backward only reads the kept block: a second backward through a retained graph adds
    # the same gradients again.
    x, w, labels = make_inputs(40, 32, 300, seed=42, dtype=torch.bfloat16)
    x.requires_grad_(True)
    w.requires_grad_(True)
    loss = arcface_ext.combined_margin_loss(x, w, labels, reduction="sum")
    loss.backward(retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    loss.backward()
    assert torch.equal(x.grad, first[0]) and torch.equal(w.grad, first[1])


def test_kept_block_zeroes_clamped_cosines(kernel, monkeypatch):
    # Row 0 and class 5 are parallel constant vectors (D = 24, values 1 and 3) whose fp32 cosine
    # rounds to 1 + 2^-23 in any summation order (exact dot products, correctly rounded sqrt and
    # division). The recomputed block has 0 in that column (the clamp's gradient); the kept block
    # keeps its exponential, whose contribution is parallel to both vectors and so projected out:
    # the gradients agree. Row 0's target (class 7, about 30° away) keeps the row in the block.
    x, w, labels = make_inputs(16, 24, 40, seed=48, dtype=torch.bfloat16)
    x[0] = 1.0
    w[5] = 3.0
    w[7] = 1.0 + 0.5 * w[7]
    labels[0] = 7
    upstream = torch.ones(16, device=DEVICE)  # (no row's gradient dwarfs row 0's)
    outputs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", setting)
        outputs[setting] = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    for name, a, e in zip(OUTPUTS[2:], outputs["1"][2:], outputs["0"][2:]):
        assert_matches_table(a, e.double(), name=name, roundings=GEMM_OPERAND_ROUNDINGS)


def opposite_rows_inputs():
    """Inputs where rows 5 and 9 point away from their class centre (about 170°) and straight at
    another one: their largest logit sits ~80 above their target logit, past what the kept
    block's fixed shift allows, so the forward recomputes those two rows exactly."""
    x, w, labels = make_inputs(64, 32, 500, seed=43, dtype=torch.float64)
    generator = torch.Generator().manual_seed(43)
    for row, other in ((5, 11), (9, 12)):
        noise = torch.randn(32, generator=generator, dtype=torch.float64).to(DEVICE) * 0.1 * x[row].norm() / 32 ** 0.5
        w[labels[row]] = -x[row] + noise
        w[other] = x[row] * 2.0
        assert labels[row] != other
    return x.bfloat16(), w.bfloat16(), labels


def test_kept_block_recomputes_rows_outside_its_shift(kernel):
    x, w, labels = opposite_rows_inputs()
    kept_outputs = torch.ops.arcface_ext.margin_softmax_forward_kept(x, w, labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1,
                                                                    False, 1 << 26)
    _, factor, inv_norm, recompute, unclamped = kept_parts(kept_outputs[3], 64, 500)
    if kernel != "cublas":
        # Exactly the two rows; the others keep H and their factor exp(S_i - lse_i).
        assert recompute.nonzero().flatten().tolist() == [5, 9]
        assert factor[5] == 1 and factor[9] == 1
    else:
        # The cuBLAS path writes G itself for every row.
        assert bool((recompute == 1).all()) and bool((factor == 1).all())
    expected_inv_norm = 1 / w.float().norm(dim=1)
    assert_close_report(inv_norm, expected_inv_norm, atol=0, rtol=1e-5, name="inv_norm")
    assert bool((unclamped == 1).all())
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5)
    assert_matches(ours, expected)


def test_kept_block_gives_an_ignored_row_nothing(kernel, monkeypatch):
    # Row 3 is ignored, and its dot products overflow fp32 (finite bf16 values near the range's
    # end): the block's row is zero, as the recomputing path's is, so no NaN reaches grad_weight.
    x, w, labels = make_inputs(16, 24, 40, seed=49, dtype=torch.bfloat16, ignored=(3,))
    x[3] = 3e38
    upstream = upstream_gradient(16, seed=49, dtype=torch.float64)
    outputs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", setting)
        outputs[setting] = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
        assert all(bool(t[torch.arange(16, device=DEVICE) != 3].isfinite().all()) if t.dim() == 1 else
                   bool(t.isfinite().all()) for t in outputs[setting][2:]), setting
    expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels, upstream=upstream)
    for setting in ("1", "0"):
        for name, a, e in zip(OUTPUTS[2:], outputs[setting][2:], expected[2:]):
            assert_matches_table(a, e, name=f"{name} (ARCFACE_EXT_KEEP_BLOCK={setting})",
                                 roundings=GEMM_OPERAND_ROUNDINGS)


def grid_limit_inputs():
    """Two bf16 rows and 65535·128 + 1 classes: one class tile more than a grid's y dimension holds
    (the kept block of two rows fits the default workspace)."""
    c = 65535 * 128 + 1
    x = torch.randn(2, 8, dtype=torch.float64).to(DEVICE, torch.bfloat16).requires_grad_(True)
    w = torch.randn(c, 8, dtype=torch.float64).to(DEVICE, torch.bfloat16).requires_grad_(True)
    return x, w, torch.tensor([0, c - 1], device=DEVICE)


@pytest.mark.gpu_only  # (8.4M classes take the emulator ten minutes)
def test_a_step_past_the_grid_limit_recomputes():
    # The kept block's recompute pass has a block per 128 classes in grid.y: past 65535 of them
    # the step recomputes instead (the block fits the workspace only for a few rows there).
    x, w, labels = grid_limit_inputs()
    names = cuda_kernel_names(lambda: arcface_ext.combined_margin_loss(x, w, labels, reduction="sum").backward())
    assert "kept_block_recompute_kernel" not in names and "fused_backward_kernel" in names, names
    assert bool(w.grad[-1].abs().sum() > 0)


def test_the_kept_op_refuses_classes_past_the_grid_limit():
    x, w, labels = grid_limit_inputs()
    with pytest.raises(ValueError, match="margin_softmax_forward_kept takes at most 8388480 classes"):
        torch.ops.arcface_ext.margin_softmax_forward_kept(x.detach(), w.detach(), labels, 64.0, 1.0, 0.5, 0.0, 0.0,
                                                          -1, False, 1 << 27)


@pytest.mark.parametrize("case", ["kept", "fp16", "workspace", "disabled", "shard", "no-grad"])
def test_kept_block_only_where_it_fits(monkeypatch, workspace, case):
    # The autograd formula keeps the block for bf16 steps over the whole softmax whose block fits
    # the workspace (N·C·2 bytes and 5 (N + C) more, and 8 KiB a row left for the forward's
    # statistics), unless ARCFACE_EXT_KEEP_BLOCK=0.
    dtype = torch.float16 if case == "fp16" else torch.bfloat16
    x, w, labels = make_inputs(64, 32, 1000, seed=44, dtype=dtype)
    needed = 64 * 1000 * 2 + 5 * (64 + 1000) + 64 * 8192
    workspace(needed - 1 if case == "workspace" else needed)
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "0" if case == "disabled" else "1")
    x.requires_grad_(case != "no-grad")
    w.requires_grad_(case != "no-grad")

    def step():
        if case == "shard":
            loss, _, _ = torch.ops.arcface_ext.margin_softmax_forward(x, w, labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1,
                                                                      False, needed, 0, 2000)
        else:
            loss = arcface_ext.combined_margin_loss(x, w, labels, reduction="none")
        if loss.requires_grad:
            loss.sum().backward()

    names = cuda_kernel_names(step)
    assert ("kept_block_recompute_kernel" in names) == (case == "kept"), names
    if case != "no-grad":
        assert ("fused_backward_kernel" in names) == (case != "kept"), names


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "embeddings", "weight"])
def test_opcheck_kept_ops(needs):
    # Inputs without requires_grad: the kept ops run below the autograd formula of
    # margin_softmax_forward and have none of their own.
    x, w, labels = make_inputs(7, 16, 11, seed=45, dtype=torch.bfloat16, ignored=(3,))
    forward_args = (x, w, labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1, False, 1 << 20)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_forward_kept, forward_args)
    kept = torch.ops.arcface_ext.margin_softmax_forward_kept(*forward_args)[3]
    grad_loss = torch.rand(7, device=DEVICE)
    args = (grad_loss, x, w, labels, kept, 64.0, 1.0, 0.5, 0.0, 0.0, -1, False, *needs)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_backward_kept, args)


def test_kept_block_rejects_a_foreign_block():
    x, w, labels = make_inputs(7, 16, 11, seed=46, dtype=torch.bfloat16)
    kept = torch.zeros(100, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(RuntimeError, match="kept must be margin_softmax_forward_kept's uint8 block"):
        torch.ops.arcface_ext.margin_softmax_backward_kept(torch.ones(7, device=DEVICE), x, w, labels, kept, 64.0,
                                                           1.0, 0.5, 0.0, 0.0, -1, False, True, True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_kept_block_under_compile(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_loss_and_cosine, fullgraph=True, backend=backend)
    x, w, labels = make_inputs(21, 16, 97, seed=47, dtype=torch.bfloat16, ignored=(2,))
    eager = loss_and_grads(_loss_and_cosine, x, w, labels, reduction="mean")
    names = cuda_kernel_names(lambda: loss_and_grads(compiled, x, w, labels, reduction="mean"))
    assert "kept_block_recompute_kernel" in names and "fused_backward_kernel" not in names, names
    graph = loss_and_grads(compiled, x, w, labels, reduction="mean")
    for name, a, e in zip(OUTPUTS, graph, eager):
        assert_close_report(a.float(), e.float(), atol=1e-6, rtol=1e-6, name=f"{backend} {name}")


# ---- against the CPU op -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("margin", ["arcface", "sphereface_lambda"])
def test_matches_cpu_op(margin, dtype):
    x, w, labels = make_inputs(37, 64, 10007, seed=4, dtype=dtype, ignored=(5,))
    upstream = upstream_gradient(37, seed=4, dtype=torch.float64)
    kw = margin_kwargs(margin)
    cuda = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream, **kw)
    with cpu_op():
        cpu = op_and_grads(arcface_ext.combined_margin_loss, x.cpu(), w.cpu(), labels.cpu(), upstream=upstream.cpu(),
                           **kw)
    for name, a, e in zip(OUTPUTS, cuda, cpu):
        assert a.dtype == e.dtype, f"{name}: {a.dtype} on CUDA, {e.dtype} on CPU"
        # The CPU op's 16-bit gradients carry one rounding, ours two.
        assert_matches_table(a.cpu(), e, name=name, roundings=GEMM_OPERAND_ROUNDINGS + 1)
    # The per-row log-sum-exp, which the backward relies on, straight from the op.
    args = (1 << 26,)
    _, lse_cuda, _ = torch.ops.arcface_ext.margin_softmax_forward(x, w, labels, 64.0, kw["m1"], kw["m2"], kw["m3"],
                                                                  kw["lambda_"], -1, False, *args)
    with cpu_op():
        _, lse_cpu, _ = torch.ops.arcface_ext.margin_softmax_forward(x.cpu(), w.cpu(), labels.cpu(), 64.0, kw["m1"],
                                                                     kw["m2"], kw["m3"], kw["lambda_"], -1, False,
                                                                     *args)
    assert_matches_table(lse_cuda.cpu(), lse_cpu, name="logsumexp")


# ---- edge rows --------------------------------------------------------------------------------

def targets_past_pi(n, dim, num_classes, *, seed, dtype):
    """Embeddings 0.15-0.27 rad from the opposite of their class centre: θ in (2.87, 2.99), past
    π - m2 for m2 >= 0.3 and in SphereFace's k = 3 branch."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    w_hat = F.normalize(weight[labels], dim=1)
    other = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    other = F.normalize(other - (other * w_hat).sum(1, keepdim=True) * w_hat, dim=1)
    phi = 0.15 + 0.12 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    embeddings = 3.0 * (-torch.cos(phi) * w_hat + torch.sin(phi) * other)
    return embeddings.to(DEVICE, dtype), weight.to(DEVICE, dtype), labels.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin", ["arcface", "combined", "sphereface", "sphereface_lambda"])
def test_targets_past_pi(margin, margin_grad, dtype):
    kw = margin_kwargs(margin)
    x, w, labels = targets_past_pi(19, 16, 23, seed=5, dtype=dtype)
    ours, expected = run_both(x, w, labels, margin_grad=margin_grad, **kw)
    theta = torch.acos(expected[1])
    assert bool((kw["m1"] * theta + kw["m2"] > math.pi).all()), "the inputs must reach past pi"
    assert_matches(ours, expected)


def rotated_towards(w_hat, angle, *, seed):
    """Unit vectors at `angle` (radians, per row) from the unit vectors w_hat."""
    generator = torch.Generator().manual_seed(seed)
    other = torch.randn(w_hat.shape, generator=generator, dtype=torch.float64).to(w_hat.device)
    other = F.normalize(other - (other * w_hat).sum(1, keepdim=True) * w_hat, dim=1)
    return math.cos(angle) * w_hat + math.sin(angle) * other


@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_embeddings_on_and_opposite_their_class_centre(margin, margin_grad):
    # c = 1 and c = -1: acos and the exact dψ/dc at their singular ends. Whether the computed
    # cosine lands on 1 or one ulp past it (and the clamp then zeroes its gradient, as the
    # reference's does) is a matter of rounding, so rows exactly there are checked for finite
    # outputs only; rows 0.01 rad from either end are compared with the reference.
    x, w, labels = make_inputs(12, 16, 9, seed=6, dtype=torch.float64)
    w_hat = F.normalize(w[labels], dim=1)
    exact = x.clone()
    exact[0:4] = 2.5 * w[labels[0:4]]
    exact[4:6] = -1.5 * w[labels[4:6]]
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        ours, _ = run_both(exact.to(dtype), w.to(dtype), labels, margin_grad=margin_grad, **margin_kwargs(margin))
        assert all(bool(t.isfinite().all()) for t in ours), f"non-finite output in {dtype}"
    near = x.clone()
    near[0:4] = 2.5 * rotated_towards(w_hat[0:4], 0.01, seed=6)
    near[4:6] = 1.5 * rotated_towards(w_hat[4:6], math.pi - 0.01, seed=7)
    ours, expected = run_both(near, w, labels, margin_grad=margin_grad, **margin_kwargs(margin))
    assert_matches(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("margin", ["arcface", "cosface", "sphereface_lambda"])
def test_zero_norm_embeddings_and_class_centres(kernel, margin, dtype):
    # fp16 is left out on purpose: 1/eps = 1e12 is far outside its range, so the reference's own
    # gradient at a zero centre is inf in fp16 (see benchmarks/NOTES.md).
    x, w, labels = make_inputs(8, 16, 11, seed=7, dtype=dtype)
    labels[:3] = torch.tensor([4, 7, 9], device=DEVICE)
    x[0] = 0  # a zero embedding
    w[7] = 0  # row 1's own class centre
    w[10] = 0  # a centre no row targets
    ours, expected = run_both(x, w, labels, **margin_kwargs(margin))
    assert all(bool(t.isfinite().all()) for t in ours)
    zero_row = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    zero_row[0] = True
    zero_class = torch.zeros(11, dtype=torch.bool, device=DEVICE)
    zero_class[[7, 10]] = True
    # Those rows' gradients are scaled by 1/eps and dwarf the rest; compare them apart.
    assert_matches(ours, expected, rows=~zero_row, classes=~zero_class)
    assert_matches(ours, expected, rows=zero_row, classes=zero_class)


@pytest.mark.parametrize("keep", ["kept", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", NON_FINITE_CASES)
def test_nan_and_inf_inputs_reach_the_loss_and_gradients(monkeypatch, kernel, case, dtype, keep):
    """A NaN or inf in an embedding or a class centre makes the same losses, target cosines and
    gradient rows non-finite as in the reference (fmax/fmin would drop a NaN cosine: the loss
    stayed finite and a training loop's NaN check, or a GradScaler, never saw it). C = 257 puts the
    bad class alone in the last, partial class tile."""
    if keep == "kept" and not (dtype == torch.bfloat16 and kernel != "cublas"):
        pytest.skip("the kept block is the fused bf16 path's")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "1" if keep == "kept" else "0")
    x, w, labels = make_inputs(6, 16, 257, seed=13, dtype=dtype)
    put_non_finite(case, x, w, labels)
    ours, expected = run_both(x, w, labels)
    assert_non_finite_where_expected(ours, expected, OUTPUTS)
    if case.endswith("row"):  # the other rows are untouched
        fine = torch.ones(6, dtype=torch.bool, device=DEVICE)
        fine[1] = False
        for name, a, e in zip(OUTPUTS[:3], ours, expected):
            assert_matches_table(a[fine], e[fine], name=name, roundings=GEMM_OPERAND_ROUNDINGS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ignored_rows_and_custom_ignore_index(kernel, dtype):
    x, w, labels = make_inputs(10, 8, 7, seed=8, dtype=dtype, ignored=(0, 4, 9))
    ours, expected = run_both(x, w, labels)
    assert_matches(ours, expected)
    assert bool((ours[0][[0, 4, 9]] == 0).all()), "ignored rows have loss 0"
    assert bool(ours[1][[0, 4, 9]].isnan().all()), "ignored rows have a NaN target cosine"
    assert bool((ours[2][[0, 4, 9]] == 0).all()), "ignored rows get no gradient"
    # ignore_index = 5, a valid class: rows labelled 5 are ignored, -1 would be a bad label.
    relabelled = labels.clone()
    relabelled[[0, 4, 9]] = 5
    upstream = upstream_gradient(10, seed=0, dtype=torch.float64)
    again = op_and_grads(arcface_ext.combined_margin_loss, x, w, relabelled, upstream=upstream, ignore_index=5)
    expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), relabelled, upstream=upstream,
                            ignore_index=5)
    assert_matches(again, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_all_rows_ignored(kernel, reduction, dtype):
    x, w, _ = make_inputs(6, 8, 7, seed=9, dtype=dtype)
    labels = torch.full((6,), -1, device=DEVICE)
    loss, target_cosine, gx, gw = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels,
                                                 reduction=reduction, return_target_cosine=True)
    assert bool((loss == 0).all()) and bool(target_cosine.isnan().all())
    assert bool((gx == 0).all()) and bool((gw == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, w, labels = make_inputs(0, 8, 7, seed=10, dtype=torch.float32)
    loss, target_cosine, gx, gw = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels,
                                                 reduction=reduction, return_target_cosine=True)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert bool((loss == 0).all()) and target_cosine.shape == (0,)
    assert gx.shape == (0, 8) and gw.shape == (7, 8) and bool((gw == 0).all())
    assert loss.device.type == DEVICE and gw.device.type == DEVICE


def test_non_contiguous_inputs_equal_contiguous():
    x, w, labels = make_inputs(13, 10, 29, seed=11, dtype=torch.float32, ignored=(2,))
    x_t = x.t().contiguous().t()
    w_strided = torch.stack([w, torch.zeros_like(w)], 2)[:, :, 0]
    labels_strided = torch.stack([labels, torch.zeros_like(labels)], 1)[:, 0]
    assert not (x_t.is_contiguous() or w_strided.is_contiguous() or labels_strided.is_contiguous())
    upstream = upstream_gradient(13, seed=11)
    contiguous = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    strided = op_and_grads(arcface_ext.combined_margin_loss, x_t, w_strided, labels_strided, upstream=upstream)
    for name, a, e in zip(OUTPUTS, strided, contiguous):
        assert_close_report(a, e, atol=0, rtol=0, name=name)


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [("label >= C", 1, 5, -1), ("label < -1", 2, -2, -1),
                                 ("-1 with another ignore_index", 0, -1, -100)], ids=lambda b: b[0])
def test_bad_labels_raise_before_any_kernel(bad):
    _, row, value, ignore_index = bad
    x, w, labels = make_inputs(4, 6, 5, seed=12, dtype=torch.float32)
    labels[row] = value
    with pytest.raises(ValueError, match=rf"labels\[{row}\] = {value}"):
        arcface_ext.combined_margin_loss(x, w, labels, ignore_index=ignore_index)
    # No device-side assert or illegal access happened: the context still works.
    synchronize()
    labels[row] = 0
    loss = arcface_ext.combined_margin_loss(x, w, labels, ignore_index=ignore_index)
    assert bool(loss.isfinite())


def test_the_first_bad_label_is_named():
    # The CUDA check is one block whose threads each find their first bad row (rows i, i + 256, ...)
    # before the smallest is taken: bad rows in different threads' later strides, the first not in
    # the first stride. The backward op, called directly, checks the same way.
    x, w, labels = make_inputs(700, 8, 5, seed=14, dtype=torch.float32)
    labels[[513, 300, 650]] = torch.tensor([9, 7, -3], device=DEVICE)
    with pytest.raises(ValueError, match=r"labels\[300\] = 7 "):
        arcface_ext.combined_margin_loss(x, w, labels)
    args = (x, w, labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1, False, 1 << 26)
    grad = torch.ones(700, device=DEVICE)
    with pytest.raises(ValueError, match=r"labels\[300\] = 7 "):
        torch.ops.arcface_ext.margin_softmax_backward(grad, *args[:3], torch.zeros(700, device=DEVICE),
                                                      *args[3:], True, True)


@pytest.mark.skipif(not emulator.EMULATED, reason="pretends a capture: the emulator's ARCFACE_EMU_CAPTURING")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bad_labels_inside_a_capture_give_nan_loss_and_no_gradient(monkeypatch, kernel, dtype):
    # Inside a CUDA graph capture the label check cannot read its answer back: the op skips it, and
    # a bad row's loss is NaN (a mean over the rows is NaN: the step shows it) while its gradient is
    # zero (the model is not corrupted); every other row is as if the bad one were ignored.
    x, w, labels = make_inputs(40, 16, 300, seed=49, dtype=dtype, ignored=(3,))
    bad = labels.clone()
    bad[[7, 21]] = torch.tensor([300, -5], device=DEVICE)
    ignored = labels.clone()
    ignored[[7, 21]] = -1
    upstream = upstream_gradient(40, seed=49)
    monkeypatch.setenv("ARCFACE_EMU_CAPTURING", "1")
    ours = op_and_grads(arcface_ext.combined_margin_loss, x, w, bad, upstream=upstream)
    monkeypatch.setenv("ARCFACE_EMU_CAPTURING", "0")
    expected = op_and_grads(arcface_ext.combined_margin_loss, x, w, ignored, upstream=upstream)
    assert bool(ours[0][[7, 21]].isnan().all()) and bool(ours[1][[7, 21]].isnan().all())
    rows = torch.ones(40, dtype=torch.bool, device=DEVICE)
    rows[[7, 21]] = False
    assert torch.equal(ours[0][rows], expected[0][rows])
    for name, a, e in zip(OUTPUTS[2:], ours[2:], expected[2:]):
        assert torch.equal(a, e), name
    monkeypatch.setenv("ARCFACE_EMU_CAPTURING", "1")
    assert bool(arcface_ext.combined_margin_loss(x, w, bad).isnan())


def with_bad_rows(labels, rows, values):
    """(labels with bad values at `rows`, the same labels with those rows ignored, the other rows)."""
    bad = labels.clone()
    bad[rows] = torch.tensor(values, device=DEVICE)
    ignored = labels.clone()
    ignored[rows] = -1
    others = torch.ones(labels.shape[0], dtype=torch.bool, device=DEVICE)
    others[rows] = False
    return bad, ignored, others


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_unchecked_bad_labels_give_nan_loss_and_no_gradient(kernel, dtype):
    # check_labels=False: no check, no sync; a bad row's loss and target cosine are NaN and it gets
    # no gradient; every other row is as if the bad one were ignored (bf16: the kept gradient block's
    # step, fp16 the recomputing one), and the reference, told the same, agrees.
    x, w, labels = make_inputs(40, 16, 300, seed=53, dtype=dtype, ignored=(3,))
    bad, ignored, others = with_bad_rows(labels, [7, 21, 30], [300, -5, 10**12])
    upstream = upstream_gradient(40, seed=53)
    ours = op_and_grads(arcface_ext.combined_margin_loss, x, w, bad, upstream=upstream, check_labels=False)
    expected = op_and_grads(arcface_ext.combined_margin_loss, x, w, ignored, upstream=upstream)
    assert bool(ours[0][~others].isnan().all()) and bool(ours[1][~others].isnan().all())
    assert torch.equal(ours[0][others], expected[0][others])
    for name, a, e in zip(OUTPUTS[2:], ours[2:], expected[2:]):
        assert torch.equal(a, e), name
    reference_rows = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), bad, upstream=upstream,
                                  check_labels=False)
    assert bool(reference_rows[0][~others].isnan().all()) and bool(reference_rows[1][~others].isnan().all())
    assert_matches(ours, reference_rows, rows=others)
    for reduction in ("mean", "sum"):
        assert bool(arcface_ext.combined_margin_loss(x, w, bad, reduction=reduction, check_labels=False).isnan())
    with pytest.raises(ValueError, match=r"labels\[7\] = 300"):
        arcface_ext.combined_margin_loss(x, w, bad)


def test_unchecked_bad_labels_in_the_wgmma_weight_gradient_tile(monkeypatch):
    # The same through the backward's class-outer tile (bf16, recomputing): a bad row forms no
    # gradient there either, so d loss / d W and d loss / d x equal those with the row ignored.
    use_wgmma(monkeypatch, True)
    monkeypatch.setenv("ARCFACE_EXT_WGMMA", "resident-weight")
    monkeypatch.setenv("ARCFACE_EXT_CUDA_FUSED", "1")
    monkeypatch.setenv("ARCFACE_EXT_KEEP_BLOCK", "0")
    x, w, labels = make_inputs(70, 64, 300, seed=60, dtype=torch.bfloat16)
    bad, ignored, others = with_bad_rows(labels, [5, 40, 69], [300, -7, 1000])
    upstream = upstream_gradient(70, seed=60)
    ours = op_and_grads(arcface_ext.combined_margin_loss, x, w, bad, upstream=upstream, check_labels=False)
    expected = op_and_grads(arcface_ext.combined_margin_loss, x, w, ignored, upstream=upstream)
    assert bool(ours[0][~others].isnan().all())
    assert torch.equal(ours[0][others], expected[0][others])
    for name, a, e in zip(OUTPUTS[2:], ours[2:], expected[2:]):
        assert torch.equal(a, e), name


def test_unchecked_non_finite_margins_give_nan_rows():
    # A non-finite per-row margin, unchecked: that row's loss and gradient are NaN, the others exact.
    x, w, labels = make_inputs(24, 16, 200, seed=54, dtype=torch.bfloat16)
    m2 = torch.linspace(0.2, 0.6, 24, dtype=torch.float64, device=DEVICE)
    bad = m2.clone()
    bad[5] = float("nan")
    upstream = upstream_gradient(24, seed=54)
    ours = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream, m2=bad, check_labels=False)
    expected = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream, m2=m2)
    assert bool(ours[0][5].isnan()) and bool(ours[2][5].isnan().all())
    others = torch.arange(24, device=DEVICE) != 5
    assert torch.equal(ours[0][others], expected[0][others])
    assert torch.equal(ours[2][others], expected[2][others])
    with pytest.raises(ValueError, match="the per-row margin m2 must be finite"):
        arcface_ext.combined_margin_loss(x, w, labels, m2=bad)


def test_unchecked_bad_labels_give_their_per_row_margins_no_gradient():
    # check_labels=False with per-row margins that require grad: a bad row's margins get no gradient,
    # 0 as an ignored row's (they were NaN, from its NaN loss and target cosine), as the reference
    # and the chunked path give them; the other rows' equal those with the bad rows ignored.
    x, w, labels = make_inputs(40, 16, 300, seed=55, dtype=torch.bfloat16)
    bad, ignored, others = with_bad_rows(labels, [7, 21, 30], [300, -5, 10**12])
    upstream = upstream_gradient(40, seed=55)

    def margin_grads(loss_fn, x, w, labels):
        m2 = torch.linspace(0.2, 0.6, 40, dtype=torch.float64, device=DEVICE).requires_grad_(True)
        m3 = torch.linspace(0.0, 0.1, 40, dtype=torch.float64, device=DEVICE).requires_grad_(True)
        loss = loss_fn(x, w, labels, m2=m2, m3=m3, reduction="none", check_labels=False)
        loss.backward(upstream.to(loss.dtype))
        return loss.detach(), m2.grad, m3.grad

    ours = margin_grads(arcface_ext.combined_margin_loss, x, w, bad)
    expected = margin_grads(arcface_ext.combined_margin_loss, x, w, ignored)
    assert bool(ours[0][~others].isnan().all())
    for name, grad, want in zip(("m2", "m3"), ours[1:], expected[1:]):
        assert torch.equal(grad[~others], torch.zeros_like(grad[~others])), name
        assert torch.equal(grad, want), name
    reference_rows = margin_grads(reference.combined_margin_loss, x.double(), w.double(), bad)
    for name, grad in zip(("m2", "m3"), reference_rows[1:]):
        assert torch.equal(grad[~others], torch.zeros_like(grad[~others])), name


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_unchecked_bad_labels_in_a_sampled_module(sharded):
    # Partial FC, check_labels=False: the bad row is left out of the sample as an ignored one would
    # be, and put past the sample, so that the op gives it a NaN loss and no gradient; the other
    # rows, and the sample, are those of the same step with the row ignored. (One rank: the
    # sharded module's own sample and renumbering.)
    x, w, labels = make_inputs(32, 16, 2000, seed=55, dtype=torch.float32, ignored=(4,))
    bad, ignored, others = with_bad_rows(labels, [9, 17], [2000, -3])
    kind = arcface_ext.ShardedCombinedMarginLoss if sharded else arcface_ext.CombinedMarginLoss
    module = kind(2000, 16, sample_rate=0.1, reduction="none", check_labels=False, device=DEVICE)
    assert "check_labels=False" in repr(module)
    with torch.no_grad():
        module.weight.copy_(w)
    results = []
    for batch_labels in (bad, ignored):
        torch.manual_seed(56)
        xs = x.clone().requires_grad_(True)
        module.weight.grad = None
        loss, cosine = module(xs, batch_labels, return_target_cosine=True)
        loss.backward(torch.ones_like(loss))
        results.append((loss.detach(), cosine, xs.grad, module.weight.grad, module.last_sampled_classes))
    ours, expected = results
    assert torch.equal(ours[4], expected[4])
    assert bool(ours[0][~others].isnan().all()) and bool(ours[1][~others].isnan().all())
    assert torch.equal(ours[0][others], expected[0][others])
    for name, a, e in zip(OUTPUTS[2:], ours[2:4], expected[2:4]):
        assert torch.equal(a, e), name
    module.check_labels = True
    with pytest.raises(ValueError, match="labels must lie in"):
        module(x, bad)


def _unchecked_sharded_worker(rank, world_size, init_file, out_dir, sample_rate):
    import torch.distributed as dist

    emulator.install()  # a spawned process: conftest did not run here
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x, w, labels = make_inputs(12, 16, 90, seed=58, dtype=torch.float32, ignored=(1,))
        bad, ignored, _ = with_bad_rows(labels, [2, 9], [90, -4])
        mine = slice(6 * rank, 6 * rank + 6)
        module = arcface_ext.ShardedCombinedMarginLoss(90, 16, sample_rate=sample_rate, reduction="none",
                                                       check_labels=False)
        with torch.no_grad():
            module.weight.copy_(module.shard_of(w))
        results = {}
        for name, batch_labels in (("bad", bad), ("ignored", ignored)):
            torch.manual_seed(59 + rank)
            xs = x[mine].clone().requires_grad_(True)
            module.weight.grad = None
            loss, cosine = module(xs, batch_labels[mine], return_target_cosine=True)
            loss.backward(torch.ones_like(loss))
            results[name] = (loss.detach(), cosine, xs.grad, module.weight.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not emulator.EMULATED, reason="two gloo ranks on the emulator's CPU tensors")
@pytest.mark.parametrize("sample_rate", [1.0, 0.5], ids=["all-classes", "sampled"])
def test_unchecked_bad_labels_across_sharded_ranks(tmp_path, sample_rate):
    # Two ranks, check_labels=False: a bad label (row 2 on rank 0, row 9 on rank 1) gives its row a
    # NaN loss and target cosine on its rank (the shards' statistics combine without its target),
    # and every other output is that of the same step with the row ignored.
    import torch.multiprocessing as mp

    mp.spawn(_unchecked_sharded_worker, args=(2, str(tmp_path / "store"), str(tmp_path), sample_rate), nprocs=2,
             join=True)
    for rank, row in ((0, 2), (1, 3)):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        ours, expected = results["bad"], results["ignored"]
        others = torch.arange(6) != row
        assert bool(ours[0][row].isnan()) and bool(ours[1][row].isnan())
        assert torch.equal(ours[0][others], expected[0][others])
        for name, a, e in zip(OUTPUTS[2:], ours[2:], expected[2:]):
            assert torch.equal(a, e), (rank, name)


@pytest.mark.gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_unchecked_training_step_never_synchronises(dtype):
    # torch.cuda's sync debug mode raises on any device synchronisation: the checked step reads its
    # label check back (one sync), the unchecked one (forward, mean, backward) none.
    x, w, labels = make_inputs(64, 32, 1000, seed=57, dtype=dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    m2 = torch.linspace(0.2, 0.6, 64, dtype=torch.float64, device=DEVICE)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        arcface_ext.combined_margin_loss(x, w, labels, m2=m2, check_labels=False).backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            arcface_ext.combined_margin_loss(x, w, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert bool(x.grad.isfinite().all()) and bool(w.grad.isfinite().all())


@pytest.mark.gpu_only
@pytest.mark.parametrize("margins", ["scalar", "per-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_training_step_in_a_cuda_graph(dtype, margins):
    # The whole step (forward, sum, backward) captured once and replayed on new values in the same
    # tensors gives the eager results (bf16: the kept gradient block); a bad label copied in before a
    # replay gives a NaN loss and the gradients of the step with that row ignored. Per-row margins
    # (AdaFace's, ElasticFace's) are not read back inside the capture either.
    x, w, labels = make_inputs(64, 32, 1000, seed=50, dtype=dtype)
    static_x = x.clone().requires_grad_(True)
    static_w = w.clone().requires_grad_(True)
    static_labels = labels.clone()
    kwargs = {}
    if margins == "per-row":
        kwargs["m2"] = torch.linspace(0.2, 0.6, 64, dtype=torch.float64, device=DEVICE)

    def step():
        loss = arcface_ext.combined_margin_loss(static_x, static_w, static_labels, reduction="sum", **kwargs)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graph asks
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = static_w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    def replay_and_compare(expected_labels):
        graph.replay()
        torch.cuda.synchronize()
        expected = loss_and_grads(arcface_ext.combined_margin_loss, static_x.detach(), static_w.detach(),
                                  expected_labels, reduction="sum", **kwargs)
        for name, a, e in (("grad_embeddings", static_x.grad, expected[2]),
                           ("grad_weight", static_w.grad, expected[3])):
            torch.testing.assert_close(a, e, msg=name)
        return expected[0]

    for seed in (51, 52):
        new_x, new_w, new_labels = make_inputs(64, 32, 1000, seed=seed, dtype=dtype)
        with torch.no_grad():
            static_x.copy_(new_x)
            static_w.copy_(new_w)
        static_labels.copy_(new_labels)
        torch.testing.assert_close(static_loss, replay_and_compare(new_labels))
    static_labels[5] = 1000
    ignored = static_labels.clone()
    ignored[5] = -1
    replay_and_compare(ignored)
    assert bool(static_loss.isnan())


@pytest.mark.gpu_only
def test_mixed_devices_raise():
    x, w, labels = make_inputs(4, 6, 5, seed=13, dtype=torch.float32)
    with pytest.raises(ValueError, match="one device"):
        arcface_ext.combined_margin_loss(x, w.cpu(), labels)


# ---- precision, determinism, streams ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_large_loss_scale(kernel, dtype):
    # A loss-scaled upstream gradient, large and small: the gradient block is kept free of
    # grad_loss and the B operand is divided by max|grad_loss|, so fp16's intermediate values
    # neither overflow nor underflow. (2^10 keeps the fp16 gradients themselves, up to about
    # 2^10·s/‖x‖, inside fp16's range.)
    x, w, labels = make_inputs(64, 128, 3001, seed=14, dtype=dtype)
    for scale in (2.0 ** 10, 2.0 ** -12):
        upstream = torch.full((64,), scale, dtype=torch.float64, device=DEVICE)
        ours = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
        expected = op_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels, upstream=upstream)
        assert all(bool(t[t == t].isfinite().all()) for t in ours), f"non-finite output at scale {scale}"
        assert_matches(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("workspace_bytes", [None, 1], ids=["default", "min-chunk"])
def test_deterministic(kernel, workspace, workspace_bytes, dtype):
    workspace(workspace_bytes)
    x, w, labels = make_inputs(37, 40, 10007, seed=15, dtype=dtype, ignored=(3,))
    upstream = upstream_gradient(37, seed=15)
    first = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    second = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    for name, a, b in zip(OUTPUTS, first, second):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name} differs between two runs"


@pytest.mark.gpu_only
def test_runs_on_the_current_stream():
    x, w, labels = make_inputs(37, 40, 4099, seed=16, dtype=torch.float32)
    upstream = upstream_gradient(37, seed=16)
    expected = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ours = op_and_grads(arcface_ext.combined_margin_loss, x, w, labels, upstream=upstream)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name, a, e in zip(OUTPUTS, ours, expected):
        assert torch.equal(a.nan_to_num(), e.nan_to_num()), f"{name} differs on a side stream"


@pytest.mark.parametrize("needs", ["embeddings", "weight"])
def test_one_input_needs_grad(needs):
    x, w, labels = make_inputs(11, 8, 17, seed=17, dtype=torch.float32)
    expected = loss_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels)
    x = x.clone().requires_grad_(needs == "embeddings")
    w = w.clone().requires_grad_(needs == "weight")
    arcface_ext.combined_margin_loss(x, w, labels).backward()
    grad, other, index = (x.grad, w.grad, 2) if needs == "embeddings" else (w.grad, x.grad, 3)
    assert other is None
    assert_matches_reference(grad, expected[index], name=f"grad_{needs}")


def test_forward_under_no_grad():
    x, w, labels = make_inputs(9, 8, 13, seed=18, dtype=torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with_grad = arcface_ext.combined_margin_loss(x, w, labels, reduction="none")
    with torch.no_grad():
        without = arcface_ext.combined_margin_loss(x, w, labels, reduction="none")
    assert not without.requires_grad
    assert torch.equal(without, with_grad.detach())


# ---- gradcheck, opcheck, torch.compile, autocast --------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_gradcheck(margin, reduction):
    x, w, labels = make_inputs(5, 4, 7, seed=19, dtype=torch.float64, ignored=(2,))
    kw = margin_kwargs(margin)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: arcface_ext.combined_margin_loss(a, b, labels, s=8.0, reduction=reduction,
                                                      margin_grad="exact", **kw),
        (x, w))


def op_arguments(embeddings, weight, labels, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, lambda_=0.0, ignore_index=-1,
                 straight_through=False, workspace_bytes=1 << 20):
    return (embeddings, weight, labels, s, m1, m2, m3, lambda_, ignore_index, straight_through, workspace_bytes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("margin", ["arcface", "sphereface_lambda"])
def test_opcheck_forward(margin, dtype):
    x, w, labels = make_inputs(7, 6, 11, seed=20, dtype=dtype)
    args = op_arguments(x.requires_grad_(True), w.requires_grad_(True), labels, **margin_kwargs(margin))
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_forward, args)


def test_opcheck_forward_with_ignored_rows():
    # The op leaves 0 at ignored rows (the Python layer writes the NaN), so opcheck can compare.
    x, w, labels = make_inputs(7, 6, 11, seed=21, ignored=(1, 5))
    args = op_arguments(x.requires_grad_(True), w.requires_grad_(True), labels)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_forward, args)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "embeddings", "weight"])
def test_opcheck_backward(needs):
    x, w, labels = make_inputs(7, 6, 11, seed=22, dtype=torch.float64, ignored=(3,))
    forward_args = op_arguments(x, w, labels)
    _, logsumexp, _ = torch.ops.arcface_ext.margin_softmax_forward(*forward_args)
    grad_loss = torch.rand(7, dtype=torch.float64, device=DEVICE)
    args = (grad_loss, x, w, labels, logsumexp, *forward_args[3:], *needs)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_backward, args)


def _loss_and_cosine(embeddings, weight, labels, reduction):
    loss, target_cosine = arcface_ext.combined_margin_loss(embeddings, weight, labels, s=30.0, m2=0.3, m3=0.1,
                                                           reduction=reduction, return_target_cosine=True)
    return loss * 2.0, target_cosine


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(reduction, backend):
    torch._dynamo.reset()
    compiled = torch.compile(_loss_and_cosine, fullgraph=True, backend=backend)
    for n in (13, 17):  # the second batch size makes the trace dynamic in N
        x, w, labels = make_inputs(n, 8, 37, seed=23 + n, dtype=torch.float32, ignored=(1,))
        eager = loss_and_grads(_loss_and_cosine, x, w, labels, reduction=reduction)
        graph = loss_and_grads(compiled, x, w, labels, reduction=reduction)
        tol = 0 if backend == "aot_eager" else 1e-6
        for name, a, e in zip(OUTPUTS, graph, eager):
            assert_close_report(a, e, atol=tol, rtol=tol, name=f"{backend} N={n} {name}")


def test_autocast_embeddings_from_a_linear_layer():
    # Under autocast the Linear layer yields bf16 embeddings and the op, a matrix product for
    # autocast's purposes, runs on bf16 copies of its inputs (here the fp32 class centres): the
    # fused tensor-core path, an fp32 loss, and the gradient flowing back into the bf16 embeddings,
    # the layer and the fp32 centres.
    torch.manual_seed(24)
    backbone = torch.nn.Linear(48, 32).to(DEVICE)
    criterion = arcface_ext.ArcFaceLoss(501, 32).to(DEVICE)
    inputs = torch.randn(29, 48, device=DEVICE)
    labels = torch.randint(0, 501, (29,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        embeddings = backbone(inputs)
        assert embeddings.dtype == torch.bfloat16
        embeddings.retain_grad()
        loss = criterion(embeddings, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert backbone.weight.grad is not None and bool(backbone.weight.grad.isfinite().all())
    assert criterion.weight.grad.dtype == torch.float32
    expected = loss_and_grads(reference.combined_margin_loss, embeddings.detach().double(),
                              criterion.weight.detach().bfloat16().double(), labels, s=64.0, m2=0.5)
    assert_matches_table(loss.detach(), expected[0], name="loss")
    assert_matches_table(embeddings.grad, expected[2], name="grad_embeddings", roundings=GEMM_OPERAND_ROUNDINGS)
    # The centres' gradient is computed in bf16 (rounded like any bf16 gradient), then cast to fp32.
    assert_matches_table(criterion.weight.grad.bfloat16(), expected[3], name="grad_weight",
                         roundings=GEMM_OPERAND_ROUNDINGS)


def test_bf16_module(kernel):
    torch.manual_seed(25)
    criterion = arcface_ext.CosFaceLoss(1001, 64).to(DEVICE, torch.bfloat16)
    embeddings = torch.randn(31, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1001, (31,), device=DEVICE)
    loss = criterion(embeddings, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert criterion.weight.grad.dtype == torch.bfloat16
    expected = loss_and_grads(reference.combined_margin_loss, embeddings.detach().double(),
                              criterion.weight.detach().double(), labels, s=64.0, m3=0.35, m2=0.0)
    assert_matches_table(loss.detach(), expected[0], name="loss")
    assert_matches_table(embeddings.grad, expected[2], name="grad_embeddings", roundings=GEMM_OPERAND_ROUNDINGS)
    assert_matches_table(criterion.weight.grad, expected[3], name="grad_weight", roundings=GEMM_OPERAND_ROUNDINGS)


# ---- memory -------------------------------------------------------------------------------------

@pytest.mark.gpu_only
def test_peak_memory_at_a_million_classes(kernel):
    # The bound: N = 512, D = 512, C = 1,000,000, bf16; the memory beyond the inputs and
    # their gradients stays under 256 MiB (eager needs several GB: the N x C logits alone are 2 GB
    # in fp32). The default workspace is 128 MiB.
    n, dim, num_classes = 512, 512, 1_000_000
    generator = torch.Generator(device=DEVICE).manual_seed(26)
    weight = torch.randn(num_classes, dim, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    weight.requires_grad_(True)
    embeddings = torch.randn(n, dim, device=DEVICE, dtype=torch.bfloat16, generator=generator, requires_grad=True)
    labels = torch.randint(0, num_classes, (n,), device=DEVICE, generator=generator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = arcface_ext.combined_margin_loss(embeddings, weight, labels)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (weight, embeddings))
    extra_mib = (peak - base - grads) / 2 ** 20
    assert bool(loss.isfinite()) and bool(weight.grad.isfinite().all())
    assert extra_mib < 256, f"peak extra memory {extra_mib:.1f} MiB >= 256 MiB"


# ---- the trainer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["arcface", "adaface"])
def test_trainer_steps_on_the_fused_kernels(tmp_path, loss):
    # A few steps of the bundled trainer with the margin loss under bf16 autocast (--loss-amp bf16):
    # the backbone's fp32 embeddings and the fp32 centres reach the op as bf16, so the fused
    # tensor-core kernels run inside a real training step (the backward from the kept gradient
    # block: it fits the workspace); the losses agree
    # with the same run on the pure-PyTorch reference loss (whose bf16 cosines cost up to ~0.25 in a
    # logit) and fall.
    import json

    from train.trainer import main

    def run(impl):
        output = tmp_path / impl
        argv = ["--data", "synthetic", "--synthetic-identities", "20", "--synthetic-images-per-identity", "8",
                "--network", "small", "--image-size", "32", "--batch-size", "32", "--embedding-size", "64",
                "--max-steps", "6", "--warmup-steps", "0", "--log-every", "1", "--eval-every", "0",
                "--save-every", "0", "--num-workers", "0", "--val-targets", "none", "--no-plots",
                "--no-tensorboard", "--device", DEVICE, "--loss", loss, "--loss-amp", "bf16",
                "--loss-impl", impl, "--output", str(output)]
        assert main(argv) == 0
        with open(output / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f if line.strip()]

    names = cuda_kernel_names(lambda: run("fused"))
    assert "fused_forward_kernel" in names and "kept_block_recompute_kernel" in names, names
    fused = run("fused")
    reference_losses = run("reference")
    assert len(fused) == 6 and all(math.isfinite(v) for v in fused)
    assert fused[0] == pytest.approx(reference_losses[0], rel=0.02)
    assert sum(fused[-2:]) < sum(fused[:2])
