"""--save-sharded: each rank of a --sharded-classes run writes its own class centres and their optimizer state beside
checkpoint.pt; resumed on the same number of processes (each its own file), on another (the rows put together again),
after a stop in the middle of a save (the previous checkpoint whole), and refused with a shard missing or of another
save. The ranks are forked with torchrun's variables (trainer_fixtures.train_on_ranks), as in test_ddp."""

import os
import re
import shutil
import time

import pytest
import torch
import torch.distributed

import arcface_ext
from train import centre_shards, checkpoint

from trainer_fixtures import base_argv, make_face_folder, one_thread, read_jsonl, train_on_ranks  # noqa: F401

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.skipif(not arcface_ext.extension_available(),
                                 reason="--sharded-classes needs the compiled op"),
              pytest.mark.slow]


def _argv(data, output, max_steps, *extra):
    return base_argv(data, str(output), batch_size=4, max_steps=max_steps, save_every=2) + \
        ["--sharded-classes", *extra]


def _train(argv, nprocs=2, main=None):
    result = train_on_ranks(argv, nprocs=nprocs, main=main, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _whole(output):
    """(checkpoint.pt's contents, with the whole centres and optimizer state, as an unsharded save holds them)."""
    path = str(output / "checkpoint.pt")
    state = checkpoint.load(path)
    if "centre_shards" in state:
        centres, optimizer = centre_shards.whole_state(path, state)
        state = {**state, "margin_loss": centres, "optimizer": optimizer}
    return state


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["margin_loss"].keys() == b["margin_loss"].keys()
    for key in a["margin_loss"]:
        assert torch.equal(a["margin_loss"][key], b["margin_loss"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, entry in a["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), \
                (index, key)


def _losses(output):
    return [r["loss"] for r in read_jsonl(output / "metrics.jsonl")]


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """Two 2-process runs to step 2 from the same start, saved whole and --save-sharded: (data, whole, sharded)."""
    root = tmp_path_factory.mktemp("save_sharded")
    data = make_face_folder(str(root / "faces"))
    _train(_argv(data, root / "whole", 2))
    _train(_argv(data, root / "sharded", 2, "--save-sharded"))
    return data, root / "whole", root / "sharded"


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def test_a_sharded_save_resumes_as_the_whole_checkpoint_does(halfway, tmp_path):
    data, whole, sharded = halfway
    state = checkpoint.load(str(sharded / "checkpoint.pt"))
    # checkpoint.pt holds no centres; one file a rank holds its own, named in its manifest.
    assert "weight" not in state["margin_loss"]
    manifest = state["centre_shards"]
    assert manifest["world_size"] == 2 and manifest["step"] == 2
    assert [rows for _, *rows in manifest["files"]] == [[0, 4], [4, 8]]
    assert sorted(name for name, *_ in manifest["files"]) == centre_shards.shard_files(str(sharded))
    _assert_same_state(_whole(whole), _whole(sharded))

    whole, sharded = _copy(whole, tmp_path / "whole"), _copy(sharded, tmp_path / "sharded")
    _train(_argv(data, whole, 4, "--resume", "auto"))
    _train(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"))
    assert _losses(sharded) == _losses(whole) and len(_losses(whole)) == 4  # bit for bit
    _assert_same_state(_whole(whole), _whole(sharded))
    # The step-4 save's shards replaced the step-2 save's, which are gone.
    names = centre_shards.shard_files(str(sharded))
    assert sorted(name for name, *_ in checkpoint.load(str(sharded / "checkpoint.pt"))["centre_shards"]["files"]) \
        == names and len(names) == 2


@pytest.mark.parametrize("nprocs", [1, 3])
def test_a_sharded_save_resumes_on_another_number_of_processes(nprocs, halfway, tmp_path):
    # The data order from the resume on is another number of processes' in both runs, alike: the same losses.
    data, whole, sharded = halfway
    whole, sharded = _copy(whole, tmp_path / "whole"), _copy(sharded, tmp_path / "sharded")
    _train(_argv(data, whole, 4, "--resume", "auto"), nprocs=nprocs)
    resumed = _train(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"), nprocs=nprocs)
    assert "resumed from" in resumed.stderr
    assert _losses(sharded) == _losses(whole) and len(_losses(whole)) == 4
    _assert_same_state(_whole(whole), _whole(sharded))
    # One process: no shards (the whole matrix in checkpoint.pt, the earlier save's shards gone); three: three.
    files = centre_shards.shard_files(str(sharded))
    assert len(files) == (0 if nprocs == 1 else 3)
    assert ("centre_shards" in checkpoint.load(str(sharded / "checkpoint.pt"))) == (nprocs > 1)


def _train_killed_in_the_step_4_save(argv):
    """train.trainer.main(argv) on a rank; in the step-4 save, rank 0 is killed (SIGKILL) as it starts writing
    checkpoint.pt, every rank's shard written (KILL_IN=checkpoint), or rank 1 as it starts writing its shard,
    rank 0's written (KILL_IN=shard)."""
    import signal

    from train import trainer

    whom, name = {"checkpoint": ("0", "checkpoint.pt"), "shard": ("1", "checkpoint-centres-1-of-2-")}[
        os.environ["KILL_IN"]]
    if os.environ["RANK"] == whom:
        save_atomic = trainer.checkpoint.save_atomic

        def killed(obj, path):
            if os.path.basename(path).startswith(name) and obj.get("step") == 4:
                if whom == "1":  # (rank 0's shard written: its name is this save's, rank 1's but for the rank)
                    folder, mine = os.path.split(path)
                    theirs = os.path.join(folder, mine.replace("-1-of-", "-0-of-"))
                    while not os.path.exists(theirs):
                        time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            save_atomic(obj, path)

        trainer.checkpoint.save_atomic = killed
    return trainer.main(argv)


@pytest.mark.parametrize("where", ["checkpoint", "shard"])
def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(where, halfway, tmp_path, monkeypatch):
    data, whole, sharded = halfway
    reference = _copy(whole, tmp_path / "whole")
    _train(_argv(data, reference, 6, "--resume", "auto"))
    sharded = _copy(sharded, tmp_path / "sharded")
    before = sorted(os.listdir(sharded))
    monkeypatch.setenv("KILL_IN", where)
    killed = train_on_ranks(_argv(data, sharded, 6, "--save-sharded", "--resume", "auto"),
                            main=_train_killed_in_the_step_4_save, timeout=120)
    monkeypatch.delenv("KILL_IN")
    assert killed.returncode != 0
    state = checkpoint.load(str(sharded / "checkpoint.pt"))
    assert state["step"] == 2
    # The step-2 save's shards, and the killed one's written before the kill (both ranks', or rank 0's).
    assert len(centre_shards.shard_files(str(sharded))) == (4 if where == "checkpoint" else 3)
    assert set(before) <= set(os.listdir(sharded))
    _train(_argv(data, sharded, 6, "--save-sharded", "--resume", "auto"))
    assert _losses(sharded) == _losses(reference) and len(_losses(reference)) == 6
    _assert_same_state(_whole(reference), _whole(sharded))
    assert len(centre_shards.shard_files(str(sharded))) == 2  # (the killed save's went with the next save)


@pytest.mark.parametrize("nprocs", [1, 2])
def test_a_missing_or_mismatched_shard_is_refused(nprocs, halfway, tmp_path):
    data, _, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    manifest = checkpoint.load(str(sharded / "checkpoint.pt"))["centre_shards"]
    last = sharded / manifest["files"][-1][0]  # (rank 1's: on two processes, rank 0 reads none of it)
    shard = checkpoint.load(str(last))
    torch.save({**shard, "step": 0}, str(last))  # another save's file under this save's name
    refused = train_on_ranks(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"), nprocs=nprocs,
                             timeout=120)
    assert refused.returncode == 1
    path = sharded / "checkpoint.pt"
    line = (f"--resume {path}: {last} is not the shard of the class centres that {path} names (rows [4, 8) of the "
            f"save at step 2, id {manifest['save_id']}): another save's, or not a shard")
    assert refused.stderr.count(line) == nprocs, refused.stderr[-3000:]
    os.remove(last)
    refused = train_on_ranks(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"), nprocs=nprocs,
                             timeout=120)
    assert refused.returncode == 1
    line = f"--resume {path}: {last} is missing: a shard of the class centres that {path} names (at step 2)"
    assert refused.stderr.count(line) == nprocs, refused.stderr[-3000:]
    assert checkpoint.load(str(path))["step"] == 2


def test_the_tools_read_a_sharded_checkpoint(halfway, tmp_path, capsys):
    # The backbone is checkpoint.pt's (train.export's backbone.pt as of a whole checkpoint); --pretrained_model
    # without --finetuning takes the centres put together from the shards, or says why not.
    from train import export
    from train.trainer import main

    data, whole, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    assert export.main(["--checkpoint", str(sharded / "checkpoint.pt"), "--output", str(tmp_path / "export"),
                        "--no-onnx"]) == 0
    exported = torch.load(str(tmp_path / "export" / "backbone.pt"), weights_only=True)
    for key, value in checkpoint.load(str(whole / "checkpoint.pt"))["model"].items():
        assert torch.equal(exported[key], value), key
    path = str(sharded / "checkpoint.pt")
    capsys.readouterr()
    main(base_argv(data, str(tmp_path / "fine"), max_steps=1, save_every=0, pretrained_model=path))
    err = capsys.readouterr().err
    assert f"initialised the backbone and class centres from {path}" in err, err
    missing = sharded / checkpoint.load(path)["centre_shards"]["files"][0][0]
    os.remove(missing)
    main(base_argv(data, str(tmp_path / "fresh"), max_steps=1, save_every=0, pretrained_model=path))
    err = capsys.readouterr().err
    assert (f"note: {path}'s class centres not taken ({missing} is missing: a shard of the class centres that {path} "
            "names (at step 2)): starting fresh ones") in err, err
    assert f"initialised the backbone from {path}" in err


def _train_with_an_error_after_checkpoint_pt_s_rename(argv):
    """train.trainer.main(argv) on a rank; rank 0's write of the step-4 checkpoint.pt renames the file into place
    and then raises OSError (as a rename over NFS whose reply was lost says ENOENT, or a temporary of another
    user's that the clean-up after the rename cannot remove)."""
    from train import trainer

    if os.environ["RANK"] == "0":
        save_atomic = trainer.checkpoint.save_atomic

        def written_then_failed(obj, path):
            save_atomic(obj, path)
            if os.path.basename(path) == "checkpoint.pt" and obj.get("step") == 4:
                raise OSError(5, "Input/output error")

        trainer.checkpoint.save_atomic = written_then_failed
    return trainer.main(argv)


def test_a_checkpoint_written_before_its_write_failed_keeps_its_shards(halfway, tmp_path):
    # checkpoint.pt, once renamed, names this save's shards and no longer the previous save's: they must stay.
    data, _, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    failed = train_on_ranks(_argv(data, sharded, 6, "--save-sharded", "--resume", "auto"),
                            main=_train_with_an_error_after_checkpoint_pt_s_rename, timeout=120)
    assert failed.returncode != 0
    assert "Input/output error" in failed.stderr, failed.stderr[-3000:]
    state = checkpoint.load(str(sharded / "checkpoint.pt"))
    assert state["step"] == 4
    for name, *_ in state["centre_shards"]["files"]:
        assert (sharded / name).is_file(), name
    _train(_argv(data, sharded, 6, "--save-sharded", "--resume", "auto"))
    assert checkpoint.load(str(sharded / "checkpoint.pt"))["step"] == 6
    assert len(centre_shards.shard_files(str(sharded))) == 2


def test_the_shards_are_found_beside_the_file_a_link_to_checkpoint_pt_points_to(halfway, tmp_path):
    # (--resume latest.pt, a link into the run's folder: the shards are beside checkpoint.pt, not the link)
    _, whole, sharded = halfway
    link = tmp_path / "latest.pt"
    link.symlink_to(sharded / "checkpoint.pt")
    centres, _ = centre_shards.whole_state(str(link), checkpoint.load(str(link)))
    assert torch.equal(centres["weight"], checkpoint.load(str(whole / "checkpoint.pt"))["margin_loss"]["weight"])


def test_a_copy_of_checkpoint_pt_kept_beside_it_keeps_its_shards(halfway, tmp_path):
    # (cp checkpoint.pt step-2.pt, to keep it: the next saves remove the shards no checkpoint in the folder names)
    data, whole, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    shutil.copy(sharded / "checkpoint.pt", sharded / "step-2.pt")
    _train(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"))
    kept = checkpoint.load(str(sharded / "step-2.pt"))
    centres, _ = centre_shards.whole_state(str(sharded / "step-2.pt"), kept)
    assert torch.equal(centres["weight"], checkpoint.load(str(whole / "checkpoint.pt"))["margin_loss"]["weight"])
    assert len(centre_shards.shard_files(str(sharded))) == 4


def _train_recording_the_folder_s_syncs(argv):
    """train.trainer.main(argv) on a rank; rank 0 records to $EVENTS its writes of checkpoint.pt, its fsyncs of
    the folder and its removals of shards, in order."""
    import stat

    from train import trainer

    if os.environ["RANK"] == "0":
        events = open(os.environ["EVENTS"], "a")
        save_atomic, fsync, remove = trainer.checkpoint.save_atomic, os.fsync, os.remove

        def recorded_save(obj, path):
            save_atomic(obj, path)
            if os.path.basename(path) == "checkpoint.pt":
                events.write(f"write checkpoint.pt {obj['step']}\n")
                events.flush()

        def recorded_fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                events.write("fsync folder\n")
                events.flush()
            return fsync(fd)

        def recorded_remove(path, *args, **kwargs):
            if centre_shards.SHARD.fullmatch(os.path.basename(path)):
                events.write("remove shard\n")
                events.flush()
            return remove(path, *args, **kwargs)

        trainer.checkpoint.save_atomic, os.fsync, os.remove = recorded_save, recorded_fsync, recorded_remove
    return trainer.main(argv)


def test_checkpoint_pt_s_rename_is_made_durable_before_the_previous_shards_go(halfway, tmp_path, monkeypatch):
    # (a power cut after the previous save's shards are removed must not find the previous checkpoint.pt)
    data, _, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    monkeypatch.setenv("EVENTS", str(tmp_path / "events"))
    _train(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"), main=_train_recording_the_folder_s_syncs)
    events = (tmp_path / "events").read_text().splitlines()
    assert "remove shard" in events and "write checkpoint.pt 4" in events, events
    after = events[events.index("write checkpoint.pt 4"):]
    assert after.index("fsync folder") < after.index("remove shard"), events


def test_a_fresh_run_sets_the_shards_aside_with_their_checkpoint(halfway, tmp_path):
    # (earlier-1/checkpoint.pt names its shards by their names alone: beside it again, it resumes from there)
    data, whole, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    before = centre_shards.shard_files(str(sharded))
    _train(_argv(data, sharded, 2, "--save-sharded"))
    aside = sharded / "earlier-1"
    assert centre_shards.shard_files(str(aside)) == before
    assert len(centre_shards.shard_files(str(sharded))) == 2 and not set(before) & set(os.listdir(sharded))
    resumed = _train(_argv(data, tmp_path / "on", 4, "--save-sharded", "--resume", str(aside / "checkpoint.pt")))
    assert f"resumed from {aside / 'checkpoint.pt'}" in resumed.stderr, resumed.stderr[-3000:]
    assert centre_shards.shard_files(str(aside)) == before



def _train_out_of_memory_in_the_step_4_save(argv):
    """train.trainer.main(argv) on a rank; in the step-4 save, rank 1 runs out of host memory as it copies its rows
    of the centres (split_state raises MemoryError), before the ranks agree that every shard is written
    (OUT_OF_MEMORY_IN=shard), or rank 0 as it writes checkpoint.pt (OUT_OF_MEMORY_IN=checkpoint)."""
    from train import trainer

    if os.environ["OUT_OF_MEMORY_IN"] == "shard" and os.environ["RANK"] == "1":
        split_state = trainer.centre_shards.split_state

        def out_of_memory(*args):
            if args[-1] == 4:
                raise MemoryError("out of memory copying the centres")
            return split_state(*args)

        trainer.centre_shards.split_state = out_of_memory
    if os.environ["OUT_OF_MEMORY_IN"] == "checkpoint" and os.environ["RANK"] == "0":
        save_atomic = trainer.checkpoint.save_atomic

        def out_of_memory_in_checkpoint_pt(obj, path):
            if os.path.basename(path) == "checkpoint.pt" and obj.get("step") == 4:
                raise MemoryError("out of memory copying the centres")
            save_atomic(obj, path)

        trainer.checkpoint.save_atomic = out_of_memory_in_checkpoint_pt
    return trainer.main(argv)


@pytest.mark.parametrize("where", ["shard", "checkpoint"])
def test_an_unexpected_error_in_one_ranks_part_of_a_save_is_said_to_the_others(where, halfway, tmp_path, monkeypatch):
    # An error of any kind (not only a write's OSError) on one rank where the others wait for its outcome (the
    # agreement that every shard is written, checkpoint.pt's outcome) is said there: the others do not wait until
    # torchrun ends them (or gloo tells them of a lost peer), and end with its one line; its own process raises it.
    data, _, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    monkeypatch.setenv("OUT_OF_MEMORY_IN", where)
    failed = train_on_ranks(_argv(data, sharded, 6, "--save-sharded", "--resume", "auto"),
                            main=_train_out_of_memory_in_the_step_4_save, timeout=120)
    monkeypatch.delenv("OUT_OF_MEMORY_IN")
    assert failed.returncode != 0
    assert "MemoryError: out of memory copying the centres" in failed.stderr  # (its traceback)
    file = "checkpoint-centres-1-of-2-" if where == "shard" else "checkpoint.pt"
    line = re.search(rf"train: (error: )?rank {'0' if where == 'shard' else '1'}: writing \S+{file}\S* at step 4 "
                     r"failed: MemoryError: out of memory copying the centres\. ", failed.stderr)
    assert line, failed.stderr[-3000:]
    state = checkpoint.load(str(sharded / "checkpoint.pt"))
    assert state["step"] == 2
    named = sorted(name for name, *_ in state["centre_shards"]["files"])
    assert centre_shards.shard_files(str(sharded)) == named  # (the step-4 save's removed)


def test_a_copy_kept_beside_checkpoint_pt_keeps_its_shards_when_the_run_is_set_aside(halfway, tmp_path):
    # (--resume runs/x/step-2.pt --output runs/x: back to a milestone kept in the run's folder, whose run is set
    # aside into earlier-1; the copy stays, and a second try from it must find its shards, as earlier-1's must)
    data, whole, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    shutil.copy(sharded / "checkpoint.pt", sharded / "step-2.pt")
    before = centre_shards.shard_files(str(sharded))
    _train(_argv(data, sharded, 4, "--save-sharded", "--resume", str(sharded / "step-2.pt")))
    expected = checkpoint.load(str(whole / "checkpoint.pt"))["margin_loss"]["weight"]
    for kept in (sharded / "step-2.pt", sharded / "earlier-1" / "checkpoint.pt"):
        centres, _ = centre_shards.whole_state(str(kept), checkpoint.load(str(kept)))
        assert torch.equal(centres["weight"], expected), kept
    assert centre_shards.shard_files(str(sharded / "earlier-1")) == before
    assert checkpoint.load(str(sharded / "checkpoint.pt"))["step"] == 4
    assert len(centre_shards.shard_files(str(sharded))) == 4  # (step 4's, and the copy's)


def test_a_start_that_stops_puts_a_copy_s_linked_shards_back_once(halfway, tmp_path, monkeypatch, capsys):
    # A fresh run sets the folder's run aside (the copy's shards linked into earlier-1, not moved), then stops at
    # start-up (a full disk as training.log begins): the folder is as it was, earlier-1 gone.
    import train.trainer as trainer_module

    data, _, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    shutil.copy(sharded / "checkpoint.pt", sharded / "step-2.pt")
    before = sorted(os.listdir(sharded))

    def open_(path, mode="r", *args, **kwargs):
        if "a" in mode and os.path.basename(path) == "training.log":
            raise OSError(28, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "open", open_, raising=False)
    with pytest.raises(SystemExit, match="No space left on device"):
        trainer_module.main(base_argv(data, str(sharded), batch_size=4, max_steps=2))
    assert f"note: the earlier run's files are back in {sharded}\n" in capsys.readouterr().err
    assert sorted(os.listdir(sharded)) == before
    assert all(os.stat(sharded / name).st_nlink == 1 for name in centre_shards.shard_files(str(sharded)))


def _resume_out_of_memory_on_rank_1(argv, *message):
    """train.trainer.main(argv) on a rank; rank 1 runs out of host memory as it reads its rows from the shards."""
    from train import trainer

    if os.environ["RANK"] == "1":
        def out_of_memory(*args):
            raise MemoryError(*message)

        trainer.centre_shards.whole_state = out_of_memory
    return trainer.main(argv)


def _resume_out_of_memory_on_rank_1_said_in_lines(argv):
    return _resume_out_of_memory_on_rank_1(argv, "out of memory reading the centres\nat row 7")


def _resume_out_of_memory_on_rank_1_said_without_words(argv):  # (as CPython's own MemoryError is)
    return _resume_out_of_memory_on_rank_1(argv)


@pytest.mark.parametrize("main, said", [
    (_resume_out_of_memory_on_rank_1_said_in_lines, "MemoryError: out of memory reading the centres\n"),
    (_resume_out_of_memory_on_rank_1_said_without_words, "MemoryError\n")], ids=["lines", "no_words"])
def test_an_unexpected_error_reading_one_ranks_shards_is_said_to_the_others(main, said, halfway, tmp_path):
    # (as a missing shard is: in the ranks' agreement on the resume, rather than the others waiting there; in one
    # line, its first, and without a dangling ': ' where the error has no words)
    data, _, sharded = halfway
    sharded = _copy(sharded, tmp_path / "sharded")
    failed = train_on_ranks(_argv(data, sharded, 4, "--save-sharded", "--resume", "auto"), main=main, timeout=120)
    assert failed.returncode != 0
    rank_0 = failed.stderr.split("[rank1]")[0]
    assert f"--resume {sharded / 'checkpoint.pt'}: {said}" in rank_0, failed.stderr[-3000:]
    assert "at row 7" not in rank_0, rank_0
    assert checkpoint.load(str(sharded / "checkpoint.pt"))["step"] == 2
