"""The losses on a device type that has no kernel of the op (Apple's mps, Intel's xpu): the PyTorch
path that combined_margin_loss and the modules take there. No such device here: the tests take "cpu"
out of ops.OP_DEVICES, so that CPU tensors take that path, and compare it with the op and the fp64
reference."""
import contextlib
import re
import warnings

import pytest
import torch

import arcface_ext
from arcface_ext import _checks, functional, ops, reference
from conftest import (MARGINS, TOLERANCES, assert_close_report, assert_matches_reference, load_benchmark, loss_and_grads,
                      margin_kwargs)

OUTPUTS = ("loss", "target_cosine", "grad_embeddings", "grad_weight")
WARNING = "arcface_ext: the fused op has no cpu kernel"
pytestmark = pytest.mark.filterwarnings("ignore:.*the fused op has no cpu kernel:UserWarning")


@contextlib.contextmanager
def cpu_without_kernel():
    """CPU tensors routed as a device without a kernel of the op's would be, with no warning given yet;
    yields the set of the (device, path) pairs taken (warned about)."""
    saved = ops.OP_DEVICES, functional._warned_without_kernel
    taken: set[tuple[str, str]] = set()
    ops.OP_DEVICES, functional._warned_without_kernel = frozenset({"meta"}), taken
    try:
        yield taken
    finally:
        ops.OP_DEVICES, functional._warned_without_kernel = saved


def make_case(n=37, dim=24, num_classes=301, *, seed, dtype=torch.float64, ignored=(5,)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[list(ignored)] = -1
    return x.to(dtype), w.to(dtype), labels


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


def margins_and_grads(loss_fn, x, w, labels, m2, m3, **options):
    """loss_and_grads with m2 and m3 leaves of their own: also their gradients."""
    m2, m3 = (m.detach().clone().requires_grad_(True) for m in (m2, m3))
    outputs = loss_and_grads(loss_fn, x, w, labels, m2=m2, m3=m3, **options)
    return (*outputs, m2.grad, m3.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("m1, lambda_", [(1.0, 0.0), (4.0, 0.0), (4.0, 3.0)], ids=["arc", "sphere", "sphere-lambda"])
def test_per_row_margins_match_the_op_and_the_reference(m1, lambda_, reduction):
    # The reference's path, differentiable margins (MagFace's) included: their gradients too.
    x, w, labels = make_case(seed=2)
    generator = torch.Generator().manual_seed(3)
    m2 = torch.rand(37, generator=generator, dtype=torch.float64) - 0.5
    m3 = torch.rand(37, generator=generator, dtype=torch.float64) * 0.6 - 0.1
    m2[18] = 0.0  # the CosFace branch
    options = dict(s=30.0, m1=m1, lambda_=lambda_, reduction=reduction, return_target_cosine=True)
    names = (*OUTPUTS, "grad_m2", "grad_m3")
    with cpu_without_kernel() as taken:
        fallback = margins_and_grads(arcface_ext.combined_margin_loss, x, w, labels, m2, m3, **options)
    assert taken == {("cpu", "reference")}
    expected = margins_and_grads(reference.combined_margin_loss, x, w, labels, m2, m3, **options)
    for name, a, e in zip(names, fallback, expected):
        assert_matches_reference(a, e, name=f"fp64 {name}")
    op, fallback = both_routes(margins_and_grads, arcface_ext.combined_margin_loss, x.float(), w.float(), labels,
                               m2, m3, path="reference", **options)
    for name, a, e in zip(names, fallback, op):
        assert_close_report(a, e, atol=1e-5 * float(e.abs().max()), rtol=1e-5, name=f"fp32 {name}")


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
@pytest.mark.parametrize("how", ["inputs", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_inputs_and_autocast_match_the_op(dtype, how, per_row):
    x, w, labels = make_case(seed=4, dtype=torch.float32)
    m2 = torch.linspace(0.2, 0.5, 37, dtype=torch.float64) if per_row else 0.5
    options = dict(s=30.0, m2=m2, m3=0.1, return_target_cosine=True)
    if how == "inputs":
        x, w = x.to(dtype), w.to(dtype)
        fn = arcface_ext.combined_margin_loss
    else:
        def fn(*args, **kwargs):
            with torch.autocast("cpu", dtype=dtype):
                return arcface_ext.combined_margin_loss(*args, **kwargs)
    op, fallback = both_routes(loss_and_grads, fn, x, w, labels, path="reference" if per_row else "chunked",
                               **options)
    assert fallback[0].dtype == torch.float32 and fallback[2].dtype == x.dtype
    # Both take the products of the rounded operands in fp32, and round their gradient blocks (the chunked
    # path's before its products) to 16 bits: the gradients agree to that rounding, fp32 under autocast too.
    assert_all_close(fallback[:2], op[:2], what=f"{dtype} {how}")
    assert_all_close(fallback[2:], op[2:], what=f"{dtype} {how}", names=OUTPUTS[2:],
                     tolerances={**TOLERANCES, torch.float32: TOLERANCES[dtype]})


def module_outputs(make, embeddings, labels, *, seed=0, steps=2):
    """Two training steps of a fresh module (every draw from one seed): loss, target cosine, gradients
    and the module's buffers, for each step."""
    torch.manual_seed(seed)
    module = make()
    outputs = []
    for _ in range(steps):
        x = embeddings.detach().clone().requires_grad_(True)
        module.zero_grad()
        loss, target_cosine = module(x, labels, return_target_cosine=True)
        loss.backward()
        outputs.append((loss.detach(), target_cosine, x.grad, module.weight.grad.clone(),
                        *(b.clone() for b in module.buffers())))
    return outputs


MODULES = {
    "arcface": lambda: arcface_ext.ArcFaceLoss(301, 24, s=30.0),
    "arcface-easy": lambda: arcface_ext.ArcFaceLoss(301, 24, s=30.0, easy_margin=True),
    "cosface": lambda: arcface_ext.CosFaceLoss(301, 24, s=30.0),
    "sphereface": lambda: arcface_ext.SphereFaceLoss(301, 24, s=30.0, lambda_=2.0),
    "combined-sampled": lambda: arcface_ext.CombinedMarginLoss(301, 24, s=30.0, m2=0.3, m3=0.2, sample_rate=0.3),
    "label-smoothing": lambda: arcface_ext.CombinedMarginLoss(301, 24, s=30.0, label_smoothing=0.1),
    "adaface": lambda: arcface_ext.AdaFaceLoss(301, 24, s=30.0),
    "adaface-sampled": lambda: arcface_ext.AdaFaceLoss(301, 24, s=30.0, sample_rate=0.3),
    "elasticface-arc": lambda: arcface_ext.ElasticFaceLoss(301, 24, s=30.0),
    "elasticface-cos-plus": lambda: arcface_ext.ElasticFaceLoss(301, 24, s=30.0, kind="cos", plus=True),
    "magface": lambda: arcface_ext.MagFaceLoss(301, 24, s=30.0),
    "magface-easy": lambda: arcface_ext.MagFaceLoss(301, 24, s=30.0, easy_margin=True),
    "curricularface": lambda: arcface_ext.CurricularFaceLoss(301, 24, s=30.0),
    "subcenter": lambda: arcface_ext.SubCenterMarginLoss(301, 24, k=3, s=30.0),
}


# The path each module takes without a kernel: per-row margins the reference's; the chunked path's own
# losses (CurricularFace, sub-centres) neither, they run there on every device.
MODULE_PATHS = {**dict.fromkeys(("arcface-easy", "adaface", "adaface-sampled", "elasticface-arc",
                                 "elasticface-cos-plus", "magface", "magface-easy"), "reference"),
                "curricularface": None, "subcenter": None}


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_match_the_op(name):
    # Their statistics (AdaFace's, CurricularFace's t) move alike, and partial FC samples the same classes.
    x, _, labels = make_case(seed=5, dtype=torch.float32)
    x = x * 20.0  # norms about AdaFace's and MagFace's ranges
    op, fallback = both_routes(module_outputs, MODULES[name], x, labels, path=MODULE_PATHS.get(name, "chunked"))
    for step, (a, e) in enumerate(zip(fallback, op)):
        for i, (ai, ei) in enumerate(zip(a, e)):
            what = f"{name} step {step} {(*OUTPUTS, 'buffer', 'buffer')[min(i, 5)]}"
            assert_close_report(ai, ei, atol=2e-5 * float(ei[ei.isfinite()].abs().max()), rtol=2e-5, name=what)


def test_cuda_tensors_on_a_build_without_cuda_kernels_are_told_how_to_build_them():
    # (A CPU-only build given CUDA tensors takes the PyTorch path too; its warning says how to get the kernels.)
    assert "reinstall it with the toolkit's nvcc on the PATH or CUDA_HOME set, or FORCE_CUDA=1" in \
        functional._build_hint("cuda")
    assert functional._build_hint("mps") == functional._build_hint("xpu") == ""


def test_one_warning_a_path_naming_the_device_and_the_path():
    x, w, labels = make_case(seed=6, dtype=torch.float32)
    with cpu_without_kernel(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            arcface_ext.combined_margin_loss(x, w, labels)
            arcface_ext.ArcFaceLoss(301, 24)(x, labels)
        for _ in range(2):
            arcface_ext.combined_margin_loss(x, w, labels, m2=torch.full((37,), 0.5))
    said = [str(w.message) for w in caught]
    assert [w.category for w in caught] == [UserWarning, UserWarning], said
    assert said[0].startswith(f"{WARNING} (only none): combined_margin_loss runs in plain PyTorch on cpu, on the "
                              "chunked PyTorch path"), said[0]
    assert "per-row margins (m2 or m3 a tensor) on arcface_ext.reference, which holds the whole N x C" in said[1]
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
        for margins in ({}, {"m2": torch.full((37,), 0.5)}):
            loss, _, gx, gw = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction="none",
                                             check_labels=False, **margins)
            assert loss[3].isnan() and loss[torch.arange(37) != 3].isfinite().all(), margins
            assert (gx[3] == 0).all() and gw.isfinite().all(), margins
            with pytest.raises(ValueError, match=re.escape("arcface_ext: labels[3] = 400 is out of range")):
                arcface_ext.combined_margin_loss(x, w, labels, **margins)


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


def test_compile_fullgraph_of_a_module_on_cpu_still_runs_the_op():
    x, _, labels = make_case(seed=10, dtype=torch.float32)
    torch.manual_seed(0)
    module = arcface_ext.ArcFaceLoss(301, 24, s=30.0)
    eager = module(x, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
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
