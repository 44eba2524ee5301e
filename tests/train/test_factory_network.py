"""A backbone of one's own, ``--network package.module:factory``: imported where the run is built, resumed,
fine-tuned from, exported and verified, with one-line errors when it is missing or gives another shape."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import arcface_ext
from train import checkpoint, export, verify
from train.config import parse_args
from train.models import get_model, multiply_adds
from train.trainer import main

from trainer_fixtures import (IMAGE_SIZE, REPO, assert_onnx_export_matches, base_argv,  # noqa: F401
                              make_face_folder, one_thread)

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"
MODULE = "h75_own_backbones"  # a name no other test imports
NETWORK = f"{MODULE}:tiny"

SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, embedding_size, image_size, width=8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.PReLU(width),
                                   nn.Conv2d(width, 2 * width, 3, 2, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 * width, embedding_size), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.head(self.trunk(x))


CALLS = []


def tiny(embedding_size=512, image_size=112):
    CALLS.append(image_size)
    return Tiny(embedding_size, image_size)


def one_wider(embedding_size=512, image_size=112):
    return Tiny(embedding_size + 1, image_size)


def sized(size):
    return Tiny(size, size)


def fixed_size(embedding_size, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, embedding_size))


def not_a_module(embedding_size, image_size):
    return "a string"


def needs_depth(depth, embedding_size, image_size):
    return Tiny(embedding_size, image_size)


def any_options(embedding_size, image_size, **options):
    return Tiny(embedding_size, image_size)


class SizeAsserted(Tiny):
    def forward(self, x):  # as timm's patch embedding checks its input (an AssertionError)
        torch._assert(x.shape[-2] == 32, f"Input height ({x.shape[-2]}) doesn't match model (32).")
        return super().forward(x)


def size_asserted(embedding_size, image_size):
    return SizeAsserted(embedding_size, 32)
'''


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """The folder of ``MODULE`` on ``sys.path`` (PYTHONPATH, in a user's shell), its import forgotten after."""
    folder = tmp_path / "own"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield folder
    sys.modules.pop(MODULE, None)


def forget_module(monkeypatch, folder):
    """As a shell whose PYTHONPATH lacks the module's folder."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    sys.modules.pop(MODULE, None)


@pytest.fixture
def faces(tmp_path):
    return make_face_folder(str(tmp_path / "faces"), identities=4, images=4)


def test_a_factory_network_trains_resumes_exports_and_verifies(own_module, faces, tmp_path, capsys):
    output = tmp_path / "run"
    argv = base_argv(faces, str(output), network=NETWORK, batch_size=8, max_steps=4, save_every=2,
                     loss_impl=LOSS_IMPL)
    first = argv[:argv.index("--max-steps")] + ["--max-steps", "2"] + argv[argv.index("--max-steps") + 2:]
    assert main(first) == 0
    # 8x3x3x3 + 16x8x3x3 convolutions on 16x16 and 8x8 maps, and the 64 -> 64 linear head, counted on the
    # network built: the factory is called once (it was called again on the meta device for the count).
    assert "network h75_own_backbones:tiny: 0.01M parameters, 0.1M multiply-adds an image" in capsys.readouterr().err
    assert sys.modules[MODULE].CALLS == [IMAGE_SIZE]
    assert multiply_adds(NETWORK, IMAGE_SIZE, embedding_size=64) == 8 * 27 * 16 * 16 + 16 * 72 * 8 * 8 + 64 * 64
    assert json.loads((output / "args.json").read_text())["network"] == NETWORK
    assert main(argv + ["--resume", "auto"]) == 0
    assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == 4

    exported = tmp_path / "exported"
    assert_onnx_export_matches(str(output / "checkpoint.pt"), exported, capsys, IMAGE_SIZE)
    assert json.loads((exported / "backbone.json").read_text())["network"] == NETWORK
    model, settings = checkpoint.load_backbone(str(exported / "backbone.pt"))
    assert type(model).__name__ == "Tiny" and settings["embedding_size"] == 64
    with torch.no_grad():
        assert model(torch.zeros(3, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (3, 64)

    # Fine-tuning from the export: the factory's weights load into the factory's network.
    tuned = base_argv(faces, str(tmp_path / "tuned"), network=NETWORK, batch_size=8, max_steps=1,
                      loss_impl=LOSS_IMPL, pretrained_model=str(exported / "backbone.pt"), finetuning=True)
    assert main(tuned) == 0
    # Another network told what the file holds, in the options' words.
    other = base_argv(faces, str(tmp_path / "other"), batch_size=8, max_steps=1, loss_impl=LOSS_IMPL,
                      pretrained_model=str(exported / "backbone.pt"))
    with pytest.raises(SystemExit, match=f"it holds --network {NETWORK} --embedding-size 64 --image-size 32$"):
        main(other)
    # The network has no amp attribute: verify's --amp says so (it did say "is an ONNX model").
    capsys.readouterr()
    assert verify.main(["--model", str(exported / "backbone.pt"), "--data", "synthetic", "--amp", "bf16"]) != 0
    assert "is a network of its own (package.module:factory) that has no amp attribute" in capsys.readouterr().err


def test_a_factory_that_does_not_import_is_a_one_line_error_naming_where_it_was_named(own_module, faces, tmp_path,
                                                                                        monkeypatch):
    output = tmp_path / "run"
    argv = base_argv(faces, str(output), network=NETWORK, batch_size=8, max_steps=1, loss_impl=LOSS_IMPL)
    assert main(argv) == 0
    assert export.main(["--checkpoint", str(output / "checkpoint.pt"), "--output", str(tmp_path / "exp"),
                        "--no-onnx"]) == 0
    forget_module(monkeypatch, own_module)
    missing = f"cannot import {MODULE} \\(No module named '{MODULE}'\\); is its folder on PYTHONPATH\\?$"
    with pytest.raises(SystemExit, match=f"^train: error: --network {NETWORK} --image-size 32: {missing}"):
        main(argv + ["--max-steps", "2", "--resume", "auto"])
    for model in (output / "checkpoint.pt", tmp_path / "exp" / "backbone.pt"):
        with pytest.raises(ValueError, match=f"^{model} holds a backbone of network {NETWORK}: {missing}"):
            checkpoint.load_backbone(str(model))
    with pytest.raises(SystemExit, match=f"^train: error: --network {MODULE}:nowhere --image-size 32: cannot import "
                                         f"{MODULE} "):
        main(base_argv(faces, str(tmp_path / "b"), network=f"{MODULE}:nowhere"))


def test_a_module_found_whose_own_import_fails_is_not_said_to_be_off_pythonpath(own_module):
    # Its folder is on PYTHONPATH: what is missing is what it imports (was "cannot import <it> (No module named
    # '<what it imports>'); is its folder on PYTHONPATH?", sending the user after the wrong folder).
    (own_module / "h174_needs_more.py").write_text("import h174_not_installed\n")
    (own_module / "h174_wrong_name.py").write_text(f"from {MODULE} import not_there\n")
    for name, error in (("h174_needs_more", "No module named 'h174_not_installed'"),
                        ("h174_wrong_name", f"cannot import name 'not_there' from '{MODULE}' ")):
        with pytest.raises(ValueError, match="^" + re.escape(f"cannot import {name}: an import in it fails ({error}")):
            get_model(f"{name}:tiny", embedding_size=64, image_size=32)
        assert name not in sys.modules
    with pytest.raises(ValueError, match=re.escape("cannot import h174_own.nets (No module named 'h174_own'); is its "
                                                   "folder on PYTHONPATH?")):
        get_model("h174_own.nets:tiny", embedding_size=64, image_size=32)  # (a package not found: its folder)


@pytest.mark.parametrize("factory, options, message", [
    ("one_wider", {}, r"it maps 2 x 3 x 32 x 32 images to \(2, 65\), not to \(2, 64\): a backbone must give N x "
                      "--embedding-size embeddings"),
    ("not_a_module", {}, "returned a str, not a torch.nn.Module"),
    # (torch 2.15 names the op before its message: "addmm: mat1 and mat2 ...")
    ("fixed_size", {"image_size": 16}, r"it fails on 2 x 3 x 16 x 16 images: (addmm: )?mat1 and mat2 shapes cannot "
                                       r"be multiplied \(2x768 and 3072x64\)$"),
    ("sized", {}, "must take the keyword arguments embedding_size and image_size; it does not take embedding_size "
                  "or image_size"),
    ("missing", {}, f"{MODULE} has no missing"),
    # (an AssertionError's traceback before)
    ("size_asserted", {"image_size": 16}, r"it fails on 2 x 3 x 16 x 16 images: Input height \(16\) doesn't match "
                                          r"model \(32\)\.$"),
    # (a TypeError's traceback before: the factory was called with a parameter of its own left out)
    ("needs_depth", {}, "cannot be called with embedding_size= and image_size=: missing a required argument: "
                        "'depth'"),
    ("tiny", {"amp": "bf16"}, "takes no amp= argument, which --amp needs: leave that option out, or give the "
                              "factory that parameter"),
    ("tiny", {"keep_prob": 0.5}, "takes no dropout= argument, which --keep-prob needs"),
])
def test_a_factory_that_does_not_fit_is_refused_naming_network(own_module, faces, tmp_path, factory, options,
                                                               message):
    argv = base_argv(faces, str(tmp_path / "run"), network=f"{MODULE}:{factory}", **options)
    size = options.get("image_size", IMAGE_SIZE)
    with pytest.raises(SystemExit, match=f"^train: error: --network {MODULE}:{factory} --image-size {size}: "
                                         f".*{message}"):
        main(argv)
    assert not (tmp_path / "run").exists()


def test_the_parser_takes_a_factory_and_names_its_folder_after_it(tmp_path, capsys):
    args = parse_args(["--network", "my_nets.faces:build"])
    assert args.network == "my_nets.faces:build" and args.output == "runs/my_nets.faces.build"
    with pytest.raises(SystemExit):
        parse_args(["--network", "r51"])
    assert "package.module:factory" in capsys.readouterr().err
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"network": "not a factory"}))
    with pytest.raises(SystemExit, match="network 'not a factory' is not one this trainer has: r18, .*"
                                         "package.module:factory"):
        parse_args(["--config", str(config)])


def test_get_model_passes_a_factory_what_it_takes(own_module):
    model = get_model(NETWORK, embedding_size=16, image_size=IMAGE_SIZE, dropout=0.0, gradient_checkpointing=False,
                      amp="none")
    assert model.head[0].out_features == 16
    with pytest.raises(ValueError, match="unknown network 'r51'; expected one of r18, .*package.module:factory"):
        get_model("r51")


def test_a_bare_state_dict_of_a_factory_network_loads_with_the_three_options(own_module, tmp_path):
    # Its shapes say nothing of a network here, and it was refused with all three given ("not a backbone this
    # trainer builds: ... pass --network, --embedding-size and --image-size").
    built = get_model(NETWORK, embedding_size=16, image_size=IMAGE_SIZE)
    path = tmp_path / "backbone.pth"
    torch.save(built.state_dict(), path)
    model, settings = checkpoint.load_backbone(str(path), network=NETWORK, embedding_size=16, image_size=IMAGE_SIZE)
    assert settings == {"network": NETWORK, "embedding_size": 16, "image_size": IMAGE_SIZE}
    torch.testing.assert_close(model.state_dict(), built.state_dict())
    with pytest.raises(ValueError, match="pass --network, --embedding-size and --image-size"):
        checkpoint.load_backbone(str(path), network=NETWORK)


def test_a_file_naming_a_factory_runs_its_module_when_loaded_as_the_readme_warns(own_module, tmp_path):
    # weights_only=True keeps a file's tensors from running code, not its network's name: a backbone.json (or a
    # checkpoint's args) naming package.module:factory has that module imported by train.embed/verify/export.
    (own_module / "h80_side_effect.py").write_text("import pathlib\n"
                                                   "pathlib.Path(__file__).with_suffix('.ran').touch()\n")
    torch.save(get_model(NETWORK, embedding_size=16, image_size=IMAGE_SIZE).state_dict(), tmp_path / "backbone.pt")
    (tmp_path / "backbone.json").write_text(json.dumps({"network": "h80_side_effect:build", "embedding_size": 16,
                                                        "image_size": IMAGE_SIZE}))
    try:
        with pytest.raises(ValueError, match="h80_side_effect has no build"):
            checkpoint.load_backbone(str(tmp_path / "backbone.pt"))
    finally:
        sys.modules.pop("h80_side_effect", None)
    assert (own_module / "h80_side_effect.ran").exists()
    readme = (pathlib.Path(__file__).parents[2] / "docs" / "trainer.md").read_text()
    assert "has its\nmodule imported, which runs that module's code" in readme
    assert "imports that module when it is loaded" in readme


@pytest.mark.slow
def test_verify_of_a_factory_network_trained_under_amp_runs_without_amp_given(own_module, faces, tmp_path, capsys):
    # Its run recorded --amp bf16 (a factory that takes amp= uses it as it builds the network, with no amp
    # attribute to set later): train.verify without --amp refused the run's own amp as if it had been given
    # ("--amp bf16: ... has no amp attribute"). It runs unautocast, and says so; an --amp given is still refused.
    output = tmp_path / "run"
    assert main(base_argv(faces, str(output), network=f"{MODULE}:any_options", batch_size=8, max_steps=1,
                          loss_impl=LOSS_IMPL)) == 0
    state = checkpoint.load(str(output / "checkpoint.pt"))
    state["args"]["amp"] = "bf16"
    torch.save(state, output / "checkpoint.pt")
    capsys.readouterr()
    assert verify.main(["--model", str(output / "checkpoint.pt"), "--data", "synthetic"]) == 0
    assert ("the run trained under --amp bf16; this network of its own (package.module:factory) has no amp attribute "
            "to autocast by: verified in fp32 (--amp none: without this note)" in capsys.readouterr().err)
    assert verify.main(["--model", str(output / "checkpoint.pt"), "--data", "synthetic", "--amp", "bf16"]) != 0
    assert "has no amp attribute" in capsys.readouterr().err
    readme = (pathlib.Path(__file__).parents[2] / "docs" / "trainer.md").read_text()
    assert "else verifies\nin fp32, with a note where its run trained under `--amp`" in readme


@pytest.mark.slow
def test_a_factory_in_a_scripts_main_trains_with_a_note_and_is_then_a_one_line_error(faces, tmp_path, capsys):
    # A script that defines its network and calls the trainer: the run has it, but train.export and the
    # others import __main__ as their own later ("__main__ has no tiny" said nothing of why).
    output = tmp_path / "run"
    argv = base_argv(faces, str(output), network="__main__:tiny", batch_size=8, max_steps=1, loss_impl=LOSS_IMPL)
    script = tmp_path / "my_training.py"
    script.write_text(SOURCE + f"\nimport sys\nfrom train.trainer import main\nsys.exit(main({argv!r}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert ("note: --network __main__:tiny is found in this program only: train.export, train.embed, train.verify "
            "and python -m train --resume import __main__ as their own and will not find it; put it in a module and "
            "name it module:tiny") in child.stderr
    program = re.escape(sys.modules["__main__"].__file__)  # (pytest's, here: the program that loads the file)
    missing = (f"__main__ \\({program}\\) has no tiny: a network named __main__:\\.\\.\\. is found only in the script "
               "that defines it, run as the main program; put it in a module and name it module:tiny")
    with pytest.raises(ValueError, match=f"^{re.escape(str(output / 'checkpoint.pt'))} holds a backbone of network "
                                         f"__main__:tiny: {missing}$"):
        checkpoint.load_backbone(str(output / "checkpoint.pt"))
    assert export.main(["--checkpoint", str(output / "checkpoint.pt"), "--output", str(tmp_path / "exp"),
                        "--no-onnx"]) != 0
    assert re.search(missing, capsys.readouterr().err)
