"""Partial FC's inter-class filtering and CurricularFace on the chunked path (arcface_ext.chunked):
against the whole-matrix reference in fp64 (values and gradients, every margin, chunks, sub-centres),
against the two methods written out here as their papers and code describe them, gradcheck, and the
modules (CurricularFace's running t, filtering with class sampling, the refusals)."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import arcface_ext
from arcface_ext import reference
from arcface_ext.chunked import chunked_margin_loss


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as trainer_fixtures.one_thread gives the trainer's tests (conftest's
    _torch_threads_as_before puts the count back after each test). The chunked path is PyTorch ops, none of
    it depends on the thread count, and the fused op's calls here (11 classes at most: one block of classes)
    take the same path on any number of threads. The tensors are tiny; where the cores are shared, torch's
    spare OpenMP threads only wait: on two cores busy with another run this file took 76 s on torch's default
    two threads and 7.7 s on one (test_gradcheck 11.5 s and test_per_row_margins_gradcheck 12.1 s, 0.2 s each)."""
    torch.set_num_threads(1)


MARGINS = {
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(m1=1.35, m2=0.0, m3=0.0),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
}


def inputs(n=13, c=11, k=1, d=16, seed=0, dtype=torch.float64, near=5):
    """Random rows, with ``near`` other classes' centres put close to some embeddings, so that both
    filtering (cosines past 0.4) and easy and hard negatives occur."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c * k, d, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    for i in range(near):
        other = (int(labels[i]) + 1 + i) % c
        w[other * k] = x[i] + 0.4 * torch.randn(d, generator=g, dtype=dtype)
    # A few rows close to their own class, so that not every negative is hard.
    for i in range(near, min(n, near + 4)):
        w[int(labels[i]) * k] = x[i] + 0.2 * torch.randn(d, generator=g, dtype=dtype)
    return x.requires_grad_(True), w.requires_grad_(True), labels


def cosines(x, w):
    return (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)


def filtered_as_insightface(x, w, labels, threshold, s=64.0, m=0.5):
    """insightface's CombinedMarginLoss (ArcFace) with inter-class filtering, as its code describes it:
    the clamped cosines of the other classes past the threshold are multiplied by 0 (the target's
    column is kept), then the angular margin on the target, then cross-entropy of s times them."""
    cos = cosines(x, w)
    with torch.no_grad():
        keep = 1.0 - (cos > threshold).to(cos.dtype)
        keep[torch.arange(len(labels)), labels] = 1.0
    cos = cos * keep
    target = cos[torch.arange(len(labels)), labels]
    margined = torch.cos(torch.acos(target) + m)
    logits = cos.scatter(1, labels[:, None], margined[:, None]) * s
    return F.cross_entropy(logits, labels)


def curricular_as_its_paper(x, w, labels, t, s=64.0, m=0.5):
    """CurricularFace's logits as its paper writes them: target s·cos(θ + m); another class j gets
    s·c_j·(t + c_j) when c_j > cos(θ_y + m), else s·c_j."""
    cos = cosines(x, w)
    target = cos[torch.arange(len(labels)), labels]
    margined = torch.cos(torch.acos(target) + m)
    hard = (cos > margined[:, None]).detach()
    cos = torch.where(hard, cos * (t + cos), cos)
    logits = cos.scatter(1, labels[:, None], margined[:, None]) * s
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("kind", ["filtering", "curricular"])
@pytest.mark.parametrize("k,chunk", [(1, None), (1, 3), (3, 2)])
def test_matches_the_whole_matrix_in_fp64(margin, margin_grad, kind, k, chunk):
    x, w, labels = inputs(k=k, seed=zlib.crc32(f"{margin} {margin_grad} {kind} {k}".encode()) % 1000)
    labels[7] = -1  # an ignored row: no loss, no gradient
    options = dict(s=30.0, margin_grad=margin_grad, k=k, **MARGINS[margin])
    options.update(interclass_filtering_threshold=0.4) if kind == "filtering" else options.update(curricular_t=0.3)
    ours = chunked_margin_loss(x, w, labels, class_chunk=chunk, **options)
    gx, gw = torch.autograd.grad(ours, (x, w))
    expected = reference.chunked_margin_loss(x, w, labels, **options)
    ex, ew = torch.autograd.grad(expected, (x, w))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-11)
    assert gx[7].abs().max() == 0
    # The options change the loss (the inputs reach the filtered and the hard regions).
    plain = reference.chunked_margin_loss(x, w, labels, s=30.0, margin_grad=margin_grad, k=k, **MARGINS[margin])
    assert abs(ours.item() - plain.item()) > 1e-3


def test_filtering_is_insightfaces():
    x, w, labels = inputs(seed=21)
    assert (cosines(x, w).scatter(1, labels[:, None], -1.0) > 0.4).sum() >= 3
    ours = arcface_ext.chunked_margin_loss(x, w, labels, interclass_filtering_threshold=0.4, class_chunk=4)
    theirs = filtered_as_insightface(x, w, labels, 0.4)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for ours_grad, their_grad in zip(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(theirs, (x, w))):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-9, atol=1e-12)
    # A filtered class gets no gradient from the row, and its logit counts as e^0 in the softmax.
    g = torch.Generator().manual_seed(23)
    one = torch.randn(1, 16, dtype=torch.float64, generator=g)
    near = one + 0.3 * torch.randn(4, 16, dtype=torch.float64, generator=g)
    far = -one + 0.3 * torch.randn(6, 16, dtype=torch.float64, generator=g)
    w1 = torch.cat([one, near, far]).requires_grad_(True)
    cos = cosines(one, w1)[0].detach()
    assert (cos[1:5] > 0.4).all() and (cos[5:] < 0).all()
    loss = chunked_margin_loss(one, w1, torch.tensor([0]), s=10.0, m2=0.0, interclass_filtering_threshold=0.4,
                               class_chunk=3)
    expected = math.log(math.exp(10.0 * cos[0]) + 4 + sum(math.exp(10.0 * c) for c in cos[5:].tolist())) - 10.0 * cos[0]
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    (gw,) = torch.autograd.grad(loss, w1)
    assert gw[1:5].abs().max() == 0 and (gw[5:].abs().sum(dim=1) > 0).all()


def test_curricular_is_its_papers():
    x, w, labels = inputs(seed=22)
    t = torch.tensor(0.25, dtype=torch.float64)
    ours = arcface_ext.chunked_margin_loss(x, w, labels, curricular_t=t, class_chunk=5)
    theirs = curricular_as_its_paper(x, w, labels, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for ours_grad, their_grad in zip(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(theirs, (x, w))):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-9, atol=1e-12)
    # No hard negative (every target well inside its margin): the plain combined margin loss.
    x_easy, labels_easy = x[:11], torch.arange(11)
    w_easy = x_easy.detach().clone()
    cos = cosines(x_easy, w_easy)
    margined = torch.cos(torch.acos(cos[torch.arange(11), labels_easy]) + 0.5)
    assert not (cos.scatter(1, labels_easy[:, None], -1.0) > margined[:, None]).any()
    torch.testing.assert_close(chunked_margin_loss(x_easy, w_easy, labels_easy, curricular_t=0.7),
                               reference.combined_margin_loss(x_easy, w_easy, labels_easy), rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, w, labels = inputs(n=5, c=4, k=2, d=6, seed=3, near=2)
    for options in (dict(interclass_filtering_threshold=0.3), dict(curricular_t=0.4)):
        f = lambda x, w: chunked_margin_loss(x, w, labels, k=2, s=8.0, class_chunk=3, reduction="sum",  # noqa: E731
                                             **options)
        assert torch.autograd.gradcheck(f, (x, w))


def row_margins(n=13, *, seed=0):
    """Per-row (m2, m3) leaves, float64: AdaFace's range for m2 (negative ones too, a zero row: the CosFace
    branch), m3 in [-0.1, 0.3]."""
    g = torch.Generator().manual_seed(seed)
    m2 = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 - 0.4
    m2[3] = 0.0
    m3 = torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.1
    return m2.requires_grad_(True), m3.requires_grad_(True)


@pytest.mark.parametrize("family", [dict(m1=1.0), dict(m1=1.35, lambda_=0.5)], ids=["arc", "sphere-lambda"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("kind", ["plain", "filtering", "curricular"])
@pytest.mark.parametrize("k,chunk", [(1, None), (1, 3), (3, 2)])
def test_per_row_margins_match_the_whole_matrix_in_fp64(family, margin_grad, kind, k, chunk):
    # m2 and m3 one a row: only the targets' logits change; the margins get the op's gradient.
    x, w, labels = inputs(k=k, seed=zlib.crc32(f"{family} {margin_grad} {kind} {k}".encode()) % 1000)
    labels[7] = -1
    m2, m3 = row_margins(seed=k)
    options = dict(s=30.0, margin_grad=margin_grad, k=k, m2=m2, m3=m3, **family)
    if kind != "plain":
        options.update(interclass_filtering_threshold=0.4) if kind == "filtering" else options.update(curricular_t=0.3)
    ours = chunked_margin_loss(x, w, labels, class_chunk=chunk, **options)
    expected = reference.chunked_margin_loss(x, w, labels, **options)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    for name, a, e in zip(("x", "w", "m2", "m3"), torch.autograd.grad(ours, (x, w, m2, m3)),
                          torch.autograd.grad(expected, (x, w, m2, m3))):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"grad {name}: {m}")
        assert a[7].abs().max() == 0 if name != "w" else a.abs().max() > 0, name


def test_per_row_margins_gradcheck():
    # 3-D embeddings: gradcheck computes two losses per input entry, 49 here (88 with 6-D ones). The case has, as
    # the 6-D one had, every class a target, in both class chunks (3 and 1) and on either sub-centre; non-target
    # cosines filtered and kept at 0.3, hard and easy ones for CurricularFace; both of SphereFace's branches
    # k = 0, 1 at m1 = 2; the angular margin within [0, π] and the zero-margin row; and no cosine within 0.03 of
    # one of those branch points (the 6-D case had one within 0.004).
    x, w, labels = inputs(n=5, c=4, k=2, d=3, seed=9, near=2)
    m2 = torch.tensor([0.3, -0.2, 0.5, 0.0, 0.4], dtype=torch.float64, requires_grad=True)
    m3 = torch.tensor([0.1, 0.0, -0.05, 0.2, 0.15], dtype=torch.float64, requires_grad=True)
    for options in (dict(), dict(interclass_filtering_threshold=0.3), dict(curricular_t=0.4), dict(m1=2.0)):
        f = lambda x, w, m2, m3: chunked_margin_loss(x, w, labels, k=2, s=8.0, m2=m2, m3=m3,  # noqa: E731
                                                     class_chunk=3, reduction="sum", **options)
        assert torch.autograd.gradcheck(f, (x, w, m2, m3))


def test_per_row_margins_checks(monkeypatch):
    # The op's checks and messages: shape, dtype, device (with the other arguments), values (with the labels: a
    # CPU tensor's whatever check_labels says; unchecked where the check is a sync, a NaN row instead).
    x, w, labels = inputs(seed=8)
    m2, m3 = (m.detach() for m in row_margins())
    with pytest.raises(ValueError, match=r"m3 as a tensor holds one margin per row: shape \(N,\) = \(13,\)"):
        chunked_margin_loss(x, w, labels, m3=m3[:5])
    with pytest.raises(TypeError, match="m2 as a tensor must be floating point, got torch.int64"):
        chunked_margin_loss(x, w, labels, m2=torch.zeros(13, dtype=torch.long))
    m2[6] = float("nan")
    for check_labels in (True, False):
        with pytest.raises(ValueError, match=r"^arcface_ext: the per-row margin m2 must be finite \(row_margins "
                                             r"column 0 holds a NaN or an infinity\)$"):
            chunked_margin_loss(x, w, labels, m2=m2, m3=m3, check_labels=check_labels)
    monkeypatch.setattr(arcface_ext._checks, "ALWAYS_CHECKED_DEVICES", frozenset())
    rows = chunked_margin_loss(x, w, labels, m2=m2, m3=m3, check_labels=False, reduction="none")
    assert rows[6].isnan() and rows[torch.arange(13) != 6].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(k=3), dict(interclass_filtering_threshold=0.4),
                                     dict(curricular_t=0.3)], ids=["plain", "k3", "filtering", "curricular"])
def test_scalar_margins_are_the_shard_passes_bit_for_bit(dtype, options):
    # Per-row margins took nothing from numbers' results: chunked_margin_loss with numbers is exactly its two
    # passes with those numbers (the route it took before per-row margins, and the sharded losses' still).
    from arcface_ext.chunked import gemm_dtype, shard_backward, shard_forward

    k = options.get("k", 1)
    x, w, labels = inputs(k=k, seed=9, dtype=dtype)
    labels[2] = -1
    grad_rows = torch.rand(13, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    margins = dict(s=30.0, m1=1.0, m2=0.3, m3=0.2, lambda_=0.0)
    rows, cosine = chunked_margin_loss(x, w, labels, reduction="none", return_target_cosine=True, class_chunk=4,
                                       **margins, **options)
    gx, gw = torch.autograd.grad(rows, (x, w), grad_rows.to(rows.dtype))
    t = options.get("curricular_t")
    passes = dict(k=k, **margins, straight_through=False, ignore_index=-1, chunk=4,
                  threshold=options.get("interclass_filtering_threshold", 0.0),
                  curricular_t=None if t is None else torch.tensor(t, dtype=torch.float64),
                  gemm_dtype=gemm_dtype(x, w))
    expected_rows, lse, expected_cosine = shard_forward(x.detach(), w.detach(), labels, **passes)
    ex, ew = shard_backward(grad_rows.to(rows.dtype), x.detach(), w.detach(), labels, lse, **passes)
    for name, a, e in (("rows", rows, expected_rows), ("x", gx, ex), ("w", gw, ew),
                       ("cosine", cosine[labels != -1], expected_cosine[labels != -1])):
        assert torch.equal(a, e), f"{name}: {float((a - e).abs().max())} apart"


def test_curricular_module_moves_t_as_curricularface():
    torch.manual_seed(0)
    module = arcface_ext.CurricularFaceLoss(11, 16, s=30.0)
    assert module.t.item() == 0 and module.t.dtype == torch.float32
    x, _, labels = inputs(seed=4, dtype=torch.float32)
    labels[2] = -1
    counted = labels != -1
    target = cosines(x, module.weight)[torch.arange(13), labels.clamp_min(0)][counted]
    loss, target_cos = module(x, labels, return_target_cosine=True)
    t = 0.01 * target.mean()
    torch.testing.assert_close(module.t, t.detach())
    # The call used the moved t, as CurricularFace updates it before its logits.
    expected = reference.chunked_margin_loss(x, module.weight, labels, s=30.0, curricular_t=t.detach())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert module.weight.grad is not None
    # Again: t = 0.99 t + 0.01 mean.
    module(x, labels)
    torch.testing.assert_close(module.t, (0.99 * t + 0.01 * target.mean()).detach())
    before = module.t.clone()
    # Eval mode, a batch of ignored rows, and a refused call leave t as it was.
    module.eval()
    module(x, labels)
    module.train()
    module(x, torch.full_like(labels, -1))
    with pytest.raises(ValueError, match="labels must lie"):
        module(x, labels + 11)
    assert torch.equal(module.t, before)
    # It stays fp32 under a cast, travels in the state dict, and reset_parameters zeroes it.
    assert module.to(torch.bfloat16).t.dtype == torch.float32
    assert "t" in module.state_dict()
    module.reset_parameters()
    assert module.t.item() == 0


def test_modules_with_sampling_reference_and_refusals():
    x, w, labels = inputs(c=40, seed=5, dtype=torch.float32)
    module = arcface_ext.CombinedMarginLoss(40, 16, s=30.0, interclass_filtering_threshold=0.4, sample_rate=0.5)
    with torch.no_grad():
        module.weight.copy_(w)
    torch.manual_seed(1)
    loss = module(x, labels)
    index = module.last_sampled_classes
    positions = torch.searchsorted(index, labels)
    expected = reference.chunked_margin_loss(x, w[index], positions, s=30.0, interclass_filtering_threshold=0.4)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    unsampled = torch.ones(40, dtype=torch.bool)
    unsampled[index] = False
    assert module.weight.grad[unsampled].abs().max() == 0
    module.eval()
    full = module(x, labels)
    module.use_reference = True
    torch.testing.assert_close(module(x, labels), full)
    torch.testing.assert_close(full, reference.chunked_margin_loss(x, w, labels, s=30.0,
                                                                   interclass_filtering_threshold=0.4))
    curricular = arcface_ext.CurricularFaceLoss(40, 16, sample_rate=0.5, use_reference=True)
    curricular(x, labels).backward()
    assert curricular.t.item() != 0

    with pytest.raises(ValueError, match="interclass_filtering_threshold must be a number in"):
        arcface_ext.CombinedMarginLoss(40, 16, interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="does not go with AdaFaceLoss's per-row margins"):
        arcface_ext.AdaFaceLoss(40, 16, interclass_filtering_threshold=0.4)
    with pytest.raises(ValueError, match="does not go with CurricularFaceLoss's hard negatives"):
        arcface_ext.CurricularFaceLoss(40, 16, interclass_filtering_threshold=0.4)
    with pytest.raises(ValueError, match="momentum must be"):
        arcface_ext.CurricularFaceLoss(40, 16, momentum=0)
    with pytest.raises(ValueError, match="do not go together"):
        chunked_margin_loss(x, w, labels, interclass_filtering_threshold=0.4, curricular_t=0.1)
    with pytest.raises(ValueError, match="curricular_t must be"):
        chunked_margin_loss(x, w, labels, curricular_t=torch.zeros(2))
    with pytest.raises(ValueError, match="curricular_t must be"):
        chunked_margin_loss(x, w, labels, curricular_t=math.nan)
    sub = arcface_ext.SubCenterMarginLoss(40, 16, k=2, interclass_filtering_threshold=0.4)
    assert "interclass_filtering_threshold=0.4" in repr(sub)
    sub(x, labels).backward()


def test_unchecked_bad_labels_empty_batches_and_compile(monkeypatch):
    x, w, labels = inputs(seed=6)
    bad = labels.clone()
    bad[1] = 50
    # CPU labels are checked whatever check_labels says, as the fused op checks them (no device sync).
    for options in (dict(interclass_filtering_threshold=0.4), dict(curricular_t=0.2)):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
            chunked_margin_loss(x, w, bad, check_labels=False, **options)
    # Unchecked, as on a GPU (the emulator's way of running the CPU as one).
    monkeypatch.setattr(arcface_ext._checks, "ALWAYS_CHECKED_DEVICES", frozenset())
    for options in (dict(interclass_filtering_threshold=0.4), dict(curricular_t=0.2)):
        rows = chunked_margin_loss(x, w, bad, reduction="none", check_labels=False, **options)
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
        torch.testing.assert_close(rows, reference.chunked_margin_loss(x, w, bad, reduction="none",
                                                                       check_labels=False, **options),
                                   equal_nan=True)
        empty = chunked_margin_loss(x[:0], w, labels[:0], **options)
        assert empty.item() == 0
    xf, wf = x.detach().float(), w.detach().float()
    compiled = torch.compile(lambda x, w, y, t: chunked_margin_loss(x, w, y, curricular_t=t, class_chunk=4),
                             fullgraph=True)
    t = torch.tensor(0.3)
    torch.testing.assert_close(compiled(xf, wf, labels, t), chunked_margin_loss(xf, wf, labels, curricular_t=t))


@pytest.mark.parametrize("k", [1, 2])
def test_centres_shorter_than_the_norms_eps(k):
    # The normalisation is a rank-1 scaling here: a centre shorter than eps (divided by eps alone)
    # gets the gradient of w / max(|w|, eps) all the same, as autograd has it on the whole matrix.
    x, w, labels = inputs(n=6, c=5, k=k, seed=31, near=2)
    tiny = w.detach().clone()
    tiny[1] *= 1e-14
    tiny[3 * k] = 0.0
    tiny.requires_grad_(True)
    for options in (dict(interclass_filtering_threshold=0.4), dict(curricular_t=0.2), {}):
        ours = torch.autograd.grad(chunked_margin_loss(x, tiny, labels, k=k, class_chunk=2, **options), (x, tiny))
        theirs = torch.autograd.grad(reference.chunked_margin_loss(x, tiny, labels, k=k, **options), (x, tiny))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def combine_shards(x, w, labels, bounds, grad_rows, **options):
    """chunked.shard_forward / shard_backward on each shard [a, b) of w, combined as the sharded loss
    combines them: (loss per row, target cosine, d/dx, d/dw of Σ grad_rows·loss)."""
    from arcface_ext.chunked import shard_backward, shard_forward

    c = w.shape[0]
    outputs = [shard_forward(x, w[a:b], labels, class_offset=a, num_classes=c, **options) for a, b in bounds]
    counted = labels != -1
    lse = torch.logsumexp(torch.stack([lse for _, lse, _ in outputs]), dim=0)
    target_logit, cosine = torch.zeros_like(lse), torch.zeros_like(lse)
    for (a, b), (loss_s, lse_s, cos_s) in zip(bounds, outputs):
        owned = counted & (labels >= a) & (labels < b)
        target_logit += torch.where(owned, lse_s - loss_s, 0.0)
        cosine += torch.where(owned, cos_s, 0.0)
    loss = torch.where(counted, lse - target_logit, 0.0)
    grads = [shard_backward(grad_rows, x, w[a:b], labels, lse, class_offset=a, num_classes=c, **options)
             for a, b in bounds]
    return loss, cosine, sum(gx for gx, _ in grads), torch.cat([gw for _, gw in grads])


@pytest.mark.parametrize("bounds", [[(0, 11)], [(0, 5), (5, 11)], [(0, 1), (1, 8), (8, 11)]],
                         ids=["1-shard", "2-shards", "3-uneven"])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_shards_of_the_chunked_path_combine_to_the_whole_loss(bounds, threshold):
    # What ShardedCombinedMarginLoss runs on each rank with interclass_filtering_threshold: the fused
    # op's shard semantics (a row whose target another shard holds counts without a target column).
    x, w, labels = inputs(seed=41)
    labels[4] = -1
    grad_rows = torch.rand(13, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    options = dict(s=30.0, m1=1.0, m2=0.3, m3=0.2, lambda_=0.0, straight_through=False, ignore_index=-1)
    loss, cosine, gx, gw = combine_shards(x.detach(), w.detach(), labels, bounds, grad_rows, threshold=threshold,
                                          chunk=2, **options)
    rows, expected_cos = reference.chunked_margin_loss(x, w, labels, s=30.0, m1=1.0, m2=0.3, m3=0.2,
                                                       interclass_filtering_threshold=threshold, reduction="none",
                                                       return_target_cosine=True)
    ex, ew = torch.autograd.grad((rows * grad_rows).sum(), (x, w))
    torch.testing.assert_close(loss, rows.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cosine[labels != -1], expected_cos[labels != -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-12)
    if threshold == 0 and arcface_ext.extension_available():
        # Each shard's own outputs are the fused op's.
        from arcface_ext import ops
        from arcface_ext.chunked import shard_forward

        for a, b in bounds:
            ours = shard_forward(x.detach(), w.detach()[a:b], labels, class_offset=a, num_classes=11, **options)
            theirs = ops.margin_softmax_forward(x.detach(), w.detach()[a:b], labels, 30.0, 1.0, 0.3, 0.2, 0.0, -1,
                                                False, 1 << 20, a, 11)
            for mine, op in zip(ours, theirs):
                torch.testing.assert_close(mine, op, rtol=1e-12, atol=1e-12)


def test_sharded_module_with_filtering_on_one_process():
    if not arcface_ext.extension_available():
        pytest.skip("the sharded module needs the compiled op")
    x, w, labels = inputs(seed=42)
    sharded = arcface_ext.ShardedCombinedMarginLoss(11, 16, s=30.0, interclass_filtering_threshold=0.4,
                                                    dtype=torch.float64)
    assert "interclass_filtering_threshold=0.4" in repr(sharded)
    with torch.no_grad():
        sharded.weight.copy_(w)
    xs = x.detach().clone().requires_grad_(True)
    loss = sharded(xs, labels)
    loss.backward()
    expected = reference.chunked_margin_loss(x, w, labels, s=30.0, interclass_filtering_threshold=0.4)
    ex, ew = torch.autograd.grad(expected, (x, w))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(xs.grad, ex)
    torch.testing.assert_close(sharded.weight.grad, ew)
    with pytest.raises(ValueError, match="labels must lie"):
        sharded(xs, labels + 11)
    with pytest.raises(ValueError, match="does not go with ShardedAdaFaceLoss's per-row margins"):
        arcface_ext.ShardedAdaFaceLoss(11, 16, interclass_filtering_threshold=0.4)


def test_non_finite_inputs_double_backward_and_the_meta_device():
    # A NaN centre is not filtered away: the loss is NaN, as without filtering (not a finite loss with
    # NaN gradients).
    x, w, labels = inputs(seed=51)
    w = w.detach().clone()
    w[10] = float("nan")
    for options in (dict(interclass_filtering_threshold=0.3), dict(curricular_t=0.2), {}):
        assert torch.isnan(chunked_margin_loss(x, w, labels, **options))
    # Double backward raises when asked for, rather than returning a gradient without a graph.
    x, w, labels = inputs(seed=52)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(chunked_margin_loss(x, w, labels, curricular_t=0.1), x, create_graph=True)
    # The meta device: shapes only, as the fused op's fake kernels give them.
    xm, wm = torch.empty(4, 8, device="meta"), torch.empty(6, 8, device="meta")
    ym = torch.zeros(4, dtype=torch.long, device="meta")
    assert chunked_margin_loss(xm, wm, ym, interclass_filtering_threshold=0.3).shape == ()
    assert arcface_ext.CurricularFaceLoss(6, 8, device="meta")(xm, ym).device.type == "meta"


def test_a_non_finite_batch_leaves_curricular_t_as_it_was():
    module = arcface_ext.CurricularFaceLoss(11, 16)
    x, _, labels = inputs(seed=53, dtype=torch.float32)
    module(x, labels)
    before = module.t.clone()
    bad = x.detach().clone()
    bad[0] = float("inf")
    assert torch.isnan(module(bad, labels))
    assert torch.equal(module.t, before)
    assert torch.isfinite(module(x, labels))
    # fp64 modules keep an fp64 t; 16-bit casts leave it fp32.
    assert arcface_ext.CurricularFaceLoss(11, 16, dtype=torch.float64).t.dtype == torch.float64
    assert module.double().t.dtype == torch.float64 and module.half().t.dtype == torch.float64


def test_sharded_filtering_under_autocast_is_the_replicated_one():
    # Both round their products' operands to bf16 a chunk at a time; the rest, the loss included, fp32.
    if not arcface_ext.extension_available():
        pytest.skip("the sharded module needs the compiled op")
    x, w, labels = inputs(seed=54, dtype=torch.float32)
    outputs = []
    for cls in (arcface_ext.ShardedCombinedMarginLoss, arcface_ext.CombinedMarginLoss):
        module = cls(11, 16, interclass_filtering_threshold=0.3)
        with torch.no_grad():
            module.weight.copy_(w)
        xs = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(xs, labels)
        loss.backward()
        assert loss.dtype == xs.grad.dtype == module.weight.grad.dtype == torch.float32
        outputs.append((loss.detach(), xs.grad, module.weight.grad))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b)
    rounded = reference.chunked_margin_loss(x.detach().bfloat16().double(), w.detach().bfloat16().double(), labels,
                                            interclass_filtering_threshold=0.3)
    torch.testing.assert_close(outputs[0][0].double(), rounded, rtol=1e-6, atol=1e-5)


def test_sharded_curricularface_on_one_process_is_the_replicated_one():
    if not arcface_ext.extension_available():
        pytest.skip("the sharded module needs the compiled op")
    x, w, labels = inputs(seed=55)
    labels[2] = -1
    sharded = arcface_ext.ShardedCurricularFaceLoss(11, 16, s=30.0, dtype=torch.float64)
    replicated = arcface_ext.CurricularFaceLoss(11, 16, s=30.0, dtype=torch.float64)
    with torch.no_grad():
        sharded.weight.copy_(w)
        replicated.weight.copy_(w)
    for step in range(2):
        outputs = []
        for module in (sharded, replicated):
            module.weight.grad = None
            xs = (x.detach() * (step + 1)).requires_grad_(True)
            loss, cos = module(xs, labels, return_target_cosine=True)
            loss.backward()
            outputs.append((loss.detach(), cos, xs.grad, module.weight.grad, module.t.clone()))
        for a, b in zip(*outputs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert sharded.t.item() != 0
    with pytest.raises(ValueError, match="does not go with ShardedCurricularFaceLoss's hard negatives"):
        arcface_ext.ShardedCurricularFaceLoss(11, 16, interclass_filtering_threshold=0.4)


# 16-bit operands: under autocast, or with 16-bit inputs, the products take the embeddings and each
# chunk of centres rounded to 16 bits (the gradient block too in the backward pass), accumulate in fp32,
# and everything else stays fp32. The ground truth: the fp64 reference on the rounded inputs.
SIXTEEN = {"bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = {"subcenters": dict(k=3), "filtering": dict(interclass_filtering_threshold=0.4),
         "curricular": dict(curricular_t=0.3), "plain": dict()}


def relative_error(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("precision", SIXTEEN)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["autocast", "16-bit inputs"])
def test_16_bit_operands_are_the_rounded_inputs_in_fp32(precision, kind, how):
    dtype = SIXTEEN[precision]
    options = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, **KINDS[kind])
    x, w, labels = inputs(n=40, c=50, k=options.get("k", 1), d=64, seed=zlib.crc32(f"{precision}{kind}".encode()),
                          dtype=torch.float32)
    labels[3] = -1
    if how == "autocast":
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            ours = chunked_margin_loss(x, w, labels, reduction="none", class_chunk=7, **options)
    else:
        x, w = x.detach().to(dtype).requires_grad_(True), w.detach().to(dtype).requires_grad_(True)
        ours = chunked_margin_loss(x, w, labels, reduction="none", class_chunk=7, **options)
    ours.sum().backward()
    assert ours.dtype == torch.float32 and x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    xr = x.detach().to(dtype).double().requires_grad_(True)
    wr = w.detach().to(dtype).double().requires_grad_(True)
    expected = reference.chunked_margin_loss(xr, wr, labels, reduction="none", **options)
    expected.sum().backward()
    # The loss: the rounded inputs' to fp32 accumulation (s·cosine errors of ~1e-5), where the
    # unrounded inputs' differs by the rounding (~1e-2 at s = 64 in bf16).
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=5e-5)
    if how == "autocast" and dtype == torch.bfloat16:
        unrounded = chunked_margin_loss(x.detach(), w.detach(), labels, reduction="none", **options)
        assert (unrounded.double() - expected).abs().max() > 20 * (ours.double() - expected).abs().max()
    # The gradients: through a gradient block rounded to 16 bits.
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert relative_error(x.grad, xr.grad) < tolerance
    assert relative_error(w.grad, wr.grad) < tolerance
    assert torch.equal(x.grad[3], torch.zeros_like(x.grad[3]))


def test_16_bit_operands_a_chunk_at_a_time(monkeypatch):
    # Every product takes 16-bit operands, and no 16-bit copy of the whole weight is made.
    from torch.utils._python_dispatch import TorchDispatchMode
    from arcface_ext import chunked

    x, w, labels = inputs(n=20, c=60, d=32, seed=3, dtype=torch.float32)
    operands = []

    def recording_mm(a, b):
        operands.append((a.dtype, b.dtype))
        return real_mm(a, b)

    real_mm = chunked._mm
    monkeypatch.setattr(chunked, "_mm", recording_mm)
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                    largest.append(t.numel())
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Sizes():
        loss = chunked_margin_loss(x, w, labels, interclass_filtering_threshold=0.4, class_chunk=8)
        loss.backward()
    # Forward: 8 chunks of cosines; backward: 8 chunks of three products (the cosines again, then the
    # two gradients).
    assert operands == [(torch.bfloat16, torch.bfloat16)] * 32
    assert max(largest) < w.numel() / 2
    # fp32 and fp64 stay as they were, under autocast too (autocast leaves fp64 products alone).
    operands.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_margin_loss(x.double(), w.double(), labels, class_chunk=30)
    assert operands == [(torch.float64, torch.float64)] * 2


def test_curricular_t_moves_by_the_rounded_target_cosines():
    x, w, labels = inputs(n=30, c=40, d=64, seed=8, dtype=torch.float32)
    module = arcface_ext.CurricularFaceLoss(40, 64, momentum=0.5)
    with torch.no_grad():
        module.weight.copy_(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x, labels).backward()
    expected = cosines(x.detach().bfloat16().double(), w.detach().bfloat16().double())[torch.arange(30), labels]
    assert math.isclose(float(module.t), 0.5 * float(expected.mean()), rel_tol=1e-5)


def test_16_bit_operands_compile():
    x, w, labels = inputs(n=16, c=20, d=32, seed=9, dtype=torch.float32)

    def loss(x, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_margin_loss(x, w, y, interclass_filtering_threshold=0.4, class_chunk=6)

    # (inductor's fused elementwise kernels may compute from a rounded value's fp32 original, as its
    # emulate_precision_casts is off by default: the two agree to the rounding, not to fp32)
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(x.detach(), w.detach(), labels), loss(x.detach(), w.detach(), labels),
                               rtol=2e-3, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", SIXTEEN)
def test_16_bit_operands_on_the_gpu(precision):
    # The products go to torch.mm(..., out_dtype=torch.float32) where torch has it (2.8 and later): 16-bit
    # tensor-core GEMMs with fp32 results. The same semantics as on the CPU.
    from torch.utils._python_dispatch import TorchDispatchMode

    dtype = SIXTEEN[precision]
    x, w, labels = inputs(n=64, c=300, k=3, d=128, seed=10, dtype=torch.float32)
    x, w = x.detach().cuda().requires_grad_(True), w.detach().cuda().requires_grad_(True)
    labels = labels.cuda()
    seen = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cuda", dtype=dtype), Ops():
        ours = chunked_margin_loss(x, w, labels, k=3, reduction="none", class_chunk=40)
        ours.sum().backward()
    if "dtype" in torch.ops.aten.mm.overloads():
        assert "aten.mm.dtype" in seen
    xr = x.detach().to(dtype).double().requires_grad_(True)
    wr = w.detach().to(dtype).double().requires_grad_(True)
    expected = reference.chunked_margin_loss(xr, wr, labels, k=3, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=5e-5)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert relative_error(x.grad, xr.grad) < tolerance and relative_error(w.grad, wr.grad) < tolerance


@pytest.mark.parametrize("precision", SIXTEEN)
def test_16_bit_gradient_block_leaves_the_loss_scale_out(precision):
    # A loss scaler's 2^16 times s / |w_j| (centres of norm ~0.2) would pass fp16's 65504: each row's
    # upstream gradient is applied after the products, as in the fused kernels. A zero centre's block
    # saturates instead of overflowing.
    dtype = SIXTEEN[precision]
    x, w, labels = inputs(n=128, c=50, d=64, seed=11, dtype=torch.float32)
    w = (0.2 * torch.nn.functional.normalize(w.detach(), dim=1))
    w[7] = 0.0
    labels[labels == 7] = 8
    x, w = x.detach().requires_grad_(True), w.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = chunked_margin_loss(x, w, labels, curricular_t=0.0, class_chunk=16)
    (loss * 2.0 ** 16).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    xr = x.detach().to(dtype).double().requires_grad_(True)
    wr = w.detach().to(dtype).double().requires_grad_(True)
    reference.chunked_margin_loss(xr, wr, labels, curricular_t=0.0).backward()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert relative_error(x.grad / 2.0 ** 16, xr.grad) < tolerance
    others = torch.arange(50) != 7  # (the zero centre's own gradient saturates in fp16)
    assert relative_error(w.grad[others] / 2.0 ** 16, wr.grad[others]) < tolerance


def test_16_bit_centres_sharded_are_not_copied_whole(monkeypatch):
    # The sharded chunked path takes bf16 centres as they are: no fp32 copy of the shard or of its
    # gradient, and the replicated module's numbers.
    if not arcface_ext.extension_available():
        pytest.skip("the sharded module needs the compiled op")
    from torch.utils._python_dispatch import TorchDispatchMode
    from arcface_ext import chunked

    monkeypatch.setattr(chunked, "BLOCK_VALUES", 32 * 50)  # blocks of 50 classes

    x, w, labels = inputs(n=24, c=400, d=32, seed=12, dtype=torch.float32)
    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    largest.append(t.numel())
            return out

    outputs = []
    for cls in (arcface_ext.ShardedCombinedMarginLoss, arcface_ext.CombinedMarginLoss):
        module = cls(400, 32, interclass_filtering_threshold=0.3, dtype=torch.bfloat16)
        with torch.no_grad():
            module.weight.copy_(w)
        xs = x.detach().bfloat16().requires_grad_(True)
        largest.clear()
        with Sizes():
            loss = module(xs, labels)
            loss.backward()
        assert max(largest) < w.numel() / 2, cls.__name__
        outputs.append((loss.detach(), xs.grad, module.weight.grad))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b)


def test_the_references_empty_batch():
    x, w = torch.zeros(0, 16, dtype=torch.float64), torch.randn(33, 16, dtype=torch.float64)
    labels = torch.zeros(0, dtype=torch.long)
    for k in (1, 3):
        assert float(reference.chunked_margin_loss(x, w, labels, k=k)) == 0.0
        assert float(chunked_margin_loss(x, w, labels, k=k)) == 0.0
