"""--margin-warmup-steps: the loss's margin ramped from none to its value over the first optimiser steps."""

import os
import re

import pytest

from train import checkpoint
from train.config import parse_args, steps_from_epochs, unused_options, warmed_up_margins
from train.trainer import main

from trainer_fixtures import LOSS_IMPL, base_argv, faces, one_thread, read_jsonl  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def argv(faces, output, **overrides):
    data, _ = faces
    return base_argv(data, str(output), **{"loss_impl": LOSS_IMPL, **overrides})


def test_the_margins_rise_linearly_m1_from_1():
    args = parse_args(["--loss", "combined", "--m1", "1.2", "--m2", "0.3", "--m3", "0.1", "--margin-warmup-steps", "4"])
    assert warmed_up_margins(args, 0) == (1.0, 0.0, 0.0)
    assert warmed_up_margins(args, 2) == pytest.approx((1.1, 0.15, 0.05))
    assert warmed_up_margins(args, 4) == warmed_up_margins(args, 40) == (1.2, 0.3, 0.1)
    assert warmed_up_margins(parse_args(["--loss", "combined", "--m2", "0.3"]), 0) == (1.0, 0.3, 0.0)  # (off)


@pytest.mark.parametrize("loss", ["adaface", "magface"])
def test_losses_whose_margins_follow_the_norm_refuse_it(loss):
    with pytest.raises(SystemExit, match=f"^--margin-warmup-steps does not go with --loss {loss}, "):
        parse_args(["--loss", loss, "--margin-warmup-steps", "100"])
    with pytest.raises(SystemExit, match=f"^--margin-warmup-epochs does not go with --loss {loss}, "):
        parse_args(["--loss", loss, "--margin-warmup-epochs", "0.5"])
    parse_args(["--loss", loss, "--margin-warmup-steps", "0"])  # (off: taken)


def test_epochs_and_checks():
    args = parse_args(["--margin-warmup-epochs", "1.5", "--max-steps", "100"])
    assert args.margin_warmup_steps is None
    steps_from_epochs(args, 10)
    assert args.margin_warmup_steps == 15
    # The later of the two spellings counts, as for --warmup-steps.
    assert parse_args(["--margin-warmup-epochs", "2", "--margin-warmup-steps", "7"]).margin_warmup_epochs is None
    with pytest.raises(SystemExit, match="--margin-warmup-steps must be at least 0, got -1"):
        parse_args(["--margin-warmup-steps", "-1"])
    with pytest.raises(SystemExit, match="--margin-warmup-epochs must be finite and >= 0, got -1"):
        parse_args(["--margin-warmup-epochs", "-1"])
    args = parse_args(["--margin-warmup-steps", "400", "--max-steps", "300"])
    assert "--margin-warmup-steps 400 is more than --max-steps 300: the margin rises to 75% of its value, no further" \
        in unused_options(args)


def test_a_warm_up_as_long_as_the_run_never_reaches_the_whole_margin():
    # Step k trains at k/N of it: the whole margin comes at step N, past a run of N steps (its last: (N-1)/N).
    args = parse_args(["--margin-warmup-steps", "300", "--max-steps", "300"])
    assert "--margin-warmup-steps 300 is as long as --max-steps 300: the margin rises to 99.7% of its value, no " \
        "further" in unused_options(args)
    # (Not rounded up to all of it.)
    args = parse_args(["--margin-warmup-steps", "1001", "--max-steps", "1000"])
    assert "--margin-warmup-steps 1001 is more than --max-steps 1000: the margin rises to 99.8% of its value, no " \
        "further" in unused_options(args)
    assert not [note for note in unused_options(parse_args(["--margin-warmup-steps", "299", "--max-steps", "300"]))
                if "margin" in note]


# (--loss and options, and the flags that give its margins: the losses the warm-up takes, on each of their paths)
ARC, COS, SPHERE = {"--arcface-m": "m2"}, {"--m3": "m3"}, {"--m1": "m1"}
WARMED_UP = [(["--loss", "arcface"], ARC), (["--loss", "cosface"], COS), (["--loss", "sphereface"], SPHERE),
             (["--loss", "combined", "--m1", "1.2", "--m3", "0.1"], {"--m1": "m1", "--m2": "m2", "--m3": "m3"}),
             (["--loss", "elasticface-arc", "--elastic-std", "0"], ARC),
             (["--loss", "elasticface-cos+", "--elastic-std", "0"], COS), (["--loss", "curricularface"], ARC),
             (["--loss", "arcface", "--subcenters", "3"], ARC), (["--loss", "cosface", "--sample-rate", "0.5"], COS),
             (["--loss", "arcface", "--interclass-filter", "0.2"], ARC),
             (["--loss", "sphereface", "--loss-impl", "reference"], SPHERE)]


@pytest.mark.parametrize("options, flags", WARMED_UP, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_the_module_trains_at_the_margins_it_is_given(options, flags):
    # The trainer sets the built module's m1, m2 and m3 each step: its loss is that of a module built with them.
    import torch

    from train.trainer import build_margin_loss

    args = parse_args(options + ["--margin-warmup-steps", "4", "--embedding-size", "8"])
    torch.manual_seed(0)  # (centres drawn from another stream than the embeddings: far from them)
    warmed = build_margin_loss(args, 20)
    warmed.m1, warmed.m2, warmed.m3 = warmed_up_margins(args, 1)
    margins = dict(zip(("m1", "m2", "m3"), warmed_up_margins(args, 1)))
    given = [token for flag, name in flags.items() for token in (flag, str(margins[name]))]
    built = build_margin_loss(parse_args(options + given + ["--embedding-size", "8"]), 20)
    built.load_state_dict(warmed.state_dict())
    embeddings, labels = torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 20
    torch.manual_seed(0)
    loss = warmed(embeddings, labels)
    torch.manual_seed(0)  # (the same classes sampled)
    assert loss.item() == built(embeddings, labels).item()
    warmed.m1, warmed.m2, warmed.m3 = warmed_up_margins(args, 4)
    torch.manual_seed(0)
    assert warmed(embeddings, labels).item() > loss.item() + 1  # (the whole margin: another loss)


@pytest.mark.slow
def test_the_ramped_margin_is_trained_with_and_logged(faces, tmp_path, capsys):
    # The first step trains at no margin: its loss is that of a run at --arcface-m 0, to the bit.
    assert main(argv(faces, tmp_path / "none", max_steps=1, arcface_m=0.0)) == 0
    assert main(argv(faces, tmp_path / "ramp", max_steps=6, margin_warmup_steps=4, arcface_m=0.4)) == 0
    records = read_jsonl(tmp_path / "ramp" / "metrics.jsonl")
    assert [r["margin"] for r in records] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert records[0]["loss"] == read_jsonl(tmp_path / "none" / "metrics.jsonl")[0]["loss"]
    log = (tmp_path / "ramp" / "training.log").read_text()
    assert "margin warm-up: linear from none over 4 steps (margin 0 at step 0)" in log
    assert ", margin 0.3, " in log and ", margin 0.4, " not in log  # (the lines while it rises)
    assert "margin" not in read_jsonl(tmp_path / "none" / "metrics.jsonl")[0]


@pytest.mark.slow
def test_the_progress_bar_shows_the_margin_while_it_rises(faces, tmp_path, capsys, monkeypatch):
    # As the lines: the margin of each logged step while it rises, none once it is whole.
    monkeypatch.setattr("train.trainer._is_terminal", lambda stream: True, raising=False)
    assert main(argv(faces, tmp_path, max_steps=6, log_every=1, margin_warmup_steps=4, arcface_m=0.4)) == 0
    err = capsys.readouterr().err
    assert sorted(set(re.findall(r"\bmargin=([\d.]+)", err))) == ["0", "0.1", "0.2", "0.3"], err
    # (the bar's last drawing, at step 6, at the whole margin: without it)
    assert "margin=" not in err.rsplit("\r", 1)[-1] and "loss=" in err.rsplit("\r", 1)[-1], err


@pytest.mark.slow
def test_the_compiled_backbone_is_compiled_once_while_the_margin_rises(faces, tmp_path):
    # --compile compiles the backbone alone. The margin, which the warm-up changes at every step, is a constant of
    # any graph the loss is in (docs/usage.md, margin schedules under torch.compile): the loss stays outside, so
    # the backbone's one graph serves every step. (aot_eager: the graphs are dynamo's, whatever the backend.)
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert main(argv(faces, tmp_path, max_steps=6, margin_warmup_steps=4, arcface_m=0.4, compile=True,
                     compile_backend="aot_eager")) == 0
    assert [r["margin"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.slow
def test_gradient_accumulation_counts_optimiser_steps_and_a_resume_is_the_unbroken_run(faces, tmp_path, monkeypatch,
                                                                                       capsys):
    from trainer_fixtures import run_killed_at

    options = dict(max_steps=6, save_every=2, batch_size=8, gradient_acc=2, keep_prob=0.8, loss="combined", m1=1.1,
                   m2=0.3, m3=0.1, margin_warmup_steps=4)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0
    records = read_jsonl(full / "metrics.jsonl")
    assert [r["m2"] for r in records] == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3, 0.3])
    run_killed_at(3, argv(faces, killed, **options), monkeypatch)
    assert checkpoint.load(str(killed / "checkpoint.pt"))["step"] == 2
    assert main(argv(faces, killed, resume="auto", **options)) == 0
    assert "(m1 1.05, m2 0.15, m3 0.05 at step 2)" in capsys.readouterr().err
    assert read_jsonl(killed / "metrics.jsonl") == [{**r, "samples_per_sec": r2["samples_per_sec"], "time": r2["time"]}
                                                    for r, r2 in zip(records, read_jsonl(killed / "metrics.jsonl"))]
    a, b = checkpoint.load(str(full / "checkpoint.pt")), checkpoint.load(str(killed / "checkpoint.pt"))
    assert all((a["model"][key] == b["model"][key]).all() for key in a["model"])
    assert (a["margin_loss"]["weight"] == b["margin_loss"]["weight"]).all()
    # Another warm-up is another run.
    with pytest.raises(SystemExit, match="--margin-warmup-steps 4 in the checkpoint, 5 requested"):
        main(argv(faces, killed, resume="auto", **{**options, "max_steps": 8, "margin_warmup_steps": 5}))
    assert os.path.exists(killed / "checkpoint.pt")
