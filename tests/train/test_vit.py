"""Vision Transformers: arcface_torch's configurations (sizes, multiply-adds against its published
FLOPs, state-dict layout), masking and stochastic depth in training only, the options every
backbone takes, and ``--network vit_t`` through the trainer, a resume and the ONNX export."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import arcface_ext
from conftest import assert_close_report
from train import checkpoint
from train.config import parse_args
from train.models import NETWORKS, VIT_CONFIGS, VisionTransformer, get_model
from train.models.vit import Attention, DropPath
from train.trainer import Trainer, build_optimizer

from trainer_fixtures import (assert_onnx_export_matches, base_argv, output_dtypes, forward_backward,  # noqa: F401
                              make_face_folder, one_thread, read_jsonl, run_killed_at, train_one_thread)

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"
IMAGE_SIZE = 36  # a 4x4 grid of 9px patches: 16 tokens, and a fast trainer run

# The sizes below follow from arcface_torch's VisionTransformer at 112 px (a 12x12 grid: 144
# tokens), its 512-D embedding, and each configuration's (embed_dim D, depth) in its
# backbones/__init__.py; expected_parameters() and expected_multiply_adds() spell the sums out.
EXACT_PARAMETERS = {
    "vit_t": 19_137_792, "vit_t_dp005_mask0": 19_137_792,
    "vit_s": 76_023_296, "vit_s_dp005_mask_0": 76_023_296,
    "vit_b": 113_833_472, "vit_b_dp005_mask_005": 113_833_472,
    "vit_l_dp005_mask_005": 255_684_352,
    "vit_h": 756_393_984,
}
EXACT_MULTIPLY_ADDS = {
    "vit_t": 1_504_882_688, "vit_t_dp005_mask0": 1_504_882_688,
    "vit_s": 5_746_548_736, "vit_s_dp005_mask_0": 5_746_548_736,
    "vit_b": 11_437_170_688, "vit_b_dp005_mask_005": 11_437_170_688,
    "vit_l_dp005_mask_005": 25_337_794_560,
    "vit_h": 89_198_870_528,
}
# arcface_torch's README, "ViT For Face Recognition" table, FLOPs column (G) for VIT-T/S/B/L on
# WebFace42M (trained as vit_t_dp005_mask0 ... vit_l_dp005_mask_005). Its flops.py counts them
# as ptflops' multiply-accumulates plus the attention matmuls (its `extra_gflops`); it publishes
# no parameter counts for its ViTs, and no FLOPs for vit_h.
PUBLISHED_GMACS = {"vit_t_dp005_mask0": 1.5, "vit_s_dp005_mask_0": 5.7, "vit_b_dp005_mask_005": 11.4,
                   "vit_l_dp005_mask_005": 25.3}


def expected_parameters(dim, depth, tokens=144, embedding=512, patch=9):
    patch_embed = dim * 3 * patch * patch + dim          # conv weight and bias
    embeddings = tokens * dim + dim                      # pos_embed, mask_token
    block = (2 * dim                                     # norm1
             + 3 * dim * dim                             # qkv, no bias
             + dim * dim + dim                           # proj
             + 2 * dim                                   # norm2
             + 4 * dim * dim + 4 * dim                   # mlp.fc1
             + 4 * dim * dim + dim)                      # mlp.fc2
    head = (2 * dim                                      # final norm
            + tokens * dim * dim + 2 * dim               # Linear(tokens*D -> D, no bias), BN
            + dim * embedding + 2 * embedding)           # Linear(D -> 512, no bias), BN
    return patch_embed + embeddings + depth * block + head


def expected_multiply_adds(dim, depth, tokens=144, embedding=512, patch=9):
    patch_embed = tokens * dim * 3 * patch * patch
    block = tokens * 12 * dim * dim + 2 * tokens * tokens * dim  # qkv+proj+mlp, then QK^T and AV
    return patch_embed + depth * block + tokens * dim * dim + dim * embedding


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **kwargs):
    # Shapes only: vit_h holds 756M parameters.
    with torch.device("meta"):
        return get_model(name, **kwargs)


def multiply_adds(model, image_size=112):
    # On the meta device (no data, no time), where scaled_dot_product_attention decomposes into the
    # two matmuls the counter knows (on CPU its fused kernel is not counted). The forward is the
    # amp="none" one, which autocast on meta does not allow spelling as model(x).
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval().forward_head(model.forward_trunk(x))
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as two FLOPs


def test_registered_under_arcface_torch_names():
    names = {"vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
             "vit_l_dp005_mask_005", "vit_h"}
    assert set(VIT_CONFIGS) == names and names <= set(NETWORKS)


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_size(name):
    config = VIT_CONFIGS[name]
    model = meta_model(name)
    assert isinstance(model, VisionTransformer) and model.num_patches == 144 and model.embedding_size == 512
    count = count_parameters(model)
    assert count == expected_parameters(config.embed_dim, config.depth) == EXACT_PARAMETERS[name], count
    madds = multiply_adds(model)
    assert madds == expected_multiply_adds(config.embed_dim, config.depth) == EXACT_MULTIPLY_ADDS[name], madds
    if name in PUBLISHED_GMACS:
        assert round(madds / 1e9, 1) == PUBLISHED_GMACS[name]


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_configuration(name):
    """Heads, stochastic depth, masking and checkpointing as arcface_torch's get_model sets them."""
    config = VIT_CONFIGS[name]
    model = meta_model(name)
    assert all(block.attn.num_heads == 8 for block in model.blocks) and len(model.blocks) == config.depth
    rates = [block.drop_path.p for block in model.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(config.drop_path_rate)
    assert rates == sorted(rates) and config.drop_path_rate in (0.05, 0.1)
    assert model.mask_ratio == config.mask_ratio and model.mask_token.requires_grad == (config.mask_ratio > 0)
    # insightface's using_checkpoint: on for the 24- and 48-block ones, unless asked otherwise.
    assert model.gradient_checkpointing == (config.depth > 12)
    assert not meta_model(name, gradient_checkpointing=False).gradient_checkpointing


def arcface_torch_state_layout(dim, depth, tokens, embedding, patch=9, mlp_ratio=4):
    """Key -> shape of arcface_torch's VisionTransformer state dict (norm_layer="ln",
    qkv_bias=False), written out from its vit.py: module-level pos_embed and mask_token,
    patch_embed.proj (Conv2d), blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
    the final norm, and the feature Sequential (Linear, BatchNorm1d, Linear, BatchNorm1d)."""
    hidden = mlp_ratio * dim
    layout = {"pos_embed": (1, tokens, dim), "mask_token": (1, 1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        layout.update({
            f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
            f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.norm2.weight": (dim,), f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, dim), f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (dim, hidden), f"blocks.{i}.mlp.fc2.bias": (dim,),
        })
    layout.update({"norm.weight": (dim,), "norm.bias": (dim,),
                   "feature.0.weight": (dim, tokens * dim), "feature.2.weight": (embedding, dim)})
    for index, width in ((1, dim), (3, embedding)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"feature.{index}.{name}"] = (width,)
        layout[f"feature.{index}.num_batches_tracked"] = ()
    return layout


def test_state_dict_is_arcface_torch_layout():
    model = get_model("vit_t")
    state = model.state_dict()
    expected = arcface_torch_state_layout(dim=256, depth=12, tokens=144, embedding=512)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # A state dict of that layout (as a released backbone.pth would be) loads strictly and is used.
    torch.manual_seed(0)
    released = {k: torch.randn(shape) if len(shape) else torch.tensor(7) for k, shape in expected.items()}
    released.update({k: torch.rand(v) + 0.5 for k, v in expected.items() if k.endswith("running_var")})
    model.load_state_dict(released)
    assert torch.equal(model.blocks[11].attn.qkv.weight, released["blocks.11.attn.qkv.weight"])
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 112, 112))).all()


def test_batchnorm_variant_layout():
    """norm="bn": insightface's VITBatchNorm, one BatchNorm1d channel per token, under ``.bn``."""
    model = get_model("vit_t_dp005_mask0", norm="bn", image_size=IMAGE_SIZE, embedding_size=64)
    state = model.state_dict()
    assert tuple(state["blocks.0.norm1.bn.running_mean"].shape) == (16,)
    assert tuple(state["blocks.11.norm2.bn.weight"].shape) == (16,) and tuple(state["norm.bn.bias"].shape) == (16,)
    assert "blocks.0.norm1.weight" not in state
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert model.train()(x).shape == (4, 64)
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 64)
    with pytest.raises(ValueError, match="norm='bn'.*mask_ratio=0"):
        get_model("vit_t", norm="bn")


def test_attention_layout_and_scale():
    """The qkv rows are [q | k | v], each [head 0 | head 1 | ...], and softmax(QK^T / sqrt(d))V is
    what scaled_dot_product_attention computes: written out here head by head."""
    torch.manual_seed(0)
    dim, heads, tokens = 32, 4, 7
    attn = Attention(dim, heads)
    x = torch.randn(2, tokens, dim)
    wq, wk, wv = attn.qkv.weight.detach().chunk(3)
    d = dim // heads
    outputs = []
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        q, k, v = x @ wq[rows].T, x @ wk[rows].T, x @ wv[rows].T
        outputs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v)
    expected = attn.proj(torch.cat(outputs, dim=-1))
    with torch.no_grad():
        assert_close_report(attn(x), expected.detach(), atol=1e-5, rtol=1e-5, name="attention")


@pytest.mark.parametrize("size, side", [(112, 12), (IMAGE_SIZE, 4), (50, 5)])
def test_output_shapes(size, side):
    torch.manual_seed(0)
    model = get_model("vit_t", image_size=size, embedding_size=128).eval()
    assert model.feature_map_size == side and model.pos_embed.shape == (1, side * side, 256)
    assert model.feature[0].in_features == side * side * 256
    with torch.no_grad():
        for batch in (2, 1):
            out = model(torch.randn(batch, 3, size, size))
            assert out.shape == (batch, 128) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [8, 0])
def test_image_smaller_than_a_patch(size):
    with pytest.raises(ValueError, match=f"image_size {size} is smaller than one 9x9 patch"):
        get_model("vit_t", image_size=size)


def test_input_of_another_size_is_named():
    model = get_model("vit_t", image_size=IMAGE_SIZE).eval()
    with pytest.raises(ValueError, match=r"expected 36x36 images \(image_size\), got \(45, 45\)"):
        model(torch.randn(1, 3, 45, 45))


def test_eval_is_deterministic_and_training_masks_patches():
    torch.manual_seed(0)
    model = get_model("vit_t", image_size=IMAGE_SIZE, embedding_size=64)  # mask_ratio 0.1
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    token = model.mask_token.detach().reshape(-1)
    with torch.no_grad():
        model.eval()
        torch.manual_seed(1)
        a, tokens_a = model(x), model.forward_trunk(x).reshape(4, 16, 256)
        torch.manual_seed(2)
        b = model(x)
        assert torch.equal(a, b)
        assert not (tokens_a == token).all(-1).any()  # no mask tokens in eval mode

        model.train()
        torch.manual_seed(1)
        tokens = model.forward_trunk(x).reshape(4, 16, 256)
        masked = (tokens == token).all(-1)
        # int(16 * 0.9) = 14 tokens kept a sample, as insightface's random_masking counts them;
        # the masked positions hold the mask token itself, and differ between samples.
        assert masked.sum(1).tolist() == [2, 2, 2, 2]
        assert len({tuple(row.nonzero().flatten().tolist()) for row in masked}) > 1
        torch.manual_seed(1)
        c = model(x)
        torch.manual_seed(2)
        d = model(x)
        assert not torch.allclose(c, d) and not torch.allclose(c, a)


def test_stochastic_depth_in_training_only():
    torch.manual_seed(0)
    model = get_model("vit_t_dp005_mask0", image_size=IMAGE_SIZE, embedding_size=64)  # no masking
    assert model.mask_ratio == 0
    x = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        outputs = []
        for seed in (1, 2, 1):
            torch.manual_seed(seed)
            outputs.append(model.train()(x))
        assert not torch.allclose(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
        # Without drop path the training forward is deterministic (BN uses the batch's statistics).
        plain = get_model("vit_t_dp005_mask0", image_size=IMAGE_SIZE, embedding_size=64, drop_path_rate=0.0)
        plain.load_state_dict(model.state_dict())
        torch.manual_seed(1)
        first = plain.train()(x)
        torch.manual_seed(2)
        assert torch.equal(first, plain(x))

    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    y = drop(torch.ones(4000, 3, 5))
    per_sample = y[:, 0, 0]
    assert torch.all((y == per_sample[:, None, None]))  # one decision a sample
    assert torch.equal(per_sample.unique(), torch.tensor([0.0, 4 / 3]))  # dropped, or scaled by 1 / 0.75
    assert (per_sample == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(drop.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_every_trainable_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = get_model("vit_t", image_size=IMAGE_SIZE, embedding_size=64, dropout=0.1)
    _, grads = forward_backward(model.train(), torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "mask_token" in names and sorted(grads) == sorted(names)
    for name in names:
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    # Without masking the mask token is kept for the state dict but frozen (no optimizer or DDP
    # bucket sees a parameter that never gets a gradient).
    frozen = get_model("vit_t_dp005_mask0", image_size=IMAGE_SIZE, embedding_size=64)
    assert not frozen.mask_token.requires_grad
    assert [n for n, p in frozen.named_parameters() if not p.requires_grad] == ["mask_token"]


def test_dropout_before_the_head():
    assert get_model("vit_t", image_size=IMAGE_SIZE, dropout=0.4).dropout.p == pytest.approx(0.4)
    assert get_model("vit_t", image_size=IMAGE_SIZE).dropout.p == 0.0


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = get_model("vit_t", image_size=IMAGE_SIZE, embedding_size=64)  # masking and drop path on
    checkpointed = get_model("vit_t", image_size=IMAGE_SIZE, embedding_size=64, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.manual_seed(1)
    out_a, grads_a = forward_backward(plain.train(), x)
    torch.manual_seed(1)
    out_b, grads_b = forward_backward(checkpointed.train(), x)
    assert_close_report(out_b, out_a, atol=1e-6, rtol=1e-6, name="embeddings")
    assert grads_a.keys() == grads_b.keys() and "mask_token" in grads_a
    for name in grads_a:
        assert_close_report(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-6, name=name)


def test_bf16_autocast_covers_the_trunk_not_the_head():
    torch.manual_seed(0)
    model = get_model("vit_t", image_size=IMAGE_SIZE, embedding_size=64, amp="bf16")
    out, seen = output_dtypes(model.train(), {"patch_embed": model.patch_embed, "qkv": model.blocks[0].attn.qkv,
                                              "mlp": model.blocks[-1].mlp, "norm": model.norm, "head": model.feature},
                              torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert seen == {"patch_embed": torch.bfloat16, "qkv": torch.bfloat16, "mlp": torch.bfloat16,
                    "norm": torch.float32, "head": torch.float32}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.dtype == torch.float32
    assert model.mask_token.grad.dtype == torch.float32


def test_unknown_vit():
    from train.models import vit
    with pytest.raises(ValueError, match="unknown ViT 'vit_x'"):
        vit("vit_x")


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory):
    """``--network vit_t`` (masking, drop path) with the head's dropout, AdamW as insightface
    trains its ViTs: four steps, a checkpoint every two."""
    root = tmp_path_factory.mktemp("vit")
    data = make_face_folder(str(root / "faces"), identities=4, images=4, size=IMAGE_SIZE)

    def argv(output, **extra):
        return base_argv(data, str(root / output), network="vit_t", image_size=IMAGE_SIZE, batch_size=8,
                         max_steps=4, save_every=2, keep_prob=0.9, optimizer="adamw", lr=0.001, decay=0.1,
                         loss_impl=LOSS_IMPL, **extra)

    assert train_one_thread(argv("full")) == 0
    return root, argv


def test_trainer_trains_vit(vit_runs):
    root, _ = vit_runs
    records = read_jsonl(root / "full" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    state = checkpoint.load(str(root / "full" / "checkpoint.pt"))
    assert state["step"] == 4 and state["args"]["network"] == "vit_t"
    assert state["model"]["feature.2.weight"].shape == (64, 256)
    assert state["model"]["feature.0.weight"].shape == (256, 16 * 256)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model, settings = checkpoint.load_backbone(str(root / "full" / "checkpoint.pt"))
    assert settings["network"] == "vit_t" and isinstance(model, VisionTransformer) and not model.training
    assert model.image_size == IMAGE_SIZE and model.embedding_size == 64


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(vit_runs, monkeypatch):
    # Masking, drop path and dropout all draw from the generators the checkpoint restores.
    root, argv = vit_runs
    run_killed_at(3, argv("killed"), monkeypatch)
    assert checkpoint.load(str(root / "killed" / "checkpoint.pt"))["step"] == 2
    assert train_one_thread(argv("killed", resume="auto")) == 0
    losses = [[r["loss"] for r in read_jsonl(root / run / "metrics.jsonl")] for run in ("killed", "full")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a = checkpoint.load(str(root / "full" / "checkpoint.pt"))["model"]
    b = checkpoint.load(str(root / "killed" / "checkpoint.pt"))["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fp16_on_the_cpu_is_said_to_slow_a_vits_attention_not_convolutions(tmp_path, capsys):
    # The note blamed torch's CPU fp16 convolutions, which a ViT has one of (its patch embedding): it is that one's
    # backward and the attention's that make a ViT's fp16 steps slower on a CPU.
    data = make_face_folder(str(tmp_path / "faces"), identities=2, images=4, size=IMAGE_SIZE)
    assert train_one_thread(base_argv(data, str(tmp_path / "run"), network="vit_t", image_size=IMAGE_SIZE,
                                      batch_size=4, max_steps=1, save_every=1, amp="fp16", loss_impl=LOSS_IMPL)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--amp fp16 on the CPU" in line]
    assert notes == ["note: --amp fp16 on the CPU runs slower than fp32 (torch's CPU fp16 attention and "
                     "patch-embedding convolution); --amp none for a CPU trial"], notes


def test_onnx_export_matches_torch(vit_runs, tmp_path, capsys):
    root, _ = vit_runs
    assert_onnx_export_matches(str(root / "full" / "checkpoint.pt"), tmp_path, capsys, IMAGE_SIZE)


def test_parameter_free_modules_keep_insightface_keys():
    # Dropout and DropPath carry no state: adding them changes no key.
    model = get_model("vit_t", image_size=IMAGE_SIZE, dropout=0.5)
    assert not any(".drop_path." in k or k.startswith("dropout") for k in model.state_dict())
    assert all(isinstance(block.drop_path, DropPath) for block in model.blocks)
    assert isinstance(model.dropout, nn.Dropout)


def test_a_compiled_models_state_dict_loads(vit_runs, tmp_path):
    # torch.compile's wrapper puts `_orig_mod.` before every key (`_orig_mod.module.` over DDP): a
    # state dict saved from a compiled model is the same backbone, for train.embed and --pretrained_model.
    root, argv = vit_runs
    model, _ = checkpoint.load_backbone(str(root / "full" / "checkpoint.pt"))
    compiled = torch.compile(model).state_dict()  # (compiles lazily: nothing runs here)
    assert all(key.startswith("_orig_mod.") for key in compiled)
    for name, state in (("compiled", compiled), ("compiled_ddp", {k.replace("_orig_mod.", "_orig_mod.module."): v
                                                                   for k, v in compiled.items()})):
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        loaded, settings = checkpoint.load_backbone(str(path))
        assert settings == {"network": "vit_t", "embedding_size": 64, "image_size": IMAGE_SIZE}
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        trainer = Trainer(parse_args(argv(name, pretrained_model=str(path))))
        assert torch.equal(trainer.backbone.pos_embed, model.pos_embed)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_reaches_every_parameter_as_in_arcface_torch(optimizer):
    # arcface_torch hands backbone.parameters() to its optimizer whole: no exemption for norms, biases or
    # the position embedding, which the README's --decay says. (With mask_ratio 0 the frozen mask token,
    # which gets no gradient there either, is left out.)
    args = SimpleNamespace(optimizer=optimizer, lr=0.001, momentum=0.9, decay=0.1)
    for name in ("vit_t", "vit_t_dp005_mask0"):
        model = get_model(name, image_size=IMAGE_SIZE, embedding_size=64)
        centres = nn.Linear(64, 5, bias=False)
        groups = build_optimizer(args, model, centres).param_groups
        decayed = {id(p) for group in groups if group["weight_decay"] == 0.1 for p in group["params"]}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert {"pos_embed", "norm.bias", "blocks.0.norm1.weight", "feature.1.bias"} <= set(trainable)
        assert ("mask_token" in trainable) == (name == "vit_t")
        assert all(id(p) in decayed for p in model.parameters() if p.requires_grad)
        assert id(centres.weight) in decayed


def test_a_pretrained_vit_of_another_size_is_named_by_its_record(vit_runs, tmp_path, capsys):
    # 36 to 44 px give the same 4x4 patches: the weights alone read as 36 px, the checkpoint says 40.
    root, argv = vit_runs
    state = checkpoint.load(str(root / "full" / "checkpoint.pt"))
    state["args"]["image_size"] = 40
    at_40 = tmp_path / "at_40.pt"
    torch.save(state, at_40)
    with pytest.raises(SystemExit, match=r"^--pretrained_model .*at_40\.pt does not fit --network vit_s "
                                         r"--embedding-size 64 --image-size 40: it holds --network vit_t "
                                         r"--embedding-size 64 --image-size 40$"):
        # (the command line's later flags win)
        Trainer(parse_args(argv("vit_s", pretrained_model=str(at_40)) + ["--network", "vit_s", "--image-size", "40"]))
    # The same patches at another size load, and the run says the faces are drawn at another scale.
    Trainer(parse_args(argv("vit_t", pretrained_model=str(at_40))))
    assert f"note: --pretrained_model {at_40} was trained at 40px; this run trains at --image-size 36" \
        in capsys.readouterr().err


def test_a_foreign_state_dict_is_named_in_a_few_short_lines(vit_runs, tmp_path):
    # load_state_dict lists every missing and unexpected key on one line each: pages for a ViT.
    root, argv = vit_runs
    weights = checkpoint.load(str(root / "full" / "checkpoint.pt"))["model"]
    foreign = tmp_path / "foreign.pt"
    # (Under "encoder." all of them would be the network's as a submodule's, and load: one left out.)
    torch.save({"encoder." + k: v for k, v in list(weights.items())[1:]}, foreign)
    with pytest.raises(SystemExit) as raised:
        Trainer(parse_args(argv("foreign", pretrained_model=str(foreign))))
    message = str(raised.value)
    assert message.startswith(f"--pretrained_model {foreign} does not fit --network vit_t")
    assert "Missing key(s)" in message and "Unexpected key(s)" in message
    assert len(message) < 1200 and all(len(line) < 400 for line in message.splitlines()), message
