"""The pure-PyTorch reference against derivations that do not share its code: autograd through
plain acos/cos and F.cross_entropy on interior points, closed-form 2-D cases worked out with the
math module, the straight-through trick written the usual way, and fp64 gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from arcface_ext import reference
from conftest import MARGINS, assert_close_report, loss_and_grads, margin_kwargs

def interior_inputs(n, dim, num_classes, *, seed, m1=1.0, m2=0.0, dtype=torch.float64):
    """Embeddings near or away from their class centre, redrawn until every target cosine lies
    away from the kinks of ψ (c = ±1, θ + m2 = π, m1·θ + m2 = kπ), where the plain autograd
    derivation is exact."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    embeddings = torch.empty(n, dim, dtype=dtype)
    bad = torch.ones(n, dtype=torch.bool)
    for _ in range(100):
        if not bad.any():
            break
        count = int(bad.sum())
        pull = torch.rand(count, 1, generator=generator, dtype=dtype) * 2.0 - 0.3
        noise = torch.randn(count, dim, generator=generator, dtype=dtype)
        embeddings[bad] = pull * F.normalize(weight[labels[bad]], dim=1) + 0.5 * F.normalize(noise, dim=1)
        theta = torch.acos(F.cosine_similarity(embeddings, weight[labels], dim=1))
        t = m1 * theta + m2
        distance_to_kink = (t / math.pi - torch.round(t / math.pi)).abs()
        bad = (theta.cos().abs() > 0.97) | (distance_to_kink < 0.01)
        if m1 == 1.0:
            bad |= theta + m2 > math.pi - 0.01
    assert not bad.any()
    return embeddings, weight, labels


def naive_loss(embeddings, weight, labels, *, s, m1, m2, m3, lambda_, reduction="mean",
               ignore_index=-1, straight_through=False):
    """The paper's formula with autograd through torch.acos/cos and F.cross_entropy. Valid on
    interior points only: it has none of the reference's care at c = ±1 or past θ + m2 = π."""
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    counted = labels != ignore_index
    safe_labels = torch.where(counted, labels, 0)
    one_hot = F.one_hot(safe_labels, weight.shape[0]).to(cosine.dtype)
    target_cosine = (cosine * one_hot).sum(1)
    t = m1 * torch.acos(target_cosine) + m2
    k = torch.floor(t / math.pi).detach()
    psi = torch.cos(t) * (1 - 2 * torch.remainder(k, 2)) - 2 * k
    psi = (psi + lambda_ * target_cosine) / (1 + lambda_)
    if straight_through:
        psi = target_cosine + (psi - target_cosine).detach()
    logits = s * cosine + one_hot * (s * (psi - m3) - s * target_cosine).unsqueeze(1)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# ---- against autograd through acos/cos ----------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_reference_matches_naive_autograd(margin, margin_grad, reduction):
    kw = margin_kwargs(margin)
    x, w, labels = interior_inputs(23, 8, 11, seed=1, m1=kw["m1"], m2=kw["m2"])
    labels[[3, 17]] = -1
    ours = loss_and_grads(reference.combined_margin_loss, x, w, labels, s=16.0, reduction=reduction,
                          margin_grad=margin_grad, **kw)
    naive = loss_and_grads(naive_loss, x, w, labels, s=16.0, reduction=reduction,
                           straight_through=margin_grad == "straight_through", **kw)
    for name, a, e in zip(("loss", "grad_embeddings", "grad_weight"), (ours[0], ours[2], ours[3]),
                          (naive[0], naive[2], naive[3])):
        assert_close_report(a, e, atol=1e-12, rtol=1e-10, name=name)


def test_straight_through_differs_from_exact_with_an_angular_margin():
    # Guards the comparison above against a vacuous pass: the two modes must really differ.
    x, w, labels = interior_inputs(16, 8, 7, seed=2, m2=0.5)
    exact = loss_and_grads(reference.combined_margin_loss, x, w, labels, s=16.0)
    straight = loss_and_grads(reference.combined_margin_loss, x, w, labels, s=16.0,
                              margin_grad="straight_through")
    assert torch.equal(exact[0], straight[0])
    assert (exact[2] - straight[2]).abs().max() > 1e-3


# ---- closed-form 2-D cases ----------------------------------------------------------------

def two_d_case(target_angle, m1, m2, m3, lambda_, s):
    """One embedding at angle 0 (norm 2) and three class centres at known angles and norms, the
    first being the target. Returns the inputs and the loss and d loss / d x worked out with the
    math module: with θ = target_angle, every logit is a function of the embedding's angle α, and
    d loss / d x = (d loss / d α) · (-sin α, cos α) / ‖x‖ at α = 0."""
    angles = [target_angle, 1.2, -2.0]
    norms = [0.5, 3.0, 1.0]
    weight = torch.tensor([[r * math.cos(a), r * math.sin(a)] for a, r in zip(angles, norms)],
                          dtype=torch.float64)
    embeddings = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0])

    theta = target_angle  # 0 < target_angle <= π, so θ = target_angle - α near α = 0
    c = math.cos(theta)
    if m1 == 1.0 and theta + m2 <= math.pi:
        psi, dpsi_dtheta = math.cos(theta + m2), -math.sin(theta + m2)
    elif m1 == 1.0:
        psi, dpsi_dtheta = c - m2 * math.sin(m2), -math.sin(theta)
    else:
        t = m1 * theta + m2
        k = math.floor(t / math.pi)
        psi = (-1) ** k * math.cos(t) - 2 * k
        dpsi_dtheta = -((-1) ** k) * m1 * math.sin(t)
    psi, dpsi_dtheta = (psi + lambda_ * c) / (1 + lambda_), (dpsi_dtheta - lambda_ * math.sin(theta)) / (1 + lambda_)
    logits = [s * (psi - m3)] + [s * math.cos(a) for a in angles[1:]]
    # d logit / d α: the target's θ falls as α grows; the others' cosines are cos(angle - α).
    dlogits = [-s * dpsi_dtheta] + [s * math.sin(a) for a in angles[1:]]
    top = max(logits)
    z = sum(math.exp(v - top) for v in logits)
    loss = top + math.log(z) - logits[0]
    dloss_dalpha = sum(math.exp(v - top) / z * d for v, d in zip(logits, dlogits)) - dlogits[0]
    grad_embeddings = torch.tensor([[0.0, dloss_dalpha / 2.0]], dtype=torch.float64)
    return embeddings, weight, labels, loss, grad_embeddings


@pytest.mark.parametrize("target_angle", [0.3, 1.0, 2.2, 3.0], ids=lambda a: f"theta{a}")
@pytest.mark.parametrize("margin", list(MARGINS))
def test_reference_matches_closed_form_2d(margin, target_angle):
    kw = margin_kwargs(margin)
    x, w, labels, loss, grad_embeddings = two_d_case(target_angle, s=8.0, **kw)
    x.requires_grad_(True)
    got_loss = reference.combined_margin_loss(x, w, labels, s=8.0, **kw)
    got_loss.backward()
    assert_close_report(got_loss, torch.tensor(loss, dtype=torch.float64), atol=1e-12, rtol=1e-12, name="loss")
    assert_close_report(x.grad, grad_embeddings, atol=1e-12, rtol=1e-10, name="grad_embeddings")


def test_arcface_past_pi_is_insightface_linear_continuation():
    # θ + m2 > π: ψ = c - m2·sin(m2), a monotone continuation (it jumps below -1 at the seam).
    cosine = torch.tensor([math.cos(2.9), math.cos(3.1), -1.0], dtype=torch.float64)
    psi, dpsi = reference.margin_psi(cosine, m1=1.0, m2=0.5, lambda_=0.0)
    assert_close_report(psi, cosine - 0.5 * math.sin(0.5), atol=0, rtol=1e-15, name="psi")
    assert torch.equal(dpsi, torch.ones_like(dpsi))


# ---- properties of ψ ------------------------------------------------------------------------

def test_sphereface_psi_is_continuous_and_monotone():
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi, _ = reference.margin_psi(torch.cos(theta), m1=4.0, m2=0.0, lambda_=0.0)
    steps = psi.diff()
    assert bool((steps <= 1e-12).all()), "psi must fall as theta grows"
    # Largest step for a smooth function on this grid: |dψ/dθ| <= 4 times the grid spacing.
    assert float(steps.abs().max()) < 4 * math.pi / 20000 * 1.01
    assert float(psi[0]) == pytest.approx(1.0) and float(psi[-1]) == pytest.approx(-7.0)


@pytest.mark.parametrize("margin", list(MARGINS))
def test_exact_margin_derivative_matches_autograd_and_is_finite_at_the_ends(margin):
    kw = margin_kwargs(margin)
    kw.pop("m3")
    cosine = torch.linspace(-0.97, 0.97, 391, dtype=torch.float64)
    t = kw["m1"] * torch.acos(cosine) + kw["m2"]
    near_kink = (t / math.pi - torch.round(t / math.pi)).abs() < 1e-3
    cosine = cosine[~near_kink].requires_grad_(True)
    psi, dpsi = reference.margin_psi(cosine, **kw)
    (autograd_dpsi,) = torch.autograd.grad(psi.sum(), cosine)
    assert_close_report(dpsi, autograd_dpsi, atol=1e-10, rtol=1e-10, name="dpsi/dc")

    ends = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    psi, dpsi = reference.margin_psi(ends, **kw)
    assert bool(psi.isfinite().all() and dpsi.isfinite().all()), (psi, dpsi)


# ---- gradcheck --------------------------------------------------------------------------------

@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_gradcheck(margin, reduction):
    kw = margin_kwargs(margin)
    x, w, labels = interior_inputs(5, 4, 6, seed=3, m1=kw["m1"], m2=kw["m2"])
    labels[1] = -1
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: reference.combined_margin_loss(a, b, labels, s=4.0, reduction=reduction, **kw),
        (x, w))


def test_reference_gradcheck_past_pi():
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    x = -w[labels] + 0.3 * torch.randn(4, 4, generator=generator, dtype=torch.float64)
    theta = torch.acos(F.cosine_similarity(x, w[labels], dim=1))
    assert bool((theta + 0.5 > math.pi + 0.01).all())
    assert torch.autograd.gradcheck(
        lambda a, b: reference.combined_margin_loss(a, b, labels, s=4.0, m2=0.5),
        (x.requires_grad_(True), w.requires_grad_(True)))


# ---- reductions, ignored rows, target cosine, input checks ----------------------------------

def test_reductions_and_ignored_rows():
    x, w, labels = interior_inputs(9, 6, 5, seed=5, m2=0.5)
    labels[[0, 4]] = -1
    rows = reference.combined_margin_loss(x, w, labels, reduction="none")
    assert rows[0] == 0 and rows[4] == 0
    counted = labels != -1
    assert torch.equal(reference.combined_margin_loss(x, w, labels, reduction="sum"), rows.sum())
    assert_close_report(reference.combined_margin_loss(x, w, labels), rows.sum() / counted.sum(),
                        atol=0, rtol=1e-15, name="mean")
    other = labels.clone()
    other[[0, 4]] = -100
    assert torch.equal(reference.combined_margin_loss(x, w, other, reduction="none", ignore_index=-100), rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction):
    x, w, _ = interior_inputs(4, 6, 5, seed=6)
    labels = torch.full((4,), -1)
    loss, _, gx, gw = loss_and_grads(reference.combined_margin_loss, x, w, labels, reduction=reduction)
    assert bool((loss == 0).all())
    assert bool((gx == 0).all() and (gw == 0).all())


def test_return_target_cosine():
    x, w, labels = interior_inputs(7, 6, 5, seed=7)
    labels[2] = -1
    x.requires_grad_(True)
    loss, target_cosine = reference.combined_margin_loss(x, w, labels, return_target_cosine=True)
    assert not target_cosine.requires_grad
    expected = F.cosine_similarity(x.detach(), w[labels.clamp_min(0)], dim=1)
    expected[2] = float("nan")
    assert_close_report(target_cosine, expected, atol=1e-14, rtol=1e-14, name="target_cosine")


@pytest.mark.parametrize("bad_label", [5, -2])
def test_out_of_range_labels_raise(bad_label):
    x, w, labels = interior_inputs(4, 6, 5, seed=8)
    labels[1] = bad_label
    with pytest.raises(ValueError, match="labels"):
        reference.combined_margin_loss(x, w, labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_keep_cosines_in_fp32(dtype):
    # With s = 64 a cosine rounded to 16 bits is a 0.1-0.25 logit error; the reference must not.
    x, w, labels = interior_inputs(16, 32, 50, seed=9)
    x16, w16 = x.to(dtype), w.to(dtype)
    loss = reference.combined_margin_loss(x16, w16, labels, reduction="none")
    exact = reference.combined_margin_loss(x16.double(), w16.double(), labels, reduction="none")
    assert loss.dtype == torch.float32
    assert_close_report(loss, exact, atol=1e-4, rtol=1e-5, name="loss")
