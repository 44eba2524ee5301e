"""Per-row margins: m2 and m3 as (N,) tensors in the fused op (AdaFace's and ElasticFace's
per-sample margins) against the fp64 reference, the op's registration with the new argument, and
the AdaFace and ElasticFace modules against their papers' formulas written out on the full logits."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import arcface_ext
from arcface_ext import reference
from conftest import TOLERANCES, assert_close_report, assert_matches_reference, largest_tensor_made, loss_and_grads

OUTPUTS = ("loss", "target_cosine", "grad_embeddings", "grad_weight")


def make_case(n, dim, num_classes, *, seed, near_centre=(), ignored=()):
    """Random inputs; rows in `near_centre` lie almost on their class centre (θ ≈ 0.05), so that a
    negative m2 takes θ + m2 below 0 there."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    for i in near_centre:
        x[i] = 3.0 * w[labels[i]] + 0.05 * w[labels[i]].norm() * torch.randn(dim, generator=generator,
                                                                               dtype=torch.float64) / dim ** 0.5
    labels[list(ignored)] = -1
    m2 = torch.rand(n, generator=generator, dtype=torch.float64) * 1.0 - 0.5  # [-0.5, 0.5)
    m3 = torch.rand(n, generator=generator, dtype=torch.float64) * 0.6 - 0.1
    m2[n // 2] = 0.0  # a row without an angular margin takes the CosFace branch
    return x, w, labels, m2, m3


def run_both(x, w, labels, dtype, **kwargs):
    """The op on `dtype` inputs and the fp64 reference on the same (rounded) values."""
    x, w = x.to(dtype), w.to(dtype)
    ours = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, return_target_cosine=True, **kwargs)
    expected = loss_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels,
                              return_target_cosine=True, **kwargs)
    return ours, expected


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("m1, lambda_", [(1.0, 0.0), (4.0, 0.0), (4.0, 3.0)], ids=["arc", "sphere", "sphere-lambda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_per_row_margins_match_the_reference(reduction, m1, lambda_, dtype):
    # Rows near their centre exercise the negative-m2 hold (ArcFace branch); SphereFace's m1·θ
    # there amplifies an fp32 cosine's rounding past the fp32 tolerance, which is not this test's.
    near_centre = (0, 1, 2) if m1 == 1.0 else ()
    x, w, labels, m2, m3 = make_case(37, 24, 301, seed=1, near_centre=near_centre, ignored=(5,))
    ours, expected = run_both(x, w, labels, dtype, s=30.0, m1=m1, m2=m2, m3=m3, lambda_=lambda_,
                              reduction=reduction)
    for name, a, e in zip(OUTPUTS, ours, expected):
        assert_matches_reference(a, e, name=name, dtype=a.dtype)


def test_negative_angular_margin_holds_psi_at_one_below_zero():
    # θ ≈ 0.05 and m2 = -0.3: θ + m2 < 0, so ψ = 1 and its derivative 0 (AdaFace's clip), where the
    # unguarded cos(θ + m2) would rise with θ. The target logit is then exactly s·(1 - m3).
    x, w, labels, _, _ = make_case(6, 16, 11, seed=2, near_centre=range(6))
    m2 = torch.full((6,), -0.3, dtype=torch.float64)
    m3 = torch.full((6,), 0.1, dtype=torch.float64)
    loss_rows = arcface_ext.combined_margin_loss(x, w, labels, s=10.0, m2=m2, m3=m3, reduction="none")
    cosine = F.normalize(x) @ F.normalize(w).t()
    logits = 10.0 * cosine
    logits[torch.arange(6), labels] = 10.0 * (1 - 0.1)
    torch.testing.assert_close(loss_rows, torch.logsumexp(logits, 1) - 10.0 * 0.9, rtol=1e-12, atol=1e-12)
    # The same scalar margin gives the same numbers.
    scalar = arcface_ext.combined_margin_loss(x, w, labels, s=10.0, m2=-0.3, m3=0.1, reduction="none")
    assert torch.equal(scalar, loss_rows)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_constant_per_row_margins_equal_the_scalars_bit_for_bit(reduction):
    x, w, labels, _, _ = make_case(29, 16, 97, seed=3, ignored=(4,))
    n = labels.shape[0]
    for m2, m3 in ((0.5, 0.0), (0.0, 0.35), (0.3, 0.2)):
        scalar = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels, m2=m2, m3=m3, reduction=reduction,
                                return_target_cosine=True)
        per_row = loss_and_grads(arcface_ext.combined_margin_loss, x, w, labels,
                                 m2=torch.full((n,), m2, dtype=torch.float64),
                                 m3=torch.full((n,), m3, dtype=torch.float64), reduction=reduction,
                                 return_target_cosine=True)
        for name, a, e in zip(OUTPUTS, per_row, scalar):
            assert_close_report(a, e, atol=0, rtol=0, name=f"({m2}, {m3}) {name}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_with_per_row_margins(reduction):
    x, w, labels, m2, m3 = make_case(6, 5, 9, seed=4, ignored=(2,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: arcface_ext.combined_margin_loss(a, b, labels, s=8.0, m2=m2, m3=m3, reduction=reduction), (x, w))


def test_opcheck_with_row_margins():
    x, w, labels, m2, m3 = make_case(7, 6, 11, seed=5, ignored=(3,))
    margins = torch.stack([m2, m3], dim=1)
    scalars = (64.0, 1.0, 0.0, 0.0, 0.0, -1, False, 1 << 20)
    forward = (x.requires_grad_(True), w.requires_grad_(True), labels, *scalars, 0, -1, margins)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_forward, forward)
    _, logsumexp, _ = torch.ops.arcface_ext.margin_softmax_forward(*forward)
    backward = (torch.rand(7, dtype=torch.float64), x.detach(), w.detach(), labels, logsumexp, *scalars, True, True,
                0, -1, margins)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_backward, backward)
    if hasattr(torch.ops.arcface_ext, "margin_softmax_train"):
        train = (x, w, labels, *scalars, True, True, True, margins)
        torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_train, train)


def test_compile_fullgraph_with_per_row_margins():
    def loss_fn(embeddings, weight, labels, m2, m3):
        return arcface_ext.combined_margin_loss(embeddings, weight, labels, s=30.0, m2=m2, m3=m3)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x, w, labels, m2, m3 = make_case(13, 8, 37, seed=6, ignored=(1,))
    x, w = x.float(), w.float()
    eager = loss_and_grads(loss_fn, x, w, labels, m2=m2, m3=m3)
    graph = loss_and_grads(compiled, x, w, labels, m2=m2, m3=m3)
    for name, a, e in zip(OUTPUTS, graph, eager):
        if a is not None:
            assert_close_report(a, e, atol=0, rtol=0, name=name)


def test_bad_per_row_margins_are_named():
    x, w, labels, m2, m3 = make_case(5, 4, 7, seed=7)
    loss = arcface_ext.combined_margin_loss
    with pytest.raises(ValueError, match=r"m2 as a tensor holds one margin per row: shape \(N,\) = \(5,\)"):
        loss(x, w, labels, m2=m2[:4])
    with pytest.raises(ValueError, match="m3 as a tensor holds one margin per row"):
        loss(x, w, labels, m3=m3[:, None])
    with pytest.raises(TypeError, match="m2 as a tensor must be floating point"):
        loss(x, w, labels, m2=torch.zeros(5, dtype=torch.int64))
    bad = m2.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="the per-row margin m2 must be finite"):
        loss(x, w, labels, m2=bad)
    with pytest.raises(ValueError, match="the per-row margin m3 must be finite"):
        loss(x, w, labels, m2=m2, m3=torch.where(bad.isnan(), torch.inf, m3))
    with pytest.raises(ValueError, match=r"row_margins must have shape \(N, 2\)"):
        torch.ops.arcface_ext.margin_softmax_forward(x, w, labels, 64.0, 1.0, 0.0, 0.0, 0.0, -1, False, 1 << 20,
                                                     0, -1, torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_margins must be float64"):
        torch.ops.arcface_ext.margin_softmax_forward(x, w, labels, 64.0, 1.0, 0.0, 0.0, 0.0, -1, False, 1 << 20,
                                                     0, -1, torch.zeros(5, 2, dtype=torch.float32))


# ---- AdaFace and ElasticFace -------------------------------------------------------------------

def adaface_logits(embeddings, weight, labels, *, s, m, h, mean, std, eps=1e-3):
    """AdaFace's head as its paper and code write it, on the full cosine matrix: the norm-derived
    scaler, g_angle = -m·z on θ (clipped to [eps, π - eps]) and g_add = m + m·z off the cosine."""
    norms = embeddings.norm(dim=1).clamp(0.001, 100).detach()
    z = ((norms - mean) / (std + eps) * h).clamp(-1, 1)
    cosine = F.normalize(embeddings) @ F.normalize(weight).t()
    cosine = cosine.clamp(-1 + 1e-7, 1 - 1e-7)
    one_hot = F.one_hot(labels, weight.shape[0]).to(cosine.dtype)
    theta = torch.acos(cosine)
    theta_m = torch.clamp(theta + one_hot * (-m * z)[:, None], 1e-7, math.pi - 1e-7)
    return s * (torch.cos(theta_m) - one_hot * (m + m * z)[:, None])


def test_adaface_matches_its_formula_and_tracks_the_norm_statistics():
    torch.manual_seed(0)
    n, dim, num_classes = 32, 16, 50
    criterion = arcface_ext.AdaFaceLoss(num_classes, dim, s=64.0, m=0.4, h=0.333, t_alpha=0.01, dtype=torch.float64)
    # Norms spread around 20, so that the scaler takes both signs (hard and easy rows).
    x = torch.randn(n, dim, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(5, 40, n, dtype=torch.float64)[:, None]
    labels = torch.randint(0, num_classes, (n,))
    norms = x.norm(dim=1)
    mean = 0.99 * 20 + 0.01 * norms.mean()
    std = 0.99 * 100 + 0.01 * norms.std()

    xs = x.clone().requires_grad_(True)
    loss = criterion(xs, labels)
    loss.backward()
    # An fp64 module keeps fp64 statistics.
    torch.testing.assert_close(criterion.batch_mean, mean)
    torch.testing.assert_close(criterion.batch_std, std)

    w = criterion.weight.detach().clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    expected = F.cross_entropy(adaface_logits(xe, w, labels, s=64.0, m=0.4, h=0.333, mean=mean,
                                              std=std), labels)
    expected.backward()
    assert_matches_reference(loss, expected.detach(), name="loss", dtype=torch.float32)
    assert_matches_reference(xs.grad, xe.grad, name="grad_embeddings", dtype=torch.float32)
    assert_matches_reference(criterion.weight.grad, w.grad, name="grad_weight", dtype=torch.float32)

    # Eval mode leaves the statistics alone. With a narrow spread the scaler reaches its clip at
    # both ends: angular margins up to ±0.4 (negative for easy, high-norm rows), as the formula says.
    criterion.eval()
    criterion.batch_std.fill_(5.0)
    loss = criterion(x, labels)
    torch.testing.assert_close(criterion.batch_mean, mean)
    expected = F.cross_entropy(adaface_logits(x, criterion.weight.detach(), labels, s=64.0, m=0.4, h=0.333,
                                              mean=mean, std=5.0), labels)
    assert_matches_reference(loss.detach(), expected, name="eval loss, clipped scaler", dtype=torch.float32)
    assert "AdaFaceLoss" in repr(criterion) and "h=0.333" in repr(criterion)


def test_adaface_statistics_are_saved_and_restored():
    a = arcface_ext.AdaFaceLoss(10, 8)
    a(torch.randn(6, 8) * 7, torch.randint(0, 10, (6,)))
    b = arcface_ext.AdaFaceLoss(10, 8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.batch_mean, a.batch_mean) and float(a.batch_mean) != 20.0


def test_adaface_statistics_stay_fp32_in_a_16_bit_module():
    # A bf16 running mean would round its 1% steps away: 20 + 0.01·(25 - 20) is 20 in bf16.
    criterion = arcface_ext.AdaFaceLoss(10, 8).to(torch.bfloat16)
    assert criterion.weight.dtype == torch.bfloat16 and criterion.batch_mean.dtype == torch.float32
    x = torch.nn.functional.normalize(torch.randn(6, 8)).mul(25.0).bfloat16()
    criterion(x, torch.randint(0, 10, (6,)))
    assert 20.0 < float(criterion.batch_mean) < 20.1
    assert criterion.to(torch.float64).batch_std.dtype == torch.float64  # (an fp64 module: fp64 statistics)
    # Built in fp64, as cast to it (and as CurricularFace's t).
    built = arcface_ext.AdaFaceLoss(10, 8, dtype=torch.float64)
    assert built.batch_mean.dtype == built.batch_std.dtype == torch.float64


@pytest.mark.parametrize("module", [arcface_ext.ArcFaceLoss, arcface_ext.AdaFaceLoss, arcface_ext.MagFaceLoss,
                                    arcface_ext.ElasticFaceLoss])
def test_a_nan_embedding_is_a_nan_loss_for_every_per_row_margin_loss(module):
    # As for ArcFace (the README's promise, so that a NaN check or a gradient scaler sees it): AdaFace's
    # and MagFace's margins, read from the NaN row's norm, made the op refuse the whole call instead.
    torch.manual_seed(0)
    criterion = module(10, 8, reduction="none").double()
    x = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64)).mul(25.0)
    x[2] = math.nan
    labels = torch.randint(0, 10, (6,))
    loss = criterion(x, labels)
    assert bool(loss[2].isnan()) and bool(loss[torch.arange(6) != 2].isfinite().all())
    if module is arcface_ext.AdaFaceLoss:     # the NaN row moved no statistics
        assert math.isfinite(float(criterion.batch_mean)) and math.isfinite(float(criterion.batch_std))
    criterion.reduction = "mean"
    assert bool(criterion(x, labels).isnan())


@pytest.mark.parametrize("module", [arcface_ext.AdaFaceLoss, arcface_ext.ElasticFaceLoss, arcface_ext.MagFaceLoss])
def test_per_row_margin_modules_check_their_arguments_first(module):
    # Their margins are read from the embeddings: a bad call gets the op's message, not an
    # IndexError from the margins, and AdaFace's statistics do not move.
    criterion = module(10, 8)
    state = {k: v.clone() for k, v in criterion.state_dict().items()}
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        criterion(torch.randn(8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree on the embedding size"):
        criterion(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        criterion([[0.0] * 8], torch.zeros(1, dtype=torch.long))
    # Label values are checked by the op itself, after the margins are read (on a GPU, a check
    # before them would be one more read-back a step).
    with pytest.raises(ValueError, match=r"labels\[1\] = 10"):
        criterion(torch.randn(4, 8), torch.tensor([0, 10, 2, 3]))
    assert all(torch.equal(v, state[k]) for k, v in criterion.state_dict().items())


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_draws_its_margins_from_the_normal(kind):
    n, dim, num_classes = 24, 16, 40
    criterion = arcface_ext.ElasticFaceLoss(num_classes, dim, s=64.0, m=0.5 if kind == "arc" else 0.35, std=0.05,
                                            kind=kind, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = torch.randn(n, dim, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,))
    drawn = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.05 + criterion.m
    loss = criterion(x, labels)
    margins = dict(m2=drawn, m3=0.0) if kind == "arc" else dict(m2=0.0, m3=drawn)
    expected = reference.combined_margin_loss(x, criterion.weight, labels, s=64.0, **margins)
    assert_matches_reference(loss, expected, name="loss")
    # Every call draws anew; eval mode uses the mean margin.
    assert not torch.equal(criterion(x, labels), loss)
    criterion.eval()
    fixed = dict(m2=criterion.m, m3=0.0) if kind == "arc" else dict(m2=0.0, m3=criterion.m)
    assert_matches_reference(criterion(x, labels), reference.combined_margin_loss(x, criterion.weight, labels,
                                                                                 s=64.0, **fixed), name="eval loss")
    assert f"kind='{kind}'" in repr(criterion)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpu_only])])
@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_plus_hands_the_draws_out_by_target_cosine(kind, device):
    # ElasticFace+: the same draws as ElasticFace's, the largest margin to the counted row farthest from its
    # centre (lowest cos θ_y), the smallest to the nearest; ignored rows take no part. Written out in fp64
    # from the normalised rows, with a tie (two equal rows: the first in row order takes the larger draw).
    n, dim, num_classes, m, std = 40, 16, 50, (0.5 if kind == "arc" else 0.35), 0.05
    criterion = arcface_ext.ElasticFaceLoss(num_classes, dim, m=m, std=std, kind=kind, plus=True,
                                            generator=torch.Generator(device).manual_seed(3), dtype=torch.float64,
                                            device=device)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[[5, 17]] = -1
    x[9], labels[9] = x[7], labels[7]
    drawn = (torch.randn(n, generator=torch.Generator(device).manual_seed(3), dtype=torch.float64, device=device)
             * std + m).cpu()
    w = criterion.weight.detach().cpu()
    cosine = (F.normalize(x) * F.normalize(w)[labels.clamp_min(0)]).sum(1)
    rows = sorted((i for i in range(n) if labels[i] >= 0), key=lambda i: (cosine[i].item(), i))
    draws = sorted((drawn[i].item() for i in range(n) if labels[i] >= 0), reverse=True)
    expected = torch.full((n,), m, dtype=torch.float64)
    expected[rows] = torch.tensor(draws, dtype=torch.float64)
    assert expected[rows[0]] == max(draws) and expected[rows[-1]] == min(draws) and expected[7] >= expected[9]

    loss = criterion(x.to(device), labels.to(device)).cpu()
    margins = dict(m2=expected, m3=0.0) if kind == "arc" else dict(m2=0.0, m3=expected)
    assert_matches_reference(loss, reference.combined_margin_loss(x, w, labels, s=64.0, **margins), name="loss")
    criterion.generator.manual_seed(3)
    got = criterion.row_margins(x.to(device), labels.to(device))[0 if kind == "arc" else 1]
    assert torch.equal(got.cpu(), expected)
    # The plain ElasticFace's draws, for the same seed, are the same numbers in row order.
    plain = arcface_ext.ElasticFaceLoss(num_classes, dim, m=m, std=std, kind=kind, device=device,
                                        generator=torch.Generator(device).manual_seed(3), dtype=torch.float64)
    assert torch.equal(plain.row_margins(x.to(device), labels.to(device))[0 if kind == "arc" else 1].cpu(), drawn)
    # Eval mode and std = 0: the mean margin everywhere, as without plus.
    criterion.eval()
    assert criterion.row_margins(x.to(device), labels.to(device)) == (criterion.m2, criterion.m3)
    assert f"kind='{kind}', m={m}, plus=True, std=0.05" in repr(criterion)
    assert "plus" not in repr(plain)


def test_elasticface_plus_with_partial_fc_a_nan_row_and_no_n_by_c_tensor():
    n, dim, num_classes = 64, 4, 50
    x, labels = torch.randn(n, dim, requires_grad=True), torch.randint(0, num_classes, (n,))
    criterion = arcface_ext.ElasticFaceLoss(num_classes, dim, plus=True, sample_rate=0.5)
    with largest_tensor_made() as largest:
        criterion(x, labels).backward()
    assert largest[0] <= max(n * dim, num_classes * dim) < n * num_classes
    # A non-finite row: its own loss is NaN, the others' margins are still the counted rows' draws.
    bad = x.detach().clone()
    bad[3] = math.nan
    margins = criterion.row_margins(bad, labels)[0]
    assert torch.isfinite(margins).all()
    per_row = arcface_ext.ElasticFaceLoss(num_classes, dim, plus=True, reduction="none")(bad, labels)
    assert per_row[3].isnan() and torch.isfinite(per_row[torch.arange(n) != 3]).all()
    # Sharded centres on one process: the same margins (tests/test_distributed.py: over gloo ranks).
    sharded = arcface_ext.ShardedElasticFaceLoss(num_classes, dim, plus=True,
                                                 generator=torch.Generator().manual_seed(4))
    replicated = arcface_ext.ElasticFaceLoss(num_classes, dim, plus=True, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sharded.weight.copy_(replicated.weight)
    assert torch.equal(sharded.row_margins(x.detach(), labels)[0], replicated.row_margins(x.detach(), labels)[0])
    with pytest.raises(TypeError, match="plus must be a bool"):
        arcface_ext.ElasticFaceLoss(num_classes, dim, plus=1)
    # The standard deviations of ElasticFace's configurations: 0.05, and 0.0175 / 0.02 for Arc+ / Cos+.
    assert [arcface_ext.ElasticFaceLoss(10, 4, kind=kind, plus=plus).std
            for plus in (False, True) for kind in ("arc", "cos")] == [0.05, 0.05, 0.0175, 0.02]


@pytest.mark.parametrize("plus", [False, True])
def test_elasticface_compiles_over_batch_sizes_that_change(plus):
    # The last batch of an epoch is smaller: torch.compile then traces the batch size as a symbol,
    # and randn(..., generator=None) with a symbolic size fails to trace (torch 2.13).
    criterion = arcface_ext.ElasticFaceLoss(12, 8, plus=plus, dtype=torch.float64)
    compiled = torch.compile(criterion, backend="eager")
    for n in (6, 4, 9):
        x, labels = torch.randn(n, 8, dtype=torch.float64), torch.randint(0, 12, (n,))
        torch.manual_seed(n)
        got = compiled(x, labels)
        torch.manual_seed(n)
        assert_matches_reference(got, criterion(x, labels), name=f"loss at N = {n}")


def test_per_row_margin_modules_with_partial_fc_and_the_reference():
    # The sampled path and the reference path carry the per-row margins too: the same sample (same
    # seed) gives the same loss either way.
    x = torch.randn(16, 8, dtype=torch.float64) * 10
    labels = torch.randint(0, 60, (16,))
    results = []
    for use_reference in (False, True):
        torch.manual_seed(9)
        criterion = arcface_ext.AdaFaceLoss(60, 8, sample_rate=0.3, use_reference=use_reference, dtype=torch.float64)
        results.append((criterion(x, labels), criterion.last_sampled_classes))
    assert torch.equal(results[0][1], results[1][1]) and len(results[0][1]) == 18
    torch.testing.assert_close(results[0][0], results[1][0], rtol=TOLERANCES[torch.float64][1], atol=1e-10)


def test_module_argument_checks():
    with pytest.raises(ValueError, match="AdaFace's h must be a finite real number > 0, got 0"):
        arcface_ext.AdaFaceLoss(10, 4, h=0)
    with pytest.raises(ValueError, match="AdaFace's h must be a finite real number"):
        arcface_ext.AdaFaceLoss(10, 4, h=math.inf)
    for m in ("0.4", 22.9, -0.1):     # a string from a config, degrees, negative
        with pytest.raises(ValueError, match=r"AdaFace's m must be a finite real number in \[0, 1\]"):
            arcface_ext.AdaFaceLoss(10, 4, m=m)
    with pytest.raises(ValueError, match="l_a must be a finite real number, got '10'"):
        arcface_ext.MagFaceLoss(10, 4, l_a="10")
    with pytest.raises(ValueError, match=r"u_m <= pi/2"):
        arcface_ext.MagFaceLoss(10, 4, u_m=45.0)
    with pytest.raises(ValueError, match="m2 .* must lie in"):
        arcface_ext.ElasticFaceLoss(10, 4, m=28.6)
    with pytest.raises(ValueError, match="kind must be 'arc' or 'cos'"):
        arcface_ext.ElasticFaceLoss(10, 4, kind="sphere")
    for std in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="std must be a finite real number >= 0"):
            arcface_ext.ElasticFaceLoss(10, 4, std=std)
    for build in (arcface_ext.ElasticFaceLoss, arcface_ext.ShardedElasticFaceLoss):  # a seed for the generator
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got 3 \(for a seed"):
            build(10, 4, generator=3)
    x, w, labels = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1])
    for call in (lambda: arcface_ext.combined_margin_loss(x, w, labels, return_target_cosine=1),
                 lambda: reference.combined_margin_loss(x, w, labels, return_target_cosine=1),
                 lambda: arcface_ext.ArcFaceLoss(5, 4)(x, labels, return_target_cosine=1),
                 lambda: arcface_ext.ShardedCombinedMarginLoss(5, 4)(x, labels, return_target_cosine=1)):
        with pytest.raises(TypeError, match="return_target_cosine must be a bool"):
            call()


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_adaface_statistics_follow_the_counted_rows_only(sharded):
    # Rows labelled ignore_index (padding) count for nothing, in the running statistics too; with
    # fewer than two counted rows there is no spread to follow, and the statistics stay.
    module = arcface_ext.ShardedAdaFaceLoss if sharded else arcface_ext.AdaFaceLoss
    criterion = module(10, 8, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 8, generator=generator, dtype=torch.float64)
         * torch.tensor([5.0, 30, 0, 0, 12, 0], dtype=torch.float64)[:, None])
    labels = torch.tensor([1, 2, -1, -1, 3, -1])
    criterion(x, labels)
    # (AdaFace clips the norms to [0.001, 100]: a row of 30·N(0, 1)⁸ passes 100 now and then, which made
    # this test fail on some draws of the unseeded generator)
    norms = x.norm(dim=1).clamp(0.001, 100)[labels != -1]
    torch.testing.assert_close(criterion.batch_mean, 0.99 * 20 + 0.01 * norms.mean())
    torch.testing.assert_close(criterion.batch_std, 0.99 * 100 + 0.01 * norms.std())
    before = {k: v.clone() for k, v in criterion.state_dict().items() if k.startswith("batch_")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom <= 0" from a batch of one
        for batch in ([-1, -1, -1], [4, -1, -1], [7]):
            criterion(torch.randn(len(batch), 8, dtype=torch.float64), torch.tensor(batch))
    assert all(torch.equal(criterion.state_dict()[k], v) for k, v in before.items())


def test_adaface_reset_parameters_restores_the_statistics():
    # Deferred initialisation (meta device, to_empty, reset_parameters) leaves no garbage statistics.
    criterion = arcface_ext.AdaFaceLoss(10, 4, device="meta").to_empty(device="cpu")
    criterion.reset_parameters()
    assert float(criterion.batch_mean) == 20.0 and float(criterion.batch_std) == 100.0
    assert 0.005 < float(criterion.weight.detach().std()) < 0.02


# ---- differentiable margins and MagFace --------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("m1, lambda_", [(1.0, 0.0), (3.0, 2.0)], ids=["arc", "sphere-lambda"])
def test_gradcheck_through_the_margins(reduction, m1, lambda_):
    x, w, labels, m2, m3 = make_case(7, 5, 11, seed=8, near_centre=(0,), ignored=(2,))
    inputs = (x.requires_grad_(True), w.requires_grad_(True), m2.requires_grad_(True), m3.requires_grad_(True))
    for loss_fn in (arcface_ext.combined_margin_loss, reference.combined_margin_loss):
        assert torch.autograd.gradcheck(
            lambda a, b, p, q: loss_fn(a, b, labels, s=8.0, m1=m1, m2=p, m3=q, lambda_=lambda_, reduction=reduction),
            inputs)


def test_margin_gradients_match_the_reference_and_only_the_margins_may_need_them():
    x, w, labels, m2, m3 = make_case(29, 16, 97, seed=9, near_centre=(0, 1), ignored=(4,))
    m2[:2] = -0.3
    grads = []
    for loss_fn in (arcface_ext.combined_margin_loss, reference.combined_margin_loss):
        p, q = m2.clone().requires_grad_(True), m3.clone().requires_grad_(True)
        loss_fn(x, w, labels, s=30.0, m2=p, m3=q).backward()  # x and w need no gradient
        grads.append((p.grad, q.grad))
    for name, ours, expected in zip(("m2", "m3"), grads[0], grads[1]):
        assert_matches_reference(ours, expected, name=f"grad {name}")
    assert grads[0][0][4] == 0 and grads[0][1][4] == 0  # the ignored row
    assert grads[0][0][:2].abs().max() == 0  # θ + m2 < 0 there: ψ is held, no gradient


def magface_loss(embeddings, weight, labels, *, s, l_a, u_a, l_m, u_m, lambda_g, easy_margin=False):
    """MagFace's loss as its paper and code write it (MagLinear, MagLoss) on the full logits: the
    margin and the regulariser both from the clipped norm, with gradients; ``easy_margin`` as
    MagLinear's (no margin where cos θ <= 0)."""
    a = embeddings.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cosine = (F.normalize(embeddings) @ F.normalize(weight).t()).clamp(-1, 1)
    sine = torch.sqrt((1.0 - cosine ** 2).clamp_min(1e-30))
    cos_theta_m = cosine * torch.cos(m) - sine * torch.sin(m)
    if easy_margin:
        cos_theta_m = torch.where(cosine > 0, cos_theta_m, cosine)
    else:
        cos_theta_m = torch.where(cosine > torch.cos(math.pi - m), cos_theta_m, cosine - torch.sin(math.pi - m) * m)
    one_hot = F.one_hot(labels, weight.shape[0]).to(cosine.dtype)
    logits = s * (one_hot * cos_theta_m + (1 - one_hot) * cosine)
    g = a / u_a ** 2 + 1 / a
    return F.cross_entropy(logits, labels) + lambda_g * g.mean()


def test_magface_matches_its_formula_with_gradients_through_the_norm():
    torch.manual_seed(0)
    n, dim, num_classes = 24, 16, 40
    criterion = arcface_ext.MagFaceLoss(num_classes, dim, dtype=torch.float64)
    x = torch.randn(n, dim, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(5, 130, n, dtype=torch.float64)[:, None]  # both clips
    labels = torch.randint(0, num_classes, (n,))
    xs = x.clone().requires_grad_(True)
    loss = criterion(xs, labels)
    loss.backward()
    xe, we = x.clone().requires_grad_(True), criterion.weight.detach().clone().requires_grad_(True)
    expected = magface_loss(xe, we, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)
    expected.backward()
    # The norms and margins are formed in fp64 for fp64 embeddings: fp64's tolerance.
    assert_matches_reference(loss.detach(), expected.detach(), name="loss")
    assert_matches_reference(xs.grad, xe.grad, name="grad_embeddings")
    assert_matches_reference(criterion.weight.grad, we.grad, name="grad_weight")
    assert "lambda_g=35.0" in repr(criterion)
    with pytest.raises(ValueError, match="MagFace needs"):
        arcface_ext.MagFaceLoss(10, 4, l_a=20, u_a=10)


def test_magface_easy_margin_matches_magfaces_training_code():
    torch.manual_seed(1)
    n, dim, num_classes = 32, 8, 12
    criterion = arcface_ext.MagFaceLoss(num_classes, dim, easy_margin=True, dtype=torch.float64)
    x = torch.randn(n, dim, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(5, 130, n, dtype=torch.float64)[:, None]
    labels = torch.randint(0, num_classes, (n,))
    cosine = (F.normalize(x) @ F.normalize(criterion.weight.detach()).t()).gather(1, labels[:, None])
    assert 5 <= int((cosine <= 0).sum()) <= n - 5  # both sides of cos θ = 0
    xs = x.clone().requires_grad_(True)
    loss = criterion(xs, labels)
    loss.backward()
    xe, we = x.clone().requires_grad_(True), criterion.weight.detach().clone().requires_grad_(True)
    expected = magface_loss(xe, we, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                            easy_margin=True)
    expected.backward()
    assert_matches_reference(loss.detach(), expected.detach(), name="loss")
    assert_matches_reference(xs.grad, xe.grad, name="grad_embeddings")
    assert_matches_reference(criterion.weight.grad, we.grad, name="grad_weight")
    default = magface_loss(x, criterion.weight.detach(), labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8,
                           lambda_g=35.0)
    assert abs(float(default) - loss.item()) > 0.1  # the rows with cos θ <= 0 lose their margin
    assert "easy_margin=True" in repr(criterion)
    with pytest.raises(TypeError, match="easy_margin must be a bool"):
        arcface_ext.MagFaceLoss(10, 4, easy_margin=1)


def test_sharded_loss_refuses_differentiable_margins():
    class Differentiable(arcface_ext.ShardedCombinedMarginLoss):
        def row_margins(self, embeddings, labels):
            return embeddings.norm(dim=1) / 100, 0.0

    criterion = Differentiable(10, 4)
    with pytest.raises(ValueError, match="differentiable per-row margins .* not supported with sharded"):
        criterion(torch.randn(3, 4, requires_grad=True), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("loss_fn", [arcface_ext.combined_margin_loss, reference.combined_margin_loss],
                         ids=["fused", "reference"])
def test_per_row_margins_under_autocast(loss_fn):
    # Under bf16 autocast the cosines come out of the matrix product in bf16 while the per-row margin
    # tensors keep the target logit in fp32 (the reference once failed here: a scatter of fp32 into
    # bf16 logits). Both run, with losses within bf16's tolerance of the fp32 ones, and gradients.
    x, w, labels, m2, m3 = make_case(24, 32, 50, seed=61)
    x, w, m2, m3 = x.float(), w.float(), m2.float(), m3.float()
    expected = reference.combined_margin_loss(x, w, labels, m2=m2, m3=m3, reduction="none")
    xs = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(xs, w, labels, m2=m2, m3=m3, reduction="none")
    loss.sum().backward()
    assert loss.dtype == torch.float32 and bool(xs.grad.isfinite().all())
    # s = 64 times a bf16 cosine (the reference rounds its cosines to bf16 under autocast): up to
    # ~0.25 a logit.
    assert_close_report(loss, expected, atol=0.5, rtol=0.0, name="loss")


def test_the_documented_departures_from_the_authors_code_hold():
    """What the README and docstrings say about the authors' own code, pinned: a target more than
    π - m from its centre continues linearly, c - m·sin m, where ElasticFace's code takes cos(θ + m)
    and AdaFace's holds θ + m at π - 1e-3; MagFace's margin applies where cos θ < 0 too, where its
    training code (MagLinear's easy_margin=True) leaves the target logit at s·cos θ."""
    dim, num_classes = 8, 5
    w = torch.eye(num_classes, dim, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # Row 0: θ ≈ 3.0 from its centre (past π - 0.5); row 1: θ ≈ 2.0 (cos θ < 0, θ + m < π).
    x = torch.zeros(2, dim, dtype=torch.float64)
    x[0, 0], x[0, 2] = math.cos(3.0), math.sin(3.0)
    x[1, 1], x[1, 3] = math.cos(2.0), math.sin(2.0)

    def target_logit(criterion, embeddings):
        with torch.no_grad():
            criterion.weight.copy_(w)
            rows = criterion(embeddings, labels)
        cosine = F.normalize(embeddings) @ w.t()
        others = torch.logsumexp(64.0 * cosine.scatter(1, labels[:, None], -math.inf), dim=1)
        # loss_i = log(e^{t} + e^{others}) - t  =>  t = others - log(e^{loss} - 1)
        return others - torch.log(torch.expm1(rows))

    elastic = arcface_ext.ElasticFaceLoss(num_classes, dim, std=0.0, reduction="none", dtype=torch.float64)
    logit = float(target_logit(elastic, x)[0]) / 64.0
    assert logit == pytest.approx(math.cos(3.0) - 0.5 * math.sin(0.5), abs=1e-9)
    assert abs(logit - math.cos(3.5)) > 0.25  # ElasticFace's code: cos(θ + m), turned back up

    magface = arcface_ext.MagFaceLoss(num_classes, dim, reduction="none", lambda_g=0.0, dtype=torch.float64)
    logit = float(target_logit(magface, x * 10.0)[1]) / 64.0  # norm l_a: margin l_m = 0.45
    assert logit == pytest.approx(math.cos(2.45), abs=1e-9)
    assert abs(logit - math.cos(2.0)) > 0.3  # MagFace's training code: no margin where cos θ <= 0
