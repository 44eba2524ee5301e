"""The README's "Coming from another library" mappings, checked in fp64 against those libraries' losses
written out here from their documented semantics (none of them is needed to run this): the same weights,
inputs and labels give the same loss and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import arcface_ext
from conftest import assert_matches_reference, largest_tensor_made

N, D, C = 48, 16, 23


def inputs(centres, *, seed=0, away=8):
    """fp64 embeddings and labels; the first ``away`` rows point nearly opposite their class centre, so that
    θ + m passes π there and the rules past it are compared too."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, centres.shape[0], (N,), generator=g)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    x[:away] = -F.normalize(centres[labels[:away]]) + 0.05 * torch.randn(away, D, dtype=torch.float64, generator=g)
    return x, labels


def margin_softmax(cosine, labels, target_logit, s, **cross_entropy):
    """Cross-entropy of s·cos θ_j with the target's logit replaced."""
    logits = cosine.scatter(1, labels[:, None], target_logit[:, None]) * s
    return F.cross_entropy(logits, labels, **cross_entropy)


def pml_angular(x, W, labels, *, margin_degrees=28.6, scale=64.0, sub_centers=1):
    """pytorch-metric-learning's ArcFaceLoss / SubCenterArcFaceLoss: W is (D, C·k) (class c's sub-centres are
    columns c·k ... c·k + k - 1, a class's cosine the largest of theirs), the margin in degrees, past
    θ = π - m the target logit cos θ - m·sin m, and the mean over the rows (its default MeanReducer)."""
    m = math.radians(margin_degrees)
    cosine = (F.normalize(x) @ F.normalize(W, dim=0)).view(len(x), -1, sub_centers).amax(2)
    theta = cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1, 1).acos()
    target = torch.where(theta <= math.pi - m, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))
    return margin_softmax(cosine, labels, target, scale)


def arc_margin_product_loss(x, centres, labels, *, s=30.0, m=0.5, easy_margin=False, **cross_entropy):
    """ronghuaiyang/arcface-pytorch's ArcMarginProduct (its weight, ``centres`` here, (C, D)) followed by
    nn.CrossEntropyLoss(**cross_entropy):
    target logit s·cos(θ + m); with easy_margin, s·cos θ where cos θ <= 0; without, s·(cos θ - m·sin m) where
    cos θ <= cos(π - m)."""
    cosine = F.normalize(x) @ F.normalize(centres).t()
    index = labels.clamp_min(0)[:, None]      # (rows that cross_entropy ignores are labelled -1)
    c = cosine.gather(1, index).squeeze(1)
    shifted = torch.cos(c.clamp(-1, 1).acos() + m)
    if easy_margin:
        target = torch.where(c > 0, shifted, c)
    else:
        target = torch.where(c > math.cos(math.pi - m), shifted, c - m * math.sin(m))
    return F.cross_entropy(cosine.scatter(1, index, target[:, None]) * s, labels, **cross_entropy)


def compare(theirs, ours, x, parameters, ours_weight):
    """Loss and gradients (embeddings, and the weight as ``ours_weight`` maps theirs onto ours)."""
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = theirs(xt), ours(xo)
    expected.backward()
    actual.backward()
    assert_matches_reference(actual.detach(), expected.detach(), name="loss")
    assert_matches_reference(xo.grad, xt.grad, name="grad_embeddings")
    assert_matches_reference(parameters[1].grad, ours_weight(parameters[0].grad), name="grad_weight")


@pytest.mark.parametrize("margin_degrees,scale,sub_centers", [(28.6, 64.0, 1), (50.0, 30.0, 1), (28.6, 64.0, 3)])
def test_pytorch_metric_learnings_arcface_and_subcenter_arcface(margin_degrees, scale, sub_centers):
    W = torch.randn(D, C * sub_centers, dtype=torch.float64, requires_grad=True)   # theirs: (D, C·k)
    if sub_centers == 1:
        ours = arcface_ext.ArcFaceLoss(C, D, s=scale, m=math.radians(margin_degrees), dtype=torch.float64)
    else:
        ours = arcface_ext.SubCenterMarginLoss(C, D, k=sub_centers, s=scale, m2=math.radians(margin_degrees),
                                               dtype=torch.float64)
    ours.load_state_dict({"weight": W.detach().t()})        # their state dict's "W", transposed
    x, labels = inputs(W.detach().t()[::sub_centers])
    theirs = lambda x: pml_angular(x, W, labels, margin_degrees=margin_degrees, scale=scale,  # noqa: E731
                                   sub_centers=sub_centers)
    compare(theirs, lambda x: ours(x, labels), x, (W, ours.weight), lambda g: g.t())


def test_pytorch_metric_learnings_cosface():
    W = torch.randn(D, C, dtype=torch.float64, requires_grad=True)
    ours = arcface_ext.CosFaceLoss(C, D, s=64.0, m=0.35, dtype=torch.float64)
    ours.load_state_dict({"weight": W.detach().t()})
    x, labels = inputs(W.detach().t())

    def theirs(x):
        cosine = F.normalize(x) @ F.normalize(W, dim=0)
        return margin_softmax(cosine, labels, cosine.gather(1, labels[:, None]).squeeze(1) - 0.35, 64.0)
    compare(theirs, lambda x: ours(x, labels), x, (W, ours.weight), lambda g: g.t())


def test_pytorch_metric_learnings_sphereface_needs_embeddings_of_one_norm():
    """Its SphereFaceLoss scales the logits by the embedding's own norm (times `scale`, 1 by default): ours
    by s, the same for embeddings whose norm is s, in the loss and the centres' gradient (the embeddings'
    gradient differs by the part along the embedding that its norm's gradient adds)."""
    W = torch.randn(D, C, dtype=torch.float64)
    ours = arcface_ext.SphereFaceLoss(C, D, m=4, s=10.0, dtype=torch.float64)
    ours.load_state_dict({"weight": W.t()})
    x, labels = inputs(W.t())
    x = 10.0 * F.normalize(x)
    cosine = F.normalize(x) @ F.normalize(W, dim=0)
    theta = cosine.gather(1, labels[:, None]).squeeze(1).acos()
    k = torch.floor(4 * theta / math.pi)
    expected = margin_softmax(cosine, labels, (-1) ** k * torch.cos(4 * theta) - 2 * k, 10.0)
    assert_matches_reference(ours(x, labels).detach(), expected, name="loss")


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arc_margin_product(easy_margin):
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)   # theirs: (C, D), as ours
    ours = arcface_ext.ArcFaceLoss(C, D, s=30.0, m=0.5, easy_margin=easy_margin, dtype=torch.float64)
    ours.load_state_dict({"weight": weight.detach()})       # their state dict as it is
    x, labels = inputs(weight.detach())
    cosine = (F.normalize(x) @ F.normalize(weight.detach()).t()).gather(1, labels[:, None])
    assert 8 <= int((cosine <= 0).sum()) <= N - 8           # both sides of cos θ = 0
    theirs = lambda x: arc_margin_product_loss(x, weight, labels, easy_margin=easy_margin)  # noqa: E731
    compare(theirs, lambda x: ours(x, labels), x, (weight, ours.weight), lambda g: g)
    other = arc_margin_product_loss(x, weight.detach(), labels, easy_margin=not easy_margin)
    assert abs(float(other) - ours(x, labels).item()) > 0.1   # the option changes the loss here


def test_easy_margin_is_checked_and_shown():
    assert "easy_margin=True" in repr(arcface_ext.ArcFaceLoss(10, 4, easy_margin=True))
    assert "easy_margin" not in repr(arcface_ext.ArcFaceLoss(10, 4))
    with pytest.raises(TypeError, match="easy_margin must be a bool"):
        arcface_ext.ArcFaceLoss(10, 4, easy_margin=1)
    with pytest.raises(ValueError, match="easy_margin"):
        arcface_ext.ArcFaceLoss(10, 4, easy_margin=True, interclass_filtering_threshold=0.3)
    x, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -1, 10])
    with pytest.raises(ValueError, match=r"labels\[5\] = 10 is out of range"):
        arcface_ext.ArcFaceLoss(10, 4, easy_margin=True)(x, labels)


def test_easy_margin_with_class_sampling_and_16_bit_inputs():
    torch.manual_seed(0)
    criterion = arcface_ext.ArcFaceLoss(50, 8, easy_margin=True, sample_rate=0.3)
    x, labels = torch.randn(16, 8), torch.randint(0, 50, (16,))
    assert torch.isfinite(criterion(x, labels))
    criterion.eval()
    full = criterion(x, labels)
    assert_matches_reference(criterion.bfloat16()(x.bfloat16(), labels).double(), full.double(),
                             dtype=torch.bfloat16, name="bf16 loss")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropys_class_weights_and_ignore_index(reduction):
    """nn.CrossEntropyLoss(weight=w, ignore_index=-1, reduction=...) after a margin head is ours with
    reduction="none", the rows weighted by w[label] and divided by the counted rows' weights for "mean"."""
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    class_weights = torch.rand(C, dtype=torch.float64) + 0.5
    ours = arcface_ext.ArcFaceLoss(C, D, s=30.0, m=0.5, reduction="none", ignore_index=-1, dtype=torch.float64)
    ours.load_state_dict({"weight": weight.detach()})
    x, labels = inputs(weight.detach())
    labels[[3, 17]] = -1

    row_weights = torch.where(labels >= 0, class_weights[labels.clamp_min(0)], 0.0)

    def weighted(x):
        rows = ours(x, labels) * row_weights      # (ignored rows' losses are 0)
        # "none" is summed here for a scalar to differentiate: their weighted rows, summed alike.
        return rows.sum() / row_weights.sum() if reduction == "mean" else rows.sum()

    def theirs(x):
        return arc_margin_product_loss(x, weight, labels, weight=class_weights, ignore_index=-1,
                                       reduction=reduction).sum()
    compare(theirs, weighted, x, (weight, ours.weight), lambda g: g)
    rows = ours(x, labels).detach()
    expected = arc_margin_product_loss(x, weight.detach(), labels, ignore_index=-1, reduction="none")
    assert_matches_reference(rows, expected, name="rows")


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)], ids=["arcface", "cosface"])
def test_arcface_torchs_combined_margin_loss(margins):
    """arcface_torch's CombinedMarginLoss(s, m1, m2, m3) after PartialFC_V2's normalised product, with its
    cross-entropy's mean: the margin moves the target logit but takes no part in the gradient (the
    product's gradient passes as if the logit were s·cos θ), and past θ + m2 = π it keeps cos(θ + m2). Ours
    with margin_grad="straight_through" is the same up to that point; past it ours continues linearly."""
    m1, m2, m3 = margins
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    ours = arcface_ext.CombinedMarginLoss(C, D, s=64.0, m1=m1, m2=m2, m3=m3, margin_grad="straight_through",
                                          dtype=torch.float64)
    ours.load_state_dict({"weight": weight.detach()})       # PartialFC_V2's state dict, on one process
    x, labels = inputs(weight.detach(), away=0)

    def theirs(x):
        cosine = F.normalize(x) @ F.normalize(weight).t()
        c = cosine.gather(1, labels[:, None]).squeeze(1)
        return margin_softmax(cosine, labels, c + (torch.cos(c.acos() + m2) - m3 - c).detach(), 64.0)
    compare(theirs, lambda x: ours(x, labels), x, (weight, ours.weight), lambda g: g)


def smoothed_margin_loss(x, centres, labels, target_of, *, s, epsilon, **cross_entropy):
    """nn.CrossEntropyLoss(label_smoothing=epsilon) on s·cos θ_j with the target's logit s·target_of(c_y)."""
    cosine = F.normalize(x) @ F.normalize(centres).t()
    index = labels.clamp_min(0)[:, None]
    target = target_of(cosine.gather(1, index).squeeze(1))
    return F.cross_entropy(cosine.scatter(1, index, target[:, None]) * s, labels, label_smoothing=epsilon,
                           **cross_entropy)


def arc(m, straight_through=False, easy_margin=False):
    def target_of(c):
        shifted = torch.cos(c.clamp(-1, 1).acos() + m)
        psi = torch.where(c > 0 if easy_margin else c > math.cos(math.pi - m), shifted,
                          c if easy_margin else c - m * math.sin(m))
        return c + (psi - c).detach() if straight_through else psi
    return target_of


SMOOTHED = {
    "arcface": (dict(m=0.5), arc(0.5)),
    "arcface_straight_through": (dict(m=0.5, margin_grad="straight_through"), arc(0.5, straight_through=True)),
    "arcface_easy_margin": (dict(m=0.5, easy_margin=True), arc(0.5, easy_margin=True)),
    "cosface": (dict(m1=1.0, m2=0.0, m3=0.35), lambda c: c - 0.35),
    "combined": (dict(m1=1.0, m2=0.3, m3=0.2), lambda c: arc(0.3)(c) - 0.2),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", SMOOTHED)
def test_cross_entropys_label_smoothing(kind, reduction):
    """label_smoothing=ε is nn.CrossEntropyLoss(label_smoothing=ε) on the margin logits, ignored rows
    (ignore_index) included."""
    options, target_of = SMOOTHED[kind]
    module = arcface_ext.ArcFaceLoss if "m" in options else arcface_ext.CombinedMarginLoss
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    ours = module(C, D, s=30.0, label_smoothing=0.1, reduction=reduction, dtype=torch.float64, **options)
    ours.load_state_dict({"weight": weight.detach()})
    x, labels = inputs(weight.detach())
    labels[[3, 17]] = -1
    theirs = lambda x: smoothed_margin_loss(x, weight, labels, target_of, s=30.0, epsilon=0.1,  # noqa: E731
                                            ignore_index=-1, reduction=reduction).sum()
    compare(theirs, lambda x: ours(x, labels).sum(), x, (weight, ours.weight), lambda g: g)
    if reduction == "none":
        assert ours(x, labels)[[3, 17]].eq(0).all()
    assert "label_smoothing=0.1" in repr(ours)


def test_label_smoothing_with_per_row_margins_and_class_sampling():
    """Per-row margin tensors (MagFace's, differentiable: their gradient reaches the norm) and partial FC's
    sample (the mean over the sampled classes, as a CrossEntropyLoss over the sampled logits has it)."""
    torch.manual_seed(3)
    num_classes = 200
    weight = torch.randn(num_classes, D, dtype=torch.float64, requires_grad=True)
    ours = arcface_ext.MagFaceLoss(num_classes, D, label_smoothing=0.2, lambda_g=0.0, sample_rate=0.3,
                                   dtype=torch.float64)
    ours.load_state_dict({"weight": weight.detach()})
    x, labels = inputs(weight.detach())
    x = x * torch.linspace(5, 130, N, dtype=torch.float64)[:, None] / x.norm(dim=1, keepdim=True)
    xo = x.clone().requires_grad_()
    loss = ours(xo, labels)
    loss.backward()
    classes = ours.last_sampled_classes
    assert len(classes) == 60
    assert repr(ours).endswith("lambda_g=0.0, sample_rate=0.3, label_smoothing=0.2)")   # (MagFace's showed neither)
    xt = x.clone().requires_grad_()
    margins = 0.45 + (0.8 - 0.45) / 100 * (xt.norm(dim=1).clamp(10, 110) - 10)

    def target_of(c):
        angle = c.clamp(-1, 1).acos() + margins
        return torch.where(angle <= math.pi, torch.cos(angle), c - margins * torch.sin(margins))
    expected = smoothed_margin_loss(xt, weight[classes], torch.searchsorted(classes, labels), target_of, s=64.0,
                                    epsilon=0.2)
    expected.backward()
    assert_matches_reference(loss.detach(), expected.detach(), name="loss")
    assert_matches_reference(xo.grad, xt.grad, name="grad_embeddings")
    assert_matches_reference(ours.weight.grad, weight.grad, name="grad_weight")


def test_label_smoothing_with_16_bit_inputs():
    torch.manual_seed(4)
    weight = torch.randn(C, D, dtype=torch.bfloat16)
    x, labels = inputs(weight.double())
    x = x.bfloat16()
    ours = arcface_ext.ArcFaceLoss(C, D, s=30.0, m=0.5, label_smoothing=0.1, dtype=torch.bfloat16)
    ours.load_state_dict({"weight": weight})
    loss = ours(x, labels)
    assert loss.dtype == torch.float32
    expected = smoothed_margin_loss(x.double(), weight.double(), labels, arc(0.5), s=30.0, epsilon=0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_label_smoothing_is_checked():
    with pytest.raises(ValueError, match=r"label_smoothing must be a finite real number in \[0, 1\]"):
        arcface_ext.ArcFaceLoss(10, 4, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing does not go with interclass_filtering_threshold"):
        arcface_ext.ArcFaceLoss(10, 4, label_smoothing=0.1, interclass_filtering_threshold=0.3)
    with pytest.raises(ValueError, match="label_smoothing does not go with CurricularFace"):
        arcface_ext.CurricularFaceLoss(10, 4, label_smoothing=0.1)
    assert "label_smoothing" not in repr(arcface_ext.ArcFaceLoss(10, 4))


@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(easy_margin=True),
                                     dict(label_smoothing=0.1, easy_margin=True, sample_rate=0.5)],
                         ids=["label_smoothing", "easy_margin", "both_sampled"])
def test_label_smoothing_and_easy_margin_make_no_n_by_c_tensor(options):
    """Every tensor the forward and backward passes make, recorded: none as large as the N x C cosines (the
    largest are the N x D embeddings' and the C x D centres'), as the reference's product is."""
    n, c, d = 64, 50, 4
    x, labels = torch.randn(n, d, requires_grad=True), torch.randint(0, c, (n,))
    for use_reference in (False, True):
        with largest_tensor_made() as largest:
            arcface_ext.ArcFaceLoss(c, d, use_reference=use_reference, **options)(x, labels).backward()
        if use_reference:
            assert largest[0] >= n * c     # the recording sees the matrix where there is one
        else:
            assert largest[0] <= max(n * d, c * d) < n * c


# Module, its options, the option its constructor's m sets, and a margin to start from and one to move to.
SCHEDULED = {
    "arcface": (arcface_ext.ArcFaceLoss, {}, "m2", 0.0, 0.2),
    "arcface_easy_margin": (arcface_ext.ArcFaceLoss, dict(easy_margin=True), "m2", 0.0, 0.2),
    "cosface": (arcface_ext.CosFaceLoss, {}, "m3", 0.0, 0.2),
    "sphereface": (arcface_ext.SphereFaceLoss, {}, "m1", 2, 4),
    "curricularface": (arcface_ext.CurricularFaceLoss, {}, "m2", 0.0, 0.2),
    "elasticface_arc": (arcface_ext.ElasticFaceLoss, dict(kind="arc", std=0.0), "m2", 0.0, 0.2),
    "elasticface_cos": (arcface_ext.ElasticFaceLoss, dict(kind="cos", std=0.0), "m3", 0.0, 0.2),
    "adaface": (arcface_ext.AdaFaceLoss, {}, "m", 0.0, 0.2),  # AdaFace's own m (was set unchecked: nan, 7)
}


@pytest.mark.parametrize("kind", SCHEDULED)
def test_a_margin_set_between_steps_takes_effect(kind):
    """WeSpeaker's and 3D-Speaker's margin schedulers raise the margin from 0 to its final value during
    training (their heads' update(margin)): here criterion.m = value, which gives the loss and gradients of
    the module built with that margin, and is checked as the constructor checks it. m was an attribute that
    nothing read: the module kept its margin, silently (CurricularFace's repr showed the new one)."""
    cls, options, option, start, end = SCHEDULED[kind]
    weight = torch.randn(C, D, dtype=torch.float64)
    x, labels = inputs(weight)
    built = cls(C, D, s=32.0, m=end, dtype=torch.float64, **options)
    built.load_state_dict({**built.state_dict(), "weight": weight})
    scheduled = cls(C, D, s=32.0, m=start, dtype=torch.float64, **options)
    scheduled.load_state_dict(built.state_dict())
    scheduled.m = end
    assert (scheduled.m, getattr(scheduled, option)) == (end, end), (scheduled.m, getattr(scheduled, option))
    assert repr(scheduled) == repr(built)
    compare(lambda x: built(x, labels), lambda x: scheduled(x, labels), x, (built.weight, scheduled.weight),
            lambda g: g)
    bad = 0.0 if option == "m1" else 30.0          # m1 > 0; an angle in degrees, a cosine margin past 1
    with pytest.raises(ValueError, match=f"{option} .*must"):
        scheduled.m = bad
    assert scheduled.m == end


@pytest.mark.parametrize("build, hint", [
    (lambda: arcface_ext.CombinedMarginLoss(C, D), "set m1, m2 or m3"),
    (lambda: arcface_ext.SubCenterMarginLoss(C, D, k=3, s=32.0, m2=0.2), "set m1, m2 or m3"),
    (lambda: arcface_ext.MagFaceLoss(C, D), "its margin runs from l_m to u_m"),
    (lambda: arcface_ext.ShardedCombinedMarginLoss(C, D), "set m1, m2 or m3"),
    (lambda: arcface_ext.ShardedSubCenterMarginLoss(C, D, k=2), "set m1, m2 or m3"),
], ids=["combined", "subcenter", "magface", "sharded", "sharded_subcenter"])
def test_a_margin_set_on_a_module_without_one_is_refused(build, hint):
    """The modules built from m1, m2, m3 (SubCenterMarginLoss is WeSpeaker's sub-center head, whose
    margin its scheduler moves) or MagFace's l_m, u_m have no single m: criterion.m = 0.2 landed in an
    attribute that nothing read, and the schedule trained at the first margin, silently."""
    criterion = build()
    margins = (criterion.m1, criterion.m2, criterion.m3)
    with pytest.raises(AttributeError, match=f"{type(criterion).__name__} has no single margin m to set: {hint}"):
        criterion.m = 0.2
    assert not hasattr(criterion, "m") and (criterion.m1, criterion.m2, criterion.m3) == margins
