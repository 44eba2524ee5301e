"""--pretrained_model without --finetuning: which class centres a checkpoint of this trainer hands on."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

import arcface_ext
from train import checkpoint
from train.config import parse_args
from train.trainer import Trainer, main

from trainer_fixtures import base_argv, make_face_folder, one_thread, train_one_thread  # noqa: F401

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(a two-step checkpoint on a folder of 4 identities, that folder)."""
    root = tmp_path_factory.mktemp("pretrained")
    data = make_face_folder(str(root / "faces"), identities=4, images=4)
    assert train_one_thread(base_argv(data, str(root / "run"), loss_impl=LOSS_IMPL, batch_size=8, max_steps=2)) == 0
    return str(root / "run" / "checkpoint.pt"), data


def started(data, output, pretrained_path):
    return Trainer(parse_args(base_argv(str(data), str(output), loss_impl=LOSS_IMPL, batch_size=8,
                                        pretrained_model=pretrained_path)))


def test_class_centres_of_other_identities_are_not_taken(pretrained, tmp_path, capsys):
    # As many identities, other people (or the same in another order): the centres were taken, each label
    # another person's. A trial (50 identities, 64 px): loss 60.3 over the first 10 steps against 23.4 with
    # fresh centres, verification 96.5% -> 92.3% at step 20 (96.3% with fresh ones).
    path, data = pretrained
    centres = checkpoint.load(path)["margin_loss"]["weight"]
    others = make_face_folder(str(tmp_path / "others"), identities=4, images=4)
    os.rename(tmp_path / "others" / "id_000", tmp_path / "others" / "id_100")  # the names differ, not just the pixels
    reordered = tmp_path / "reordered"
    shutil.copytree(data, reordered)
    os.rename(reordered / "id_000", reordered / "id_zzz")  # label 0 is now label 3
    for folder in (tmp_path / "others", reordered):
        capsys.readouterr()
        trainer = started(folder, tmp_path / f"from-{folder.name}", path)
        assert not torch.equal(trainer.margin_loss.weight.detach(), centres)
        err = capsys.readouterr().err
        assert f"note: {path}'s class centres are of other identities than --data {folder}'s" in err
        assert f"initialised the backbone from {path}" in err

    # The same identities: a copy elsewhere (silently), other images of them.
    moved, fewer = tmp_path / "moved", tmp_path / "fewer"
    shutil.copytree(data, moved)
    shutil.copytree(data, fewer)
    os.remove(fewer / "id_001" / "00.png")
    for folder in (moved, fewer):
        capsys.readouterr()
        trainer = started(folder, tmp_path / f"from-{folder.name}", path)
        assert torch.equal(trainer.margin_loss.weight.detach(), centres)
        err = capsys.readouterr().err
        assert "note:" not in err and f"initialised the backbone and class centres from {path}" in err


def test_sub_centres_are_named_with_the_option_that_takes_them(pretrained, tmp_path, capsys):
    # A checkpoint of --subcenters 3 (4 classes, 12 rows) into a run without: the note said '12 x 64 class
    # centres, this run 4 x 64 (4 classes)', as for other identities, and not what would take them.
    _, data = pretrained
    assert main(base_argv(data, str(tmp_path / "k3"), loss_impl=LOSS_IMPL, batch_size=8, max_steps=2,
                          subcenters=3)) == 0
    path = str(tmp_path / "k3" / "checkpoint.pt")
    capsys.readouterr()
    started(data, tmp_path / "k1", path)
    assert (f"note: {path} has 12 x 64 class centres (4 classes x 3 sub-centres), this run 4 x 64 (4 classes): "
            "starting fresh ones (--subcenters 3 takes them)\n") in capsys.readouterr().err
    trainer = Trainer(parse_args(base_argv(data, str(tmp_path / "k3-again"), loss_impl=LOSS_IMPL, batch_size=8,
                                           pretrained_model=path, subcenters=3)))
    assert torch.equal(trainer.margin_loss.weight.detach(), checkpoint.load(path)["margin_loss"]["weight"])


def test_class_centres_for_data_that_names_no_identities_are_taken_with_a_note(pretrained, tmp_path, capsys):
    # The synthetic faces (as a RecordIO set) do not name their identities: only the count can be checked.
    path, _ = pretrained
    centres = checkpoint.load(path)["margin_loss"]["weight"]
    capsys.readouterr()
    trainer = Trainer(parse_args(base_argv("synthetic", str(tmp_path / "run"), loss_impl=LOSS_IMPL, batch_size=8,
                                           synthetic_identities=4, synthetic_images_per_identity=4,
                                           pretrained_model=path)))
    assert torch.equal(trainer.margin_loss.weight.detach(), centres)
    err = capsys.readouterr().err
    assert (f"note: --data synthetic is not the data {path} trained on (its record of its data differs), and their "
            "identities cannot be compared") in err and "for other identities, pass --finetuning" in err


def test_a_file_torch_did_not_write_says_how_it_starts(tmp_path):
    # A text file given as --pretrained_model (or --resume, --model) failed with the unpickler's
    # "KeyError: 104", the code of its first byte, which says nothing.
    text = tmp_path / "notes.pt"
    text.write_text("hello, these are notes\n")
    with pytest.raises(ValueError, match=r"notes\.pt: not a readable checkpoint .*: it starts with b'hello, t', "
                                         r"where torch\.save's files start with b'PK'"):
        checkpoint.load(str(text))


def test_an_onnx_model_is_named_so(tmp_path):
    # insightface's w600k_r50.onnx (or train.export's backbone.onnx) given to checkpoint.load (export's
    # --checkpoint, --resume) was "not a readable checkpoint (truncated, or not saved by torch.save ...?)": it is
    # neither.
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["embedding"])], "backbone",
                                   [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 4])],
                                   [onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, [1, 4])])
    model = tmp_path / "w600k_r50.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=8), str(model))
    renamed = tmp_path / "weights.pt"  # told by its start too
    shutil.copy(model, renamed)
    for path in (model, renamed):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is an ONNX model, not a PyTorch checkpoint: "
                                             r"give the checkpoint or state dict it was exported from "
                                             r"\(train\.export's backbone\.pt, insightface's backbone\.pth\)$"):
            checkpoint.load(str(path))
    # --pretrained_model reads an ONNX model's weights (tests/train/test_onnx_pretrained.py): a graph without the
    # network's layers is refused, naming the file and the network it was read for.
    with pytest.raises(SystemExit, match=rf"^train: error: --pretrained_model {re.escape(str(model))} does not fit "
                                         r"--network small --embedding-size 64 --image-size 32: its graph has 0 "
                                         "convolutions, .*, the network has 13 convolutions") as error:
        main(base_argv("synthetic", str(tmp_path / "run"), loss_impl=LOSS_IMPL, pretrained_model=str(model)))
    assert "\n" not in str(error.value)
    # --resume took the line above, which points at backbone.pt, which --resume then refused ("use
    # --pretrained_model"): a two-step path. Its line names the flag that takes the weights, and the
    # export's backbone.pt where one is beside the graph.
    for beside in (False, True):
        if beside:
            (tmp_path / "backbone.pt").write_bytes(b"")
        weights = (str(tmp_path / "backbone.pt") if beside
                   else "train.export's backbone.pt or insightface's backbone.pth")
        with pytest.raises(SystemExit) as error:
            main(base_argv("synthetic", str(tmp_path / "run"), loss_impl=LOSS_IMPL, resume=str(model)))
        assert str(error.value) == (
            f"train: error: --resume {model} is an ONNX model, not a training checkpoint (--resume continues a run of "
            f"this trainer from its checkpoint.pt): start a new run from the weights it was exported from with "
            f"--pretrained_model {weights}")
