"""Class centres split across ranks: the op's shard mode (labels of other shards), its combination
into the whole softmax, and ShardedCombinedMarginLoss over real gloo process groups, all against the
fp64 reference of the unsharded loss."""
import copy
import datetime
import functools
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import arcface_ext
from arcface_ext import ops, reference
from conftest import MARGINS, assert_matches_reference, loss_and_grads, margin_kwargs, settle, spawn_ranks

pytestmark = [pytest.mark.skipif(not arcface_ext.extension_available(), reason="arcface_ext._C is not built"),
              pytest.mark.slow]  # (process groups of spawned ranks)


def make_case(seed, sizes, num_classes, dim, dtype=torch.float64, ignored=()):
    """Rows of several ranks (one tensor, rank-major), the full class-centre matrix, labels that
    reach every class range, and `ignored` rows labelled -1."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[:3] = torch.tensor([0, num_classes - 1, num_classes // 2])[:n]
    labels[list(ignored)] = -1
    return x.to(dtype), w.to(dtype), labels


# ---- class_shard ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, world_size", [(1, 1), (7, 3), (9, 3), (10, 4), (85742, 8)])
def test_class_shard_partitions_the_classes(num_classes, world_size):
    shards = [arcface_ext.class_shard(num_classes, r, world_size) for r in range(world_size)]
    assert shards[0][0] == 0 and shards[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    sizes = [stop - start for start, stop in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_class_shard_rejects_more_ranks_than_classes():
    with pytest.raises(ValueError, match="num_classes"):
        arcface_ext.class_shard(3, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        arcface_ext.class_shard(10, 2, 2)


# ---- the op on one shard, combined by hand --------------------------------------------------------

def sharded_op(x, w, labels, bounds, grad_loss, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, lambda_=0.0,
               straight_through=False, ignore_index=-1, workspace_bytes=1 << 20):
    """The op on each shard [a, b) of w, combined as the distributed loss combines it: (loss per
    row, target cosine, d/dx and d/dw of Σ grad_loss·loss)."""
    c = w.shape[0]
    params = (s, m1, m2, m3, lambda_, ignore_index, straight_through, workspace_bytes)
    outputs = [ops.margin_softmax_forward(x, w[a:b], labels, *params, a, c) for a, b in bounds]
    counted = labels != ignore_index
    lse = torch.logsumexp(torch.stack([lse for _, lse, _ in outputs]), dim=0)
    target_logit = torch.zeros_like(lse)
    cosine = torch.zeros_like(lse)
    for (a, b), (loss_s, lse_s, cos_s) in zip(bounds, outputs):
        owned = counted & (labels >= a) & (labels < b)
        target_logit += torch.where(owned, lse_s - loss_s, 0.0)
        cosine += torch.where(owned, cos_s, 0.0)
    loss = torch.where(counted, lse - target_logit, 0.0)
    grads = [ops.margin_softmax_backward(grad_loss, x, w[a:b], labels, lse, *params, True, True, a, c)
             for a, b in bounds]
    return loss, cosine, sum(gx for gx, _ in grads), torch.cat([gw for _, gw in grads])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("bounds", [[(0, 13)], [(0, 6), (6, 13)], [(0, 1), (1, 9), (9, 13)]],
                         ids=["1-shard", "2-shards", "3-uneven"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_shards_combine_to_the_whole_loss(margin, bounds, dtype):
    x, w, labels = make_case(3, [9], 13, 16, dtype=dtype, ignored=(4,))
    grad_loss = torch.rand(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    loss, cosine, gx, gw = sharded_op(x, w, labels, bounds, grad_loss.to(loss_dtype), **margin_kwargs(margin))
    expected = loss_and_grads(reference.combined_margin_loss, x.double(), w.double(), labels, reduction="none",
                              return_target_cosine=True, grad_seed=1, **margin_kwargs(margin))
    assert_matches_reference(loss, expected[0], name="loss")
    assert_matches_reference(cosine[labels != -1], expected[1][labels != -1], name="target_cosine")
    assert_matches_reference(gx, expected[2], name="grad_embeddings", dtype=dtype)
    assert_matches_reference(gw, expected[3], name="grad_weight", dtype=dtype)
    assert torch.all(gx[4] == 0) and loss[4] == 0


def test_shard_holding_no_target_gives_only_its_softmax_share():
    x, w, labels = make_case(5, [6], 10, 8)
    labels[:] = 1  # every target in the first shard
    loss, lse, cosine = ops.margin_softmax_forward(x, w[5:], labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1, False,
                                                   1 << 20, 5, 10)
    logits = 64.0 * torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w[5:], dim=1).T
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, lse, rtol=0, atol=0)  # no target logit here
    assert torch.all(cosine == 0)


def test_shard_arguments_are_checked():
    x, w, labels = make_case(7, [4], 10, 8)
    forward = torch.ops.arcface_ext.margin_softmax_forward
    params = (64.0, 1.0, 0.5, 0.0, 0.0, -1, False, 1 << 20)
    with pytest.raises(ValueError, match="class_offset"):
        forward(x, w[5:], labels, *params, -1, 10)
    with pytest.raises(ValueError, match=r"weight holds classes \[6, 11\) but num_classes is 10"):
        forward(x, w[5:], labels, *params, 6, 10)
    with pytest.raises(ValueError, match="num_classes must be"):
        forward(x, w[5:], labels, *params, 5, -3)
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is out of range: labels must lie in \[0, 10\)"):
        forward(x, w[5:], torch.tensor([0, 10, 3, 4]), *params, 5, 10)
    # Unsharded calls keep their meaning: a label past the weight's own C is an error.
    with pytest.raises(ValueError, match=r"labels\[0\] = 7"):
        forward(x, w[:5], torch.tensor([7, 1, 2, 3]), *params)


def test_sharded_opcheck():
    x, w, labels = make_case(9, [5], 9, 6, ignored=(2,))
    args = (x.requires_grad_(True), w[3:7].clone().requires_grad_(True), labels, 64.0, 1.0, 0.5, 0.0, 0.0, -1,
            False, 1 << 20, 3, 9)
    torch.library.opcheck(torch.ops.arcface_ext.margin_softmax_forward, args)


# ---- the module on one process ----------------------------------------------------------------------

def test_sharded_repr_says_lambda_and_margin_grad_as_the_replicated_one_does():
    # The trainer's loss line under torchrun (an arcface_torch config's ArcFace trains margin_grad=
    # 'straight_through'): the sharded module's repr left both out.
    options = dict(lambda_=2.0, margin_grad="straight_through")
    said = "m1=1.0, m2=0.5, m3=0.0, lambda_=2.0, margin_grad='straight_through'"
    assert said in repr(arcface_ext.CombinedMarginLoss(12, 10, **options))
    assert said + ", classes [0, 12) on rank 0 of 1" in repr(arcface_ext.ShardedCombinedMarginLoss(12, 10, **options))
    assert "k=3, s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_grad='straight_through', classes" in repr(
        arcface_ext.ShardedSubCenterMarginLoss(12, 10, k=3, margin_grad="straight_through"))
    assert "m3=0.0, classes [0, 12)" in repr(arcface_ext.ShardedCombinedMarginLoss(12, 10))  # the defaults unsaid


def test_single_process_module_equals_the_unsharded_loss():
    x, w, labels = make_case(11, [7], 12, 10, ignored=(3,))
    sharded = arcface_ext.ShardedCombinedMarginLoss(12, 10, 64.0, 1.0, 0.3, 0.2, dtype=torch.float64)
    assert (sharded.class_start, sharded.class_stop, sharded.world_size) == (0, 12, 1)
    with torch.no_grad():
        sharded.weight.copy_(w)
    xs = x.clone().requires_grad_(True)
    loss, cosine = sharded(xs, labels, return_target_cosine=True)
    loss.backward()
    expected = loss_and_grads(reference.combined_margin_loss, x, w, labels, return_target_cosine=True,
                              m1=1.0, m2=0.3, m3=0.2)
    assert_matches_reference(loss, expected[0], name="loss")
    torch.testing.assert_close(cosine, expected[1], equal_nan=True)
    assert_matches_reference(xs.grad, expected[2], name="grad_embeddings")
    assert_matches_reference(sharded.weight.grad, expected[3], name="grad_weight")


# ---- real process groups ----------------------------------------------------------------------

NUM_CLASSES, DIM = 11, 12
MARGIN = dict(s=64.0, m1=1.0, m2=0.3, m3=0.2)


def row_margin_table(n):
    """Per-row (m2, m3) for the per-row-margin cases: negative angular margins among them."""
    generator = torch.Generator().manual_seed(5)
    return (torch.rand(n, generator=generator, dtype=torch.float64) - 0.4,
            0.3 * torch.rand(n, generator=generator, dtype=torch.float64))


class _GivenMargins(arcface_ext.ShardedCombinedMarginLoss):
    """The sharded loss with per-row margins handed in (this rank's rows)."""

    margins = None

    def row_margins(self, embeddings, labels):
        return self.margins


def _worker(rank, world_size, init_file, sizes, ignored, out_dir, num_classes, sample_rate, per_row, threshold):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x, w, labels = make_case(13, sizes, num_classes, DIM, ignored=ignored)
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        torch.manual_seed(0)
        module = _GivenMargins(num_classes, DIM, **MARGIN, sample_rate=sample_rate, dtype=torch.float64,
                               interclass_filtering_threshold=threshold)
        module.margins = (MARGIN["m2"], MARGIN["m3"])
        if per_row:
            m2, m3 = row_margin_table(len(labels))
            module.margins = (m2[mine], m3[mine])
        initial = module.gather(module.weight)
        torch.manual_seed(100 + rank)  # the ranks draw different samples
        with torch.no_grad():
            module.weight.copy_(module.shard_of(w))
        xs = x[mine].clone().requires_grad_(True)
        loss, cosine = module(xs, labels[mine], return_target_cosine=True)
        loss.backward()
        gathered = module.gather(module.weight.grad)
        # One row a piece, and a per-class vector: the same whole, in host memory.
        in_pieces = module.gather(module.weight.grad, piece_bytes=1)
        numbers = module.gather(torch.arange(module.class_start, module.class_stop, dtype=torch.float64),
                                piece_bytes=16)
        if rank == 0:
            assert torch.equal(in_pieces, gathered) and in_pieces.device.type == "cpu"
            assert torch.equal(numbers, torch.arange(num_classes, dtype=torch.float64))
        else:
            assert in_pieces is None and numbers is None
        if world_size == 3:
            # Over a subgroup, dst is a rank of the group: its rank 1 is global rank 2.
            pair_group = dist.new_group([1, 2])
            if rank > 0:
                pair = arcface_ext.ShardedCombinedMarginLoss(7, DIM, process_group=pair_group, dtype=torch.float64)
                classes = torch.arange(pair.class_start, pair.class_stop, dtype=torch.float64)
                whole = pair.gather(classes, dst=1)
                assert torch.equal(whole, torch.arange(7, dtype=torch.float64)) if rank == 2 else whole is None
                settle(pair_group)
        # AdaFace's norm statistics follow every rank's counted rows, the same on every rank.
        adaface = arcface_ext.ShardedAdaFaceLoss(num_classes, DIM, dtype=torch.float64)
        adaface(xs.detach() * (1 + rank), labels[mine])
        # ElasticFace+: each rank hands its own draws out by its rows' target cosines, from the ranks that
        # hold their classes.
        elastic = arcface_ext.ShardedElasticFaceLoss(num_classes, DIM, plus=True, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(7 + rank))
        with torch.no_grad():
            elastic.weight.copy_(elastic.shard_of(w))
        elastic_margins = elastic.row_margins(xs.detach(), labels[mine])[0]
        elastic_loss = elastic(xs.detach(), labels[mine])  # the whole call: its collectives in step with the op's
        torch.save({"loss": loss.detach(), "cosine": cosine, "grad_x": xs.grad, "grad_w": module.weight.grad,
                    "range": (module.class_start, module.class_stop), "initial": initial,
                    "gathered_grad": gathered, "sampled": module.last_sampled_classes,
                    "adaface": (adaface.batch_mean, adaface.batch_std), "elastic_plus": elastic_margins,
                    "elastic_loss": elastic_loss},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes, ignored, num_classes, sample_rate, per_row, threshold", [
    ([5, 3], (6,), NUM_CLASSES, 1.0, False, 0.0), ([4, 1, 3], (0,), NUM_CLASSES, 1.0, False, 0.0),
    ([5, 3], (6,), 60, 0.3, False, 0.0), ([4, 1, 3], (0,), 60, 0.3, True, 0.0),
    ([4, 1, 3], (0,), NUM_CLASSES, 1.0, False, 0.3), ([5, 3], (6,), 60, 0.3, False, 0.3)],
    ids=["2-ranks", "3-ranks-uneven", "2-ranks-sampled", "3-ranks-uneven-sampled-per-row-margins",
         "3-ranks-uneven-filtered", "2-ranks-sampled-filtered"])
def test_gloo_ranks_match_a_replicated_classifier(tmp_path, sizes, ignored, num_classes, sample_rate, per_row,
                                                  threshold):
    world_size = len(sizes)
    spawn_ranks(_worker, args=(world_size, str(tmp_path / "store"), sizes, ignored, str(tmp_path), num_classes,
                               sample_rate, per_row, threshold), nprocs=world_size)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    x, w, labels = make_case(13, sizes, num_classes, DIM, ignored=ignored)

    # Partial FC: the softmax runs over the union of the ranks' samples, each holding every class
    # of its shard that is a target anywhere in the gathered batch, and as many as sample_size says.
    classes = torch.arange(num_classes)
    if sample_rate < 1:
        rows = max(sizes) * world_size
        for r, result in enumerate(results):
            start, stop = arcface_ext.class_shard(num_classes, r, world_size)
            sample = result["sampled"]
            assert len(sample) == arcface_ext.sample_size(stop - start, sample_rate, rows) < stop - start
            assert torch.all((sample >= start) & (sample < stop)) and torch.all(sample[1:] > sample[:-1])
            targets = labels[(labels >= start) & (labels < stop)]
            assert torch.isin(targets, sample).all()
        classes = torch.cat([result["sampled"] for result in results])
    else:
        assert all(result["sampled"] is None for result in results)
    counted = labels != -1
    positions = torch.where(counted, torch.searchsorted(classes, labels.clamp_min(0)), -1)

    # What DDP over a replicated classifier gives: each rank's loss over its rows, each rank's
    # embeddings the gradient of its own loss, the centres the mean of the ranks' gradients.
    grad_w = torch.zeros_like(w)
    m2, m3 = row_margin_table(len(labels)) if per_row else (None, None)
    # Inter-class filtering: the replicated loss's (the chunked path on the whole matrix); the inputs
    # have other classes past the threshold, so that it matters.
    whole = reference.combined_margin_loss
    if threshold:
        whole = functools.partial(reference.chunked_margin_loss, interclass_filtering_threshold=threshold)
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w[classes], dim=1).T
        assert (cos.scatter(1, positions.clamp_min(0)[:, None], -1.0) > threshold).sum() >= 3
    for r, result in enumerate(results):
        mine = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
        margins = dict(MARGIN, m2=m2[mine], m3=m3[mine]) if per_row else MARGIN
        loss, cosine, gx, gw = loss_and_grads(whole, x[mine], w[classes], positions[mine], return_target_cosine=True,
                                              **margins)
        assert_matches_reference(result["loss"], loss, name=f"rank {r} loss")
        torch.testing.assert_close(result["cosine"], cosine, equal_nan=True)
        assert_matches_reference(result["grad_x"], gx, name=f"rank {r} grad_embeddings")
        grad_w[classes] += gw / world_size
    for r, result in enumerate(results):
        start, stop = result["range"]
        assert (start, stop) == arcface_ext.class_shard(num_classes, r, world_size)
        assert_matches_reference(result["grad_w"], grad_w[start:stop], name=f"rank {r} grad_weight")
    assert_matches_reference(results[0]["gathered_grad"], grad_w, name="gathered grad_weight")
    assert all(result["gathered_grad"] is None for result in results[1:])
    if sample_rate < 1:  # the centres outside every sample got exactly nothing
        left_out = torch.ones(num_classes, dtype=torch.bool)
        left_out[classes] = False
        assert left_out.any() and torch.all(results[0]["gathered_grad"][left_out] == 0)

    # AdaFace: every rank moved its statistics by the norms of all the counted rows (rank r's scaled
    # by r + 1).
    norms = torch.cat([x[sum(sizes[:r]):sum(sizes[:r + 1])].norm(dim=1) * (1 + r) for r in range(world_size)])
    norms = norms.clamp(0.001, 100)[labels != -1]
    for result in results:
        torch.testing.assert_close(result["adaface"][0], (0.99 * 20.0 + 0.01 * norms.mean()))
        torch.testing.assert_close(result["adaface"][1], (0.99 * 100.0 + 0.01 * norms.std()))

    # ElasticFace+: rank r's draws (its generator), the largest to its counted row of lowest target cosine.
    unit = torch.nn.functional.normalize
    cosine = (unit(x, dim=1) * unit(w, dim=1)[labels.clamp_min(0)]).sum(1)
    for r, result in enumerate(results):
        mine = range(sum(sizes[:r]), sum(sizes[:r + 1]))
        generator = torch.Generator().manual_seed(7 + r)
        drawn = torch.randn(len(mine), generator=generator, dtype=torch.float64) * 0.0175 + 0.5
        counted = [i for i in range(len(mine)) if labels[mine[i]] != -1]
        expected = torch.full((len(mine),), 0.5, dtype=torch.float64)
        ranked = sorted(counted, key=lambda i: (cosine[mine[i]].item(), i))
        expected[ranked] = drawn[counted].sort(descending=True).values
        assert torch.equal(result["elastic_plus"], expected), (r, result["elastic_plus"], expected)
        assert torch.isfinite(result["elastic_loss"])

    # The initial centres do not depend on the number of ranks.
    torch.manual_seed(0)
    single = arcface_ext.ShardedCombinedMarginLoss(num_classes, DIM, **MARGIN, dtype=torch.float64)
    torch.testing.assert_close(results[0]["initial"], single.weight.detach(), rtol=0, atol=0)


# ---- ranks that call differently ----------------------------------------------------------------

def _outcome(call):
    """'ok', or the exception's type and message: what a rank saw."""
    try:
        call()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the test compares them
        return f"{type(exc).__name__}: {exc}"


def _misuse_worker(rank, world_size, init_file, out_dir):
    import datetime

    early = arcface_ext.ShardedCombinedMarginLoss(8, 4)  # before the process group exists
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=20))
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        module = arcface_ext.ShardedCombinedMarginLoss(8, 4, dtype=torch.float64)
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 5, 7])
        module32 = arcface_ext.ShardedCombinedMarginLoss(8, 4)

        def autocast_on_rank_1(call):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rank == 1):
                return call()

        outcomes = {
            "built before init": _outcome(lambda: early(x.float(), labels)),
            "bad labels length on rank 1": _outcome(lambda: module(x, labels[:2] if rank == 1 else labels)),
            "dtype differs": _outcome(lambda: autocast_on_rank_1(lambda: module32(x.float(), labels))),
            "mode differs": _outcome(lambda: module.train(rank == 0)(x, labels)),
            "grad differs": _outcome(lambda: module.train()(x.detach() if rank == 1 else x, labels)),
            "sub-centres differ": _outcome(lambda: arcface_ext.ShardedSubCenterMarginLoss(
                8, 4, k=2 + rank, dtype=torch.float64)(x, labels)),
            # Options built differently (num_classes read from each rank's part of the data): the
            # shards overlapped silently, and embeddings of another size made gloo abort the process.
            "num_classes differ": _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(
                8 + 2 * rank, 4, dtype=torch.float64)(x, labels)),
            "embedding sizes differ": _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(
                8, 4 + rank, dtype=torch.float64)(torch.cat([x] + [x[:, :1]] * rank, dim=1), labels)),
            "sample rates differ": _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(
                8, 4, sample_rate=0.5 + 0.25 * rank, dtype=torch.float64)(x, labels)),
            "margin grads differ": _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(
                8, 4, margin_grad=("exact", "straight_through")[rank], dtype=torch.float64)(x, labels)),
            # A subclass's own options: std = 0 on one rank gathered no margins there (gloo aborted); t,
            # moved at another rate, differed between the ranks silently.
            "elastic stds differ": _outcome(lambda: arcface_ext.ShardedElasticFaceLoss(
                8, 4, std=0.05 * rank, dtype=torch.float64)(x, labels).backward()),
            # (a rank without plus would not join the collectives of ElasticFace+'s target cosines)
            "elastic plus differs": _outcome(lambda: arcface_ext.ShardedElasticFaceLoss(
                8, 4, std=0.05, plus=rank == 1, dtype=torch.float64)(x, labels)),
            "curricular momenta differ": _outcome(lambda: arcface_ext.ShardedCurricularFaceLoss(
                8, 4, momentum=0.01 * (rank + 1), dtype=torch.float64)(x, labels)),
            # Every rank checks the gathered labels: the error names the rank and its own row.
            "bad label on rank 1": _outcome(lambda: module(x, torch.tensor([18, 5, 7]) if rank == 1 else labels)),
            # Sampled and chunked paths check the gathered labels before the op: named alike (they said
            # "got 18", with neither rank nor row).
            "bad label on rank 1, sampled": _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(
                8, 4, sample_rate=0.5, dtype=torch.float64)(x, torch.tensor([1, 5, 18]) if rank == 1 else labels)),
            "bad label on rank 1, filtered": _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(
                8, 4, interclass_filtering_threshold=0.3, dtype=torch.float64)(
                    x, torch.tensor([1, 5, 18]) if rank == 1 else labels)),
            "alike afterwards": _outcome(lambda: module(x, labels).backward()),
        }
        weight = module.weight.detach().clone()
        outcomes["ddp"] = _outcome(lambda: torch.nn.parallel.DistributedDataParallel(module))
        outcomes["ddp left the shard alone"] = bool(torch.equal(module.weight, weight))
        # Inside a larger wrapped model DDP reads the model's ignore list, not the loss's: it
        # broadcasts rank 0's shard, which the loss's first call finds; ddp_ignore_shards prevents it.
        for case, ignore in (("ddp over a model", False), ("ddp over a model, shards ignored", True)):
            model = torch.nn.ModuleDict({"neck": torch.nn.Linear(4, 4).double(),
                                         "head": arcface_ext.ShardedCombinedMarginLoss(8, 4, dtype=torch.float64)})
            if ignore:
                outcomes["ignored names"] = arcface_ext.ddp_ignore_shards(model)
            weight = model["head"].weight.detach().clone()
            torch.nn.parallel.DistributedDataParallel(model)
            outcomes[case + ": shard kept"] = bool(torch.equal(model["head"].weight, weight))
            outcomes[case] = _outcome(lambda: model["head"](x, labels).backward())
        # A model whose loss was called once before it was wrapped (a sanity check): the broadcast
        # comes after that call, and the shards then trained in step, silently.
        model = torch.nn.ModuleDict({"head": arcface_ext.ShardedCombinedMarginLoss(8, 4, dtype=torch.float64)})
        with torch.no_grad():
            model["head"](x, labels)
        torch.nn.parallel.DistributedDataParallel(model)
        outcomes["ddp over a model after a call"] = _outcome(lambda: model["head"](x, labels).backward())
        # Shards drawn alone after one seed on every rank: the same error, which names that cause too
        # (it blamed DistributedDataParallel alone, with none in use).
        own = arcface_ext.ShardedCombinedMarginLoss(8, 4, dtype=torch.float64)
        torch.manual_seed(1)
        torch.nn.init.normal_(own.weight, 0.0, 0.01)
        outcomes["own initialisation from one seed"] = _outcome(lambda: own(x, labels))
        # A state of the same shard loads; the whole matrix loads as this rank's rows; another rank's
        # shard (same shape: 8 classes on 2 ranks) is refused.
        full = torch.arange(32, dtype=torch.float64).view(8, 4)
        state = module.state_dict()
        others = [None] * world_size
        dist.all_gather_object(others, state)
        outcomes["own state"] = _outcome(lambda: module.load_state_dict(state))
        outcomes["whole matrix"] = _outcome(lambda: module.load_state_dict({"weight": full}))
        outcomes["whole matrix rows"] = bool(torch.equal(module.weight, full[4 * rank:4 * rank + 4]))
        outcomes["other shard"] = _outcome(lambda: module.load_state_dict(others[1 - rank]))
        # An EMA or SWA copy of a model made with copy.deepcopy: a loss over an explicit process group
        # shares it (deepcopy raised "cannot pickle ProcessGroup").
        pair = arcface_ext.ShardedCombinedMarginLoss(8, 4, process_group=dist.new_group([0, 1]), dtype=torch.float64)
        copied = copy.deepcopy(torch.nn.ModuleDict({"head": pair}))["head"]
        outcomes["deepcopy over a group"] = _outcome(lambda: copied(x, labels).backward())
        outcomes["deepcopy shares the group"] = copied.process_group is pair.process_group
        outcomes["deepcopy copies the shard"] = bool(torch.equal(copied.weight, pair.weight)
                                                     and copied.weight is not pair.weight)
        solo = dist.new_group([0])
        outcomes["not a member"] = _outcome(lambda: arcface_ext.ShardedCombinedMarginLoss(8, 4, process_group=solo))
        torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


def test_ranks_that_call_differently_all_raise(tmp_path):
    # Every rank raises (none is left waiting in a collective) when one rank's arguments fail their
    # checks or the ranks differ in dtype, mode or gradients; a later alike call still works.
    spawn_ranks(_misuse_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, outcomes in enumerate(ranks):
        assert outcomes["built before init"].startswith("RuntimeError: this loss was built for rank 0 of 1")
        assert "configure_model" in outcomes["built before init"]
        assert outcomes["dtype differs"] == ("ValueError: the ranks must call the sharded loss alike, but they "
                                             "differ in compute dtype (rank 0: float32, rank 1: bfloat16)")
        assert outcomes["mode differs"].endswith("differ in mode (rank 0: training, rank 1: eval)")
        assert outcomes["grad differs"].endswith(
            "differ in gradients (rank 0: embeddings with grad, rank 1: embeddings without grad)")
        assert outcomes["sub-centres differ"].endswith("differ in sub-centres a class (rank 0: k=2, rank 1: k=3)")
        assert outcomes["num_classes differ"].endswith("differ in num_classes (rank 0: num_classes=8, rank 1: "
                                                       "num_classes=10)"), outcomes["num_classes differ"]
        assert outcomes["embedding sizes differ"].endswith(
            "differ in embedding_size (rank 0: embedding_size=4, rank 1: embedding_size=5)")
        assert outcomes["sample rates differ"].endswith(
            "differ in sample_rate (rank 0: sample_rate=0.5, rank 1: sample_rate=0.75)")
        assert outcomes["margin grads differ"].endswith(
            "differ in margin_grad (rank 0: margin_grad='exact', rank 1: margin_grad='straight_through')")
        assert outcomes["elastic stds differ"].endswith("differ in std (rank 0: std=0.0, rank 1: std=0.05)")
        assert outcomes["elastic plus differs"].endswith("differ in plus (rank 0: plus=False, rank 1: plus=True)")
        assert outcomes["curricular momenta differ"].endswith(
            "differ in momentum (rank 0: momentum=0.01, rank 1: momentum=0.02)")
        assert outcomes["bad label on rank 1"].startswith("ValueError: arcface_ext: rank 1's labels[0] = 18 is out of "
                                                          "range"), outcomes["bad label on rank 1"]
        for case in ("sampled", "filtered"):
            assert outcomes[f"bad label on rank 1, {case}"] == (
                "ValueError: arcface_ext: rank 1's labels[2] = 18 is out of range: labels must lie in [0, 8) "
                "(num_classes) or equal ignore_index (-1)"), outcomes[f"bad label on rank 1, {case}"]
        assert outcomes["alike afterwards"] == "ok"
        assert "parameter that requires a gradient" in outcomes["ddp"] and outcomes["ddp left the shard alone"]
        assert outcomes["ddp over a model: shard kept"] == (rank == 0)
        assert outcomes["ddp over a model"].startswith("RuntimeError: every rank's shard of class centres starts with "
                                                       "the same centre")
        assert outcomes["ddp over a model after a call"] == outcomes["ddp over a model"]
        assert outcomes["own initialisation from one seed"] == outcomes["ddp over a model"]
        assert "from the same seed" in outcomes["own initialisation from one seed"]
        assert outcomes["ignored names"] == ["head.weight"]
        assert outcomes["ddp over a model, shards ignored: shard kept"]
        assert outcomes["ddp over a model, shards ignored"] == "ok"
        assert outcomes["own state"] == outcomes["whole matrix"] == "ok" and outcomes["whole matrix rows"]
        assert f"this rank holds [{4 * rank}, {4 * rank + 4}) of 8" in outcomes["other shard"]
        # The same layout: a checkpoint that one rank wrote (Lightning's, Accelerate's) holds its shard alone.
        assert f"that is rank {1 - rank}'s shard" in outcomes["other shard"], outcomes["other shard"]
        assert outcomes["other shard"].endswith(  # (it said "gather() called on every rank")
            "holds that rank's shard alone. Save the whole matrix and its optimizer state with "
            "arcface_ext.full_state_dict(model, optimizer), called on every rank"), outcomes["other shard"]
        assert outcomes["deepcopy over a group"] == "ok" and outcomes["deepcopy shares the group"]
        assert outcomes["deepcopy copies the shard"]
    assert ranks[1]["bad labels length on rank 1"] == "ValueError: labels has 2 entries but embeddings has 3 rows"
    assert ranks[0]["bad labels length on rank 1"] == ("RuntimeError: rank(s) [1] of the process group refused "
                                                       "their arguments (their own errors say why): every rank "
                                                       "stops this call")
    assert ranks[0]["not a member"] == "ok"
    assert ranks[1]["not a member"] == "ValueError: this process is not a member of process_group"


@pytest.mark.parametrize("module_class", [arcface_ext.ShardedCombinedMarginLoss, arcface_ext.ShardedAdaFaceLoss,
                                          arcface_ext.ShardedElasticFaceLoss, arcface_ext.ShardedCurricularFaceLoss,
                                          arcface_ext.ShardedSubCenterMarginLoss])
def test_sharded_state_dict_holds_tensors_only(module_class):
    # Accelerate's save_state and save_model write the model's state dict with safetensors by default, which
    # takes tensors only: the shard's record, a dict, failed there on every rank ("'dict' object has no
    # attribute 'storage'", accelerate 1.16.0). The record is a tensor; the state still round-trips.
    module = module_class(7, 4)
    state = module.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values()), \
        {key: type(value).__name__ for key, value in state.items()}
    copy_ = module_class(7, 4)
    copy_.load_state_dict(state)
    assert torch.equal(copy_.weight, module.weight)


def test_sharded_state_dict_and_deferred_initialisation():
    # Single process: the shard is every class. The state records it; a state of another shard is
    # refused, and a state without the record (older versions) still loads.
    module = arcface_ext.ShardedCombinedMarginLoss(5, 3)
    state = module.state_dict()
    # num_classes, class_start, class_stop, k
    assert state["_extra_state"].dtype == torch.int64 and state["_extra_state"].tolist() == [5, 0, 5, 1]
    module.load_state_dict({"weight": state["weight"]})
    module.load_state_dict(state)
    for record in (torch.tensor([5, 0, 3, 1]), {"num_classes": 5, "class_start": 0, "class_stop": 3}):  # (older)
        with pytest.raises(RuntimeError, match=r"holds classes \[0, 3\) of 5, this rank holds \[0, 5\) of 5"):
            module.load_state_dict({"weight": state["weight"][:3], "_extra_state": record})
    # The record older versions wrote, a dict, still loads.
    module.load_state_dict({"weight": state["weight"], "_extra_state": {"num_classes": 5, "class_start": 0,
                                                                        "class_stop": 5}})
    meta = arcface_ext.ShardedCombinedMarginLoss(2_000_000, 512, device="meta")
    assert meta.weight.is_meta and meta.weight.shape == (2_000_000, 512)


def test_a_shard_of_another_number_of_ranks_names_full_state_dict():
    # One rank's own state (model.state_dict(), optimizer.state_dict()) saved on 2 ranks and resumed on another
    # number: both refusals name the recipe that resumes there, full_state_dict. They said "gather() the shards"
    # and nothing at all (the optimizer's). One process holds all 5 classes; the saved shard holds [0, 3).
    module = arcface_ext.ShardedCombinedMarginLoss(5, 3)
    weight = module.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"holds classes \[0, 3\) of 5, this rank holds \[0, 5\) of 5: .*save "
                                           r"the whole matrix with arcface_ext\.full_state_dict\(model, optimizer\)"):
        module.load_state_dict({"weight": weight[:3], "_extra_state": torch.tensor([5, 0, 3, 1])})
    optimizer = arcface_ext.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    saved = {"state": {0: {"momentum_buffer": torch.ones(3, 3)}},
             "param_groups": optimizer.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match=r"^optimizer state weight's momentum_buffer has 3 rows: neither the whole "
                                         r"centres' 5 nor this rank's 5 \(classes \[0, 5\)\): a rank's own "
                                         r"optimizer\.state_dict\(\) holds its shard's rows alone: save with "
                                         r"arcface_ext\.full_state_dict\(model, optimizer\)$"):
        arcface_ext.shard_optimizer_state(module, optimizer, saved)


def test_an_optimizer_state_no_rank_holds_is_not_called_a_rank_s_own():
    # The whole state of a loss of another number of classes (full_state_dict's, a replicated loss's) was said to
    # be a rank's own shard, to be saved with full_state_dict, as it was. Of 5 classes a rank of 2 or more ranks
    # holds 1, 2 or 3; k rows a class with sub-centres.
    for module, rows, shard in [(arcface_ext.ShardedCombinedMarginLoss(5, 3), 7, False),  # (more than the whole)
                                (arcface_ext.ShardedCombinedMarginLoss(5, 3), 4, False),
                                (arcface_ext.ShardedSubCenterMarginLoss(5, 3, k=2), 6, True),  # (3 classes)
                                (arcface_ext.ShardedSubCenterMarginLoss(5, 3, k=2), 5, False),
                                (arcface_ext.ShardedSubCenterMarginLoss(5, 3, k=2), 8, False)]:
        optimizer = arcface_ext.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        saved = {"state": {0: {"momentum_buffer": torch.ones(rows, 3)}},
                 "param_groups": optimizer.state_dict()["param_groups"]}
        whole = 5 * module.k
        said = (": a rank's own optimizer.state_dict() holds its shard's rows alone: save with "
                "arcface_ext.full_state_dict(model, optimizer)") if shard else (
                ", nor a rank's shard of its 5 classes on any number of ranks: the state of a loss of another number "
                "of classes (num_classes)")
        message = (f"optimizer state weight's momentum_buffer has {rows} rows: neither the whole centres' {whole} nor "
                   f"this rank's {whole} (classes [0, 5)){said}")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            arcface_ext.shard_optimizer_state(module, optimizer, saved)


@pytest.mark.parametrize("module_class", [arcface_ext.ShardedCombinedMarginLoss, arcface_ext.ShardedAdaFaceLoss,
                                          arcface_ext.ShardedElasticFaceLoss, arcface_ext.ShardedCurricularFaceLoss,
                                          arcface_ext.ShardedSubCenterMarginLoss])
def test_built_under_the_meta_default_device(module_class):
    # Under `with torch.device("meta")` reset_parameters drew its seed with torch.randint on the default
    # device, a meta tensor, and int() of it raised "Tensor.item() cannot be called on meta tensors": the
    # module could not be built. Built so, then to_empty and reset_parameters (every buffer too), it is the
    # module built directly from the same seed.
    torch.manual_seed(0)
    built = module_class(7, 4, dtype=torch.float64)
    with torch.device("meta"):
        deferred = module_class(7, 4, dtype=torch.float64)
    assert deferred.weight.is_meta
    deferred.to_empty(device="cpu")
    torch.manual_seed(0)
    deferred.reset_parameters()
    for (name, value), expected in zip(deferred.state_dict().items(), built.state_dict().values()):
        assert torch.equal(value, expected), (name, value, expected)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("saved", ["sharded", "replicated"])
def test_a_checkpoint_of_another_number_of_classes_is_refused_by_name(saved, k):
    # A sharded loss's checkpoint of 16 classes into one of 11 was refused as though the number of ranks had
    # changed ("load the whole matrix (gather() the shards) to change the number of ranks"), which that very
    # whole matrix would not do; a replicated loss's got torch's size mismatch naming the rank's shape only.
    cls = arcface_ext.ShardedCombinedMarginLoss if k == 1 else arcface_ext.ShardedSubCenterMarginLoss
    options = {} if k == 1 else {"k": k}
    module = cls(11, 4, **options)
    if saved == "sharded":
        state = cls(16, 4, **options).state_dict()
        pattern = r"weight holds centres of a loss of 16 classes, this module has 11 \(num_classes\)"
    else:
        state = {"weight": torch.randn(16 * k, 4)}
        pattern = rf"weight has {16 * k} rows: not the whole centres' {11 * k} \(11 classes"
    before = module.weight.detach().clone()
    with pytest.raises(RuntimeError, match=pattern):
        module.load_state_dict(state)
    assert torch.equal(module.weight, before)


@pytest.mark.parametrize("k", [1, 3])
def test_their_centres_as_columns_are_told_to_be_transposed(k):
    # pytorch-metric-learning's W is (D, C·k): loaded without the README's .t(), a sharded loss said only
    # "weight has 4 rows: not the whole centres' 11 (11 classes)", its columns unsaid.
    cls = arcface_ext.ShardedCombinedMarginLoss if k == 1 else arcface_ext.ShardedSubCenterMarginLoss
    module = cls(11, 4, **({} if k == 1 else {"k": k}))
    their_w = torch.randn(4, 11 * k)
    with pytest.raises(RuntimeError) as raised:
        module.load_state_dict({"weight": their_w})
    assert str(raised.value).endswith(
        f"weight has 4 rows: not the whole centres' {11 * k} "
        f"(11 classes{'' if k == 1 else ', 3 sub-centres a class'}); "
        "it is (D, C), the centres as columns (pytorch-metric-learning's W): load its transpose, .t()")
    module.load_state_dict({"weight": their_w.t()})
    assert torch.equal(module.weight, their_w.t())


# ---- one checkpoint for any number of ranks: full_state_dict, shard_optimizer_state ------------------

class _TwoHeads(torch.nn.Module):
    """A projection and two sharded losses (one with sub-centres), as a model holding them is saved."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 4, dtype=torch.float64)
        self.head = arcface_ext.ShardedCombinedMarginLoss(11, 4, dtype=torch.float64)
        self.sub = arcface_ext.ShardedSubCenterMarginLoss(7, 4, k=2, dtype=torch.float64)

    def forward(self, inputs, labels):
        x = self.proj(inputs)
        return self.head(x, labels) + self.sub(x, labels % 7)


@pytest.mark.parametrize("how", ["weight_norm", "custom"])
def test_a_parametrized_shard_is_refused_by_the_checkpoint_helpers(how):
    # Under a parametrization the loss's parameters are the originals, under other names: ddp_ignore_shards
    # listed "head.weight", which DDP would not find (rank 0's originals broadcast over the others'), and
    # full_state_dict saved this rank's originals ungathered beside a computed "head.weight" that would not load.
    model = torch.nn.ModuleDict({"head": arcface_ext.ShardedCombinedMarginLoss(7, 4, dtype=torch.float64)})
    if how == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model.head, "weight", dim=0)
    else:
        torch.nn.utils.parametrize.register_parametrization(model.head, "weight", torch.nn.Tanh())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.head(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])).backward()  # the loss itself runs
    optimizer.step()
    for call in (lambda: arcface_ext.ddp_ignore_shards(model), lambda: arcface_ext.full_state_dict(model, optimizer),
                 lambda: arcface_ext.shard_optimizer_state(model, optimizer, optimizer.state_dict())):
        with pytest.raises(ValueError, match=r"head.weight is parametrized .*remove_parametrizations"):
            call()


def _two_heads_and_optimizer():
    torch.manual_seed(0)  # every rank alike: the sharded losses draw the same whole matrix
    model = _TwoHeads()
    # The heads' group first: the optimizer's order is not the model's.
    optimizer = arcface_ext.optim.AdamW([{"params": [model.sub.weight, model.head.weight], "lr": 0.05},
                                         {"params": model.proj.parameters()}], lr=0.01)
    return model, optimizer


def _checkpoint_steps(model, optimizer, rank, world_size, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        inputs, labels = (torch.randn(6, 6, generator=gen, dtype=torch.float64),
                          torch.randint(0, 11, (6,), generator=gen))
        rows = slice(rank * 6 // world_size, (rank + 1) * 6 // world_size)
        optimizer.zero_grad()
        model(inputs[rows], labels[rows]).backward()
        for param in model.proj.parameters():  # replicated: averaged, as DDP would
            dist.all_reduce(param.grad)
            param.grad /= world_size
        optimizer.step()


def _checkpoint_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model, optimizer = _two_heads_and_optimizer()
        _checkpoint_steps(model, optimizer, rank, world_size, range(2))
        model_state, optimizer_state = arcface_ext.full_state_dict(model, optimizer)
        if rank == 0:
            torch.save({"model": model_state, "optimizer": optimizer_state}, os.path.join(out_dir, "whole.pt"))
        local = copy.deepcopy(optimizer.state_dict())
        _checkpoint_steps(model, optimizer, rank, world_size, range(2, 4))
        uninterrupted = {name: module.gather(module.weight.detach()) for name, module in (("head", model.head),
                                                                                          ("sub", model.sub))}
        dist.barrier()
        # Resumed from the whole checkpoint by a fresh model: the optimizer's state sharded by a load hook.
        saved = torch.load(os.path.join(out_dir, "whole.pt"), weights_only=True)
        resumed, resumed_optimizer = _two_heads_and_optimizer()
        resumed.load_state_dict(saved["model"])
        resumed_optimizer.register_load_state_dict_pre_hook(
            lambda opt, state: arcface_ext.shard_optimizer_state(resumed, opt, state))
        resumed_optimizer.load_state_dict(saved["optimizer"])
        # Each rank's state holds its rows alone (a view of the whole kept the whole's storage on every rank).
        storage = {name: [(state.untyped_storage().nbytes(), state.nbytes)
                          for key, state in resumed_optimizer.state[module.weight].items() if key != "step"]
                   for name, module in (("head", resumed.head), ("sub", resumed.sub))}
        # A rank's own state passes unchanged; another size of rows is refused.
        own = arcface_ext.shard_optimizer_state(resumed, resumed_optimizer, local)
        wrong = copy.deepcopy(local)
        wrong["state"][1]["exp_avg"] = wrong["state"][1]["exp_avg"][:1]
        _checkpoint_steps(resumed, resumed_optimizer, rank, world_size, range(2, 4))
        result = {"returned": model_state is not None and optimizer_state is not None,
                  "own unchanged": all(torch.equal(own["state"][i][key], local["state"][i][key])
                                       for i in local["state"] for key in local["state"][i]),
                  "wrong": _outcome(lambda: arcface_ext.shard_optimizer_state(resumed, resumed_optimizer, wrong)),
                  "local": local, "uninterrupted": uninterrupted, "storage": storage,
                  "resumed": {name: module.gather(module.weight.detach()) for name, module in (("head", resumed.head),
                                                                                               ("sub", resumed.sub))}}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


def test_full_state_dict_resumes_on_any_number_of_ranks(tmp_path):
    # Three gloo ranks write one checkpoint (rank 0's file) with the whole centres and their Adam moments;
    # it resumes on the same ranks bit for bit, its rows are each rank's own state, and it loads in one
    # process (a replicated layout) as the whole.
    spawn_ranks(_checkpoint_worker, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    saved = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert [r["returned"] for r in ranks] == [True, False, False]  # (None, None) on the others
    assert saved["model"]["head.weight"].shape == (11, 4) and saved["model"]["sub.weight"].shape == (14, 4)
    assert not [key for key in saved["model"] if key.endswith("_extra_state")]
    for name in ("head", "sub"):
        assert torch.equal(ranks[0]["resumed"][name], ranks[0]["uninterrupted"][name]), name
        assert ranks[1]["resumed"][name] is None  # (gathered on rank 0)
    for rank, result in enumerate(ranks):
        assert result["own unchanged"]
        for name, sizes in result["storage"].items():
            assert len(sizes) == 2 and all(held == own for held, own in sizes), (rank, name, sizes)
        start, stop = arcface_ext.class_shard(11, rank, 3)  # [0, 4), [4, 8), [8, 11)
        assert result["wrong"] == ("ValueError: optimizer state head.weight's exp_avg has 1 rows: neither the whole "
                                   f"centres' 11 nor this rank's {stop - start} (classes [{start}, {stop})): a "
                                   "rank's own optimizer.state_dict() holds its shard's rows alone: save with "
                                   "arcface_ext.full_state_dict(model, optimizer)"), result["wrong"]
        # The whole moments' rows are each rank's own (index 0: sub's weight, 1: head's, as the groups list them).
        for index, per_class in ((0, 2), (1, 1)):
            start, stop = arcface_ext.class_shard(11 if index else 7, rank, 3)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(saved["optimizer"]["state"][index][key][start * per_class:stop * per_class],
                                   result["local"]["state"][index][key])
        assert torch.equal(saved["optimizer"]["state"][2]["exp_avg"], result["local"]["state"][2]["exp_avg"])  # (proj)
    # One process: the sharded losses hold every class, and take the whole state as it is.
    model, optimizer = _two_heads_and_optimizer()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(arcface_ext.shard_optimizer_state(model, optimizer, saved["optimizer"]))
    assert torch.equal(optimizer.state[model.head.weight]["exp_avg"], saved["optimizer"]["state"][1]["exp_avg"])
    assert arcface_ext.full_state_dict(model, optimizer)[0]["head.weight"].shape == (11, 4)


def test_full_state_dict_refuses_a_dst_outside_the_group():
    # One process: dst=1 returned (None, None), no checkpoint and no word (on several gloo ranks, gloo's
    # 'invalid root rank' from inside the gather).
    loss = arcface_ext.ShardedCombinedMarginLoss(5, 4)
    for model in (torch.nn.ModuleDict({"loss": loss}), torch.nn.Linear(2, 2)):
        for dst in (1, -1):
            with pytest.raises(ValueError,
                               match=rf"dst must be a rank of the .* process group, in \[0, 1\): got {dst}"):
                arcface_ext.full_state_dict(model, dst=dst)
        assert arcface_ext.full_state_dict(model, dst=0)[0].keys() == model.state_dict().keys() - {"loss._extra_state"}


def test_shard_optimizer_state_names_a_group_of_another_size():
    # Paired off by place with another optimizer's group, a parameter's state was taken for the loss's and
    # refused for its rows ('loss.weight's momentum_buffer has 3 rows'), before torch's own check could say why.
    loss, proj = arcface_ext.ShardedCombinedMarginLoss(5, 4), torch.nn.Linear(4, 3)
    model = torch.nn.ModuleDict({"loss": loss, "proj": proj})
    other = arcface_ext.optim.SGD([proj.weight, loss.weight], lr=0.1, momentum=0.9)
    for param in (proj.weight, loss.weight):
        param.grad = torch.ones_like(param)
    other.step()
    optimizer = arcface_ext.optim.SGD([loss.weight], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"^the optimizer state dict's parameter group 0 has 2 parameter\(s\), "
                                         r"the optimizer's 1$"):
        arcface_ext.shard_optimizer_state(model, optimizer, other.state_dict())
    # A state dict of another number of groups (an optimizer made with another param_groups layout), and a
    # tensor that is not this rank's rows given to gather: each a ValueError that says both counts.
    two = arcface_ext.optim.SGD([{"params": [proj.weight]}, {"params": [loss.weight]}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"^the optimizer state dict has 2 parameter group\(s\), the optimizer 1$"):
        arcface_ext.shard_optimizer_state(model, optimizer, two.state_dict())
    with pytest.raises(ValueError, match=r"^expected this rank's 5 rows, got shape \(4, 4\)$"):
        loss.gather(torch.zeros(4, 4))


def _listed_twice_worker(rank, world_size, init_file, out_dir):
    # (A short timeout: a rank left waiting fails the test rather than hanging it.)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=20))
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        loss = arcface_ext.ShardedCombinedMarginLoss(5, 4, dtype=torch.float64)
        with pytest.warns(UserWarning, match="duplicate"):
            optimizer = arcface_ext.optim.SGD([loss.weight, loss.weight], lr=0.1, momentum=0.9)
        loss(torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 5, (3,))).backward()
        optimizer.step()
        returned = []
        outcome = _outcome(lambda: returned.append(arcface_ext.full_state_dict(loss, optimizer)))
        whole = returned[0][1] if returned and returned[0][1] is not None else None
        torch.save({"outcome": outcome, "whole": whole, "local": optimizer.state[loss.weight]["momentum_buffer"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


def test_full_state_dict_of_a_parameter_listed_twice(tmp_path):
    # torch's state dict gives both listings one index: its state was gathered twice, and rank 0 (given the
    # whole the first time) raised while the other ranks went on, to wait in their next collective.
    spawn_ranks(_listed_twice_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["outcome"] for r in ranks] == ["ok", "ok"]
    (whole,) = (state["momentum_buffer"] for state in ranks[0]["whole"]["state"].values())
    assert torch.equal(whole, torch.cat([ranks[0]["local"], ranks[1]["local"]]))


def _deferred_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=20))
    try:
        torch.set_num_threads(1)
        found = {}
        for name, build in (("combined", lambda: arcface_ext.ShardedCombinedMarginLoss(9, 4, dtype=torch.float64)),
                            ("subcenter", lambda: arcface_ext.ShardedSubCenterMarginLoss(9, 4, k=2,
                                                                                         dtype=torch.float64))):
            torch.manual_seed(0)
            built = build()
            with torch.device("meta"):
                deferred, assigned = build(), build()
            deferred.to_empty(device="cpu")
            torch.manual_seed(0)
            deferred.reset_parameters()
            whole = torch.randn(9 * built.k, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            assigned.load_state_dict({"weight": whole}, assign=True)
            found[name] = {"deferred": deferred.weight.detach(), "built": built.weight.detach(),
                           "assigned": assigned.weight.detach(), "whole": whole,
                           "rows": (assigned.class_start * built.k, assigned.class_stop * built.k),
                           "storage_bytes": assigned.weight.untyped_storage().nbytes(),
                           "shard_bytes": assigned.weight.numel() * assigned.weight.element_size()}
        torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_deferred_initialisation_and_assigned_whole_matrix(tmp_path):
    # Built under torch.device("meta") on each rank, then to_empty and reset_parameters: each rank's rows of
    # the same whole matrix, as the directly built module's. The whole matrix loaded with assign=True into a
    # meta-built module: each rank's parameter was a view of the whole (it kept the whole matrix in every
    # rank's memory, and torch.save of the rank's state would write all of it); now a copy of its rows.
    spawn_ranks(_deferred_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        for name, found in torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).items():
            assert torch.equal(found["deferred"], found["built"]), (rank, name)
            start, stop = found["rows"]
            assert torch.equal(found["assigned"], found["whole"][start:stop]), (rank, name)
            assert found["storage_bytes"] == found["shard_bytes"], (rank, name, found["storage_bytes"],
                                                                    found["shard_bytes"])


# ---- CurricularFace on sharded centres ----------------------------------------------------------------

def _curricular_worker(rank, world_size, init_file, sizes, out_dir, sample_rate):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x, w, labels = make_case(17, sizes, NUM_CLASSES, DIM, ignored=(1,))
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        module = arcface_ext.ShardedCurricularFaceLoss(NUM_CLASSES, DIM, s=30.0, sample_rate=sample_rate,
                                                       dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(module.shard_of(w))
            module.t.fill_(0.2)
        results = []
        for step in range(2):  # the second call uses the t the first one moved
            xs = (x[mine] * (1 + step)).clone().requires_grad_(True)
            module.weight.grad = None
            torch.manual_seed(100 + rank)
            loss = module(xs, labels[mine])
            loss.backward()
            results.append({"loss": loss.detach(), "grad_x": xs.grad, "grad_w": module.gather(module.weight.grad),
                            "t": module.t.clone(), "sampled": module.last_sampled_classes})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes, sample_rate", [([5, 3], 1.0), ([4, 1, 3], 1.0), ([5, 3], 0.5)],
                         ids=["2-ranks", "3-ranks-uneven", "2-ranks-sampled"])
def test_gloo_ranks_curricularface_matches_the_whole_batch(tmp_path, sizes, sample_rate):
    # t moves by the mean target cosine of every rank's counted rows (the same on every rank); each
    # rank's loss and gradients are then the replicated CurricularFace's at that t, over the union of
    # the ranks' samples.
    world_size = len(sizes)
    spawn_ranks(_curricular_worker, args=(world_size, str(tmp_path / "store"), sizes, str(tmp_path), sample_rate),
                nprocs=world_size)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    x, w, labels = make_case(17, sizes, NUM_CLASSES, DIM, ignored=(1,))
    counted = labels != -1
    t = torch.tensor(0.2, dtype=torch.float64)
    for step in range(2):
        xs = x * (1 + step)
        target = (torch.nn.functional.normalize(xs, dim=1)
                  * torch.nn.functional.normalize(w[labels.clamp_min(0)], dim=1)).sum(dim=1).clamp(-1, 1)
        t = 0.99 * t + 0.01 * target[counted].mean()
        classes = torch.arange(NUM_CLASSES)
        if sample_rate < 1:
            classes = torch.cat([result[step]["sampled"] for result in results])
        positions = torch.where(counted, torch.searchsorted(classes, labels.clamp_min(0)), -1)
        grad_w = torch.zeros_like(w)
        for r, result in enumerate(results):
            mine = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
            torch.testing.assert_close(result[step]["t"], t, rtol=1e-12, atol=1e-14)
            loss, _, gx, gw = loss_and_grads(functools.partial(reference.chunked_margin_loss, curricular_t=t),
                                          xs[mine], w[classes], positions[mine], s=30.0, m1=1.0, m2=0.5, m3=0.0)
            assert_matches_reference(result[step]["loss"], loss, name=f"rank {r} loss")
            assert_matches_reference(result[step]["grad_x"], gx, name=f"rank {r} grad_embeddings")
            grad_w[classes] += gw / world_size
        assert_matches_reference(results[0][step]["grad_w"], grad_w, name="gathered grad_weight")


def _sixteen_bit_worker(rank, world_size, init_file, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x, w, labels = make_case(19, sizes, NUM_CLASSES, DIM, dtype=torch.float32, ignored=(2,))
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        results = {}
        for name, module in (("filtered", arcface_ext.ShardedCombinedMarginLoss(NUM_CLASSES, DIM,
                                                                                 interclass_filtering_threshold=0.2)),
                             ("curricular", arcface_ext.ShardedCurricularFaceLoss(NUM_CLASSES, DIM))):
            with torch.no_grad():
                module.weight.copy_(module.shard_of(w))
            xs = x[mine].clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = module(xs, labels[mine])
            loss.backward()
            results[name] = {"loss": loss.detach(), "grad_x": xs.grad, "grad_w": module.gather(module.weight.grad),
                             "t": getattr(module, "t", None)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_chunked_path_under_autocast(tmp_path):
    # fp32 shards under bf16 autocast: each rank's products take bf16 operands a chunk at a time, the
    # rest fp32; the loss is the whole batch's on the rounded inputs (to fp32 accumulation), the
    # gradients to the bf16 gradient block's rounding.
    sizes = [5, 4]
    spawn_ranks(_sixteen_bit_worker, args=(2, str(tmp_path / "store"), sizes, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, w, labels = make_case(19, sizes, NUM_CLASSES, DIM, dtype=torch.float32, ignored=(2,))
    x, w = x.bfloat16().double(), w.bfloat16().double()
    counted = labels != -1
    target = (torch.nn.functional.normalize(x, dim=1)
              * torch.nn.functional.normalize(w[labels.clamp_min(0)], dim=1)).sum(dim=1).clamp(-1, 1)
    t = 0.01 * target[counted].mean()
    for name, whole in (("filtered", functools.partial(reference.chunked_margin_loss,
                                                         interclass_filtering_threshold=0.2)),
                        ("curricular", functools.partial(reference.chunked_margin_loss, curricular_t=t))):
        grad_w = torch.zeros_like(w)
        for r, result in enumerate(results):
            mine = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
            loss, _, gx, gw = loss_and_grads(whole, x[mine], w, labels[mine], s=64.0, m1=1.0, m2=0.5, m3=0.0)
            got = result[name]
            torch.testing.assert_close(got["loss"].double(), loss, rtol=1e-6, atol=1e-5)
            assert float((got["grad_x"].double() - gx).norm() / gx.norm()) < 1e-2, (name, r)
            grad_w += gw / 2
            if name == "curricular":
                torch.testing.assert_close(got["t"].double(), t, rtol=1e-5, atol=1e-7)
        assert float((results[0][name]["grad_w"].double() - grad_w).norm() / grad_w.norm()) < 1e-2, name


def _subcenter_worker(rank, world_size, init_file, sizes, out_dir, num_classes, sample_rate, threshold):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        x, w, labels = make_case(23, sizes, 3 * num_classes, DIM, ignored=(4,))  # w: 3 rows a class
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        labels = labels % num_classes
        labels[4] = -1
        torch.manual_seed(0)
        module = arcface_ext.ShardedSubCenterMarginLoss(num_classes, DIM, k=3, s=30.0, sample_rate=sample_rate,
                                                        interclass_filtering_threshold=threshold, dtype=torch.float64)
        initial = module.gather(module.weight)
        with torch.no_grad():
            module.weight.copy_(module.shard_of(w))
        xs = x[mine].clone().requires_grad_(True)
        torch.manual_seed(100 + rank)
        loss = module(xs, labels[mine])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad_x": xs.grad, "grad_w": module.gather(module.weight.grad),
                    "sampled": module.last_sampled_classes, "initial": initial, "shape": tuple(module.weight.shape)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes, num_classes, sample_rate, threshold", [([4, 1, 3], 11, 1.0, 0.0),
                                                                      ([5, 3], 40, 0.5, 0.3)],
                         ids=["3-ranks-uneven", "2-ranks-sampled-filtered"])
def test_gloo_ranks_subcenters_match_the_whole_batch(tmp_path, sizes, num_classes, sample_rate, threshold):
    # Each rank holds its classes' 3 sub-centres; the whole batch's sub-center loss over the union of
    # the samples (a sampled class with all its sub-centres), in fp64.
    world_size = len(sizes)
    spawn_ranks(_subcenter_worker, args=(world_size, str(tmp_path / "store"), sizes, str(tmp_path), num_classes,
                                         sample_rate, threshold), nprocs=world_size)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    x, w, labels = make_case(23, sizes, 3 * num_classes, DIM, ignored=(4,))
    labels = labels % num_classes
    labels[4] = -1
    classes = torch.arange(num_classes)
    if sample_rate < 1:
        classes = torch.cat([result["sampled"] for result in results])
        assert len(classes) < num_classes
    for r, result in enumerate(results):
        start, stop = arcface_ext.class_shard(num_classes, r, world_size)
        assert result["shape"] == (3 * (stop - start), DIM)
    rows = (classes[:, None] * 3 + torch.arange(3)).reshape(-1)
    positions = torch.where(labels >= 0, torch.searchsorted(classes, labels.clamp_min(0)), -1)
    whole = functools.partial(reference.chunked_margin_loss, k=3, interclass_filtering_threshold=threshold)
    grad_w = torch.zeros_like(w)
    for r, result in enumerate(results):
        mine = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
        loss, _, gx, gw = loss_and_grads(whole, x[mine], w[rows], positions[mine], s=30.0, m1=1.0, m2=0.5, m3=0.0)
        assert_matches_reference(result["loss"], loss, name=f"rank {r} loss")
        assert_matches_reference(result["grad_x"], gx, name=f"rank {r} grad_embeddings")
        grad_w[rows] += gw / world_size
    assert_matches_reference(results[0]["grad_w"], grad_w, name="gathered grad_weight")
    # The initial centres do not depend on the number of ranks.
    torch.manual_seed(0)
    single = arcface_ext.ShardedSubCenterMarginLoss(num_classes, DIM, k=3, dtype=torch.float64)
    torch.testing.assert_close(results[0]["initial"], single.weight.detach(), rtol=0, atol=0)


# ---- FSDP2 (fully_shard), DTensor and torch.distributed.checkpoint ------------------------------------

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.4 kept it private
    fully_shard = None
FSDP_CLASSES, FSDP_ROWS, FSDP_STEPS = 37, 6, 3  # 37: FSDP2's shards and the class shards of unequal sizes


class _Embedder(torch.nn.Module):
    """A backbone and its loss in one module, as an FSDP2 training script holds them."""

    def __init__(self, head):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, DIM))
        self.head = head

    def forward(self, images, labels):
        return self.head(self.backbone(images), labels)


def _fsdp_start():
    """Every case's initial backbone (as a state dict) and whole class-centre matrix, and the steps' batches."""
    torch.manual_seed(0)
    backbone = _Embedder(torch.nn.Identity()).double().backbone.state_dict()
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(FSDP_CLASSES, DIM, generator=generator, dtype=torch.float64)
    batches = [(torch.randn(2 * FSDP_ROWS, 8, generator=generator, dtype=torch.float64),
                torch.randint(0, FSDP_CLASSES, (2 * FSDP_ROWS,), generator=generator)) for _ in range(FSDP_STEPS)]
    return backbone, centres, batches


FSDP_OPTIMIZERS = {"sgd": dict(lr=0.5, momentum=0.9, weight_decay=5e-4), "adamw": dict(lr=1e-2, weight_decay=0.05)}


def _fsdp_optimizer(case, params):
    if case == "sgd":
        return arcface_ext.optim.SGD(params, **FSDP_OPTIMIZERS[case])
    optimizer = arcface_ext.optim.AdamW(params, **FSDP_OPTIMIZERS[case])
    optimizer.slice_numel = 100  # the centres' shard (19 or 18 x 12) in slices
    return optimizer


def _fsdp_model(case, rank):
    """sgd: an FSDP2 backbone and a sharded head (ShardedCombinedMarginLoss, left out of fully_shard): one
    optimizer over DTensors and plain tensors. adamw: backbone and ArcFaceLoss both under fully_shard."""
    backbone, centres, _ = _fsdp_start()
    head = (arcface_ext.ShardedCombinedMarginLoss(FSDP_CLASSES, DIM, dtype=torch.float64) if case == "sgd"
            else arcface_ext.ArcFaceLoss(FSDP_CLASSES, DIM, dtype=torch.float64))
    model = _Embedder(head).double()
    model.backbone.load_state_dict(backbone)
    model.head.load_state_dict({"weight": centres})  # (the sharded head keeps its rows)
    for layer in (model.backbone[0], model.backbone[2]):
        fully_shard(layer)
    fully_shard(model.backbone)
    if case == "adamw":
        fully_shard(model.head)
        fully_shard(model)
    return model, _fsdp_optimizer(case, model.parameters())


def _fsdp_steps(model, optimizer, rank, steps):
    for images, labels in [_fsdp_start()[2][step] for step in steps]:
        mine = slice(rank * FSDP_ROWS, (rank + 1) * FSDP_ROWS)
        loss = model(images[mine], labels[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _whole_parameters(model):
    """name -> the whole parameter: a DTensor's full_tensor, the sharded head's gathered shards."""
    whole = {}
    for name, param in model.named_parameters():
        if isinstance(model.head, arcface_ext.ShardedCombinedMarginLoss) and name == "head.weight":
            whole[name] = model.head.gather(param)
        else:
            whole[name] = param.full_tensor() if hasattr(param, "full_tensor") else param.detach().clone()
    return whole


def _fsdp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        results = {}
        for case in ("sgd", "adamw"):
            # arcface_ext.optim.SGD raised on the sgd case ('_foreach_add_ got mixed torch.Tensor and DTensor');
            # AdamW sliced the flattened DTensors, not their shards: here the view raised; with 1001 x 32 centres
            # the slices were new tensors, and the centres' shards were left as they were, silently.
            outcome = _outcome(lambda: _fsdp_steps(*_fsdp_model(case, rank)[:2], rank, range(FSDP_STEPS)))
            if outcome != "ok":
                results[case] = outcome
                continue
            model, optimizer = _fsdp_model(case, rank)
            _fsdp_steps(model, optimizer, rank, range(FSDP_STEPS))
            results[case] = _whole_parameters(model)
        # Resumed from a DCP checkpoint (sharded state dicts of the model and AdamW) after step 1: the
        # uninterrupted run's parameters, bit for bit.
        model, optimizer = _fsdp_model("adamw", rank)
        _fsdp_steps(model, optimizer, rank, [0])
        dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), checkpoint_id=f"{out_dir}/dcp")
        model, optimizer = _fsdp_model("adamw", rank)
        state = dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
        dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _fsdp_steps(model, optimizer, rank, range(1, FSDP_STEPS))
        results["adamw resumed"] = _whole_parameters(model)
        # A sharded head under fully_shard: refused there, before its all-gather (with 37 classes, shards of
        # 19 and 18 rows, gloo aborted the process in it).
        sharded = _Embedder(arcface_ext.ShardedCombinedMarginLoss(FSDP_CLASSES, DIM))
        results["sharded head under fully_shard"] = _outcome(lambda: fully_shard(sharded))
        # A DTensor handed to the loss: named (PyTorch's 'got mixed torch.Tensor and DTensor' named neither).
        mesh = init_device_mesh("cpu", (world_size,))
        weight = distribute_tensor(torch.randn(FSDP_CLASSES, DIM), mesh, [Shard(0)])
        results["dtensor weight"] = _outcome(lambda: arcface_ext.combined_margin_loss(
            torch.randn(4, DIM), weight, torch.tensor([0, 1, 2, 3])))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        settle()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(fully_shard is None, reason="this torch has no torch.distributed.fsdp.fully_shard")
def test_fsdp2_steps_match_one_process(tmp_path):
    # Two gloo ranks, each with its rows of the batch, against one process stepping torch's optimizers
    # over the whole batch with a replicated loss, in fp64.
    spawn_ranks(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case, optimizer_class in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        backbone, centres, batches = _fsdp_start()
        model = _Embedder(arcface_ext.CombinedMarginLoss(FSDP_CLASSES, DIM, dtype=torch.float64)).double()
        model.backbone.load_state_dict(backbone)
        model.head.load_state_dict({"weight": centres})
        optimizer = optimizer_class(model.parameters(), **FSDP_OPTIMIZERS[case])
        for images, labels in batches:
            optimizer.zero_grad()
            model(images, labels).backward()
            optimizer.step()
        assert isinstance(ranks[0][case], dict), ranks[0][case]
        for name, param in model.named_parameters():
            assert_matches_reference(ranks[0][case][name], param.detach(), name=f"{case}: {name}")
    for name, param in ranks[0]["adamw"].items():
        assert torch.equal(ranks[0]["adamw resumed"][name], param), name
    for outcomes in ranks:
        assert outcomes["sharded head under fully_shard"].startswith(
            "ValueError: ShardedCombinedMarginLoss.weight is this rank's shard of the class centres"), \
            outcomes["sharded head under fully_shard"]
        assert outcomes["dtensor weight"].startswith("TypeError: weight is a DTensor (S(0) over 2 rank(s))"), \
            outcomes["dtensor weight"]


def _report_what_the_rank_sees(rank, out_dir, failing_rank):
    if rank == failing_rank:
        raise ValueError(f"rank {rank} fails")
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{os.environ.get('SPAWN_RANKS_PROBE')} {os.getcwd()} {torch.get_num_threads()}")


def test_ranks_see_the_callers_environment_and_their_errors_reach_it(tmp_path, monkeypatch):
    # conftest.spawn_ranks forks the ranks from a forkserver started once, not with the caller's state: each
    # call's ranks must still see what spawned ranks would (the environment, working directory and
    # OMP_NUM_THREADS of that call), and a rank's error must still fail the test.
    for probe, threads in (("first", "3"), ("second", "1")):
        folder = tmp_path / probe
        folder.mkdir()
        monkeypatch.setenv("SPAWN_RANKS_PROBE", probe)
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        monkeypatch.chdir(folder)
        spawn_ranks(_report_what_the_rank_sees, args=(str(tmp_path), None), nprocs=2)
        seen = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
        assert seen == [f"{probe} {os.path.realpath(folder)} {threads}"] * 2
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 fails"):
        spawn_ranks(_report_what_the_rank_sees, args=(str(tmp_path), 1), nprocs=2)


def _sleep_on_rank_1(rank):
    if rank == 1:
        time.sleep(600)


def test_ranks_still_running_after_the_timeout_are_killed():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"_sleep_on_rank_1: 2 rank\(s\) still running after 1 s; killed"):
        spawn_ranks(_sleep_on_rank_1, args=(), nprocs=2, timeout=1)
    assert time.monotonic() - started < 60
