"""The sub-center margin loss (arcface_ext.subcenter) against the whole-matrix computation written
out here with autograd, in fp64: values, gradients, chunking, ignored rows, K = 1 against the
reference, and its argument checks."""
import math
import zlib

import pytest
import torch

import arcface_ext
from arcface_ext import reference
from arcface_ext.subcenter import SubCenterMarginLoss, subcenter_margin_loss
from conftest import largest_tensor_made

MARGINS = {
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(m1=1.35, m2=0.0, m3=0.0),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
}


def whole_matrix(x, w, labels, k, **options):
    """The N x C·K cosines at once: each class's best sub-centre, the margin on the target, logsumexp."""
    return reference.subcenter_margin_loss(x, w, labels, k=k, **options)


def inputs(n=13, c=11, k=3, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(c * k, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, c, (n,), generator=g)
    return x, w, labels


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_matches_the_whole_matrix_in_fp64(margin, margin_grad, chunk):
    x, w, labels = inputs(seed=zlib.crc32(f"{margin} {margin_grad} {chunk}".encode()) % 1000)
    labels[3] = -1  # an ignored row: no loss, no gradient
    options = dict(s=30.0, margin_grad=margin_grad, **MARGINS[margin])
    ours = subcenter_margin_loss(x, w, labels, k=3, class_chunk=chunk, **options)
    gx, gw = torch.autograd.grad(ours, (x, w))
    expected = whole_matrix(x, w, labels, 3, **options)
    ex, ew = torch.autograd.grad(expected, (x, w))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-11)
    assert gx[3].abs().max() == 0


def test_gradcheck_and_reductions():
    x, w, labels = inputs(n=5, c=4, k=2, d=6, seed=3)
    f = lambda x, w: subcenter_margin_loss(x, w, labels, k=2, s=8.0, class_chunk=3, reduction="sum")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w))
    rows = subcenter_margin_loss(x, w, labels, k=2, s=8.0, reduction="none")
    torch.testing.assert_close(rows, whole_matrix(x, w, labels, 2, s=8.0, m1=1.0, m2=0.5, m3=0.0, reduction="none"))


def test_one_sub_centre_is_the_combined_margin_loss():
    x, w, labels = inputs(k=1, seed=5)
    ours, cos = subcenter_margin_loss(x, w, labels, k=1, return_target_cosine=True)
    expected, expected_cos = reference.combined_margin_loss(x, w, labels, return_target_cosine=True)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(cos, expected_cos)
    torch.testing.assert_close(torch.autograd.grad(ours, w)[0], torch.autograd.grad(expected, w)[0])


def test_the_gradient_reaches_only_the_winning_sub_centre():
    # One sample of class 0, nearest to its sub-centre 1 (row 1); class 1's best for it is row 4.
    # Only those two rows move: the max passes the gradient to its winner alone.
    x = torch.tensor([[1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.1], [0.3, -1.0], [0.5, 0.5], [-0.2, -1.0]],
                     dtype=torch.float64, requires_grad=True)
    loss, cos = subcenter_margin_loss(x, w, torch.tensor([0]), k=3, return_target_cosine=True)
    assert math.isclose(cos.item(), 1.0 / math.hypot(1.0, 0.2), rel_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, w)
    moved = grad.abs().sum(dim=1) > 0
    assert moved.tolist() == [False, True, False, False, True, False]


def test_under_autocast_and_with_16_bit_inputs_the_loss_is_that_of_the_rounded_inputs():
    # The products take 16-bit operands (fp32 accumulation); cosines, margins and loss stay fp32
    # (tests/test_chunked.py tests this for every kind of loss, with gradients).
    x, w, labels = inputs(seed=7, dtype=torch.float32)
    expected = reference.subcenter_margin_loss(x.detach().bfloat16().double(), w.detach().bfloat16().double(), labels,
                                               k=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = subcenter_margin_loss(x, w, labels, k=3)
    half = subcenter_margin_loss(x.detach().bfloat16(), w.detach().bfloat16(), labels, k=3)
    for loss in (under, half):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-5)


def test_module_and_checks():
    module = SubCenterMarginLoss(11, 16, k=3, s=30.0)
    assert module.weight.shape == (33, 16)
    x, _, labels = inputs()
    loss = module(x.float(), labels)
    loss.backward()
    assert module.weight.grad.shape == (33, 16)
    with pytest.raises(ValueError, match="not a multiple of k = 3"):
        subcenter_margin_loss(x, torch.randn(10, 16, dtype=torch.float64), labels, k=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        subcenter_margin_loss(x, torch.randn(33, 16, dtype=torch.float64), labels + 11, k=3)
    with pytest.raises(ValueError, match="k .sub-centres a class. must be an int >= 1"):
        subcenter_margin_loss(x, torch.randn(33, 16, dtype=torch.float64), labels, k=0)
    with pytest.raises(ValueError,
                       match=r"m2 as a tensor holds one margin per row: shape \(N,\) = \(13,\), got \(12,\)"):
        subcenter_margin_loss(x, torch.randn(33, 16, dtype=torch.float64), labels, k=3, m2=torch.zeros(12))
    # Per-row margins (the chunked path's): as the whole matrix's, their gradients too.
    w3 = torch.randn(33, 16, dtype=torch.float64, requires_grad=True)
    m2 = torch.linspace(-0.2, 0.6, 13, dtype=torch.float64, requires_grad=True)
    m3 = torch.linspace(0.3, 0.0, 13, dtype=torch.float64, requires_grad=True)
    ours = subcenter_margin_loss(x, w3, labels, k=3, s=30.0, m2=m2, m3=m3, class_chunk=4)
    whole = reference.subcenter_margin_loss(x, w3, labels, k=3, s=30.0, m2=m2, m3=m3)
    torch.testing.assert_close(ours, whole, rtol=1e-10, atol=1e-10)
    for a, e in zip(torch.autograd.grad(ours, (x, w3, m2, m3)), torch.autograd.grad(whole, (x, w3, m2, m3))):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        SubCenterMarginLoss(11, 16, k=0)
    # use_reference: the whole matrix, the same loss and gradients.
    chunked = SubCenterMarginLoss(11, 16, k=3, s=30.0, dtype=torch.float64)
    whole = SubCenterMarginLoss(11, 16, k=3, s=30.0, use_reference=True, dtype=torch.float64)
    assert "use_reference=True" in repr(whole)
    with torch.no_grad():
        whole.weight.copy_(chunked.weight)
    for criterion in (chunked, whole):
        criterion(x.detach(), labels).backward()
    torch.testing.assert_close(whole.weight.grad, chunked.weight.grad, rtol=1e-9, atol=1e-12)


def test_no_tensor_the_size_of_the_whole_matrix_is_made():
    # Every tensor made in the forward and backward pass, recorded: with 2 classes a chunk, none comes
    # near the N x C·K cosines (2,112 here): the blocks are N x 2·K = 384, the targets' sub-centres
    # N x K x D = 768.
    x, w, labels = inputs(n=64, c=11, k=3, d=4)
    with largest_tensor_made() as largest:
        loss = subcenter_margin_loss(x, w, labels, k=3, class_chunk=2)
        loss.backward()
    assert largest[0] <= max(64 * 2 * 3, 64 * 3 * 4) < 64 * 11 * 3
    with largest_tensor_made() as largest:
        reference.subcenter_margin_loss(x, w, labels, k=3).backward()
    assert largest[0] >= 64 * 11 * 3  # the recording sees the whole matrix where there is one


def test_edges_empty_batches_bad_labels_tiny_norms_and_no_double_backward(monkeypatch):
    # An empty batch: zero loss (an empty row vector with reduction none), zero gradients.
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    loss = subcenter_margin_loss(x, w, torch.zeros(0, dtype=torch.long), k=3)
    loss.backward()
    assert loss.item() == 0 and w.grad.abs().sum() == 0
    assert subcenter_margin_loss(x, w, torch.zeros(0, dtype=torch.long), k=3, reduction="none").shape == (0,)

    # Unchecked bad labels: that row's loss is NaN and it moves nothing; the others are as without it.
    x, w, labels = inputs(seed=11)
    bad = labels.clone()
    bad[2] = 99
    for call in (lambda: subcenter_margin_loss(x, w, bad, k=3, check_labels=False),
                 lambda: SubCenterMarginLoss(11, 16, k=3, check_labels=False)(x, bad)):
        with pytest.raises(ValueError, match="labels must lie in"):  # CPU labels: checked all the same
            call()
    monkeypatch.setattr(arcface_ext._checks, "ALWAYS_CHECKED_DEVICES", frozenset())  # unchecked, as on a GPU
    rows = subcenter_margin_loss(x, w, bad, k=3, reduction="none", check_labels=False)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    kept = torch.ones(13, dtype=torch.bool)
    kept[2] = False
    torch.testing.assert_close(rows[kept], subcenter_margin_loss(x, w, labels, k=3, reduction="none")[kept])
    (gx,) = torch.autograd.grad(rows[kept].sum(), x)
    assert gx[2].abs().max() == 0

    # An embedding shorter than the norm's eps: the gradient of x / max(|x|, eps), as autograd has it.
    x, w, labels = inputs(n=4, seed=12)
    tiny = x.detach().clone()
    tiny[1] *= 1e-14
    tiny.requires_grad_(True)
    ours = torch.autograd.grad(subcenter_margin_loss(tiny, w, labels[:4], k=3), tiny)[0]
    expected = torch.autograd.grad(whole_matrix(tiny, w, labels[:4], 3), tiny)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-6)

    # Double backward is refused when asked for (create_graph=True), not left to fail later.
    x, w, labels = inputs(seed=13)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(subcenter_margin_loss(x, w, labels, k=3), x, create_graph=True)
    with pytest.raises(ValueError, match="class_chunk must be None or an int >= 1"):
        subcenter_margin_loss(x, w, labels, k=3, class_chunk=0)


def test_compiles_as_one_graph():
    x, w, labels = inputs(seed=14, dtype=torch.float32)
    compiled = torch.compile(lambda x, w, y: subcenter_margin_loss(x, w, y, k=3, class_chunk=4), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, labels), subcenter_margin_loss(x, w, labels, k=3, class_chunk=4))


# ---- partial FC and sharded centres ----------------------------------------------------------------

def test_partial_fc_samples_whole_classes():
    # A sampled class brings its k sub-centres; the loss is the whole matrix's over the sampled rows of
    # weight, with the labels renumbered; the centres left out get no gradient.
    x, w, labels = inputs(n=12, c=40, seed=21)
    labels[2] = -1
    module = SubCenterMarginLoss(40, 16, k=3, s=30.0, sample_rate=0.3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(w)
    torch.manual_seed(0)
    xs = x.detach().clone().requires_grad_(True)
    loss = module(xs, labels)
    loss.backward()
    index = module.last_sampled_classes
    assert len(index) == 12 and torch.isin(labels[labels >= 0], index).all()  # sample_size(40, 0.3, 12)
    rows = (index[:, None] * 3 + torch.arange(3)).reshape(-1)
    positions = torch.where(labels >= 0, torch.searchsorted(index, labels.clamp_min(0)), -1)
    xr, wr = x.detach().clone().requires_grad_(True), w.detach()[rows].clone().requires_grad_(True)
    expected = reference.subcenter_margin_loss(xr, wr, positions, k=3, s=30.0)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.weight.grad[rows], wr.grad, rtol=1e-10, atol=1e-12)
    left_out = torch.ones(120, dtype=torch.bool)
    left_out[rows] = False
    assert torch.all(module.weight.grad[left_out] == 0)
    assert "sample_rate=0.3" in repr(module)
    # Eval mode: every class; a bad label raises (CPU labels are checked even with check_labels=False).
    module.eval()
    torch.testing.assert_close(module(x, labels), reference.subcenter_margin_loss(x, w, labels, k=3, s=30.0))
    module.train()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 40\)"):
        module(x, labels + 40)


def test_sharded_on_one_process_is_the_replicated_one():
    import arcface_ext

    if not arcface_ext.extension_available():
        pytest.skip("the sharded module needs the compiled op")
    x, w, labels = inputs(n=12, c=11, seed=22)
    for options in (dict(), dict(interclass_filtering_threshold=0.3), dict(sample_rate=0.5)):
        outputs = []
        for cls in (arcface_ext.ShardedSubCenterMarginLoss, SubCenterMarginLoss):
            module = cls(11, 16, k=3, s=30.0, dtype=torch.float64, **options)
            with torch.no_grad():
                module.weight.copy_(w)
            xs = x.detach().clone().requires_grad_(True)
            torch.manual_seed(1)
            loss = module(xs, labels)
            loss.backward()
            outputs.append((loss.detach(), xs.grad, module.weight.grad))
        for a, b in zip(*outputs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sharded = arcface_ext.ShardedSubCenterMarginLoss(11, 16, k=3)
    assert sharded.weight.shape == (33, 16) and "k=3" in repr(sharded)
    assert sharded.get_extra_state().tolist() == [11, 0, 11, 3]  # num_classes, class_start, class_stop, k
    assert sharded.gather(sharded.weight).shape == (33, 16)
    whole = torch.randn(33, 16)
    sharded.load_state_dict({"weight": whole, "_extra_state": sharded.get_extra_state()})
    assert torch.equal(sharded.weight.detach(), whole)
    state = arcface_ext.ShardedSubCenterMarginLoss(11, 16, k=2).state_dict()
    with pytest.raises(RuntimeError, match="weight holds 2 sub-centre.s. a class, this module 3"):
        sharded.load_state_dict(state)
    with pytest.raises(ValueError, match=r"expected 33 rows \(3 per class\)"):
        sharded.shard_of(torch.zeros(11, 16))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        arcface_ext.ShardedSubCenterMarginLoss(11, 16, k=0)


@pytest.mark.parametrize("options", [dict(k=3), dict(k=2, sample_rate=0.5)], ids=["k3", "k2-sampled"])
def test_deferred_initialisation_on_the_meta_device(options):
    # Built under torch.device("meta"), then to_empty and reset_parameters, as a user does with nn.Linear:
    # SubCenterMarginLoss had no reset_parameters, and to_empty left its centres uninitialised memory.
    torch.manual_seed(0)
    built = SubCenterMarginLoss(11, 16, dtype=torch.float64, **options)
    with torch.device("meta"):
        deferred = SubCenterMarginLoss(11, 16, dtype=torch.float64, **options)
    assert deferred.weight.is_meta
    deferred.to_empty(device="cpu")
    torch.manual_seed(0)
    deferred.reset_parameters()
    assert torch.equal(deferred.weight, built.weight), (deferred.weight - built.weight).abs().max()
    x, _, labels = inputs(n=8, c=11, k=options["k"])
    losses = []
    for module in (built, deferred):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        torch.manual_seed(1)  # the same samples
        for _ in range(3):
            loss = module(x.detach(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.detach())
    assert torch.equal(*losses), losses
    assert torch.equal(deferred.weight, built.weight), (deferred.weight - built.weight).abs().max()
