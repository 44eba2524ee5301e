"""The losses on a device type that has no kernel of the op (Apple's mps, Intel's xpu): the PyTorch
path that combined_margin_loss and the modules take there, the chunked path, per-row margins included.
No such device here: the tests take "cpu" out of ops.OP_DEVICES, so that CPU tensors take that path, and
compare it with the op and the fp64 reference."""
import contextlib
import json
import re
import warnings

import pytest
import torch

import arcface_ext
from arcface_ext import _checks, chunked, functional, ops, reference
from conftest import (MARGINS, TOLERANCES, assert_close_report, assert_matches_reference, largest_tensor_made,
                      load_benchmark, loss_and_grads, margin_kwargs, random_inputs)

OUTPUTS = ("loss", "target_cosine", "grad_embeddings", "grad_weight")
WARNING = "arcface_ext: the fused op has no cpu kernel"
pytestmark = pytest.mark.filterwarnings("ignore:.*the fused op has no cpu kernel:UserWarning")


WARNED_PATH = re.compile(r"arcface_ext: the fused op has no (\w+) kernel .* runs in plain PyTorch on \1, on the "
                         r"(\w+) PyTorch path")


@contextlib.contextmanager
def cpu_without_kernel():
    """CPU tensors routed as a device without a kernel of the op's would be, with no warning given yet;
    yields a set that, on leaving, holds the (device, path) pairs the warnings named. The reference's
    losses raise inside (so that no test passes on the whole N x C matrix where the chunked path is meant)."""
    saved = ops.OP_DEVICES, functional._warned_without_kernel, reference.combined_margin_loss, \
        reference.chunked_margin_loss
    taken: set[tuple[str, str]] = set()

    def whole_matrix(*args, **kwargs):
        raise AssertionError("the path without a kernel took the reference (the whole N x C matrix)")

    ops.OP_DEVICES, functional._warned_without_kernel = frozenset({"meta"}), set()
    reference.combined_margin_loss = reference.chunked_margin_loss = whole_matrix
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield taken
    finally:
        ops.OP_DEVICES, functional._warned_without_kernel, reference.combined_margin_loss, \
            reference.chunked_margin_loss = saved
        taken.update(match.groups() for match in (WARNED_PATH.match(str(w.message)) for w in caught) if match)


def make_case(n=37, dim=24, num_classes=301, *, seed, dtype=torch.float64, ignored=(5,)):
    return random_inputs(n, dim, num_classes, seed=seed, dtype=dtype, ignored=ignored)


def both_routes(loss_fn, *args, path="chunked", **kwargs):
    """loss_fn's outputs on the op's route, then on the route without a kernel, which must take ``path``
    (None: neither, the chunked path's own losses)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the op's route warns of nothing)
        op = loss_fn(*args, **kwargs)
    with cpu_without_kernel() as taken:
        fallback = loss_fn(*args, **kwargs)
    assert taken == ({("cpu", path)} if path else set())
    return op, fallback


def assert_all_close(actual, expected, *, what, tolerances=None, names=OUTPUTS):
    for name, a, e in zip(names, actual, expected):
        if e is None:
            assert a is None, name
            continue
        atol, rtol = (tolerances or TOLERANCES)[a.dtype]
        finite = e[e.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        assert a.dtype == e.dtype, f"{what} {name}: {a.dtype} vs {e.dtype}"
        assert_close_report(a, e, atol=atol * scale, rtol=rtol, name=f"{what} {name}")


@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margins", list(MARGINS))
def test_scalar_margins_match_the_op_and_the_reference(margins, reduction, margin_grad):
    # The chunked path, in fp64 against the fp64 reference and in fp32 against the op.
    options = dict(s=30.0, **margin_kwargs(margins), reduction=reduction, margin_grad=margin_grad,
                   return_target_cosine=True)
    x, w, labels = make_case(seed=1)
    with cpu_without_kernel() as taken:
        fallback = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, **options)
    assert taken == {("cpu", "chunked")}
    expected = loss_and_grads(reference.combined_margin_loss, x, w, labels, **options)
    for name, a, e in zip(OUTPUTS, fallback, expected):
        assert_matches_reference(a, e, name=f"fp64 {name}")
    op, fallback = both_routes(loss_and_grads, arcface_ext.combined_margin_loss, x.float(), w.float(), labels,
                               **options)
    assert_all_close(fallback, op, what="fp32")


# (m1, lambda_, which margins are per-row tensors) of the per-row-margin families: arc (AdaFace, MagFace,
# ElasticFace-arc), sphere with and without its blend, cos (ElasticFace-cos: m3 a row, m2 none, or m2 a tensor of
# zeros, the CosFace branch row by row).
ROW_FAMILIES = {"arc": (1.0, 0.0, ("m2", "m3")), "arc-m2": (1.0, 0.0, ("m2",)), "sphere": (4.0, 0.0, ("m2", "m3")),
                "sphere-lambda": (4.0, 3.0, ("m2", "m3")), "cos": (1.0, 0.0, ("m3",)),
                "cos-zero-m2": (1.0, 0.0, ("m2-zero", "m3"))}
ROW_OUTPUTS = (*OUTPUTS, "grad_m2", "grad_m3")


def row_margins_case(family, n=37, *, seed=3):
    """(m1, lambda_, m2, m3) of a family: the per-row ones float64 tensors (as the modules make them on CPU and
    CUDA), AdaFace's range for m2 (negative ones too) with a zero row (the CosFace branch), the others numbers."""
    m1, lambda_, per_row = ROW_FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    m2 = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5
    m2[18] = 0.0
    m3 = torch.rand(n, generator=generator, dtype=torch.float64) * 0.6 - 0.1
    m2 = torch.zeros_like(m2) if "m2-zero" in per_row else m2 if "m2" in per_row else 0.0
    return m1, lambda_, m2, m3 if "m3" in per_row else 0.1


def margins_and_grads(loss_fn, x, w, labels, m2, m3, **options):
    """loss_and_grads with the per-row margins leaves of their own: also their gradients (None for a number)."""
    m2, m3 = (m.detach().clone().requires_grad_(True) if torch.is_tensor(m) else m for m in (m2, m3))
    outputs = loss_and_grads(loss_fn, x, w, labels, m2=m2, m3=m3, **options)
    return (*outputs, *(m.grad if torch.is_tensor(m) else None for m in (m2, m3)))


@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", list(ROW_FAMILIES))
def test_per_row_margins_match_the_op_and_the_reference(family, reduction, margin_grad):
    # The chunked path (not the reference: cpu_without_kernel), differentiable margins (MagFace's) included: their
    # gradients too, in fp64 against the fp64 reference and in fp32 against the op; row 5 is ignored.
    x, w, labels = make_case(seed=2)
    m1, lambda_, m2, m3 = row_margins_case(family)
    options = dict(s=30.0, m1=m1, lambda_=lambda_, reduction=reduction, margin_grad=margin_grad,
                   return_target_cosine=True)
    with cpu_without_kernel() as taken:
        fallback = margins_and_grads(arcface_ext.combined_margin_loss, x, w, labels, m2, m3, **options)
    assert taken == {("cpu", "chunked")}
    expected = margins_and_grads(reference.combined_margin_loss, x, w, labels, m2, m3, **options)
    for name, a, e in zip(ROW_OUTPUTS, fallback, expected):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype, name
        assert_matches_reference(a, e, name=f"fp64 {name}")
    for name, a in zip(ROW_OUTPUTS[4:], fallback[4:]):
        if a is not None:
            assert a[5] == 0 and a.abs().sum() > 0, f"{name}: the ignored row's, or none"
    op, fallback = both_routes(margins_and_grads, arcface_ext.combined_margin_loss, x.float(), w.float(), labels,
                               m2, m3, **options)
    # (the margins' gradients are float64, the margins' dtype, computed in fp32 on the chunked path)
    assert_all_close(fallback, op, what="fp32", names=ROW_OUTPUTS,
                     tolerances={**TOLERANCES, torch.float64: TOLERANCES[torch.float32]})


@pytest.mark.parametrize("margins_dtype", [torch.float32, torch.bfloat16])
def test_per_row_margins_of_another_dtype(margins_dtype):
    # float32 margins, as the modules make them on mps (no float64 there); any float dtype, as the op takes them:
    # taken in the compute dtype, their gradients in their own.
    x, w, labels = make_case(seed=11, dtype=torch.float32)
    _, _, m2, m3 = row_margins_case("arc")
    m2, m3 = m2.to(margins_dtype), m3.to(margins_dtype)
    op, fallback = both_routes(margins_and_grads, arcface_ext.combined_margin_loss, x, w, labels, m2, m3, s=30.0)
    assert fallback[4].dtype == fallback[5].dtype == margins_dtype
    assert_all_close(fallback, op, what=f"{margins_dtype} margins", names=ROW_OUTPUTS)


def test_per_row_margins_gradcheck():
    # fp64, every input: the embeddings, the centres and both margins (away from the branch points).
    x, w, labels = make_case(n=6, dim=5, num_classes=9, seed=12, ignored=(2,))
    m2 = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.4, 0.25], dtype=torch.float64, requires_grad=True)
    m3 = torch.tensor([0.1, 0.0, -0.05, 0.2, 0.15, 0.3], dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    for m1, lambda_ in ((1.0, 0.0), (3.0, 1.5)):
        def loss(x, w, m2, m3):
            return arcface_ext.combined_margin_loss(x, w, labels, s=4.0, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                                                    reduction="none")
        with cpu_without_kernel() as taken:
            assert torch.autograd.gradcheck(loss, (x, w, m2, m3))
        assert taken == {("cpu", "chunked")}


def test_per_row_margins_hold_no_n_by_c_matrix(monkeypatch):
    # Forward and backward, the margins' gradients included, in blocks of classes (the reference's N x C logits
    # and their gradient are what this path replaces).
    monkeypatch.setattr(chunked, "BLOCK_VALUES", 1024)  # about 27 classes a block
    x, w, labels = make_case(num_classes=1001, seed=13, dtype=torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    m2, m3 = (m.float().requires_grad_(True) for m in row_margins_case("arc")[2:])
    with cpu_without_kernel() as taken, largest_tensor_made() as largest:
        arcface_ext.combined_margin_loss(x, w, labels, m2=m2, m3=m3).backward()
    assert taken == {("cpu", "chunked")}
    assert all(t.grad is not None for t in (x, w, m2, m3))
    assert largest[0] <= w.numel() < 37 * 1001, f"a tensor of {largest[0]} values"


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
@pytest.mark.parametrize("how", ["inputs", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_inputs_and_autocast_match_the_op(dtype, how, per_row):
    x, w, labels = make_case(seed=4, dtype=torch.float32)
    m2, m3 = row_margins_case("arc")[2:] if per_row else (0.5, 0.1)
    if how == "inputs":
        x, w = x.to(dtype), w.to(dtype)
        fn = arcface_ext.combined_margin_loss
    else:
        def fn(*args, **kwargs):
            with torch.autocast("cpu", dtype=dtype):
                return arcface_ext.combined_margin_loss(*args, **kwargs)
    op, fallback = both_routes(margins_and_grads, fn, x, w, labels, m2, m3, s=30.0, return_target_cosine=True)
    assert fallback[0].dtype == torch.float32 and fallback[2].dtype == x.dtype
    # Both take the products of the rounded operands in fp32, and round their gradient blocks (the chunked
    # path's before its products) to 16 bits: the gradients agree to that rounding, fp32 under autocast too.
    # The margins' gradients (float64, their dtype) come from the fp32 losses and target cosines.
    assert_all_close(fallback[:2], op[:2], what=f"{dtype} {how}")
    assert_all_close(fallback[2:4], op[2:4], what=f"{dtype} {how}", names=OUTPUTS[2:],
                     tolerances={**TOLERANCES, torch.float32: TOLERANCES[dtype]})
    assert_all_close(fallback[4:], op[4:], what=f"{dtype} {how}", names=ROW_OUTPUTS[4:],
                     tolerances={torch.float64: TOLERANCES[torch.float32]})


def module_outputs(make, embeddings, labels, *, seed=0, steps=2, autocast=None, **options):
    """Two training steps of a fresh module ``make(**options)`` (every draw from one seed; under autocast to
    the given dtype): loss, target cosine, gradients and the module's buffers, for each step."""
    torch.manual_seed(seed)
    module = make(**options)
    outputs = []
    for _ in range(steps):
        x = embeddings.detach().clone().requires_grad_(True)
        module.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss, target_cosine = module(x, labels, return_target_cosine=True)
        loss.backward()
        outputs.append((loss.detach(), target_cosine, x.grad, module.weight.grad.clone(),
                        *(b.clone() for b in module.buffers())))
    return outputs


MODULES = {
    "arcface": lambda **o: arcface_ext.ArcFaceLoss(301, 24, s=30.0, **o),
    "arcface-easy": lambda **o: arcface_ext.ArcFaceLoss(301, 24, s=30.0, easy_margin=True, **o),
    "cosface": lambda **o: arcface_ext.CosFaceLoss(301, 24, s=30.0, **o),
    "sphereface": lambda **o: arcface_ext.SphereFaceLoss(301, 24, s=30.0, lambda_=2.0, **o),
    "combined-sampled": lambda **o: arcface_ext.CombinedMarginLoss(301, 24, s=30.0, m2=0.3, m3=0.2, sample_rate=0.3,
                                                                   **o),
    "label-smoothing": lambda **o: arcface_ext.CombinedMarginLoss(301, 24, s=30.0, label_smoothing=0.1, **o),
    "adaface": lambda **o: arcface_ext.AdaFaceLoss(301, 24, s=30.0, **o),
    "adaface-sampled": lambda **o: arcface_ext.AdaFaceLoss(301, 24, s=30.0, sample_rate=0.3, **o),
    "adaface-label-smoothing": lambda **o: arcface_ext.AdaFaceLoss(301, 24, s=30.0, label_smoothing=0.1, **o),
    "elasticface-arc": lambda **o: arcface_ext.ElasticFaceLoss(301, 24, s=30.0, **o),
    "elasticface-arc-plus": lambda **o: arcface_ext.ElasticFaceLoss(301, 24, s=30.0, plus=True, **o),
    "elasticface-cos": lambda **o: arcface_ext.ElasticFaceLoss(301, 24, s=30.0, kind="cos", **o),
    "elasticface-cos-plus": lambda **o: arcface_ext.ElasticFaceLoss(301, 24, s=30.0, kind="cos", plus=True, **o),
    "magface": lambda **o: arcface_ext.MagFaceLoss(301, 24, s=30.0, **o),
    "magface-easy": lambda **o: arcface_ext.MagFaceLoss(301, 24, s=30.0, easy_margin=True, **o),
    "curricularface": lambda **o: arcface_ext.CurricularFaceLoss(301, 24, s=30.0, **o),
    "subcenter": lambda **o: arcface_ext.SubCenterMarginLoss(301, 24, k=3, s=30.0, **o),
}
# The modules whose margins are per-row tensors (MagFace's differentiable: their gradient reaches the embeddings).
PER_ROW_MODULES = [name for name in MODULES if name.startswith(("arcface-easy", "adaface", "elasticface", "magface"))]


# The path each module takes without a kernel: the chunked path, but for the chunked path's own losses
# (CurricularFace, sub-centres), which run there on every device and so warn of nothing.
MODULE_PATHS = {"curricularface": None, "subcenter": None}


def assert_module_outputs_close(actual, expected, *, name, atol, rtol):
    for step, (a, e) in enumerate(zip(actual, expected)):
        for i, (ai, ei) in enumerate(zip(a, e)):
            what = f"{name} step {step} {(*OUTPUTS, 'buffer', 'buffer')[min(i, 5)]}"
            assert ai.dtype == ei.dtype, what
            assert_close_report(ai, ei, atol=atol * float(ei[ei.isfinite()].abs().max()), rtol=rtol, name=what)


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_match_the_op(name):
    # Their statistics (AdaFace's, CurricularFace's t) move alike, and partial FC samples the same classes.
    x, _, labels = make_case(seed=5, dtype=torch.float32)
    x = x * 20.0  # norms about AdaFace's and MagFace's ranges
    op, fallback = both_routes(module_outputs, MODULES[name], x, labels, path=MODULE_PATHS.get(name, "chunked"))
    assert_module_outputs_close(fallback, op, name=name, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", PER_ROW_MODULES)
def test_per_row_modules_match_the_reference_in_fp64(name):
    # The module on the chunked path against the same module on the reference (use_reference=True), fp64.
    x, _, labels = make_case(seed=14)
    x = x * 20.0
    with cpu_without_kernel() as taken:
        fallback = module_outputs(MODULES[name], x, labels, dtype=torch.float64)
    assert taken == {("cpu", "chunked")}
    expected = module_outputs(MODULES[name], x, labels, dtype=torch.float64, use_reference=True)
    assert_module_outputs_close(fallback, expected, name=name, atol=TOLERANCES[torch.float64][0],
                                rtol=TOLERANCES[torch.float64][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", PER_ROW_MODULES)
def test_per_row_modules_match_the_op_under_autocast(name, dtype):
    x, _, labels = make_case(seed=15, dtype=torch.float32)
    x = x * 20.0
    op, fallback = both_routes(module_outputs, MODULES[name], x, labels, autocast=dtype)
    # (fp32 outputs: the gradients to the rounding of the 16-bit gradient blocks, as the scalar margins' test)
    assert_module_outputs_close(fallback, op, name=f"{name} {dtype}", atol=TOLERANCES[dtype][0],
                                rtol=TOLERANCES[dtype][1])


def test_cuda_tensors_on_a_build_without_cuda_kernels_are_told_how_to_build_them():
    # (A CPU-only build given CUDA tensors takes the PyTorch path too; its warning says how to get the kernels.)
    assert "reinstall it with the toolkit's nvcc on the PATH or CUDA_HOME set, or FORCE_CUDA=1" in \
        functional._build_hint("cuda")
    assert functional._build_hint("mps") == functional._build_hint("xpu") == ""


def test_one_warning_a_device_naming_it_and_the_path():
    x, w, labels = make_case(seed=6, dtype=torch.float32)
    with cpu_without_kernel(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            arcface_ext.combined_margin_loss(x, w, labels)
            arcface_ext.ArcFaceLoss(301, 24)(x, labels)
            arcface_ext.combined_margin_loss(x, w, labels, m2=torch.full((37,), 0.5))  # (per-row: the same path)
    said = [str(w.message) for w in caught]
    assert [w.category for w in caught] == [UserWarning], said
    assert said[0] == (f"{WARNING} (only none): combined_margin_loss runs in plain PyTorch on cpu, on the chunked "
                       "PyTorch path (arcface_ext.chunked: memory bounded by its class chunks, slower than the op); "
                       "the same loss up to rounding"), said[0]
    assert caught[0].filename == __file__  # (the caller's line)
    # The op's route warns of nothing, and neither do meta tensors (the fake kernel's shapes) without a kernel.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arcface_ext.combined_margin_loss(x, w, labels)
        with cpu_without_kernel():
            loss = arcface_ext.combined_margin_loss(x.to("meta"), w.to("meta"), labels.to("meta"))
    assert loss.device.type == "meta"


def errors_of(fn):
    with pytest.raises(Exception) as raised:
        fn()
    return type(raised.value), str(raised.value)


@pytest.mark.parametrize("case", ["label", "ignored-label", "negative-label", "nan-m2", "inf-m3", "m2-shape",
                                  "reduction", "check_labels"])
def test_the_ops_errors(case):
    x, w, labels = make_case(seed=7, dtype=torch.float32)
    kwargs = {}
    if case == "label":
        labels[3] = 301
    elif case == "ignored-label":
        labels[3], kwargs["ignore_index"] = -1, 7  # -1 no longer ignored
    elif case == "negative-label":
        labels[4] = -3
    elif case == "nan-m2":
        kwargs["m2"] = torch.full((37,), 0.3).index_fill(0, torch.tensor([2]), float("nan"))
    elif case == "inf-m3":
        kwargs["m3"] = torch.full((37,), 0.3).index_fill(0, torch.tensor([2]), float("inf"))
    elif case == "m2-shape":
        kwargs["m2"] = torch.full((36,), 0.3)
    elif case == "reduction":
        kwargs["reduction"] = "avg"
    else:
        kwargs["check_labels"] = 1
    op = errors_of(lambda: arcface_ext.combined_margin_loss(x, w, labels, **kwargs))
    with cpu_without_kernel():
        fallback = errors_of(lambda: arcface_ext.combined_margin_loss(x, w, labels, **kwargs))
    assert fallback == op


def test_unchecked_labels_give_their_row_a_nan_loss_where_the_check_is_a_sync(monkeypatch):
    # On an mps or xpu device, as on CUDA, check_labels=False skips the check (a device sync): the bad row's
    # loss is NaN and it gets no gradient; checked, the op's error.
    monkeypatch.setattr(_checks, "ALWAYS_CHECKED_DEVICES", frozenset())
    x, w, labels = make_case(seed=8, dtype=torch.float32)
    labels[3] = 400
    with cpu_without_kernel():
        for margins in ((0.5, 0.0), (torch.full((37,), 0.5), torch.full((37,), 0.1))):
            loss, _, gx, gw, *gm = margins_and_grads(arcface_ext.combined_margin_loss, x, w, labels, *margins,
                                                     reduction="none", check_labels=False)
            assert loss[3].isnan() and loss[torch.arange(37) != 3].isfinite().all(), margins
            assert (gx[3] == 0).all() and gw.isfinite().all(), margins
            assert all(g is None or (g[3] == 0 and g.isfinite().all() and g.abs().sum() > 0) for g in gm), gm
            with pytest.raises(ValueError, match=re.escape("arcface_ext: labels[3] = 400 is out of range")):
                arcface_ext.combined_margin_loss(x, w, labels, m2=margins[0], m3=margins[1])


def test_unchecked_non_finite_margins_give_their_row_a_nan(monkeypatch):
    # As the op's, where the check is a sync: a NaN per-row margin gives its row a NaN loss and margin gradients,
    # the other rows their own; checked, the op's error.
    monkeypatch.setattr(_checks, "ALWAYS_CHECKED_DEVICES", frozenset())
    x, w, labels = make_case(seed=16, dtype=torch.float32)
    labels[4] = 9
    m2, m3 = torch.full((37,), 0.5, dtype=torch.float64), torch.full((37,), 0.1, dtype=torch.float64)
    m2[4] = float("nan")
    others = torch.arange(37) != 4
    with cpu_without_kernel():
        loss, _, gx, gw, gm2, gm3 = margins_and_grads(arcface_ext.combined_margin_loss, x, w, labels, m2, m3,
                                                      reduction="none", check_labels=False)
        assert loss[4].isnan() and loss[others].isfinite().all()
        assert gm2[4].isnan() and gm3[4].isnan() and gm2[others].isfinite().all() and gm3[others].isfinite().all()
        assert gx[others].isfinite().all()
        with pytest.raises(ValueError, match=re.escape("arcface_ext: the per-row margin m2 must be finite (row_margins "
                                                       "column 0 holds a NaN or an infinity)")):
            arcface_ext.combined_margin_loss(x, w, labels, m2=m2, m3=m3)


def test_the_sharded_losses_say_they_need_the_op():
    # Their shards' softmax statistics and reduction are the op's (and gloo and NCCL take no mps tensors).
    x, _, labels = make_case(seed=9, dtype=torch.float32)
    for loss in (arcface_ext.ShardedCombinedMarginLoss(301, 24), arcface_ext.ShardedCurricularFaceLoss(301, 24)):
        with cpu_without_kernel(), pytest.raises(
                NotImplementedError, match=rf"^{type(loss).__name__} \(sharded class centres\) needs arcface_ext's "
                                           r"compiled op, which has kernels for none only, not for cpu tensors"):
            loss(x, labels)
        loss(x, labels)  # (the op's route)


def test_mps_margins_are_float32():
    # Apple's mps has no float64: the margins the modules draw or fill there are float32 (no mps device here).
    assert _checks.margins_dtype(torch.device("mps")) == torch.float32
    assert _checks.margins_dtype(torch.device("cpu")) == _checks.margins_dtype(torch.device("cuda")) == torch.float64


def graphs_of(fn, *args):
    """fn compiled whole (fullgraph, aot_eager) and called on args: its result and the graphs Dynamo made."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)(*args), graphs


@contextlib.contextmanager
def warnings_as_errors_but_python_3_13_0s():
    """Every warning an error, but the one Dynamo gives on Python 3.13.0 alone when it guards a module (seen with
    torch 2.13.0): "Guards may run slower on Python 3.13.0. Consider upgrading to Python 3.13.1+." (CPython's bug)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", r"Guards may run slower on Python 3\.13\.0\.", RuntimeWarning)
        yield


def test_only_python_3_13_0s_own_warning_is_let_through():
    # On Python 3.13.0, torch.compile of a module warns so, and the test below failed on it (2026-12-06).
    with warnings_as_errors_but_python_3_13_0s():
        warnings.warn("Guards may run slower on Python 3.13.0. Consider upgrading to Python 3.13.1+.", RuntimeWarning)
        with pytest.raises(RuntimeWarning):
            warnings.warn("Guards may run slower on Python 3.12.1.", RuntimeWarning)
        with pytest.raises(UserWarning, match="plain PyTorch"):
            warnings.warn("combined_margin_loss runs in plain PyTorch on cpu")


def test_compile_fullgraph_of_a_module_on_cpu_still_runs_the_op():
    x, _, labels = make_case(seed=10, dtype=torch.float32)
    torch.manual_seed(0)
    module = arcface_ext.ArcFaceLoss(301, 24, s=30.0)
    eager = module(x, labels)
    with warnings_as_errors_but_python_3_13_0s():
        compiled, graphs = graphs_of(module, x, labels)
    assert_close_report(compiled, eager, atol=0, rtol=0, name="loss")
    assert any("arcface_ext" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    # Without a kernel the compiled module is the chunked path's graph, no op in it.
    with cpu_without_kernel() as taken:
        eager = module(x, labels)
        compiled, graphs = graphs_of(module, x, labels)
    assert taken == {("cpu", "chunked")}
    assert_close_report(compiled, eager, atol=1e-6, rtol=1e-6, name="loss without a kernel")
    assert graphs and not any("arcface_ext" in str(node.target) for gm in graphs for node in gm.graph.nodes)


def test_the_benchmarks_row_margins_reach_every_loss():
    # bench_loss.py --row-margins: each impl's step takes the per-row m2 and m3 (its gradients are those of a
    # call with them, not of the scalar margins').
    bench = load_benchmark("bench_loss")
    x, w, labels = bench.make_inputs(8, 16, 50, torch.float32, torch.device("cpu"))
    margins = bench.row_margins(8, torch.device("cpu"))
    assert margins["m2"].shape == margins["m3"].shape == (8,)
    for impl, loss_fn in (("ours", arcface_ext.combined_margin_loss), ("eager", reference.combined_margin_loss),
                          ("other-device", arcface_ext.combined_margin_loss)):
        got = bench.make_step(impl, x, w, labels, per_row_margins=True)()
        scalar = bench.make_step(impl, x, w, labels)()
        loss_fn(x, w, labels, **margins).backward()
        expected = x.grad, w.grad
        x.grad = w.grad = None
        for name, a, e, s in zip(("grad_embeddings", "grad_weight"), got, expected, scalar):
            # (other-device against the op: fp32 rounding apart)
            assert_close_report(a, e, atol=1e-5 * float(e.abs().max()), rtol=1e-4, name=f"{impl} {name}")
            assert not torch.allclose(a, s), f"{impl} {name}: the same as with the scalar margins"


def test_the_benchmarks_rows_say_row_margins_only_of_the_impls_that_take_them(tmp_path, capsys):
    # the floor has no margins: its row was labelled row_margins too
    bench = load_benchmark("bench_loss")
    out = tmp_path / "rows.json"
    bench.main(["--N", "8", "--D", "16", "--C", "50", "--impls", "ours,eager,floor", "--row-margins", "--repeats", "1",
                "--warmup", "0", "--no-memory", "--out", str(out)])
    capsys.readouterr()
    rows = {row["impl"]: row for row in json.loads(out.read_text())}
    assert rows["ours"]["row_margins"] is True and rows["eager"]["row_margins"] is True
    assert "row_margins" not in rows["floor"]


def test_compile_fullgraph_of_per_row_margins_without_a_kernel():
    # MagFace: differentiable per-row margins on the chunked path, one graph, its gradients those of eager.
    x, _, labels = make_case(seed=17, dtype=torch.float32)
    x = x * 20.0
    torch.manual_seed(0)
    module = arcface_ext.MagFaceLoss(301, 24, s=30.0)
    results = []
    with cpu_without_kernel() as taken:
        for compiled in (False, True):
            embeddings = x.clone().requires_grad_(True)
            module.zero_grad()
            if compiled:
                loss, graphs = graphs_of(module, embeddings, labels)
                assert graphs and not any("arcface_ext" in str(node.target) for gm in graphs for node in gm.graph.nodes)
            else:
                loss = module(embeddings, labels)
            loss.backward()
            results.append((loss.detach(), embeddings.grad, module.weight.grad.clone()))
    assert taken == {("cpu", "chunked")}
    for name, a, e in zip(("loss", "grad_embeddings", "grad_weight"), results[1], results[0]):
        assert_close_report(a, e, atol=1e-6 * float(e.abs().max()), rtol=1e-5, name=f"compiled {name}")
