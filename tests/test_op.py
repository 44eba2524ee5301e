"""The fused CPU op against the fp64 reference, and everything around it: edge cases, gradcheck,
dispatcher registration (opcheck, torch.compile), argument checks, the modules, and its memory
bound."""
import copy
import inspect
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import arcface_ext
from arcface_ext import reference
from conftest import (MARGINS, NON_FINITE_CASES, assert_close_report, assert_matches_reference,
                      assert_non_finite_where_expected, load_benchmark, loss_and_grads, margin_kwargs,
                      put_non_finite, random_inputs)

pytestmark = pytest.mark.skipif(not arcface_ext.extension_available(),
                                reason="arcface_ext._C is not built")

OUTPUTS = ("loss", "target_cosine", "grad_embeddings", "grad_weight")


def make_inputs(n, dim, num_classes, *, seed, dtype=torch.float64, ignored=()):
    return random_inputs(n, dim, num_classes, seed=seed, dtype=dtype, ignored=ignored)


def run_both(embeddings, weight, labels, **kwargs):
    """(op outputs, reference outputs): the op on the given dtype, the reference in fp64 on the
    same values; each a tuple (loss, target_cosine, grad_embeddings, grad_weight)."""
    ours = loss_and_grads(arcface_ext.combined_margin_loss, embeddings, weight, labels,
                          return_target_cosine=True, **kwargs)
    expected = loss_and_grads(reference.combined_margin_loss, embeddings.double(), weight.double(), labels,
                              return_target_cosine=True, **kwargs)
    return ours, expected


def assert_matches(ours, expected, rows=slice(None), classes=slice(None), min_scale=0.0):
    """Every output within the tolerance table, optionally on a subset of rows / classes."""
    picks = (rows, rows, rows, classes)
    for name, a, e, pick in zip(OUTPUTS, ours, expected, picks):
        if a.dim() == 0:
            assert_matches_reference(a, e, name=name, min_scale=min_scale)
        else:
            assert_matches_reference(a[pick], e[pick], name=name, dtype=a.dtype, min_scale=min_scale)


@pytest.fixture
def workspace():
    """set_workspace_bytes, restored afterwards."""
    saved = arcface_ext.get_workspace_bytes()
    yield arcface_ext.set_workspace_bytes
    arcface_ext.set_workspace_bytes(saved)


# ---- against the reference ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_matches_reference(margin, margin_grad, reduction, dtype):
    x, w, labels = make_inputs(37, 24, 1001, seed=0, dtype=dtype, ignored=(3, 20))
    ours, expected = run_both(x, w, labels, reduction=reduction, margin_grad=margin_grad, **margin_kwargs(margin))
    assert ours[0].dtype == dtype and ours[2].dtype == dtype and ours[3].dtype == dtype
    assert_matches(ours, expected)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (5, 7, 3), (16, 64, 128), (64, 128, 512),
                                   (37, 24, 1001), (3, 5, 10007)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_reference_shapes(shape, dtype):
    x, w, labels = make_inputs(*shape, seed=1, dtype=dtype)
    ours, expected = run_both(x, w, labels, s=32.0, m1=1.0, m2=0.3, m3=0.2, reduction="none")
    # With C = 1 the loss is identically 0 and so is every gradient, which fp32 leaves at ~1e-5:
    # measure errors there against the gradients' natural scale, s.
    assert_matches(ours, expected, min_scale=32.0 if shape[2] == 1 else 0.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_16_bit_inputs(margin, dtype, reduction):
    x, w, labels = make_inputs(37, 64, 301, seed=2, dtype=dtype, ignored=(5,))
    ours, expected = run_both(x, w, labels, reduction=reduction, **margin_kwargs(margin))
    # Loss and target cosine accumulate in fp32 (fp32 tolerance); gradients come back in `dtype`.
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    assert_matches(ours, expected)


def test_mixed_input_dtypes_promote():
    x, w, labels = make_inputs(9, 8, 13, seed=3)
    ours, expected = run_both(x, w.float(), labels)
    assert ours[0].dtype == torch.float64 and ours[3].dtype == torch.float32
    assert_matches(ours, expected)


# ---- edge cases ------------------------------------------------------------------------------

def targets_past_pi(n, dim, num_classes, *, seed, dtype):
    """Each embedding 0.15-0.27 rad from the opposite of its class centre: θ in (2.87, 2.99), past
    π - m2 for m2 >= 0.3 and in SphereFace's k = 3 branch, yet far enough from c = -1 that acos
    stays well conditioned in fp32."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    w_hat = F.normalize(weight[labels], dim=1)
    other = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    other = F.normalize(other - (other * w_hat).sum(1, keepdim=True) * w_hat, dim=1)
    phi = 0.15 + 0.12 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    embeddings = 3.0 * (-torch.cos(phi) * w_hat + torch.sin(phi) * other)
    return embeddings.to(dtype), weight.to(dtype), labels


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin", ["arcface", "combined", "sphereface", "sphereface_lambda"])
def test_targets_past_pi(margin, margin_grad, dtype, reduction):
    kw = margin_kwargs(margin)
    x, w, labels = targets_past_pi(19, 16, 23, seed=4, dtype=dtype)
    ours, expected = run_both(x, w, labels, reduction=reduction, margin_grad=margin_grad, **kw)
    theta = torch.acos(expected[1])
    assert bool((kw["m1"] * theta + kw["m2"] > math.pi).all()), "the inputs must reach past pi"
    assert_matches(ours, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_embeddings_equal_to_their_class_centre(margin, margin_grad, reduction):
    # c = 1 exactly (up to rounding): acos and the exact dψ/dc are at their singular end. Half the
    # rows sit on their centre, half are random, so the comparison is not all zeros.
    x, w, labels = make_inputs(12, 16, 9, seed=5)
    x[::2] = 2.5 * w[labels[::2]]
    for dtype in (torch.float32, torch.float64):
        ours, _ = run_both(x.to(dtype), w.to(dtype), labels, reduction=reduction, margin_grad=margin_grad,
                           **margin_kwargs(margin))
        assert all(bool(t.isfinite().all()) for t in ours), f"non-finite output in {dtype}"
    ours, expected = run_both(x, w, labels, reduction=reduction, margin_grad=margin_grad, **margin_kwargs(margin))
    assert_matches(ours, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("margin", ["arcface", "cosface", "sphereface_lambda"])
def test_zero_norm_embeddings_and_class_centres(margin, dtype, reduction):
    x, w, labels = make_inputs(8, 16, 11, seed=6, dtype=dtype)
    labels[:3] = torch.tensor([4, 7, 9])
    x[0] = 0  # a zero embedding
    w[7] = 0  # row 1's own class centre
    w[10] = 0  # a centre no row targets
    ours, expected = run_both(x, w, labels, reduction=reduction, **margin_kwargs(margin))
    assert all(bool(t.isfinite().all()) for t in ours)
    # F.normalize's convention: a zero vector normalises to zero and its gradient is scaled by
    # 1/eps, so those rows dwarf the rest; compare them apart.
    zero_row = torch.zeros(8, dtype=torch.bool)
    zero_row[0] = True
    zero_class = torch.zeros(11, dtype=torch.bool)
    zero_class[[7, 10]] = True
    assert_matches(ours, expected, rows=~zero_row, classes=~zero_class)
    assert_matches(ours, expected, rows=zero_row, classes=zero_class)


@pytest.mark.parametrize("workspace_bytes", [None, 1], ids=["default", "min-block"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("case", NON_FINITE_CASES)
def test_nan_and_inf_inputs_reach_the_loss_and_gradients(workspace, case, dtype, reduction, workspace_bytes):
    """A NaN or inf in an embedding or a class centre makes the same losses, target cosines and
    gradient rows non-finite as in the reference, so that a NaN check or a GradScaler sees it (a
    clamp through fmin/fmax turned a NaN target cosine into -1). "mean" takes the training op."""
    if workspace_bytes is not None:
        workspace(workspace_bytes)
    x, w, labels = make_inputs(6, 16, 40, seed=13, dtype=dtype)
    put_non_finite(case, x, w, labels)
    ours, expected = run_both(x, w, labels, reduction=reduction)
    assert_non_finite_where_expected(ours, expected, OUTPUTS)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows(reduction):
    x, w, labels = make_inputs(10, 8, 7, seed=7, ignored=(0, 4, 9))
    ours, expected = run_both(x, w, labels, reduction=reduction, ignore_index=-1)
    assert_matches(ours, expected)
    assert bool((ours[2][[0, 4, 9]] == 0).all()), "ignored rows get no gradient"
    assert bool(ours[1][[0, 4, 9]].isnan().all()), "ignored rows have a NaN target cosine"
    if reduction == "none":
        assert bool((ours[0][[0, 4, 9]] == 0).all())
    # Another ignore_index: -1 becomes an ordinary (bad) label, -100 the ignored one.
    relabelled = labels.clone()
    relabelled[[0, 4, 9]] = -100
    again = loss_and_grads(arcface_ext.combined_margin_loss, x, w, relabelled, reduction=reduction,
                           ignore_index=-100, return_target_cosine=True)
    for name, a, e in zip(OUTPUTS, again, ours):
        assert_close_report(a, e, atol=0, rtol=0, name=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_all_rows_ignored(reduction, dtype):
    x, w, _ = make_inputs(6, 8, 7, seed=8, dtype=dtype)
    labels = torch.full((6,), -1)
    loss, target_cosine, gx, gw = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels,
                                                 reduction=reduction, return_target_cosine=True)
    assert bool((loss == 0).all()) and bool(target_cosine.isnan().all())
    assert bool((gx == 0).all()) and bool((gw == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, w, labels = make_inputs(0, 8, 7, seed=9, dtype=torch.float32)
    loss, target_cosine, gx, gw = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels,
                                                 reduction=reduction, return_target_cosine=True)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert bool((loss == 0).all()) and target_cosine.shape == (0,)
    assert gx.shape == (0, 8) and gw.shape == (7, 8) and bool((gw == 0).all())


@pytest.mark.parametrize("dtype, reduction", [(torch.float64, "mean"), (torch.float64, "none"),
                                              (torch.float32, "mean")], ids=["fp64-mean", "fp64-none", "fp32-mean"])
@pytest.mark.parametrize("workspace_bytes", [None, 1, 200_003], ids=["default", "min-block", "odd-block"])
def test_many_class_blocks(workspace, workspace_bytes, dtype, reduction):
    # C = 10007 is prime, so no block size divides it; 1 byte forces the smallest block (hundreds
    # of blocks over both threads), 200003 bytes an in-between one.
    workspace(workspace_bytes)
    x, w, labels = make_inputs(37, 40, 10007, seed=10, dtype=dtype, ignored=(11,))
    labels[:3] = torch.tensor([0, 10006, 5003])  # first, last and middle class
    ours, expected = run_both(x, w, labels, s=64.0, m2=0.5, reduction=reduction)
    assert_matches(ours, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("workspace_bytes", [None, 1], ids=["default", "min-block"])
def test_many_rows(workspace, workspace_bytes, reduction):
    # N = 1031 (prime) rows against few classes: the rows, not the classes, must be split.
    workspace(workspace_bytes)
    x, w, labels = make_inputs(1031, 24, 53, seed=30, ignored=(0, 1030))
    ours, expected = run_both(x, w, labels, reduction=reduction)
    assert_matches(ours, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_that_is_a_class(reduction):
    x, w, labels = make_inputs(23, 8, 5, seed=31)
    assert bool((labels == 2).any())
    ours, expected = run_both(x, w, labels, reduction=reduction, ignore_index=2)
    assert_matches(ours, expected)
    assert bool(ours[1][labels == 2].isnan().all())


def test_non_contiguous_inputs_equal_contiguous():
    x, w, labels = make_inputs(13, 10, 29, seed=11, dtype=torch.float32, ignored=(2,))
    x_t = x.t().contiguous().t()  # transposed views of the same values
    w_t = w.t().contiguous().t()
    labels_strided = torch.stack([labels, torch.zeros_like(labels)], 1)[:, 0]
    assert not (x_t.is_contiguous() or w_t.is_contiguous() or labels_strided.is_contiguous())
    contiguous = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction="none",
                                return_target_cosine=True)
    strided = loss_and_grads(arcface_ext.combined_margin_loss, x_t, w_t, labels_strided, reduction="none",
                             return_target_cosine=True)
    for name, a, e in zip(OUTPUTS, strided, contiguous):
        assert_close_report(a, e, atol=0, rtol=0, name=name)


def test_int32_labels_equal_int64():
    x, w, labels = make_inputs(9, 8, 13, seed=12, dtype=torch.float32, ignored=(1,))
    a = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels.int(), reduction="none",
                       return_target_cosine=True)
    b = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction="none",
                       return_target_cosine=True)
    for name, p, q in zip(OUTPUTS, a, b):
        assert_close_report(p, q, atol=0, rtol=0, name=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("workspace_bytes", [None, 1], ids=["default", "min-block"])
def test_deterministic(workspace, workspace_bytes, reduction):
    workspace(workspace_bytes)
    x, w, labels = make_inputs(37, 40, 10007, seed=13, dtype=torch.float32)
    first = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction=reduction,
                           return_target_cosine=True)
    second = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, reduction=reduction,
                            return_target_cosine=True)
    for name, a, b in zip(OUTPUTS, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("needs", ["embeddings", "weight"])
def test_one_input_needs_grad(needs, reduction):
    x, w, labels = make_inputs(11, 8, 17, seed=14)
    _, expected = run_both(x, w, labels, reduction="sum" if reduction == "none" else reduction)
    x = x.clone().requires_grad_(needs == "embeddings")
    w = w.clone().requires_grad_(needs == "weight")
    arcface_ext.combined_margin_loss(x, w, labels, reduction=reduction).sum().backward()
    grad, other, index = (x.grad, w.grad, 2) if needs == "embeddings" else (w.grad, x.grad, 3)
    assert other is None
    assert_matches_reference(grad, expected[index], name=f"grad_{needs}")


def test_return_target_cosine_is_detached_and_matches():
    x, w, labels = make_inputs(9, 8, 13, seed=15, dtype=torch.float32, ignored=(4,))
    x.requires_grad_(True)
    loss, target_cosine = arcface_ext.combined_margin_loss(x, w, labels, return_target_cosine=True)
    assert loss.requires_grad and not target_cosine.requires_grad and target_cosine.grad_fn is None
    expected = F.cosine_similarity(x.detach().double(), w.double()[labels.clamp_min(0)], dim=1)
    expected[4] = float("nan")
    assert_matches_reference(target_cosine, expected, name="target_cosine")


def test_forward_under_no_grad():
    x, w, labels = make_inputs(9, 8, 13, seed=16, dtype=torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with_grad = arcface_ext.combined_margin_loss(x, w, labels, reduction="none")
    with torch.no_grad():
        without = arcface_ext.combined_margin_loss(x, w, labels, reduction="none")
    assert not without.requires_grad
    assert torch.equal(without, with_grad.detach())


# ---- gradcheck, opcheck, torch.compile -----------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_gradcheck(margin, reduction):
    x, w, labels = make_inputs(5, 4, 7, seed=17, ignored=(2,))
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("margin", ["arcface", "sphereface_lambda"])
def test_opcheck_forward(margin, dtype):
    x, w, labels = make_inputs(7, 6, 11, seed=18, dtype=dtype, ignored=(1, 5))
    args = op_arguments(x.requires_grad_(True), w.requires_grad_(True), labels, **margin_kwargs(margin))
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_forward, args)


def test_op_outputs_are_zero_at_ignored_rows():
    # The op's contract (csrc/arcface.cpp): loss, log-sum-exp and target cosine are 0 at ignored
    # rows; only the Python layer turns those cosines into NaN.
    x, w, labels = make_inputs(7, 6, 11, seed=19, ignored=(1, 5))
    outputs = torch.ops.arcface_ext.margin_softmax_forward(*op_arguments(x, w, labels))
    for name, output in zip(("loss", "logsumexp", "target_cosine"), outputs):
        assert bool((output[[1, 5]] == 0).all()), f"{name} at ignored rows: {output[[1, 5]]}"


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "embeddings", "weight"])
def test_opcheck_backward(needs):
    x, w, labels = make_inputs(7, 6, 11, seed=20, ignored=(3,))
    forward_args = op_arguments(x, w, labels)
    _, logsumexp, _ = torch.ops.arcface_ext.margin_softmax_forward(*forward_args)
    grad_loss = torch.rand(7, dtype=torch.float64)
    args = (grad_loss, x, w, labels, logsumexp, *forward_args[3:], *needs)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_backward, args)


def test_backward_without_the_label_check_gives_bad_labels_no_gradient():
    # check_labels=False (what the autograd formula passes) skips the value check; a label outside
    # [0, num_classes) must then cause no out-of-range access and get no gradient: the same
    # gradients as with the row ignored (as the CUDA op gives inside a CUDA graph capture).
    x, w, labels = make_inputs(7, 6, 11, seed=23, ignored=(2,))
    labels[4] = 15
    forward_args = op_arguments(x, w, labels)
    ignored = labels.clone()
    ignored[4] = -1
    _, logsumexp, _ = torch.ops.arcface_ext.margin_softmax_forward(x, w, ignored, *forward_args[3:])
    grad_loss = torch.rand(7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels\[4\] = 15"):
        torch.ops.arcface_ext.margin_softmax_backward(grad_loss, x, w, labels, logsumexp, *forward_args[3:11],
                                                      True, True)
    unchecked = torch.ops.arcface_ext.margin_softmax_backward(grad_loss, x, w, labels, logsumexp,
                                                              *forward_args[3:11], True, True, check_labels=False)
    expected = torch.ops.arcface_ext.margin_softmax_backward(grad_loss, x, w, ignored, logsumexp,
                                                             *forward_args[3:11], True, True)
    for got, want in zip(unchecked, expected):
        assert torch.equal(got, want)
    # The same in a shard: a label past num_classes is bad; one in another shard is not.
    labels[5] = 13
    sharded = (*forward_args[3:11], 0, 16)
    ignored[5] = 13
    _, logsumexp, _ = torch.ops.arcface_ext.margin_softmax_forward(x, w, ignored, *sharded)
    labels[4] = 16
    unchecked = torch.ops.arcface_ext.margin_softmax_backward(grad_loss, x, w, labels, logsumexp, *sharded[:8],
                                                              True, True, *sharded[8:], check_labels=False)
    expected = torch.ops.arcface_ext.margin_softmax_backward(grad_loss, x, w, ignored, logsumexp, *sharded[:8],
                                                             True, True, *sharded[8:])
    for got, want in zip(unchecked, expected):
        assert torch.equal(got, want)


def test_autograd_backward_checks_the_labels_once():
    # The label check is a device sync on CUDA; the forward makes it, the backward (same labels,
    # saved for backward and so version-checked) must not make it again. Counted on the CPU op by
    # its reduction over the labels' bad-value mask.
    x, w, labels = make_inputs(7, 6, 11, seed=24)
    x.requires_grad_()
    w.requires_grad_()

    def label_checks(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return sum(event.name == "aten::any" for event in prof.events())

    holder = {}
    assert label_checks(lambda: holder.setdefault(
        "loss", arcface_ext.combined_margin_loss(x, w, labels, reduction="none"))) == 1
    assert label_checks(lambda: holder["loss"].sum().backward()) == 0
    assert x.grad is not None and w.grad is not None


def test_check_labels_false_still_checks_cpu_tensors():
    # check_labels=False skips a check that costs a device sync; on the CPU it costs none, and the
    # CPU op (and the reference, and partial FC's remapping) check anyway. The flag is a bool.
    x, w, labels = make_inputs(6, 8, 11, seed=25)
    labels[4] = 11
    for loss_fn in (arcface_ext.combined_margin_loss, reference.combined_margin_loss):
        with pytest.raises(ValueError, match="labels"):
            loss_fn(x, w, labels, check_labels=False)
        with pytest.raises(TypeError, match="check_labels must be a bool, got 0"):
            loss_fn(x, w, labels, check_labels=0)
    module = arcface_ext.CombinedMarginLoss(11, 8, sample_rate=0.5, check_labels=False)
    assert "check_labels=False" in repr(module)
    with pytest.raises(ValueError, match="labels must lie in"):
        module(x, labels)
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        arcface_ext.ArcFaceLoss(11, 8, check_labels="no")
    labels[4] = 3
    checked = arcface_ext.combined_margin_loss(x, w, labels)
    assert torch.equal(arcface_ext.combined_margin_loss(x, w, labels, check_labels=False), checked)


def test_labels_changed_in_place_after_the_forward_fail_the_backward():
    # What lets the backward skip its label check: the labels are saved for backward, so a
    # change between the two passes (possibly to a bad label) is caught, not computed with.
    x, w, labels = make_inputs(7, 6, 11, seed=25)
    x.requires_grad_()
    loss = arcface_ext.combined_margin_loss(x, w, labels, reduction="none")
    labels[0] = 999
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_double_backward_raises():
    x, w, labels = make_inputs(5, 6, 11, seed=26)
    x.requires_grad_()
    loss = arcface_ext.combined_margin_loss(x, w, labels, reduction="none").sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_op_statistics_are_not_differentiable():
    x, w, labels = make_inputs(5, 6, 11, seed=28)
    loss, logsumexp, target_cosine = torch.ops.arcface_ext.margin_softmax_forward(
        x.requires_grad_(), w, labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1, False, 1 << 20)
    assert loss.requires_grad and loss.grad_fn is not None
    assert not logsumexp.requires_grad and not target_cosine.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_autograd_matches_eager(reduction):
    # Compiled autograd (the backward traced by Dynamo) runs the C++ autograd formula too; a C++
    # Function that marks outputs non-differentiable trips its internal assert.
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch's compiled autograd has no _enable")
    x0, w0, labels = make_inputs(9, 8, 13, seed=29, dtype=torch.float32, ignored=(2,))

    def grads():
        x, w = _leaves(x0, w0)
        loss = arcface_ext.combined_margin_loss(x, w, labels, reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
        return x.grad, w.grad

    expected = grads()
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        got = grads()
    for name, a, e in zip(("grad_embeddings", "grad_weight"), got, expected):
        assert_close_report(a, e, atol=0.0, rtol=0.0, name=name)


def test_differentiable_row_margins_on_a_class_shard_raise_in_the_backward():
    x, w, labels = make_inputs(5, 6, 11, seed=27)
    margins = torch.full((5, 2), 0.2, dtype=torch.float64, requires_grad=True)
    loss, _, _ = torch.ops.arcface_ext.margin_softmax_forward(
        x, w, labels, 64.0, 1.0, 0.0, 0.0, 0.0, -1, False, 1 << 20, 3, 20, margins)
    with pytest.raises(RuntimeError, match="differentiable row_margins need the whole softmax"):
        loss.sum().backward()


needs_train_op = pytest.mark.skipif(not hasattr(torch.ops.arcface_ext, "margin_softmax_train"),
                                    reason="this build has no margin_softmax_train op")


@needs_train_op
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "embeddings", "weight"])
def test_opcheck_train(needs, mean):
    x, w, labels = make_inputs(7, 6, 11, seed=21, ignored=(3,))
    args = (*op_arguments(x.requires_grad_(needs[0]), w.requires_grad_(needs[1]), labels), mean, *needs)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_train, args)


# ---- the loss's reduction (reduce_loss) --------------------------------------------------------

def reduction_inputs(n, ignored, *, dtype, ignore_index=-1, seed=0):
    """A per-row loss that requires grad (ignored rows not 0, so that the reduction must skip them)
    and its labels."""
    generator = torch.Generator().manual_seed(seed)
    loss = (torch.rand(n, generator=generator, dtype=torch.float64) * 30).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 5, (n,), generator=generator)
    labels[labels == ignore_index] = ignore_index + 1
    labels[list(ignored)] = ignore_index
    return loss, labels


@pytest.mark.parametrize("ignore_index", [-1, 3])
@pytest.mark.parametrize("n, ignored", [(0, ()), (1, ()), (7, (1, 5)), (4, (0, 1, 2, 3)), (700, range(0, 700, 7))],
                         ids=["empty", "one", "some-ignored", "all-ignored", "many"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reduce_loss_matches_its_definition(dtype, reduction, n, ignored, ignore_index):
    loss, labels = reduction_inputs(n, ignored, dtype=dtype, ignore_index=ignore_index)
    reduced = arcface_ext.ops.reduce_loss(loss, labels, ignore_index, reduction)
    counted = labels != ignore_index
    count = max(int(counted.sum()), 1) if reduction == "mean" else 1
    expected = loss.detach().double()[counted].sum() / count
    assert reduced.shape == () and reduced.dtype == dtype
    # Summed in double: fp32 rounds once on the way out; fp64 differs from torch's sum by its order.
    assert_close_report(reduced.double(), expected, rtol=1e-12 if dtype == torch.float64 else 2.0 ** -23, atol=0)
    (grad,) = torch.autograd.grad(reduced * 3.0, loss)
    # ATen's (3 / count) in the loss's dtype at counted rows, 0 at ignored ones, exactly.
    scale = torch.tensor(3.0, dtype=dtype) / count
    assert torch.equal(grad, torch.where(counted, scale, torch.zeros((), dtype=dtype)))


def test_reduce_loss_takes_nan_from_counted_rows_only():
    loss = torch.tensor([1.0, float("nan"), 2.0])
    assert arcface_ext.ops.reduce_loss(loss, torch.tensor([0, -1, 1]), -1, "mean").item() == 1.5
    assert torch.isnan(arcface_ext.ops.reduce_loss(loss, torch.tensor([0, 1, 1]), -1, "mean"))
    assert arcface_ext.ops.reduce_loss(loss, torch.tensor([0, 1, 1]), -1, "none") is loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduce_loss_gradcheck(reduction):
    loss, labels = reduction_inputs(9, (2, 4), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: arcface_ext.ops.reduce_loss(a, labels, -1, reduction), (loss,))


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_opcheck_reduce_loss(mean):
    loss, labels = reduction_inputs(9, (2, 4), dtype=torch.float32)
    torch.library.opcheck(torch.ops.arcface_ext.reduce_loss, (loss, labels, -1, mean))
    torch.library.opcheck(torch.ops.arcface_ext.reduce_loss_backward, (torch.tensor(2.5), labels, -1, mean))


@pytest.mark.parametrize("call, pattern", [
    (lambda op, loss, labels: op.reduce_loss(loss[None], labels, -1, True), r"loss must have shape \(N,\)"),
    (lambda op, loss, labels: op.reduce_loss(loss, labels[:3], -1, True), r"loss must have shape \(N,\) = \(3,\)"),
    (lambda op, loss, labels: op.reduce_loss(loss, labels.int(), -1, True), "labels must be int64"),
    (lambda op, loss, labels: op.reduce_loss(loss, labels[None], -1, True), "labels must be 1-D"),
    (lambda op, loss, labels: op.reduce_loss(loss.half(), labels, -1, True), "loss must be float32 or float64"),
    (lambda op, loss, labels: op.reduce_loss_backward(loss, labels, -1, True), "grad must be a scalar"),
    (lambda op, loss, labels: op.reduce_loss_backward(loss[0].half(), labels, -1, True), "grad must be float32"),
], ids=["loss-2d", "n-mismatch", "int32-labels", "labels-2d", "fp16-loss", "grad-not-scalar", "fp16-grad"])
def test_reduce_loss_checks_its_arguments(call, pattern):
    loss, labels = reduction_inputs(5, (1,), dtype=torch.float32)
    with pytest.raises(ValueError, match=pattern):
        call(torch.ops.arcface_ext, loss.detach(), labels)


def test_the_cuda_path_reduces_the_loss_in_one_op_each_way(monkeypatch):
    # The forward op's path (CUDA's; here on the CPU with the one-call training op off): the mean is
    # reduce_loss and its backward, not ATen's ne, sum, clamp_min, sum and div (and the backward's
    # div and expanded copy), seven launches and their host time.
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func.overloadpacket).replace("aten.", ""))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(arcface_ext.ops, "TRAIN_DEVICES", frozenset())
    x, w, labels = make_inputs(6, 8, 9, seed=29, dtype=torch.float32, ignored=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    with Record():
        arcface_ext.combined_margin_loss(x, w, labels).backward()
    assert calls.count("arcface_ext.reduce_loss") == 1 and calls.count("arcface_ext.reduce_loss_backward") == 1, calls
    assert not {"sum", "div", "ne", "clamp_min", "expand"} & set(calls), calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp16_loss_scaling_keeps_small_gradients(reduction):
    # GradScaler's pattern: an fp16 loss multiplied by 2^11 before backward. The scale must reach
    # the gradients before they are rounded to fp16, or the small entries flush to zero (the
    # one-call training op stored them at scale 1: a quarter of grad_weight was zero here).
    x, w, labels = make_inputs(64, 32, 2000, seed=31, dtype=torch.float16)
    scale = 2.0 ** 11
    x.requires_grad_(True)
    w.requires_grad_(True)
    (arcface_ext.combined_margin_loss(x, w, labels, reduction=reduction).float() * scale).backward()
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    (reference.combined_margin_loss(x64, w64, labels, reduction=reduction) * scale).backward()
    for name, ours, exact in (("grad_embeddings", x.grad, x64.grad), ("grad_weight", w.grad, w64.grad)):
        representable = exact.half() != 0
        lost = int((representable & (ours == 0)).sum())
        assert lost <= representable.sum() // 100, f"{name}: {lost} of {int(representable.sum())} entries lost"
        assert_close_report(ours.double(), exact, atol=1e-3 * float(exact.abs().max()), rtol=2e-2, name=name)


def _loss_and_cosine(embeddings, weight, labels, reduction):
    loss, target_cosine = arcface_ext.combined_margin_loss(embeddings, weight, labels, s=30.0, m2=0.3, m3=0.1,
                                                           reduction=reduction, return_target_cosine=True)
    return loss * 2.0, target_cosine


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    # aot_eager runs Dynamo and AOTAutograd on fake tensors (the register_fake kernels and the
    # autograd registration) without Inductor's code generation; two batch sizes make the second
    # trace dynamic in N.
    torch._dynamo.reset()
    compiled = torch.compile(_loss_and_cosine, fullgraph=True, backend="aot_eager")
    for n in (13, 17):
        x, w, labels = make_inputs(n, 8, 37, seed=21 + n, dtype=torch.float32, ignored=(1,))
        eager = loss_and_grads(_loss_and_cosine, x, w, labels, reduction=reduction)
        graph = loss_and_grads(compiled, x, w, labels, reduction=reduction)
        for name, a, e in zip(OUTPUTS, graph, eager):
            assert_close_report(a, e, atol=0, rtol=0, name=f"N={n} {name}")


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_compile_with_hyper_parameters_that_change_between_calls(dynamic):
    # A SphereFace lambda_ anneal or a margin warm-up: Dynamo traces a float that changes between
    # calls as a symbolic float (dynamic=True from the first call), which the argument checks must
    # take without math.isfinite; each call must use its own value.
    def loss(embeddings, weight, labels, s, m2, lambda_):
        return arcface_ext.combined_margin_loss(embeddings, weight, labels, s=s, m1=2.0, m2=m2, lambda_=lambda_)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x, w, labels = make_inputs(9, 8, 23, seed=24, dtype=torch.float32)
    for s, m2, lambda_ in ((30.0, 0.1, 5.0), (32.0, 0.2, 4.0), (34.0, 0.3, 3.5)):
        eager = loss_and_grads(loss, x, w, labels, s=s, m2=m2, lambda_=lambda_)
        graph = loss_and_grads(compiled, x, w, labels, s=s, m2=m2, lambda_=lambda_)
        for name, a, e in zip(OUTPUTS, graph, eager):
            if e is not None:
                assert_close_report(a, e, atol=0, rtol=0, name=f"lambda_={lambda_} {name}")


def _autocast_loss(embeddings, weight, labels):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return arcface_ext.combined_margin_loss(embeddings, weight, labels, s=30.0, m2=0.3)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_runs_the_op_in_the_autocast_dtype(compiled):
    # As for a matrix product, autocast brings fp32 inputs to its dtype: the same numbers as the op
    # on bf16 copies, with an fp32 loss and the gradients cast back to the inputs' fp32.
    torch._dynamo.reset()
    fn = torch.compile(_autocast_loss, fullgraph=True, backend="aot_eager") if compiled else _autocast_loss
    x, w, labels = make_inputs(13, 8, 37, seed=23, dtype=torch.float32, ignored=(1,))
    loss, _, gx, gw = loss_and_grads(fn, x, w, labels)
    expected = loss_and_grads(lambda a, b, y: arcface_ext.combined_margin_loss(a, b, y, s=30.0, m2=0.3),
                              x.bfloat16(), w.bfloat16(), labels)
    assert loss.dtype == torch.float32 and gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert_close_report(loss, expected[0], atol=0, rtol=0, name="loss")
    assert_close_report(gx, expected[2].float(), atol=0, rtol=0, name="grad_embeddings")
    assert_close_report(gw, expected[3].float(), atol=0, rtol=0, name="grad_weight")
    # fp64 is left alone, as autocast leaves fp64 matrix products.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss64 = arcface_ext.combined_margin_loss(x.double(), w.double(), labels)
    assert loss64.dtype == torch.float64


def test_compile_inductor_matches_eager():
    # The default backend. Per-row losses and nothing else in the graph, so that Inductor has no
    # kernel of its own to generate and compile (a cold C++ build costs ~40 s on 2 cores); the
    # aot_eager test above covers the reductions around the op.
    def per_row(embeddings, weight, labels):
        return arcface_ext.combined_margin_loss(embeddings, weight, labels, s=30.0, m2=0.3, m3=0.1,
                                                reduction="none", return_target_cosine=True)

    torch._dynamo.reset()
    compiled = torch.compile(per_row, fullgraph=True)
    x, w, labels = make_inputs(13, 8, 37, seed=22, dtype=torch.float32, ignored=(1,))
    eager = loss_and_grads(per_row, x, w, labels)
    graph = loss_and_grads(compiled, x, w, labels)
    for name, a, e in zip(OUTPUTS, graph, eager):
        assert_close_report(a, e, atol=0, rtol=0, name=name)


def test_label_check_runs_inside_a_compiled_graph():
    torch._dynamo.reset()
    compiled = torch.compile(_loss_and_cosine, fullgraph=True, backend="aot_eager")
    x, w, labels = make_inputs(5, 8, 11, seed=23, dtype=torch.float32)
    compiled(x, w, labels, "mean")
    labels[2] = 11
    with pytest.raises(ValueError, match=r"labels\[2\]"):
        compiled(x, w, labels, "mean")


# ---- autograd plumbing ------------------------------------------------------------------------
# A training call (reduction "mean"/"sum" with gradients needed) may compute the gradients in the
# forward and only scale them in the backward; these are the ways autograd can call it.

def _reference_grads(x, w, labels, reduction):
    _, _, gx, gw = loss_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels, reduction=reduction)
    return gx, gw


def _assert_grads(x, w, expected, factor, what):
    assert_matches_reference(x.grad, expected[0] * factor, name=f"{what}: grad_embeddings")
    assert_matches_reference(w.grad, expected[1] * factor, name=f"{what}: grad_weight")


def _leaves(x, w):
    return x.clone().requires_grad_(True), w.clone().requires_grad_(True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_scaling_accumulation_and_retained_graph(reduction):
    x0, w0, labels = make_inputs(9, 8, 13, seed=40, dtype=torch.float32, ignored=(4,))
    expected = _reference_grads(x0, w0, labels, "sum" if reduction == "none" else reduction)

    def loss_of(x, w):
        loss = arcface_ext.combined_margin_loss(x, w, labels, reduction=reduction)
        return loss.sum() if reduction == "none" else loss

    x, w = _leaves(x0, w0)
    (loss_of(x, w) * 2.5).backward()
    _assert_grads(x, w, expected, 2.5, "scaled upstream")

    x, w = _leaves(x0, w0)
    loss_of(x, w).backward()
    loss_of(x, w).backward()
    _assert_grads(x, w, expected, 2.0, "two steps without zero_grad")

    x, w = _leaves(x0, w0)
    loss = loss_of(x, w)
    (loss + 2.0 * loss).backward()
    _assert_grads(x, w, expected, 3.0, "loss used twice")

    x, w = _leaves(x0, w0)
    loss = loss_of(x, w)
    (loss * 0.5).backward(retain_graph=True)
    x.grad.zero_()  # an optimiser's zero_grad(set_to_none=False) between the two passes
    w.grad.zero_()
    (loss * 2.0).backward(retain_graph=True)
    loss.backward()
    _assert_grads(x, w, expected, 3.0, "retained graph")

    x, w = _leaves(x0, w0)
    loss = loss_of(x, w)
    gx, gw = torch.autograd.grad(loss * 3.0, (x, w), retain_graph=True)
    gx1, gw1 = torch.autograd.grad(loss, (x, w))
    for name, got, want in (("grad_embeddings", gx, expected[0] * 3), ("grad_weight", gw, expected[1] * 3),
                            ("grad_embeddings (again)", gx1, expected[0]), ("grad_weight (again)", gw1, expected[1])):
        assert_matches_reference(got, want, name=f"autograd.grad: {name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_retained_graph_after_a_zero_upstream_gradient(reduction):
    x0, w0, labels = make_inputs(9, 8, 13, seed=41, dtype=torch.float32)
    expected = _reference_grads(x0, w0, labels, "sum" if reduction == "none" else reduction)
    x, w = _leaves(x0, w0)
    loss = arcface_ext.combined_margin_loss(x, w, labels, reduction=reduction).sum()
    (loss * 0.0).backward(retain_graph=True)
    loss.backward()
    _assert_grads(x, w, expected, 1.0, "zero, then one")


@pytest.mark.parametrize("first", ["embeddings", "weight"])
def test_retained_graph_one_input_at_a_time(first):
    # A backward pass for one input alone (autograd.grad(loss, embeddings) for a penalty, then
    # loss.backward(); or backward(inputs=...)) must not leave the other input's gradient scaled
    # by the wrong upstream gradient on the next pass.
    x0, w0, labels = make_inputs(9, 8, 13, seed=42, dtype=torch.float32)
    expected = _reference_grads(x0, w0, labels, "mean")
    x, w = _leaves(x0, w0)
    loss = arcface_ext.combined_margin_loss(x, w, labels) * 3.0
    order = (x, w) if first == "embeddings" else (w, x)
    got = {id(t): torch.autograd.grad(loss, t, retain_graph=True)[0] for t in order}
    w.grad = None
    loss.backward(inputs=[w])
    for name, grad, want in (("grad_embeddings", got[id(x)], expected[0]), ("grad_weight", got[id(w)], expected[1]),
                             ("grad_weight (backward(inputs=[w]))", w.grad, expected[1])):
        assert_matches_reference(grad, want * 3.0, name=f"{first} first: {name}")


# ---- bad input ------------------------------------------------------------------------------

def _bad_inputs():
    x, w, labels = make_inputs(4, 6, 5, seed=24, dtype=torch.float32)
    with_label = lambda index, value: labels.clone().index_fill_(0, torch.tensor([index]), value)  # noqa: E731
    call = arcface_ext.combined_margin_loss
    return {
        "label >= C": (lambda: call(x, w, with_label(1, 5)), ValueError, r"labels\[1\] = 5"),
        "label < -1": (lambda: call(x, w, with_label(2, -2)), ValueError, r"labels\[2\] = -2"),
        "label -1 with another ignore_index": (lambda: call(x, w, with_label(0, -1), ignore_index=-100),
                                               ValueError, r"labels\[0\] = -1"),
        "labels too short": (lambda: call(x, w, labels[:3]), ValueError, "labels"),
        "labels 2-D": (lambda: call(x, w, labels[:, None]), ValueError, "labels"),
        "float labels": (lambda: call(x, w, labels.float()), TypeError, "labels"),
        "bool labels": (lambda: call(x, w, labels > 0), TypeError, "labels"),
        "1-D embeddings": (lambda: call(x[0], w, labels), ValueError, "embeddings"),
        "3-D embeddings": (lambda: call(x[None], w, labels), ValueError, "embeddings"),
        "1-D weight": (lambda: call(x, w[0], labels), ValueError, "weight"),
        "D mismatch": (lambda: call(x, w[:, :5], labels), ValueError, "embeddings .* weight"),
        "integer embeddings": (lambda: call(x.long(), w, labels), TypeError, "embeddings"),
        "integer weight": (lambda: call(x, w.int(), labels), TypeError, "weight"),
        "no classes": (lambda: call(x, w[:0], labels), ValueError, "weight"),
        "D = 0": (lambda: call(x[:, :0], w[:, :0], labels), ValueError, r"no columns \(D = 0"),
        "weight on meta": (lambda: call(x, w.to("meta"), labels), ValueError, "device"),
        "labels on meta": (lambda: call(x, w, labels.to("meta")), ValueError, "device"),
        "reduction": (lambda: call(x, w, labels, reduction="avg"), ValueError, "reduction"),
        "s = 0": (lambda: call(x, w, labels, s=0.0), ValueError, "s "),
        "s < 0": (lambda: call(x, w, labels, s=-64.0), ValueError, "s "),
        "s NaN": (lambda: call(x, w, labels, s=float("nan")), ValueError, "s "),
        "s a tensor": (lambda: call(x, w, labels, s=torch.tensor(64.0)), ValueError, "s "),
        "m2 a bool": (lambda: call(x, w, labels, m2=True), ValueError, "m2 "),
        # Degrees for radians, an angle past pi (which trained nothing: a zero loss), a cosine margin
        # past the cosines' range.
        "m2 in degrees": (lambda: call(x, w, labels, m2=28.6), ValueError, r"m2 .*radians.* must lie in \[-pi/2"),
        "m2 past pi": (lambda: call(x, w, labels, m2=10.0), ValueError, "m2 .* must lie in"),
        "m2 below -pi/2": (lambda: call(x, w, labels, m2=-2.0), ValueError, "m2 .* must lie in"),
        "m3 past 1": (lambda: call(x, w, labels, m3=22.4), ValueError, r"m3 .* must lie in \[-1, 1\]"),
        "ignore_index a float": (lambda: call(x, w, labels, ignore_index=-1.0), ValueError, "ignore_index"),
        "margin_grad": (lambda: call(x, w, labels, margin_grad="ste"), ValueError, "margin_grad"),
        "embeddings not a tensor": (lambda: call(x.tolist(), w, labels), TypeError, "embeddings"),
        "float8 embeddings": (lambda: call(x.to(torch.float8_e4m3fn), w, labels), TypeError, "embeddings"),
        "ignore_index beyond int64": (lambda: call(x, w, labels, ignore_index=2**70), ValueError, "ignore_index"),
        # An int past the largest float raised OverflowError from float(), naming no argument.
        "s an int beyond floats": (lambda: call(x, w, labels, s=10**400), ValueError, "s must be a finite real"),
        "reference's s beyond floats": (lambda: reference.combined_margin_loss(x, w, labels, s=10**400), ValueError,
                                        "s must be a finite real"),
        "curricular_t beyond floats": (lambda: arcface_ext.chunked_margin_loss(x, w, labels, curricular_t=10**400),
                                       ValueError, "curricular_t must be a finite"),
        # Other layouts reached PyTorch's 'Could not run ... from the SparseCPU backend' or an internal error.
        "sparse embeddings": (lambda: call(x.to_sparse(), w, labels), TypeError,
                              r"embeddings must be a dense \(strided\) tensor, got a torch.sparse_coo tensor"),
        "sparse CSR weight": (lambda: call(x, w.to_sparse_csr(), labels), TypeError, "weight must be a dense"),
        "sparse labels": (lambda: call(x, w, labels.to_sparse()), TypeError, "labels must be a dense"),
        "nested embeddings": (lambda: call(torch.nested.nested_tensor(list(x)), w, labels), TypeError,
                              "embeddings must be a dense .* nested"),
        "sparse per-row margin": (lambda: call(x, w, labels, m2=torch.full((4,), 0.5).to_sparse()), TypeError,
                                  "m2 must be a dense"),
        "reference's sparse weight": (lambda: reference.combined_margin_loss(x, w.to_sparse(), labels), TypeError,
                                      "weight must be a dense"),
        "workspace beyond int64": (lambda: arcface_ext.set_workspace_bytes(2**63), ValueError, "num_bytes"),
        "workspace 0": (lambda: arcface_ext.set_workspace_bytes(0), ValueError, "num_bytes"),
    }


BAD_INPUTS = list(_bad_inputs())


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(case):
    fn, error, pattern = _bad_inputs()[case]
    with pytest.raises(error, match=pattern):
        fn()


def _bad_op_calls():
    x, w, labels = make_inputs(4, 6, 5, seed=25, dtype=torch.float32)
    op = torch.ops.arcface_ext.margin_softmax_forward
    return {
        "dtype mismatch": (lambda: op(*op_arguments(x, w.double(), labels)), "share a dtype"),
        "int32 labels": (lambda: op(*op_arguments(x, w, labels.int())), "labels must be int64"),
        "label >= C": (lambda: op(*op_arguments(x, w, labels + 5)), r"labels\[0\]"),
        "D mismatch": (lambda: op(*op_arguments(x, w[:, :5], labels)), "disagree on D"),
        "N mismatch": (lambda: op(*op_arguments(x, w, labels[:2])), "labels has 2 entries"),
        "D = 0": (lambda: op(*op_arguments(x[:, :0], w[:, :0], labels)), r"no columns \(D = 0\)"),
    }


@pytest.mark.parametrize("case", list(_bad_op_calls()))
def test_op_checks_its_arguments_at_the_host_boundary(case):
    # Called through torch.ops directly, past functional's Python checks: the C++ checks must
    # still raise a Python exception (ValueError or RuntimeError), never crash.
    fn, pattern = _bad_op_calls()[case]
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        fn()


# ---- modules ---------------------------------------------------------------------------------

MODULES = {
    "ArcFaceLoss": (lambda **kw: arcface_ext.ArcFaceLoss(23, 12, s=32.0, m=0.4, **kw),
                    dict(s=32.0, m1=1.0, m2=0.4, m3=0.0, lambda_=0.0), "m2=0.4"),
    "CosFaceLoss": (lambda **kw: arcface_ext.CosFaceLoss(23, 12, m=0.35, **kw),
                    dict(s=64.0, m1=1.0, m2=0.0, m3=0.35, lambda_=0.0), "m3=0.35"),
    "SphereFaceLoss": (lambda **kw: arcface_ext.SphereFaceLoss(23, 12, m=4, lambda_=5.0, **kw),
                       dict(s=64.0, m1=4.0, m2=0.0, m3=0.0, lambda_=5.0), "lambda_=5.0"),
    "CombinedMarginLoss": (lambda **kw: arcface_ext.CombinedMarginLoss(23, 12, 64.0, 1.0, 0.3, 0.2, **kw),
                           dict(s=64.0, m1=1.0, m2=0.3, m3=0.2, lambda_=0.0), "m3=0.2"),
}


@pytest.mark.parametrize("build, pattern", [
    (lambda: arcface_ext.CombinedMarginLoss(10.5, 8), "num_classes"),
    (lambda: arcface_ext.CombinedMarginLoss(10, 0), "embedding_size"),
    (lambda: arcface_ext.ArcFaceLoss(10, 8, s=-1.0), "s "),
    (lambda: arcface_ext.ArcFaceLoss(10, 8, m=float("nan")), "m2"),
    (lambda: arcface_ext.CosFaceLoss(10, 8, reduction="avg"), "reduction"),
    (lambda: arcface_ext.SphereFaceLoss(10, 8, lambda_=-1.0), "lambda_"),
    (lambda: arcface_ext.ArcFaceLoss(10, 8, margin_grad="ste"), "margin_grad"),
    (lambda: arcface_ext.ArcFaceLoss(10, 8, m=28.6), "m2 .* must lie in"),
    (lambda: arcface_ext.CosFaceLoss(10, 8, m=35), "m3 .* must lie in"),
    (lambda: arcface_ext.CurricularFaceLoss(10, 8, m=3.2), "m2 .* must lie in"),
    (lambda: arcface_ext.SubCenterMarginLoss(10, 8, m2=10.0), "m2 .* must lie in"),
    (lambda: arcface_ext.ShardedCombinedMarginLoss(10, 8, m3=-1.5), "m3 .* must lie in"),
    (lambda: arcface_ext.ArcFaceLoss(10, 8, s=10**400), "s must be a finite"),
], ids=["float-classes", "no-dims", "negative-s", "nan-margin", "reduction", "negative-lambda", "margin-grad",
        "arc-degrees", "cos-scaled", "curricular-past-pi", "subcenter-past-pi", "sharded-m3", "int-s-beyond-floats"])
def test_modules_check_their_options_when_built(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


@pytest.mark.parametrize("cls", [arcface_ext.ArcFaceLoss, arcface_ext.CosFaceLoss, arcface_ext.SphereFaceLoss,
                                 arcface_ext.MagFaceLoss], ids=lambda cls: cls.__name__)
def test_help_of_a_module_says_whose_keyword_arguments_it_takes(cls):
    # help(arcface_ext.ArcFaceLoss) showed `**kwargs: Any` and said nothing of them (the README's API table says
    # "the subclasses below take the keyword arguments too").
    doc = inspect.getdoc(cls)
    assert "The other keyword arguments are :class:`CombinedMarginLoss`'s: " in doc, doc
    base = inspect.signature(arcface_ext.CombinedMarginLoss).parameters.values()
    options = [p.name for p in base if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name not in ("device", "dtype")]
    for option in options:
        assert f"``{option}``" in doc, (cls.__name__, option)


@pytest.mark.parametrize("build", [arcface_ext.ArcFaceLoss, arcface_ext.AdaFaceLoss, arcface_ext.SubCenterMarginLoss,
                                   arcface_ext.ShardedCombinedMarginLoss], ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, "float32"], ids=str)
def test_a_module_of_centres_in_another_dtype_is_refused_naming_dtype(build, dtype):
    # Was torch's "Only Tensors of floating point and complex dtype can require gradients" (int64), torch.empty's
    # "received an invalid combination of arguments" (a string), or, complex, a module the first call refused.
    with pytest.raises(TypeError) as raised:
        build(10, 8, dtype=dtype)
    assert str(raised.value) == ("dtype (the class centres') must be torch.float16, torch.bfloat16, torch.float32 or "
                                 f"torch.float64, got {dtype!r}")
    assert build(10, 8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


BAD_LABEL_CALLS = {
    "op": lambda x, w, labels: arcface_ext.combined_margin_loss(x, w, labels),
    "reference": lambda x, w, labels: reference.combined_margin_loss(x, w, labels),
    "chunked": lambda x, w, labels: arcface_ext.chunked_margin_loss(x, w, labels),
    "reference-chunked": lambda x, w, labels: reference.chunked_margin_loss(x, w, labels),
    "filtering": lambda x, w, labels: arcface_ext.ArcFaceLoss(10, 8, interclass_filtering_threshold=0.4)(x, labels),
    "curricular": lambda x, w, labels: arcface_ext.CurricularFaceLoss(10, 8)(x, labels),
    "use-reference": lambda x, w, labels: arcface_ext.CosFaceLoss(10, 8, use_reference=True)(x, labels),
    "subcenter": lambda x, w, labels: arcface_ext.SubCenterMarginLoss(10, 8, k=2)(x, labels),
    "reference-subcenter": lambda x, w, labels: reference.subcenter_margin_loss(x, w.repeat(2, 1), labels, k=2),
    "sampled": lambda x, w, labels: arcface_ext.ArcFaceLoss(10, 8, sample_rate=0.5)(x, labels),
}
BAD_LABEL_BOUNDS = {"subcenter": "the number of classes in weight, 2 sub-centres a class", "sampled": "num_classes",
                    # (as the op's: the reference said "[0, 10) (the number of classes in weight)" of its 20 rows)
                    "reference-subcenter": "the number of classes in weight, 2 sub-centres a class"}


@pytest.mark.parametrize("path", BAD_LABEL_CALLS)
def test_a_bad_label_is_named_alike_on_every_path(path):
    # The op named the row and its label; the chunked path, the reference and partial FC's sampling said
    # only "labels must lie in [0, 10) or equal ignore_index (-1)" (sampling: "; got 10"), leaving a user
    # to search a batch for the row.
    x, w = torch.randn(6, 8), torch.randn(10, 8)
    labels = torch.tensor([0, 9, -1, 10, 3, 11])
    bound = BAD_LABEL_BOUNDS.get(path, "the number of classes in weight")
    with pytest.raises(ValueError) as raised:
        BAD_LABEL_CALLS[path](x, w, labels)
    assert str(raised.value) == (f"arcface_ext: labels[3] = 10 is out of range: labels must lie in [0, 10) ({bound}) "
                                 "or equal ignore_index (-1)")


@pytest.mark.parametrize("build, message", [
    (lambda: arcface_ext.ArcFaceLoss(10, 8, m2=0.3), "ArcFaceLoss sets m2 itself: its margin is m (m2 = m): pass m, "
     "or build CombinedMarginLoss with m1, m2 and m3 of your own"),
    (lambda: arcface_ext.CosFaceLoss(10, 8, m3=0.2), "CosFaceLoss sets m3 itself: its margin is m (m3 = m)"),
    (lambda: arcface_ext.SphereFaceLoss(10, 8, m1=2), "SphereFaceLoss sets m1 itself: its margin is m (m1 = m)"),
    (lambda: arcface_ext.AdaFaceLoss(10, 8, m2=0.3), "AdaFaceLoss sets m2 itself: its margins follow m, h"),
    (lambda: arcface_ext.ElasticFaceLoss(10, 8, m3=0.3), "ElasticFaceLoss sets m3 itself: its margins are drawn"),
    (lambda: arcface_ext.MagFaceLoss(10, 8, m2=0.3), "MagFaceLoss sets m2 itself: its margin follows the embedding's"),
    (lambda: arcface_ext.CurricularFaceLoss(10, 8, m1=1.0), "CurricularFaceLoss sets m1 itself: its margin is m"),
    (lambda: arcface_ext.ShardedAdaFaceLoss(10, 8, m2=0.3), "ShardedAdaFaceLoss sets m2 itself"),
    (lambda: arcface_ext.ShardedCurricularFaceLoss(10, 8, m2=0.3), "ShardedCurricularFaceLoss sets m2 itself"),
    (lambda: arcface_ext.ArcFaceLoss(10, 8, margin=28.6), "ArcFaceLoss got an unexpected keyword argument 'margin' "
     "(its margin is m; angular ones in radians, where pytorch-metric-learning's are in degrees); besides its own, it "
     "takes CombinedMarginLoss's lambda_, reduction, margin_grad, ignore_index, sample_rate, check_labels, "
     "use_reference, interclass_filtering_threshold, label_smoothing, device, dtype"),
    (lambda: arcface_ext.CosFaceLoss(10, 8, scale=30), "CosFaceLoss got an unexpected keyword argument 'scale' (the "
     "scale is s)"),
    (lambda: arcface_ext.ShardedElasticFaceLoss(10, 8, label_smoothing=0.1), "ShardedElasticFaceLoss got an "
     "unexpected keyword argument 'label_smoothing'; besides its own, it takes ShardedCombinedMarginLoss's lambda_, "
     "reduction, margin_grad, ignore_index, sample_rate, check_labels, interclass_filtering_threshold, "
     "process_group, device, dtype"),
], ids=["arc-m2", "cos-m3", "sphere-m1", "adaface", "elastic", "magface", "curricular", "sharded-adaface",
        "sharded-curricular", "their-margin", "their-scale", "sharded-smoothing"])
def test_a_module_refuses_options_it_does_not_take_naming_itself(build, message):
    # A margin the module sets from its own arguments (m2 for ArcFaceLoss's m), or another library's name
    # for an argument: was Python's "CombinedMarginLoss.__init__() got multiple values for keyword
    # argument 'm2'" (or "unexpected keyword argument 'margin'"), naming the class the module extends.
    with pytest.raises(TypeError) as raised:
        build()
    assert str(raised.value).startswith(message), str(raised.value)
    # The options it passes on still reach that class.
    criterion = arcface_ext.ArcFaceLoss(10, 8, reduction="none", sample_rate=0.5, lambda_=0.0, ignore_index=-100)
    assert (criterion.reduction, criterion.sample_rate, criterion.ignore_index) == ("none", 0.5, -100)


def test_a_users_subclass_of_a_fixed_signature_still_passes_options_on():
    # A subclass whose own __init__ takes no **kwargs, passing options to the module it extends: its options
    # reach CombinedMarginLoss (they were refused as "Mine got an unexpected keyword argument 'reduction';
    # besides its own, it takes Mine's ", the subclass taken for the class they end up in).
    class Mine(arcface_ext.ArcFaceLoss):
        def __init__(self, num_classes, embedding_size):
            super().__init__(num_classes, embedding_size, m=0.3, reduction="sum", ignore_index=-100)

    class Ada(arcface_ext.AdaFaceLoss):
        def __init__(self, num_classes, embedding_size, flavour="x"):
            super().__init__(num_classes, embedding_size, label_smoothing=0.1)

    mine, ada = Mine(10, 8), Ada(10, 8)
    assert (mine.reduction, mine.ignore_index, mine.m, ada.label_smoothing) == ("sum", -100, 0.3, 0.1)

    class Wrong(arcface_ext.CosFaceLoss):
        def __init__(self, num_classes, embedding_size):
            super().__init__(num_classes, embedding_size, margin=0.3)

    with pytest.raises(TypeError, match="^Wrong got an unexpected keyword argument 'margin' .*; besides its own, it "
                       "takes CombinedMarginLoss's lambda_, reduction"):
        Wrong(10, 8)


def test_numpy_scalars_are_taken_as_numbers():
    # Hyper-parameters read from a config through numpy (np.float32 is no float subclass, np.int64
    # no int subclass) give the same loss as Python numbers, in the functions and the modules.
    x, w, labels = make_inputs(7, 8, 11, seed=28, dtype=torch.float64, ignored=(3,))
    as_numpy = dict(s=np.float32(30.0), m1=np.int64(1), m2=np.float32(0.25), m3=np.float64(0.1),
                    lambda_=np.float32(0.0), ignore_index=np.int64(-1))
    as_python = {name: value.item() for name, value in as_numpy.items()}
    for function in (arcface_ext.combined_margin_loss, reference.combined_margin_loss):
        assert_close_report(function(x, w, labels, **as_numpy), function(x, w, labels, **as_python),
                            atol=0, rtol=0, name=function.__module__)
    criterion = arcface_ext.ArcFaceLoss(np.int64(11), np.int32(8), s=np.float32(30.0), m=np.float32(0.25),
                                        sample_rate=np.float64(1.0), ignore_index=np.int16(-1)).double()
    assert type(criterion.s) is float and type(criterion.ignore_index) is int and criterion.num_classes == 11
    expected = arcface_ext.combined_margin_loss(x, criterion.weight, labels, s=30.0, m2=0.25)
    assert_close_report(criterion(x, labels), expected, atol=0, rtol=0, name="module")


def test_numpy_bools_are_taken_as_flags():
    # A flag read through numpy: np.True_ is a numpy.bool_ in numpy 1 but a numpy.bool in numpy 2, which the
    # flags' check (looking for the name 'bool_') refused as "must be a bool".
    x, w, labels = make_inputs(7, 8, 11, seed=28, dtype=torch.float64)
    for function in (arcface_ext.combined_margin_loss, reference.combined_margin_loss):
        loss, target_cosine = function(x, w, labels, return_target_cosine=np.True_, check_labels=np.bool_(False))
        expected = function(x, w, labels, return_target_cosine=True, check_labels=False)
        assert_close_report(loss, expected[0], atol=0, rtol=0, name=function.__module__)
        assert_close_report(target_cosine, expected[1], atol=0, rtol=0, name=function.__module__)
    criterion = arcface_ext.ArcFaceLoss(11, 8, easy_margin=np.True_, check_labels=np.False_, use_reference=np.False_)
    assert criterion.check_labels is False and criterion.use_reference is False
    assert "easy_margin=True" in repr(criterion)
    with pytest.raises(TypeError, match="check_labels must be a bool, got"):
        arcface_ext.ArcFaceLoss(11, 8, check_labels=np.int64(1))


@pytest.mark.parametrize("use_reference", [False, True], ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(MODULES))
def test_module_equals_functional(name, use_reference):
    build, params, repr_part = MODULES[name]
    torch.manual_seed(0)
    criterion = build(use_reference=use_reference)
    assert criterion.weight.shape == (23, 12) and isinstance(criterion.weight, torch.nn.Parameter)
    text = repr(criterion)
    assert text.startswith(name) and "num_classes=23" in text and "embedding_size=12" in text and repr_part in text
    assert ("use_reference=True" in text) == use_reference
    x, _, labels = make_inputs(9, 12, 23, seed=26, dtype=torch.float32, ignored=(2,))
    x.requires_grad_(True)
    loss, target_cosine = criterion(x, labels, return_target_cosine=True)
    loss.backward()
    function = reference.combined_margin_loss if use_reference else arcface_ext.combined_margin_loss
    expected = loss_and_grads(function, x, criterion.weight, labels, return_target_cosine=True, **params)
    for name, a, e in zip(OUTPUTS, (loss, target_cosine, x.grad, criterion.weight.grad), expected):
        assert_close_report(a, e, atol=0, rtol=0, name=name)


def test_module_fused_matches_module_reference():
    torch.manual_seed(0)
    fused = arcface_ext.ArcFaceLoss(301, 16)
    slow = arcface_ext.ArcFaceLoss(301, 16, use_reference=True)
    slow.load_state_dict(fused.state_dict())
    x, _, labels = make_inputs(37, 16, 301, seed=27, dtype=torch.float32)
    assert_matches_reference(fused(x, labels), slow(x.double(), labels).float(), name="loss")


def test_module_repr_mentions_straight_through():
    criterion = arcface_ext.ArcFaceLoss(5, 3, margin_grad="straight_through")
    assert "margin_grad='straight_through'" in repr(criterion)


EVERY_MODULE = {
    "ArcFaceLoss": (arcface_ext.ArcFaceLoss, {}), "CosFaceLoss": (arcface_ext.CosFaceLoss, {}),
    "SphereFaceLoss": (arcface_ext.SphereFaceLoss, {}), "CombinedMarginLoss": (arcface_ext.CombinedMarginLoss, {}),
    "AdaFaceLoss": (arcface_ext.AdaFaceLoss, {}), "ElasticFaceLoss": (arcface_ext.ElasticFaceLoss, {"std": 0.0}),
    "MagFaceLoss": (arcface_ext.MagFaceLoss, {}), "CurricularFaceLoss": (arcface_ext.CurricularFaceLoss, {}),
    "SubCenterMarginLoss": (arcface_ext.SubCenterMarginLoss, {"k": 2}),
    "ArcFaceLoss-sampled": (arcface_ext.ArcFaceLoss, {"sample_rate": 0.5}),
    "ShardedCombinedMarginLoss": (arcface_ext.ShardedCombinedMarginLoss, {}),
    "ShardedAdaFaceLoss": (arcface_ext.ShardedAdaFaceLoss, {}),
    "ShardedElasticFaceLoss": (arcface_ext.ShardedElasticFaceLoss, {"std": 0.0}),
    "ShardedCurricularFaceLoss": (arcface_ext.ShardedCurricularFaceLoss, {}),
    "ShardedSubCenterMarginLoss": (arcface_ext.ShardedSubCenterMarginLoss, {"k": 2}),
}


@pytest.mark.parametrize("how", ["skip_init", "meta-assign"])
@pytest.mark.parametrize("name", list(EVERY_MODULE))
def test_module_built_without_initialisation_resumes_a_checkpoint(name, how):
    # torch.nn.utils.skip_init(cls, ...) needs a `device` argument in cls's signature: the subclasses took it
    # through **kwargs and skip_init refused them ("Module must support a 'device' arg to skip
    # initialization"). Then a checkpoint (running statistics moved) loads, and training goes on as the
    # saved module's copy does, bit for bit; also into a module built on the meta device with assign=True.
    cls, options = EVERY_MODULE[name]
    x, _, labels = make_inputs(8, 6, 11, seed=30, dtype=torch.float64)

    def steps(module, count):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        torch.manual_seed(1)  # the same samples
        for _ in range(count):
            loss = module(x * 10, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.detach()

    torch.manual_seed(0)
    saved = cls(11, 6, dtype=torch.float64, **options)
    steps(saved, 2)
    state = copy.deepcopy(saved.state_dict())
    if how == "skip_init":
        module = torch.nn.utils.skip_init(cls, 11, 6, dtype=torch.float64, **options)
        module.load_state_dict(state)
    else:
        with torch.device("meta"):
            module = cls(11, 6, dtype=torch.float64, **options)
        module.load_state_dict(state, assign=True)
    assert isinstance(module.weight, torch.nn.Parameter) and module.weight.requires_grad
    expected = copy.deepcopy(saved)
    assert_close_report(steps(module, 3), steps(expected, 3), atol=0, rtol=0, name="loss")
    for (key, value), wanted in zip(module.state_dict().items(), expected.state_dict().values()):
        assert_close_report(value, wanted, atol=0, rtol=0, name=key)


# ---- memory bound ----------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extra_memory_is_bounded_by_the_workspace(reduction):
    # N x C fp32 logits would be 24 MiB, and so would a (C, D) buffer; with a 1 MiB workspace the
    # fused forward+backward must stay within the workspace plus O(N·D), gradients excluded. The
    # reference, measured the same way, shows that the method does see an N x C buffer.
    # (Method: benchmarks/bench_loss.py's docstring; one child process, ~5 s.)
    bench = load_benchmark("bench_loss")
    n, dim, num_classes, workspace_bytes = 64, 64, 100_003, 1 << 20
    impls = ["ours", "eager"] if reduction == "none" else ["ours"]
    peak = bench.cpu_peak_extra_mb(impls, n, dim, num_classes, reduction=reduction,
                                   workspace_bytes=workspace_bytes)
    if "eager" in peak:
        logits_mb = n * num_classes * 4 / 2**20
        assert peak["eager"] >= logits_mb, (f"the reference used only {peak['eager']:.1f} MiB extra; "
                                            "the measurement is broken")
    assert peak["ours"] <= workspace_bytes / 2**20 + 2.0, (
        f"fused op used {peak['ours']:.1f} MiB extra (workspace {workspace_bytes / 2**20:.0f} MiB)")


# ---- the benchmark's largest-C search (its logic; the GPU runs it for real) --------------------

@pytest.mark.parametrize("capacity", [999, 1000, 1_234_567, 50_000_000])
def test_largest_c_search_brackets_the_capacity(monkeypatch, capacity):
    bench = load_benchmark("bench_loss")
    tried = []

    def fits(impl, n, dim, num_classes, dtype, device):
        tried.append(num_classes)
        return num_classes <= capacity

    monkeypatch.setattr(bench, "fits", fits)
    found, failed = bench.largest_c("ours", 512, 512, None, None, start=1000, limit=20_000_000)
    if capacity < 1000:
        assert (found, failed) == (0, 1000)
    elif capacity >= 20_000_000:
        assert (found, failed) == (20_000_000, None)
    else:
        assert found <= capacity < failed and failed - found <= max(1, found // 100)
    assert len(tried) < 40


def test_largest_c_search_stops_at_its_deadline(monkeypatch):
    bench = load_benchmark("bench_loss")
    monkeypatch.setattr(bench, "fits", lambda impl, n, dim, num_classes, dtype, device: num_classes <= 10**6)
    # Already past the deadline: it keeps the first C it tried and says nothing failed.
    found, failed = bench.largest_c("ours", 8, 8, None, None, start=1000, limit=10**9, deadline=0.0)
    assert (found, failed) == (1000, None)


def test_host_overhead_benchmark_runs_and_restores_the_training_op(tmp_path):
    module = load_benchmark("host_overhead")
    train_devices = arcface_ext.ops.TRAIN_DEVICES
    out = tmp_path / "rows.json"
    module.main(["--steps", "3", "--repeats", "1", "--out", str(out)])
    rows = {row["row"]: row for row in json.loads(out.read_text())}
    expected = {"ops", "step", "torch-ce", "mean", "mean-aten"} | ({"step-train"} if "cpu" in train_devices else set())
    assert set(rows) == expected
    assert all(row["us_per_step"] > 0 and row["N"] == 8 for row in rows.values())
    assert arcface_ext.ops.TRAIN_DEVICES == train_devices


def test_without_the_compiled_kernels_the_op_says_how_to_build_them_and_the_pytorch_paths_run():
    # A broken install (arcface_ext._C not importable): importing the package still works, the op and the
    # losses that need it raise the one error that says how to build it (never falling back silently), and
    # what is pure PyTorch (the reference, the chunked path, CurricularFace on replicated centres) runs.
    import subprocess
    import sys

    code = """if True:
        import sys
        sys.modules["arcface_ext._C"] = None  # as an import of a missing or broken library fails
        import torch
        import arcface_ext
        assert not arcface_ext.extension_available()
        x, labels, weight = torch.randn(4, 8, requires_grad=True), torch.tensor([0, 1, 2, 3]), torch.randn(10, 8)
        for loss in (lambda: arcface_ext.combined_margin_loss(x, weight, labels),
                     lambda: arcface_ext.CombinedMarginLoss(10, 8)(x, labels),
                     lambda: arcface_ext.ShardedCombinedMarginLoss(10, 8)(x, labels)):
            try:
                loss()
            except RuntimeError as error:
                message = str(error)
                assert message.startswith("arcface_ext's compiled kernels are not available (importing arcface_ext._C "
                                          "failed: import of arcface_ext._C halted"), message
                assert "pip install --no-build-isolation -e ." in message and "reference" in message, message
            else:
                raise AssertionError("no error without the compiled kernels")
        expected = arcface_ext.reference.combined_margin_loss(x, weight, labels)
        module = arcface_ext.CombinedMarginLoss(10, 8, use_reference=True)
        module.weight.data.copy_(weight)
        assert torch.allclose(module(x, labels), expected)
        assert torch.allclose(arcface_ext.chunked.chunked_margin_loss(x, weight, labels), expected, rtol=1e-5)
        arcface_ext.CurricularFaceLoss(10, 8)(x, labels).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        print("ok")
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr[-3000:]
