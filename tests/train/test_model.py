"""The backbones: the paper's iResNet sizes and layout, the embedding head, and the options
(gradient checkpointing, channels_last, autocast of the trunk only)."""

import pytest
import torch

from train import checkpoint
from train.checkpoint import describe_backbone, fitting_image_sizes
from train.models import NETWORKS, IResNet, get_model, model_multiply_adds, multiply_adds

from trainer_fixtures import forward_backward, one_thread, output_dtypes  # noqa: F401

# Published sizes of insightface's iResNets with a 512-D embedding at 112x112, in millions.
PUBLISHED_PARAMETERS = {"r50": 43.6, "r100": 65.2}
# The exact counts this layout gives (FC 512*7*7 -> 512 included).
EXACT_PARAMETERS = {"r18": 24_025_600, "r34": 34_139_328, "r50": 43_590_848, "r100": 65_156_160,
                    "r200": 118_833_920}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **kwargs):
    # Shapes only: building r200 for real would cost half a gigabyte and a few seconds.
    with torch.device("meta"):
        return get_model(name, **kwargs)


@pytest.mark.parametrize("name", sorted(EXACT_PARAMETERS))
def test_parameter_counts(name):
    model = meta_model(name)
    count = count_parameters(model)
    assert count == EXACT_PARAMETERS[name], f"{name}: {count} parameters, expected {EXACT_PARAMETERS[name]}"
    if name in PUBLISHED_PARAMETERS:
        assert round(count / 1e6, 1) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name, size", [("r18", 112), ("mbf", 112), ("mbf_large", 64), ("small", 48)])
def test_multiply_adds_on_the_meta_device_are_the_real_forwards(name, size):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = get_model(name, image_size=size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert multiply_adds(name, size) == counter.get_total_flops() // 2 > 0


def test_multiply_adds_of_the_iresnets():
    # insightface's r50 and r100: the 6.3G and 12.1G multiply-adds (12.6 and 24.2 GFLOPs) quoted for them.
    assert [round(multiply_adds(name) / 1e9, 1) for name in ("r50", "r100")] == [6.3, 12.1]
    assert multiply_adds("r50", embedding_size=128) < multiply_adds("r50")  # the head's FC counts


def test_layout_matches_insightface_state_dicts():
    """The names and shapes of insightface's backbone.pth, so its released weights load."""
    state = meta_model("r50").state_dict()
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer3.13.bn3.running_mean": (256,),
        "layer4.2.prelu.weight": (512,),
        "bn2.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "features.running_var": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, f"{key}: {tuple(state[key].shape)} != {shape}"
    assert "layer3.14.bn1.weight" not in state and "layer1.1.downsample.0.weight" not in state
    assert describe_backbone(state) == {"network": "r50", "embedding_size": 512, "image_size": 112}


def test_r18_forward_at_112():
    torch.manual_seed(0)
    model = get_model("r18").eval()
    assert model.feature_map_size == 7
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_head_bn_scale_is_fixed():
    torch.manual_seed(0)
    model = get_model("small", image_size=32)
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=5e-4)
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    assert torch.all(model.features.weight == 1)
    assert model.features.bias.grad is not None


@pytest.mark.parametrize("size", [32, 56, 64, 112])
def test_small_network_takes_any_size(size):
    torch.manual_seed(0)
    model = get_model("small", image_size=size, embedding_size=128)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 128)
    # 112 px where the weights fit it (97 to 128 px all give a 4x4 last map), else the largest they fit.
    assert describe_backbone(model.state_dict()) == {"network": "small", "embedding_size": 128,
                                                     "image_size": 112 if size == 112 else 32 * model.feature_map_size}


@pytest.mark.parametrize("name, image_size", [("small", 112), ("small", 56), ("r18", 100), ("r50", 112),
                                               ("vit_t", 96), ("vit_t", 112), ("mbf", 96)])
def test_the_image_sizes_a_bare_state_dict_fits(name, image_size):
    # The demo network trained at 112 px was read as 128 px, the top of the sizes its weights fit: exported so
    # into backbone.json, and train.embed resized faces to 128, for other embeddings without an error.
    def shapes(size):
        try:
            return {k: v.shape for k, v in meta_model(name, embedding_size=64, image_size=size).state_dict().items()}
        except ValueError:  # (MobileFaceNet takes multiples of 16 only)
            return None

    sizes = fitting_image_sizes(meta_model(name, embedding_size=64, image_size=image_size).state_dict())
    assert image_size in sizes
    for size in (sizes[0] - 1, sizes[0], sizes[-1], sizes[-1] + 1):
        assert (shapes(size) == shapes(image_size)) == (size in sizes), (size, sizes)
    guess = describe_backbone(meta_model(name, embedding_size=64, image_size=image_size).state_dict())["image_size"]
    assert guess == 112 if 112 in sizes else guess in sizes


def test_dropout_from_keep_prob():
    model = get_model("small", image_size=32, dropout=0.4)
    assert model.dropout.p == pytest.approx(0.4)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = get_model("small", image_size=32)
    checkpointed = get_model("small", image_size=32, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    out_a, grads_a = forward_backward(plain, x)
    out_b, grads_b = forward_backward(checkpointed, x)
    torch.testing.assert_close(out_b, out_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=lambda m, n=name: f"{n}: {m}")


def block_runs(model, x):
    """How often each block of ``model``'s four stages began to run in a forward and backward pass of ``x``:
    twice where checkpointing recomputed it (the pre-hook: torch stops a recomputation once it has what the
    backward needs, inside the segment's last block). One list a stage."""
    runs = [[0] * len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
    hooks = [block.register_forward_pre_hook(lambda *_, s=s, b=b: runs[s].__setitem__(b, runs[s][b] + 1))
             for s, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4))
             for b, block in enumerate(stage)]
    forward_backward(model, x)
    for hook in hooks:
        hook.remove()
    return runs


def test_checkpoint_segments_recompute_those_stages_and_give_the_same_gradients():
    # torch's checkpoint_sequential: `segments` of len // segments blocks, the last segment (the rest) kept.
    torch.manual_seed(0)
    settings = dict(layers=(1, 6, 9, 1), widths=(4, 8, 8, 8), embedding_size=8, image_size=16)
    plain = IResNet(**settings)
    checkpointed = IResNet(**settings, gradient_checkpointing=True, checkpoint_segments=(0, 2, 3, 0))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 16, 16)
    out_a, grads_a = forward_backward(plain, x)
    out_b, grads_b = forward_backward(checkpointed, x)
    torch.testing.assert_close(out_b, out_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=lambda m, n=name: f"{n}: {m}")
    assert block_runs(checkpointed, x) == [[1], [2, 2, 2, 1, 1, 1], [2] * 6 + [1] * 3, [1]]
    assert block_runs(plain, x) == [[1], [1] * 6, [1] * 9, [1]]
    assert "checkpoint_segments=(0, 2, 3, 0)" in repr(checkpointed)


@pytest.mark.parametrize("segments", [(0, 7, 0, 0), (0, 1, 1), (-1, 0, 0, 0)])
def test_checkpoint_segments_must_fit_the_stages(segments):
    with pytest.raises(ValueError, match=r"checkpoint_segments must give 0 to the stage's blocks for each of the 4"):
        IResNet((1, 6, 9, 1), widths=(4, 8, 8, 8), checkpoint_segments=segments)


@pytest.mark.slow  # (building r2060's 1,030 blocks takes about 4 s, on the meta device too)
def test_r2060_layout_size_and_multiply_adds():
    """arcface_torch's iresnet2060 (backbones/iresnet2060.py): stages of 3, 128, 896 and 3 blocks of
    insightface's iResNet, so its backbone.pth loads; 1.12G parameters, 239G multiply-adds at 112 px."""
    model = meta_model("r2060")
    count = count_parameters(model)
    # (the stem, 1,030 IBasicBlocks, 4 projected shortcuts, the 25,088 -> 512 FC and the BNs, added up by hand)
    assert count == 1_122_301_120, count
    state = model.state_dict()
    expected = {
        "layer1.2.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.127.bn3.running_var": (128,),
        "layer3.0.conv1.weight": (256, 128, 3, 3),
        "layer3.895.prelu.weight": (256,),
        "layer4.2.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (512, 512 * 7 * 7),
        "features.running_mean": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, f"{key}: {tuple(state[key].shape) if key in state else 'missing'}"
    assert "layer2.128.bn1.weight" not in state and "layer3.896.bn1.weight" not in state
    assert "layer3.1.downsample.0.weight" not in state
    assert describe_backbone(state) == {"network": "r2060", "embedding_size": 512, "image_size": 112}
    # arcface_torch's checkpointing in training is this one's default (the trainer's --gradient-checkpointing
    # passes its own, off unless given); in eval mode it does nothing.
    assert model.gradient_checkpointing and model.checkpoint_segments == (0, 20, 100, 0)
    madds = model_multiply_adds(model, 112)  # (multiply_adds("r2060") builds it once more)
    assert madds == 238_907_604_992 and round(madds / 1e9) == 239, madds


@pytest.mark.slow  # (about 4 s to build, and 1,030 blocks run, 792 + 114 of them twice)
def test_r2060_checkpointing_gives_the_same_gradients_as_without():
    """r2060's layout at 8 channels a stage: arcface_torch's checkpointing (layer2 in 20 segments, layer3 in
    100, the last of each kept) changes no output and no gradient."""
    torch.manual_seed(0)
    settings = dict(widths=(8, 8, 8, 8), embedding_size=8, image_size=16)
    checkpointed = get_model("r2060", **settings)
    plain = get_model("r2060", **settings, gradient_checkpointing=False)  # (the option wins over the default)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    plain.load_state_dict(checkpointed.state_dict())
    x = torch.randn(2, 3, 16, 16)
    out_a, grads_a = forward_backward(plain, x)
    out_b, grads_b = forward_backward(checkpointed, x)
    torch.testing.assert_close(out_b, out_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=lambda m, n=name: f"{n}: {m}")
    runs = block_runs(checkpointed, x)
    # 128 // 20 = 6 blocks a segment: 19 segments recomputed, the last 14 blocks kept; 896 // 100 = 8: 99, and 104.
    assert runs == [[1] * 3, [2] * 114 + [1] * 14, [2] * 792 + [1] * 104, [1] * 3]


def test_channels_last_matches():
    torch.manual_seed(0)
    model = get_model("small", image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_covers_the_trunk_not_the_head():
    torch.manual_seed(0)
    model = get_model("small", image_size=32, amp="bf16")
    out, seen = output_dtypes(model, {"trunk": model.layer4, "fc": model.fc}, torch.randn(4, 3, 32, 32))
    assert seen == {"trunk": torch.bfloat16, "fc": torch.float32}
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert model.conv1.weight.grad.dtype == torch.float32


def test_unknown_network():
    with pytest.raises(ValueError, match="unknown network 'r51'"):
        get_model("r51")
    assert set(NETWORKS) == {"r18", "r34", "r50", "r100", "r200", "r2060", "small", "mbf", "mbf_large", "vit_t",
                             "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
                             "vit_l_dp005_mask_005", "vit_h"}


@pytest.mark.parametrize("name, embedding_size, image_size, expected_name", [
    ("r100", 512, 112, "r100"), ("small", 64, 32, "small"), ("mbf", 512, 112, "mbf"), ("mbf", 128, 96, "mbf"),
    ("mbf_large", 512, 112, "mbf_large"), ("mbf_large", 128, 64, "mbf_large"),
    ("vit_t_dp005_mask0", 512, 112, "vit_t"), ("vit_s", 512, 112, "vit_s"), ("vit_b", 256, 112, "vit_b"),
    ("vit_l_dp005_mask_005", 512, 112, "vit_l_dp005_mask_005"), ("vit_h", 512, 112, "vit_h"),
    ("vit_t", 512, 36, "vit_t"),
])
def test_bare_state_dicts_name_their_network(name, embedding_size, image_size, expected_name):
    # What train.embed and --pretrained_model read from an insightface .pth that carries no settings;
    # the guess builds a network with exactly the file's keys and shapes.
    state = meta_model(name, embedding_size=embedding_size, image_size=image_size).state_dict()
    guess = describe_backbone(state)
    assert guess == {"network": expected_name, "embedding_size": embedding_size, "image_size": image_size}
    rebuilt = meta_model(guess["network"], embedding_size=embedding_size, image_size=guess["image_size"]).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_unknown_state_dict_is_named():
    with pytest.raises(ValueError, match="not a ViT this trainer builds"):
        describe_backbone({"pos_embed": torch.zeros(1, 144, 320), "feature.2.weight": torch.zeros(512, 320),
                           "blocks.0.norm1.weight": torch.zeros(320)})
    with pytest.raises(ValueError, match="not a backbone this trainer builds"):
        describe_backbone({"conv.weight": torch.zeros(3)})


def test_a_whole_models_state_dict_gives_its_backbone(tmp_path):
    # A PyTorch Lightning checkpoint ({"state_dict": the LightningModule's}, the network under its attribute's
    # name beside a loss's centres) or FaceX-Zoo's ("backbone." + a head): train.embed, train.verify and
    # train.export take the backbone, guessed or recorded; was "not a backbone this trainer builds".
    torch.manual_seed(0)
    model = get_model("small", embedding_size=64, image_size=32).eval()
    whole = {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, "head.weight": torch.randn(10, 64)}
    torch.save({"state_dict": whole, "epoch": 3}, tmp_path / "lightning.ckpt")
    images = torch.randn(2, 3, 32, 32)
    for overrides in ({}, {"network": "small", "embedding_size": 64, "image_size": 32}):
        loaded, settings = checkpoint.load_backbone(str(tmp_path / "lightning.ckpt"), **overrides)
        assert settings == {"network": "small", "embedding_size": 64, "image_size": 32}
        assert torch.equal(loaded(images), model(images))
    # A LightningModule that holds a model that holds the network: its keys under model.backbone.; was "not a
    # backbone this trainer builds" (and with the options, load_state_dict's lists of every key).
    nested = {f"model.{k}": v for k, v in whole.items()}
    torch.save({"state_dict": nested, "epoch": 3}, tmp_path / "nested.ckpt")
    for overrides in ({}, {"network": "small", "embedding_size": 64, "image_size": 32}):
        loaded, settings = checkpoint.load_backbone(str(tmp_path / "nested.ckpt"), **overrides)
        assert settings == {"network": "small", "embedding_size": 64, "image_size": 32}
        assert torch.equal(loaded(images), model(images))
    torch.save({**nested, **{f"model.ema.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "nested2.pt")
    with pytest.raises(ValueError, match="holds 2 backbones, under 'model.backbone.' and 'model.ema.'"):
        checkpoint.load_backbone(str(tmp_path / "nested2.pt"))
    # Two backbones (a model and its EMA copy): which one is not guessed.
    torch.save({**whole, **{f"ema.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="two.pt holds 2 backbones, under 'backbone.' and 'ema.': save the one"):
        checkpoint.load_backbone(str(tmp_path / "two.pt"))
    # Neither: the error names the file and what records the settings (train.embed has no --network).
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a backbone this trainer builds: .*; give python -m "
                                         "train.export --checkpoint .*other.pt its --network"):
        checkpoint.load_backbone(str(tmp_path / "other.pt"))
    # Weights whose blocks are there but not their embedding layer: the same error, not a KeyError.
    torch.save({k: v for k, v in model.state_dict().items() if k != "fc.weight"}, tmp_path / "headless.pt")
    with pytest.raises(ValueError, match="headless.pt: no weight 'fc.weight'; give python -m train.export"):
        checkpoint.load_backbone(str(tmp_path / "headless.pt"))
