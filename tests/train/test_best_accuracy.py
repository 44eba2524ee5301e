"""The verification log's best accuracy so far per target (arcface_torch's "Accuracy-Highest"), kept over a resume."""

import json
import shutil

import pytest

from train import checkpoint
from train.trainer import main

from trainer_fixtures import LOSS_IMPL, base_argv, faces, one_thread, read_jsonl, run_killed_at  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def argv(faces, output, **overrides):
    data, pairs = faces
    return base_argv(data, str(output), pairs, **{"loss_impl": LOSS_IMPL, **overrides})


def bests(records):
    """(best_accuracy, best_step) each record should carry: the highest accuracy so far, its first step."""
    out, best = [], None
    for r in records:
        if best is None or r["accuracy"] > best[0]:
            best = (r["accuracy"], r["step"])
        out.append(best)
    return out


@pytest.mark.slow
def test_the_best_accuracy_so_far_is_logged_and_resumed(faces, tmp_path, monkeypatch, capsys):
    options = dict(max_steps=6, eval_every=1, save_every=2, lr=0.5)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(faces, full, **options)) == 0
    records = read_jsonl(full / "verification.jsonl")
    assert [r["step"] for r in records] == list(range(7))
    assert [(r["best_accuracy"], r["best_step"]) for r in records] == bests(records)
    log = (full / "training.log").read_text()
    for r in records:
        assert (f"[step {r['step']}] pairs: accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} (threshold "
                f"{r['threshold']:.3f}, xnorm {r['xnorm']:.2f}) (best {r['best_accuracy']:.4f} at step "
                f"{r['best_step']})") in log

    run_killed_at(3, argv(faces, killed, **options), monkeypatch)
    # A checkpoint and a log of a version before the best was kept (their records without it).
    state = checkpoint.load(str(killed / "checkpoint.pt"))
    for record in state["verification"].values():
        del record["best_accuracy"], record["best_step"]
    checkpoint.save_atomic(state, str(killed / "checkpoint.pt"))
    old = [{k: v for k, v in r.items() if k not in ("best_accuracy", "best_step")}
           for r in read_jsonl(killed / "verification.jsonl")]
    old[1]["accuracy"] = 1.0  # (the highest of the log, before the checkpoint's step 2)
    (killed / "verification.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    logless = tmp_path / "logless"  # (the same, without the log)
    shutil.copytree(killed, logless)
    (logless / "verification.jsonl").unlink()

    # The best is the log's, of its records up to the checkpoint's step.
    assert main(argv(faces, killed, resume="auto", **options)) == 0
    resumed = read_jsonl(killed / "verification.jsonl")
    assert [r["step"] for r in resumed] == list(range(7))
    assert [(r["best_accuracy"], r["best_step"]) for r in resumed[3:]] == [(1.0, 1)] * 4
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] if r["step"] != 1 else 1.0 for r in records]

    # Without the log, its last record's accuracy is the best known.
    assert main(argv(faces, logless, resume="auto", **options)) == 0
    resumed = read_jsonl(logless / "verification.jsonl")
    assert [r["step"] for r in resumed] == list(range(3, 7))
    since = [{"step": 2, "accuracy": records[2]["accuracy"]}] + resumed
    assert [(r["best_accuracy"], r["best_step"]) for r in resumed] == bests(since)[1:]
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in records[3:]]  # (the same run)
