"""``--teacher``: embedding distillation from a frozen teacher backbone. The term is 0 for a student that
starts as its teacher and falls as a student learns; at weight 0 the run is one without a teacher, bit for
bit; a distilled run resumes exactly, and only with its own teacher; the checkpoint and the export hold the
student alone; mistakes are one-line errors naming the option."""

import hashlib
import math
import os
import shutil
import sys
import types

import pytest
import torch

from train import checkpoint, export
from train.config import build_parser, parse_args
from train.distill import distillation_loss, onnx_digest, weights_digest
from train.trainer import Trainer, main

from trainer_fixtures import (IMAGE_SIZE, LOSS_IMPL, base_argv, faces, one_thread, read_jsonl,  # noqa: F401
                              run_killed_at, train_one_thread)

MODULE = "h101_own_backbones"  # a name no other test imports
# A network without BatchNorm or dropout: in training mode it computes what it computes in eval mode, so a
# student that starts as its teacher starts at a term of 0 (BatchNorm normalises a training batch with
# its own statistics, the frozen teacher with its running ones).
SOURCE = '''
from torch import nn


def plain(embedding_size=512, image_size=112):
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.PReLU(8), nn.Conv2d(8, 16, 3, 2, 1), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, embedding_size))
'''


def argv(faces, output, **overrides):
    data, _ = faces
    return base_argv(data, str(output), **{"loss_impl": LOSS_IMPL, "log_every": 1, **overrides})


def metrics(output, key):
    return [r[key] for r in read_jsonl(os.path.join(output, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def teacher(faces, tmp_path_factory):
    """A checkpoint of the small network after 6 steps on ``faces`` (64-D embeddings at 32 px)."""
    output = tmp_path_factory.mktemp("teacher")
    assert train_one_thread(argv(faces, output, max_steps=6, save_every=0)) == 0
    return str(output / "checkpoint.pt")


def test_the_terms_are_the_papers():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 16), torch.randn(5, 16)
    cosine = torch.nn.functional.cosine_similarity(student, teacher)
    torch.testing.assert_close(distillation_loss(student, teacher, "cosine"), (1 - cosine).mean())
    # mse: F.mse_loss of the unit embeddings, the mean over the elements: 2 (1 - cos) / D.
    torch.testing.assert_close(distillation_loss(student, teacher, "mse"), (2 * (1 - cosine) / 16).mean())
    # Directions only: another norm is no distance.
    assert distillation_loss(3 * teacher, teacher, "cosine").abs() < 1e-6
    assert distillation_loss(3 * teacher, teacher, "mse").abs() < 1e-6
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        distillation_loss(student, teacher, "kl")


def test_a_student_that_starts_as_its_teacher_starts_at_a_term_of_0(faces, tmp_path, monkeypatch):
    # The teacher a bare state dict of a network of one's own (its shapes name no network: --teacher-network
    # names it, built at the run's sizes); the student starts from the checkpoint of the same weights.
    folder = tmp_path / "own"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    network = f"{MODULE}:plain"
    assert main(argv(faces, tmp_path / "teacher", network=network, max_steps=2, save_every=0)) == 0
    bare = tmp_path / "teacher.pth"
    torch.save(checkpoint.load(str(tmp_path / "teacher" / "checkpoint.pt"))["model"], bare)
    with pytest.raises(SystemExit, match=r"--teacher: .*not a backbone this trainer builds.*; or name its network "
                                         r"with --teacher-network$"):
        Trainer(parse_args(argv(faces, tmp_path / "refused", network=network, teacher=bare)))

    student = tmp_path / "student"
    assert main(argv(faces, student, network=network, max_steps=3, teacher=bare, teacher_network=network,
                     pretrained_model=tmp_path / "teacher" / "checkpoint.pt")) == 0
    distill = metrics(student, "distill")
    assert distill[0] < 1e-6, distill  # step 1's term: the weights before any step
    assert distill[1] > 1e-4  # after a step of the margin loss the two differ
    sys.modules.pop(MODULE, None)


def test_the_term_falls_and_is_logged_where_the_loss_is(faces, teacher, tmp_path, monkeypatch, capsys):
    scalars = []

    class Writer:  # what the trainer asks of TensorBoard's SummaryWriter
        def __init__(self, log_dir, purge_step=None):
            self.file_writer = types.SimpleNamespace(add_summary=lambda summary: None)

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard.summary",
                        types.SimpleNamespace(hparams=lambda values, metrics: []))
    run = [a for a in argv(faces, tmp_path, max_steps=16, teacher=teacher, distill_weight=50)
           if a != "--no-tensorboard"]
    assert main(run) == 0
    distill = metrics(tmp_path, "distill")
    assert len(distill) == 16 and all(math.isfinite(v) for v in distill)
    assert sum(distill[-4:]) < 0.7 * sum(distill[:4]), distill
    assert [(step, value) for tag, step, value in scalars if tag == "train/distill"] == list(enumerate(distill, 1))
    err = capsys.readouterr().err
    digest = weights_digest(checkpoint.load_backbone(teacher)[0])
    said = (f"distillation: teacher small from {teacher} (0.32M parameters, 64-D, 32px input; weights sha256 "
            f"{digest[:16]}); cosine term, weight 50")
    assert said in err
    line = f"[step 16/16] loss {metrics(tmp_path, 'loss')[-1]:.4f}, distill {distill[-1]:.4f}, lr "
    assert line in err
    log = (tmp_path / "training.log").read_text()
    assert said in log and line in log


def test_weight_0_is_a_run_without_a_teacher_bit_for_bit(faces, teacher, tmp_path):
    # The term measured (and logged), not trained on; building the teacher draws nothing from the run's
    # generators. Dropout on, so that the generators' states matter.
    options = dict(max_steps=4, keep_prob=0.8)
    assert main(argv(faces, tmp_path / "plain", **options)) == 0
    assert main(argv(faces, tmp_path / "measured", teacher=teacher, distill_weight=0, **options)) == 0
    assert metrics(tmp_path / "measured", "loss") == metrics(tmp_path / "plain", "loss")
    assert all(v > 0 for v in metrics(tmp_path / "measured", "distill"))
    a = checkpoint.load(str(tmp_path / "plain" / "checkpoint.pt"))
    b = checkpoint.load(str(tmp_path / "measured" / "checkpoint.pt"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["margin_loss"]["weight"], b["margin_loss"]["weight"])


def test_a_distilled_run_resumes_exactly(faces, teacher, tmp_path, monkeypatch):
    # Two passes a step, dropout on: the teacher's batches are each pass's images.
    options = dict(max_steps=6, save_every=3, keep_prob=0.8, batch_size=8, gradient_acc=2, teacher=teacher,
                   distill_loss="mse", distill_weight=50)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0
    run_killed_at(4, argv(faces, killed, **options), monkeypatch)
    assert main(argv(faces, killed, resume="auto", **options)) == 0
    assert metrics(killed, "loss") == metrics(full, "loss") and len(metrics(full, "loss")) == 6
    assert metrics(killed, "distill") == metrics(full, "distill")


def test_the_checkpoint_names_the_teacher_and_holds_the_student_alone(faces, teacher, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2, teacher=teacher)) == 0
    state = checkpoint.load(str(output / "checkpoint.pt"))
    teacher_model, _ = checkpoint.load_backbone(teacher)
    assert state["teacher"] == {"path": teacher, "digest": weights_digest(teacher_model), "network": "small",
                                "embedding_size": 64, "image_size": IMAGE_SIZE}
    student = Trainer(parse_args(argv(faces, tmp_path / "bare", max_steps=2))).backbone
    assert state["model"].keys() == student.state_dict().keys()
    # Nothing else in the file is a tensor of the teacher's.
    teacher_shapes = {tuple(t.shape) for t in teacher_model.state_dict().values() if t.numel() > 64}
    loose = [key for key, value in state.items() if key not in ("model", "margin_loss", "optimizer", "scheduler",
                                                                "scaler", "rng", "target_angles")]
    assert not any(torch.is_tensor(state[key]) for key in loose)
    assert teacher_shapes and not any(torch.is_tensor(v) and tuple(v.shape) in teacher_shapes
                                      for v in state["teacher"].values())
    assert export.main(["--checkpoint", str(output / "checkpoint.pt"), "--output", str(tmp_path / "export"),
                        "--no-onnx"]) == 0
    exported = torch.load(tmp_path / "export" / "backbone.pt", weights_only=True)
    assert exported.keys() == student.state_dict().keys()
    for key, value in exported.items():
        assert torch.equal(value, state["model"][key]), key


def test_resume_takes_the_same_teacher_only(faces, teacher, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2, teacher=teacher, distill_weight=3)) == 0
    digest = checkpoint.load(str(output / "checkpoint.pt"))["teacher"]["digest"][:16]
    other = tmp_path / "other"
    assert main(argv(faces, other, max_steps=1, seed=1)) == 0
    for extra, message in [
        # (the teacher named, not the --distill-weight that a command line without it lacks too)
        (dict(), rf"that run distilled from {teacher} \(weights sha256 {digest}\); no --teacher requested\. "
                 rf"Continue that run with --teacher {teacher} --distill-weight 3\.0 --distill-loss cosine, or start "
                 r"a new one \(another --output\) from its weights with --pretrained_model"),
        (dict(teacher=other / "checkpoint.pt", distill_weight=3),
         rf"that run distilled from {teacher} \(weights sha256 {digest}\); --teacher {other / 'checkpoint.pt'} holds "
         r"other weights"),
        (dict(teacher=teacher, distill_weight=2), r"--distill-weight 3\.0 in the checkpoint, 2\.0 requested"),
        (dict(teacher=teacher, distill_weight=3, distill_loss="mse"),
         r"--distill-loss cosine in the checkpoint, mse requested"),
    ]:
        with pytest.raises(SystemExit, match=message):
            Trainer(parse_args(argv(faces, output, max_steps=4, resume="auto", **extra)))
    with pytest.raises(SystemExit, match=r"that run trained without a teacher; --teacher .* requested\. Continue that "
                                         r"run without --teacher, or start a new one"):
        Trainer(parse_args(argv(faces, other, max_steps=4, resume="auto", teacher=teacher, distill_weight=3, seed=1)))
    # The same weights elsewhere (train.export's backbone.pt of the teacher's checkpoint): a note, and on.
    assert export.main(["--checkpoint", teacher, "--output", str(tmp_path / "moved"), "--no-onnx"]) == 0
    moved = str(tmp_path / "moved" / "backbone.pt")
    capsys.readouterr()
    assert main(argv(faces, output, max_steps=3, resume="auto", teacher=moved, distill_weight=3)) == 0
    assert (f"note: --teacher {moved} holds the weights of the teacher that run distilled from, {teacher}: the run "
            "goes on with them") in capsys.readouterr().err
    assert checkpoint.load(str(output / "checkpoint.pt"))["teacher"]["path"] == moved


def test_a_teacher_in_the_output_folder_is_followed_where_it_is_set_aside(faces, teacher, tmp_path, capsys):
    # The student trained in its teacher's folder: the teacher's run is set aside into earlier-1, and the
    # checkpoint names the teacher there (it named the path of the student's own checkpoint: a resume with it
    # was refused as other weights, a resume with the teacher's new place noted as a moved teacher).
    folder = tmp_path / "run"
    shutil.copytree(os.path.dirname(teacher), folder)
    given = str(folder / "checkpoint.pt")
    assert main(argv(faces, folder, max_steps=2, teacher=given)) == 0
    moved = str(folder / "earlier-1" / "checkpoint.pt")
    assert f"note: --teacher {given} was set aside with that run: resume this one with --teacher {moved}" in \
        capsys.readouterr().err
    assert checkpoint.load(given)["teacher"]["path"] == moved
    with pytest.raises(SystemExit, match=rf"that run distilled from {moved} \(weights sha256 [0-9a-f]{{16}}\); "
                                         rf"--teacher {given} holds other weights"):
        Trainer(parse_args(argv(faces, folder, max_steps=3, resume="auto", teacher=given)))
    # The run's args.json names it there too: as a config, it resumes the run (it named the old path).
    assert main(["--config", str(folder / "args.json"), "--resume", "auto", "--max-steps", "3"]) == 0
    assert "note: --teacher" not in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--distill-weight", "2"], r"--distill-weight 2\.0 goes with --teacher .*: give --teacher too"),
    # Its default, given: as silent as forgetting --teacher was, before.
    (["--distill-weight", "1", "--distill-loss", "cosine"],
     r"--distill-weight 1\.0 and --distill-loss cosine go with --teacher"),
    (["--distill-w=1"], r"--distill-weight 1\.0 goes with --teacher"),
    (["--teacher-network", "r50", "--distill-loss", "mse"],
     r"--teacher-network r50 and --distill-loss mse go with --teacher"),
    (["--teacher", "t.pt", "--distill-weight", "-1"], r"--distill-weight must be a finite number >= 0, got -1\.0"),
    (["--teacher", "t.pt", "--distill-weight", "nan"], r"--distill-weight must be a finite number >= 0, got nan"),
])
def test_distillation_options_are_checked_before_the_run(options, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(options)


def test_a_config_listing_the_distillation_defaults_runs_without_a_teacher(tmp_path):
    # args.json lists every option: a run without a teacher is a config with the defaults named.
    config = tmp_path / "args.json"
    config.write_text('{"distill_weight": 1.0, "distill_loss": "cosine", "teacher": null}')
    args = parse_args(["--config", str(config)])
    assert args.teacher is None
    assert set(vars(args)) <= set(vars(build_parser().parse_args([])))  # nothing but options (args.json lists them)


def test_a_teacher_that_does_not_fit_is_a_one_line_error(faces, teacher, tmp_path):
    with pytest.raises(SystemExit, match=rf"--teacher: {teacher} gives 64-D embeddings, the student 32-D "
                                         r"\(--embedding-size\): distillation compares them one to one"):
        main(argv(faces, tmp_path / "a", teacher=teacher, embedding_size=32))
    with pytest.raises(SystemExit, match=rf"--teacher: no checkpoint at {tmp_path / 'none.pt'}"):
        Trainer(parse_args(argv(faces, tmp_path / "b", teacher=tmp_path / "none.pt")))
    with pytest.raises(SystemExit, match=rf"--teacher with --teacher-network r18: {teacher} records --network small"):
        Trainer(parse_args(argv(faces, tmp_path / "c", teacher=teacher, teacher_network="r18")))
    # A bare state dict that is no network of this trainer's, named as one: what to name instead (was "pass
    # --network, --embedding-size and --image-size", train.export's options, which here are the student's).
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "own.pth")
    with pytest.raises(SystemExit) as caught:
        Trainer(parse_args(argv(faces, tmp_path / "d", teacher=tmp_path / "own.pth", teacher_network="r18")))
    assert str(caught.value).startswith(f"--teacher with --teacher-network r18: {tmp_path / 'own.pth'}: not a "
                                        "backbone this trainer builds: ")
    assert str(caught.value).endswith(": not the weights of network r18; a network of your own is --teacher-network "
                                      "package.module:factory"), str(caught.value)
    assert not os.path.exists(tmp_path / "a")  # (stopped at start-up: no folder left behind)


def test_a_teacher_of_another_input_size_sees_the_images_resized(faces, teacher, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(argv(faces, output, max_steps=2, image_size=48, teacher=teacher)) == 0
    err = capsys.readouterr().err
    assert (f"note: --teacher {teacher} takes 32px images: the run's 48px images (--image-size) are resized to that "
            "size for it") in err
    assert "32px input, the run's images resized to it" in err
    assert all(0 < v < 2 for v in metrics(output, "distill"))


def test_a_teacher_that_records_no_image_size_is_taken_at_the_runs_where_its_weights_fit_it(faces, teacher,
                                                                                              tmp_path, capsys):
    # Its bare weights (a Lightning checkpoint's, say) fit 1 to 32 px: at a 24 px run it sees the run's images as
    # they are. It was taken as 32 px, the images resized up for it, with a note.
    bare = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in checkpoint.load(teacher)["model"].items()}}, bare)
    capsys.readouterr()
    run = Trainer(parse_args(argv(faces, tmp_path / "run", image_size=24, teacher=str(bare))))
    assert (run.teacher.input_size, run.teacher.resized) == (24, False)
    assert "teacher" not in capsys.readouterr().err  # (no note of a guessed size, nor of resized images)
    # A size its weights do not fit: the guess, and the images resized to it, as before.
    run = Trainer(parse_args(argv(faces, tmp_path / "run48", image_size=48, teacher=str(bare))))
    assert (run.teacher.input_size, run.teacher.resized) == (32, True)
    assert "takes 32px images: the run's 48px images (--image-size) are resized" in capsys.readouterr().err


def test_an_onnx_teachers_digest_covers_its_external_data(teacher, tmp_path):
    # A model over 2 GB keeps its weights in files beside the graph: the digest covered the graph alone,
    # so a resume with other weights there was taken for the same teacher.
    onnx = pytest.importorskip("onnx")
    assert export.main(["--checkpoint", teacher, "--output", str(tmp_path / "export"), "--opset", "17"]) == 0
    model = onnx.load(str(tmp_path / "export" / "backbone.onnx"))
    path = str(tmp_path / "external.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location="external.data", size_threshold=0)
    before = onnx_digest(path)
    with open(tmp_path / "external.data", "r+b") as f:  # another weight, the graph file unchanged
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert onnx_digest(path) != before
    inline = str(tmp_path / "export" / "backbone.onnx")
    assert onnx_digest(inline) == hashlib.sha256(open(inline, "rb").read()).hexdigest()  # as before, without


def test_an_onnx_teachers_digest_without_the_onnx_package_is_its_files(tmp_path, monkeypatch, capsys):
    # onnxruntime runs a teacher without the onnx package (train.onnx_backbone reads the graph without it, with
    # a note): the digest needed it, an ImportError's traceback.
    graph = tmp_path / "teacher.onnx"
    graph.write_bytes(b"not read: the file's bytes are the digest")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert onnx_digest(str(graph)) == hashlib.sha256(graph.read_bytes()).hexdigest()
    assert "without the onnx package the files of external data" in capsys.readouterr().err


def test_an_onnx_teacher_gives_the_term_its_pytorch_model_gives(faces, teacher, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    assert export.main(["--checkpoint", teacher, "--output", str(tmp_path / "export")]) == 0
    onnx_model = str(tmp_path / "export" / "backbone.onnx")
    with pytest.raises(SystemExit, match=r"--teacher with --teacher-network small: .*backbone\.onnx is an ONNX model, "
                                         r"whose graph is its network: --teacher-network is for a bare state dict; "
                                         r"leave it out"):
        Trainer(parse_args(argv(faces, tmp_path / "refused", teacher=onnx_model, teacher_network="small")))
    assert main(argv(faces, tmp_path / "torch", max_steps=2, teacher=teacher)) == 0
    assert main(argv(faces, tmp_path / "onnx", max_steps=2, teacher=onnx_model)) == 0
    assert metrics(tmp_path / "onnx", "distill") == pytest.approx(metrics(tmp_path / "torch", "distill"), abs=1e-5)
    assert checkpoint.load(str(tmp_path / "onnx" / "checkpoint.pt"))["teacher"]["network"] == "onnx"
    # The export of the teacher's weights is another teacher on resume, said as such (it was 'other weights').
    for run, given, kinds in [("torch", onnx_model, ("a PyTorch network", "an ONNX graph")),
                              ("onnx", teacher, ("an ONNX graph", "a PyTorch network"))]:
        with pytest.raises(SystemExit, match=rf"that run distilled from .*, {kinds[0]}; --teacher {given} is "
                                             rf"{kinds[1]}, which computes the embeddings otherwise"):
            Trainer(parse_args(argv(faces, tmp_path / run, max_steps=3, resume="auto", teacher=given)))
