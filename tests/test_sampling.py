"""Partial FC's class sampling: the sample itself (targets kept, the rest uniform, positions right)
and the replicated module's sampled loss against the fp64 reference on the sampled centres. The
sharded form is tested over real process groups in test_distributed.py."""
import re

import pytest
import torch

import arcface_ext
from arcface_ext import reference
from arcface_ext.sampling import sample_classes, sample_size
from conftest import MARGINS, assert_matches_reference, loss_and_grads, margin_kwargs

needs_extension = pytest.mark.skipif(not arcface_ext.extension_available(), reason="arcface_ext._C is not built")


@pytest.mark.parametrize("num_classes, rate, rows, expected", [
    (1000, 0.1, 64, 100),     # insightface's int(rate * C)
    (1000, 0.1, 300, 300),    # raised so that every row's target fits
    (1000, 0.0001, 0, 1),     # at least one class
    (50, 0.1, 300, 50),       # never more than there are
    (85742, 0.3, 512, 25722),
    (7, 1.0, 3, 7),
])
def test_sample_size(num_classes, rate, rows, expected):
    assert sample_size(num_classes, rate, rows) == expected


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, True, "0.1", float("nan")])
def test_sample_rate_is_checked(rate):
    with pytest.raises(ValueError, match="sample_rate must be a number in"):
        sample_classes(torch.tensor([1, 2]), 10, rate)
    with pytest.raises(ValueError, match="sample_rate"):
        arcface_ext.CombinedMarginLoss(10, 4, sample_rate=rate)


def test_sample_classes_and_sample_size_check_their_arguments():
    # Float labels were truncated (3.7 taken for class 3) where the loss raises.
    for labels in (torch.tensor([3.7, -1.0, 5.2]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            sample_classes(labels, 100, 0.05)
    with pytest.raises(ValueError, match="labels must be a 1-D tensor"):
        sample_classes(torch.zeros(2, 2, dtype=torch.long), 100, 0.05)
    with pytest.raises(ValueError, match="sample_rate"):
        sample_size(100, 0.0, 8)
    with pytest.raises(ValueError, match="num_rows must be an int >= 0"):
        sample_size(100, 0.1, -1)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        sample_size(0, 0.1, 8)
    assert sample_size(100, 0.1, 0) == 10


@pytest.mark.parametrize("class_start", [0, 40])
def test_sample_keeps_every_target_and_maps_each_row(class_start):
    num_classes = 200
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 300, (64,), generator=generator)
    labels[:4] = torch.tensor([-1, class_start, class_start + num_classes - 1, class_start + num_classes])
    index, positions = sample_classes(labels, num_classes, 0.25, class_start=class_start, generator=generator)
    assert index.dtype == positions.dtype == torch.int64
    assert len(index) == sample_size(num_classes, 0.25, 64) == 64
    assert torch.all(index[1:] > index[:-1]) and index[0] >= 0 and index[-1] < num_classes
    inside = (labels >= class_start) & (labels < class_start + num_classes)
    assert torch.equal(index[positions[inside]], labels[inside] - class_start)
    assert torch.all(positions[~inside] == -1) and positions[0] == -1
    # The same generator state gives the same sample.
    generator = torch.Generator().manual_seed(3)
    torch.randint(0, 300, (64,), generator=generator)
    replay = sample_classes(labels, num_classes, 0.25, class_start=class_start, generator=generator)
    assert torch.equal(replay[0], index) and torch.equal(replay[1], positions)


def test_ignore_index_inside_the_class_range():
    labels = torch.tensor([5, 5, 7, 2])
    index, positions = sample_classes(labels, 30, 0.1, ignore_index=5, generator=torch.Generator().manual_seed(0))
    assert positions[0] == positions[1] == -1
    assert index[positions[2]] == 7 and index[positions[3]] == 2


def test_other_classes_are_drawn_uniformly():
    # 2 targets of 20 classes, 5 places: each of the 18 others is drawn with probability 3/18.
    generator = torch.Generator().manual_seed(11)
    labels = torch.tensor([4, 4, 17])
    draws = 3000
    counts = torch.zeros(20)
    for _ in range(draws):
        index, _ = sample_classes(labels, 20, 0.25, generator=generator)
        assert len(index) == 5
        counts[index] += 1
    assert counts[4] == counts[17] == draws
    others = torch.cat([counts[:4], counts[5:17], counts[18:]])
    p = 3 / 18
    sigma = (draws * p * (1 - p)) ** 0.5
    assert torch.all((others - draws * p).abs() < 5 * sigma), others


def test_full_sample_is_every_class_in_order():
    index, positions = sample_classes(torch.tensor([3, 0, 3]), 4, 0.5)  # 3 rows: max(2, 3) = 3 of 4
    assert len(index) == 3
    index, positions = sample_classes(torch.tensor([3, 0, 3, 1, 2]), 4, 0.5)
    assert torch.equal(index, torch.arange(4)) and torch.equal(positions, torch.tensor([3, 0, 3, 1, 2]))


# ---- the replicated module ---------------------------------------------------------------------------

def sampled_case(seed, n=37, num_classes=500, dim=16, ignored=(5,)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[list(ignored)] = -1
    return x, labels


@needs_extension
@pytest.mark.parametrize("use_reference", [False, True], ids=["fused", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_sampled_module_is_the_loss_over_its_sample(margin, reduction, use_reference):
    x, labels = sampled_case(1)
    torch.manual_seed(0)
    module = arcface_ext.CombinedMarginLoss(500, 16, sample_rate=0.2, reduction=reduction,
                                            use_reference=use_reference, dtype=torch.float64,
                                            **margin_kwargs(margin))
    xs = x.clone().requires_grad_(True)
    loss, cosine = module(xs, labels, return_target_cosine=True)
    (loss if loss.dim() == 0 else loss * torch.linspace(0.5, 1.5, len(loss), dtype=torch.float64)).sum().backward()
    sample = module.last_sampled_classes
    assert len(sample) == 100 and torch.isin(labels[labels >= 0], sample).all()

    positions = torch.where(labels >= 0, torch.searchsorted(sample, labels.clamp_min(0)), -1)
    w = module.weight.detach()
    expected = loss_and_grads(reference.combined_margin_loss, x, w[sample], positions, reduction=reduction,
                              return_target_cosine=True, **margin_kwargs(margin))
    if reduction == "none":  # loss_and_grads weighs rows by its own fixed draw: redo with linspace
        ws = w[sample].clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        rows = reference.combined_margin_loss(xr, ws, positions, reduction="none", **margin_kwargs(margin))
        (rows * torch.linspace(0.5, 1.5, len(rows), dtype=torch.float64)).sum().backward()
        expected = (rows.detach(), expected[1], xr.grad, ws.grad)
    assert_matches_reference(loss.detach(), expected[0], name="loss")
    torch.testing.assert_close(cosine, expected[1], equal_nan=True)
    assert_matches_reference(xs.grad, expected[2], name="grad_embeddings")
    assert_matches_reference(module.weight.grad[sample], expected[3], name="grad_weight (sampled)")
    left_out = torch.ones(500, dtype=torch.bool)
    left_out[sample] = False
    assert torch.all(module.weight.grad[left_out] == 0)


@needs_extension
def test_sample_rate_one_and_eval_mode_use_every_class():
    x, labels = sampled_case(2)
    torch.manual_seed(0)
    full = arcface_ext.CombinedMarginLoss(500, 16, dtype=torch.float64)
    torch.manual_seed(0)
    rate_one = arcface_ext.CombinedMarginLoss(500, 16, sample_rate=1.0, dtype=torch.float64)
    torch.manual_seed(0)
    sampled = arcface_ext.CombinedMarginLoss(500, 16, sample_rate=0.1, dtype=torch.float64)
    expected = full(x, labels)
    assert torch.equal(rate_one(x, labels), expected) and rate_one.last_sampled_classes is None
    sampled.eval()
    assert torch.equal(sampled(x, labels), expected) and sampled.last_sampled_classes is None
    sampled.train()
    assert sampled(x, labels) < expected  # fewer classes in the softmax
    assert "sample_rate=0.1" in repr(sampled) and "sample_rate" not in repr(full)


@needs_extension
def test_sampled_module_checks_labels_and_arguments():
    module = arcface_ext.CombinedMarginLoss(50, 8, sample_rate=0.2)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=re.escape("arcface_ext: labels[2] = 50 is out of range: labels must lie in "
                                                   "[0, 50) (num_classes) or equal ignore_index (-1)")):
        module(x, torch.tensor([1, 2, 50, 3]))
    with pytest.raises(ValueError, match=re.escape("labels[1] = -3 is out of range")):
        module(x, torch.tensor([1, -3, 0, 3]))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        module(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        module(x, torch.tensor([1.0, 2.0, 3.0, 4.0]))


@needs_extension
def test_sampled_module_with_ignore_index_among_the_classes():
    x, labels = sampled_case(4, ignored=())
    labels[:3] = 7
    torch.manual_seed(0)
    module = arcface_ext.CombinedMarginLoss(500, 16, sample_rate=0.1, ignore_index=7, dtype=torch.float64)
    loss, cosine = module(x, labels, return_target_cosine=True)
    sample = module.last_sampled_classes
    counted = labels != 7
    positions = torch.where(counted, torch.searchsorted(sample, labels), -1)
    expected = reference.combined_margin_loss(x, module.weight.detach()[sample], positions)
    assert_matches_reference(loss.detach(), expected, name="loss")
    assert cosine[:3].isnan().all() and cosine[3:].isfinite().all()


@needs_extension
def test_single_process_sharded_sample_is_the_replicated_sample():
    x, labels = sampled_case(6)
    torch.manual_seed(0)
    replicated = arcface_ext.CombinedMarginLoss(500, 16, sample_rate=0.3, dtype=torch.float64)
    torch.manual_seed(0)
    sharded = arcface_ext.ShardedCombinedMarginLoss(500, 16, sample_rate=0.3, dtype=torch.float64)
    with torch.no_grad():
        sharded.weight.copy_(replicated.weight)
    results = []
    for module in (replicated, sharded):
        torch.manual_seed(9)
        xs = x.clone().requires_grad_(True)
        loss = module(xs, labels)
        loss.backward()
        results.append((loss.detach(), xs.grad, module.weight.grad, module.last_sampled_classes))
    assert torch.equal(results[0][3], results[1][3])
    assert_matches_reference(results[1][0], results[0][0], name="loss")
    assert_matches_reference(results[1][1], results[0][1], name="grad_embeddings")
    assert_matches_reference(results[1][2], results[0][2], name="grad_weight")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 500\)"):
        sharded(x, torch.full_like(labels, 500))


def test_sample_classes_compiles_with_dynamic_shapes():
    # randn/rand(..., generator=None) with a symbolic size fails to trace (torch 2.13): the draw
    # passes no generator argument when it has none.
    compiled = torch.compile(sample_classes, backend="eager", dynamic=True)
    for n, num_classes in ((6, 50), (4, 70)):
        labels = torch.randint(0, num_classes, (n,))
        torch.manual_seed(n)
        index, positions = compiled(labels, num_classes, 0.3)
        torch.manual_seed(n)
        expected = sample_classes(labels, num_classes, 0.3)
        assert torch.equal(index, expected[0]) and torch.equal(positions, expected[1])


def test_sampled_modules_run_on_the_meta_device():
    # Shapes only (a model sized or traced on the meta device): the label check has no values to read.
    x = torch.randn(4, 8, device="meta", requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    for module in (arcface_ext.ArcFaceLoss(10, 8, device="meta", sample_rate=0.5),
                   arcface_ext.SubCenterMarginLoss(10, 8, device="meta", sample_rate=0.5)):
        loss = module(x, labels)
        assert loss.device.type == "meta" and loss.shape == ()
        loss.backward()
    assert x.grad.shape == (4, 8)
