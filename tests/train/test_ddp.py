"""Two-process DDP on CPU (gloo) through torchrun, as a multi-GPU run is launched: training,
logs written once, per-rank RNG states in the checkpoint, resuming, and stopping on a SIGTERM. The
tests of what the ranks train (sharded centres, the chunked path's losses, lengths in epochs, compiled
DDP's all-reduces) fork their ranks with torchrun's variables instead (trainer_fixtures.train_on_ranks:
a torchrun of three interpreters took seconds for a run of milliseconds)."""

import datetime
import functools
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed

import arcface_ext
from train import checkpoint
from train.config import DIST_TIMEOUT_LEAST_MINUTES, DIST_TIMEOUT_MOST_MINUTES

from trainer_fixtures import (REPO, base_argv, make_face_folder, make_pairs_list, one_thread,  # noqa: F401
                              read_jsonl, signal_once_training, train_on_ranks)

LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.slow]  # (torchrun groups)


def torchrun_command(args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "train", *args]


def torchrun(args, timeout=240):
    return subprocess.run(torchrun_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_two_process_gloo_training_and_resume(tmp_path):
    data = make_face_folder(str(tmp_path / "faces"))
    output = tmp_path / "run"
    args = base_argv(data, str(output), batch_size=8, max_steps=6, save_every=3, loss_impl=LOSS_IMPL)

    first = torchrun(args[:args.index("--max-steps")] + ["--max-steps", "3"] + args[args.index("--max-steps") + 2:])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "batch 8 x 2 process(es) on cpu" in first.stderr
    state = checkpoint.load(str(output / "checkpoint.pt"))
    assert state["step"] == 3
    assert len(state["rng"]) == 2  # one generator state per rank
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    resumed = torchrun(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    steps = [r["step"] for r in read_jsonl(output / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log
    assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == 6


def test_a_run_in_epochs_resumed_on_another_number_of_processes_keeps_its_steps(tmp_path):
    # 64 images in steps of 8 a process: 4 steps an epoch on 2 processes, 8 on 1. The step a run resumes at
    # counts its checkpoint's steps, and so do its lengths in epochs. They were converted at this run's epoch:
    # 1 of 2 epochs done on 2 processes was step 4 of 16 on 1 (2.5 epochs trained, the learning rate moved
    # back), and 1 of 2 done on 1 process was step 8 of 8 on 2 ("nothing to train").
    def launch(processes, args):
        done = train_on_ranks(args, nprocs=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    data = make_face_folder(str(tmp_path / "faces"))
    for first, then in ((2, 1), (1, 2)):
        output = tmp_path / f"{first}to{then}"
        args = base_argv(data, str(output), batch_size=8, save_every=0, loss_impl=LOSS_IMPL)
        epoch = 8 // first  # the first run's steps an epoch
        launch(first, args + ["--epochs", "1"])
        assert checkpoint.load(str(output / "checkpoint.pt"))["step"] == epoch
        err = launch(then, args + ["--epochs", "2", "--resume", "auto"])
        assert f"{2 * epoch} steps from step {epoch} (2 epochs of {epoch} steps)" in err
        assert (f"note: --epochs is counted in the epochs of {epoch} steps the run began with, as the steps it took "
                f"were, and so are the progress lines' epochs (this run reads the data in {8 // then} steps)") in err
        assert f"[step {2 * epoch}/{2 * epoch}]" in err and "epoch 2.00, " in err
        assert [r["step"] for r in read_jsonl(output / "metrics.jsonl")] == list(range(1, 2 * epoch + 1))
        # Resumed again on as many processes as the last run: still the first run's epochs (they were this run's
        # again, as the checkpoint's number of processes gave them).
        if then == 1:
            err = launch(1, args + ["--epochs", "3", "--resume", "auto"])
            assert f"{3 * epoch} steps from step {2 * epoch} (3 epochs of {epoch} steps)" in err


def test_forked_ranks_report_the_trainers_errors(tmp_path):
    # train_on_ranks, the other tests' torchrun: a run that fails gives the failing rank's exit code and
    # error, as torchrun does. (Either rank may be first: the other is then stopped, as torchrun stops it.)
    result = train_on_ranks(base_argv(str(tmp_path / "nowhere"), str(tmp_path / "run")))
    assert result.returncode == 1
    assert re.search(rf"train: error: rank [01]: --data '{re.escape(str(tmp_path / 'nowhere'))}': no such folder",
                     result.stderr), result.stderr


def test_forked_ranks_find_their_store_listening_before_they_start(tmp_path, monkeypatch):
    # train_on_ranks found a free port by binding port 0 and closing it, for rank 0 to bind: another process could
    # take it in between, and rank 0 failed with EADDRINUSE (shown by binding the port as the probe closed). The
    # store listens on MASTER_PORT from before the ranks start until they end; the ranks connect to it.
    import socket

    import trainer_fixtures

    listening = []

    def ranks_started(worker, args, nprocs, timeout):
        with socket.create_connection(("127.0.0.1", int(os.environ["MASTER_PORT"])), timeout=10):
            listening.append(nprocs)
        with pytest.raises(OSError, match="in use"), socket.socket() as squatter:
            squatter.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))

    with monkeypatch.context() as patch:
        patch.setattr(trainer_fixtures, "spawn_ranks", ranks_started)
        assert train_on_ranks(["--help"]).returncode == 0 and listening == [2]
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=2, save_every=0,
                                      loss_impl=LOSS_IMPL))
    assert result.returncode == 0 and "2 process(es)" in result.stderr, result.stderr[-3000:]


def test_sigterm_to_the_process_group_saves_on_every_rank(tmp_path):
    # What torchrun and cluster schedulers do: SIGTERM to the whole group, DataLoader workers
    # included. The ranks finish the step together and write the checkpoint (a collective).
    data = make_face_folder(str(tmp_path / "faces"))
    output = tmp_path / "run"
    args = base_argv(data, str(output), batch_size=8, max_steps=100000, save_every=0, num_workers=1,
                     loss_impl=LOSS_IMPL)
    _, err = signal_once_training(torchrun_command(args), output, signal.SIGTERM, cwd=REPO, timeout=120)
    assert "stopped by SIGTERM" in err, err[-3000:]
    assert "exited unexpectedly" not in err and "killed by signal" not in err, err[-3000:]
    state = checkpoint.load(str(output / "checkpoint.pt"))
    assert state["step"] >= 1 and len(state["rng"]) == 2
    assert state["step"] == max(r["step"] for r in read_jsonl(output / "metrics.jsonl"))


def _rank_process(parent: int, rank: int) -> int:
    """The pid of torchrun ``parent``'s worker of ``rank`` (read from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_a_signal_to_one_rank_stops_every_rank_with_the_checkpoint(tmp_path):
    # A pre-empted node: SIGTERM reaches its ranks only. The ranks agree on stopping at each step,
    # and all of them save and exit (they waited for each other in mismatched collectives before:
    # the signalled rank saved, the others went on to the final verification).
    data = make_face_folder(str(tmp_path / "faces"))
    output = tmp_path / "run"
    args = base_argv(data, str(output), batch_size=8, max_steps=100000, save_every=0, loss_impl=LOSS_IMPL)
    proc = subprocess.Popen(torchrun_command(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (output / "metrics.jsonl").exists() or not read_jsonl(output / "metrics.jsonl"):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(_rank_process(proc.pid, 1), signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "stopped by a signal to another process" in err, err[-3000:]
    state = checkpoint.load(str(output / "checkpoint.pt"))
    assert state["step"] == max(r["step"] for r in read_jsonl(output / "metrics.jsonl"))


def test_one_rank_failing_leaves_one_line_on_the_others(tmp_path):
    # A broken image found by one rank: that rank says which; the other finds its connection closed
    # in the next collective (or gets torchrun's SIGTERM and then finds it closed). It used to print
    # a gloo traceback ("Connection closed by peer") that read like a second error.
    data = make_face_folder(str(tmp_path / "faces"))
    first_identity = os.path.join(data, sorted(os.listdir(data))[0])
    broken = os.path.join(first_identity, sorted(os.listdir(first_identity))[0])
    with open(broken, "wb") as f:
        f.write(b"garbage")
    result = torchrun(base_argv(data, str(tmp_path / "run"), batch_size=8, max_steps=20, save_every=0,
                                loss_impl=LOSS_IMPL))
    assert result.returncode != 0
    assert re.search(rf"train: error: rank \d: step \d+'s batch: {re.escape(broken)}: cannot read the image: ",
                     result.stderr), result.stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr), result.stderr[-3000:]
    assert "Connection closed by peer" not in result.stderr, result.stderr[-3000:]


@pytest.mark.skipif(not arcface_ext.extension_available(), reason="--sharded-classes needs the compiled op")
def test_sharded_classes_train_as_a_replicated_classifier(tmp_path):
    # From the same starting weights, two processes with the class centres split between them
    # follow the replicated run step for step; their checkpoint holds the whole matrix and its
    # momentum (gathered), and resuming from it slices them again. (Both runs stop at step 2 and
    # resume to 4, so that they follow the same learning-rate schedule.) Both accumulate the gradients
    # of two passes of 4 images a step: DDP's no_sync for the replicated centres and the backbone,
    # the sharded loss's own collectives in every pass.
    data = make_face_folder(str(tmp_path / "faces"))
    start = tmp_path / "start"
    first = train_on_ranks(base_argv(data, str(start), batch_size=8, max_steps=2, save_every=0))
    assert first.returncode == 0, first.stderr[-3000:]
    pretrained = str(start / "checkpoint.pt")

    def run(output, *extra, max_steps=4):
        # At --lr 0.02: at the default 0.1 these four steps are chaotic (the loss climbs), and the two
        # summation orders' round-off grew tenfold a step, to a relative 1.8e-4 at step 4 on torch 2.4.1.
        args = base_argv(data, str(output), batch_size=4, gradient_acc=2, max_steps=max_steps, save_every=0,
                         pretrained_model=pretrained) + ["--lr", "0.02", *extra]
        result = train_on_ranks(args)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run(tmp_path / "replicated", max_steps=2)
    run(tmp_path / "replicated", "--resume", "auto")
    sharded = run(tmp_path / "sharded", "--sharded-classes", max_steps=2)
    assert "classes [0, 4) on rank 0 of 2" in sharded.stderr
    halfway = checkpoint.load(str(tmp_path / "sharded" / "checkpoint.pt"))
    assert halfway["margin_loss"]["weight"].shape == (8, 64)
    momenta = [s["momentum_buffer"] for s in halfway["optimizer"]["state"].values()]
    assert (8, 64) in [tuple(m.shape) for m in momenta]
    run(tmp_path / "sharded", "--sharded-classes", "--resume", "auto")

    replicated_loss = [r["loss"] for r in read_jsonl(tmp_path / "replicated" / "metrics.jsonl")]
    sharded_loss = [r["loss"] for r in read_jsonl(tmp_path / "sharded" / "metrics.jsonl")]
    assert len(replicated_loss) == len(sharded_loss) == 4
    # Two summation orders (the sharded softmax's and the replicated one's) through three SGD steps: a
    # relative 2e-7 on torch 2.4.1 and 2.13, the same straight through and across the resume.
    assert sharded_loss == pytest.approx(replicated_loss, rel=1e-5)
    replicated_end = checkpoint.load(str(tmp_path / "replicated" / "checkpoint.pt"))
    sharded_end = checkpoint.load(str(tmp_path / "sharded" / "checkpoint.pt"))
    # fp32 round-off of two summation orders through four steps: entries near zero are compared
    # against the matrix's scale (its largest entries are about 6).
    scale = float(replicated_end["margin_loss"]["weight"].abs().max())
    torch.testing.assert_close(sharded_end["margin_loss"]["weight"], replicated_end["margin_loss"]["weight"],
                               rtol=1e-4, atol=1e-5 * scale)
    # The whole matrix, without a shard's range: it loads into a replicated loss as it is.
    arcface_ext.ArcFaceLoss(8, 64).load_state_dict(sharded_end["margin_loss"])
    # The class centres' gradient norm in metrics.jsonl is the whole matrix's (the shards' squared norms summed
    # over the ranks), not rank 0's shard's; the backbone's, all-reduced by DDP, is every rank's.
    for key in ("grad_norm", "centres_grad_norm"):
        replicated_norms = [r[key] for r in read_jsonl(tmp_path / "replicated" / "metrics.jsonl")]
        sharded_norms = [r[key] for r in read_jsonl(tmp_path / "sharded" / "metrics.jsonl")]
        assert sharded_norms == pytest.approx(replicated_norms, rel=1e-4), key


def test_chunked_path_losses_train_under_ddp(tmp_path):
    # CurricularFace's running t is a buffer of the DDP-wrapped loss (broadcast from rank 0 at each
    # forward); the filtering's path has none, and runs on replicated or sharded centres.
    data = make_face_folder(str(tmp_path / "faces"))
    runs = [("curricular", {"loss": "curricularface"}), ("filtered", {"interclass_filter": 0.3})]
    if arcface_ext.extension_available():  # sharded centres, each rank filtering its own classes
        runs.append(("filtered-sharded", {"interclass_filter": 0.3, "sharded_classes": True}))
        runs.append(("curricular-sharded", {"loss": "curricularface", "sharded_classes": True}))
        runs.append(("subcenters-sharded", {"subcenters": 3, "sharded_classes": True, "sample_rate": 0.5}))
        # (not the chunked path: ElasticFace+'s target cosines take collectives of their own, each step)
        runs.append(("elasticface-plus-sharded", {"loss": "elasticface-arc+", "sharded_classes": True}))
    for name, extra in runs:
        output = tmp_path / name
        result = train_on_ranks(base_argv(data, str(output), batch_size=8, max_steps=3, save_every=3,
                                          loss_impl=LOSS_IMPL, **extra))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("PyTorch" in result.stderr) == (not name.startswith("elasticface")) and "2 process(es)" in result.stderr
        state = checkpoint.load(str(output / "checkpoint.pt"))["margin_loss"]
        losses = [r["loss"] for r in read_jsonl(output / "metrics.jsonl")]
        assert len(losses) == 3 and all(v == v for v in losses)
        if name.startswith("curricular"):
            assert 0 < abs(float(state["t"])) < 0.05
        if name.startswith("subcenters"):  # every rank's sub-centres, gathered in insightface's layout
            assert state["weight"].shape == (3 * checkpoint.load(str(output / "checkpoint.pt"))["num_classes"], 64)


def test_start_up_over_the_group(tmp_path):
    """--pretrained_model inside --output: every process reads it before the earlier run is moved aside
    (a race lost 2-3 of 6 runs of a helper's trial). A process that stops at start-up (its own --data
    missing) leaves the others one line each, not gloo's traceback of the closed connection."""
    data = make_face_folder(str(tmp_path / "faces"))
    output = tmp_path / "run"
    args = base_argv(data, str(output), batch_size=8, max_steps=2, save_every=0, loss_impl=LOSS_IMPL)
    assert train_on_ranks(args).returncode == 0  # (the earlier run: how it was started is not what is checked)
    again = torchrun(args + ["--pretrained_model", str(output / "checkpoint.pt")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (output / "earlier-1" / "checkpoint.pt").exists() and not (output / ".run.lock").exists()

    script = tmp_path / "per_rank.py"
    script.write_text("import os, sys\n"
                      "from train.trainer import main\n"
                      "argv = sys.argv[1:]\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    argv[argv.index('--data') + 1] = os.path.join(os.path.dirname(__file__), 'nowhere')\n"
                      "sys.exit(main(argv))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    failed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *base_argv(data, str(tmp_path / "other"), loss_impl=LOSS_IMPL)],
                            cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert failed.returncode != 0
    # (Or torchrun's SIGTERM, sent as rank 1 ended, came first: one line all the same.)
    assert ("train: error: rank 0: another process stopped during start-up (see its own output)" in failed.stderr
            or "train: rank 0: stopped by SIGTERM during the start-up" in failed.stderr), failed.stderr[-3000:]
    assert "Connection closed by peer" not in failed.stderr, failed.stderr[-3000:]
    assert re.search(r"train: error: rank 1: --data '[^']*nowhere': no such folder; expected", failed.stderr), \
        failed.stderr[-3000:]


def test_a_start_up_refusal_is_said_before_the_group_is_left(tmp_path, monkeypatch, capsys):
    """A process's own refusal at start-up is printed before it leaves the process group: the others then
    find the group gone, say "another process stopped during start-up (see its own output)" and end, and
    torchrun stops this process, at times before the interpreter had printed the SystemExit's message
    (it was raised after the group was left): no process said why the run stopped."""
    from train import trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    said_by_then = []
    monkeypatch.setattr(trainer, "_leave_group", lambda: said_by_then.append(capsys.readouterr().err))
    with pytest.raises(SystemExit) as stop:  # (a refusal before the group is started: no other process needed)
        trainer.main(base_argv(str(tmp_path / "faces"), str(tmp_path / "run"), device="cuda:99"))
    assert len(said_by_then) == 1 and said_by_then[0].startswith(
        "train: error: rank 1: --device cuda:99: this process (LOCAL_RANK 1) would use cuda:99, but ") \
        and said_by_then[0].count("\n") == 1, said_by_then
    assert stop.value.code == 1
    assert not (tmp_path / "run").exists()


def _train_with_rank_1_stopping_while_rank_0_writes(argv):
    """train.trainer.main(argv) on a rank; rank 1 stops at start-up (its loader refused) once rank 0 has
    written the run's first files into --output (args.json, the last), while rank 0, slow there, is still in
    its start-up (until the launcher's SIGTERM, which comes once rank 1 has ended): rank 0 says which of
    them went while it ran."""
    from train import checkpoint as checkpoint_module, data

    output = argv[argv.index("--output") + 1]
    if os.environ["RANK"] == "0":
        write_json_atomic = checkpoint_module.write_json_atomic

        def slow(path, *args, **kwargs):
            write_json_atomic(path, *args, **kwargs)
            if os.path.basename(path) == "args.json":
                print("rank 0: args.json written, watching the run's files", file=sys.stderr, flush=True)
                written, deadline = sorted(os.listdir(output)), time.monotonic() + 30
                while time.monotonic() < deadline:
                    gone = [name for name in written if not os.path.exists(os.path.join(output, name))]
                    if gone:
                        print(f"rank 0: {gone} gone while it runs", file=sys.stderr, flush=True)
                        break
                    time.sleep(0.01)

        checkpoint_module.write_json_atomic = slow
    else:
        def refused(*args, **kwargs):
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(output, "args.json")) and time.monotonic() < deadline:
                time.sleep(0.01)
            raise SystemExit("the loader refused (injected on rank 1)")

        data.build_train_loader = refused
    from train import trainer

    return trainer.main(argv)


def test_a_rank_stopping_at_start_up_leaves_rank_0_its_output(tmp_path):
    # Rank 0 alone makes and writes --output; a run that stops at start-up removes the folder it made. Every
    # rank undid it as it stopped: rank 1, stopping first (its data missing, or waiting past --dist-timeout
    # while rank 0 reads the verification sets), removed the logs and args.json rank 0 was still writing.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    output = tmp_path / "run"
    result = train_on_ranks(base_argv(data, str(output), batch_size=4, max_steps=2, save_every=0,
                                      loss_impl=LOSS_IMPL), main=_train_with_rank_1_stopping_while_rank_0_writes)
    assert result.returncode == 1
    assert "train: error: rank 1: the loader refused (injected on rank 1)\n" in result.stderr, result.stderr[-3000:]
    assert "rank 0: args.json written, watching the run's files" in result.stderr, result.stderr[-3000:]
    assert "gone while it runs" not in result.stderr, result.stderr[-3000:]
    assert not output.exists(), sorted(os.listdir(output))  # (rank 0's undo, as it stopped in turn)


def _train_on_a_full_disk_on_rank_0(argv):
    """train.trainer.main(argv) on a rank; on rank 0 the checkpoint cannot be written (a full disk), and
    the process lingers once it has left the group, so that the others are not stopped before they speak."""
    import errno

    from train import trainer

    if os.environ["RANK"] == "0":
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        destroy = torch.distributed.destroy_process_group

        def lingering(*args, **kwargs):
            destroy(*args, **kwargs)
            time.sleep(10)

        trainer.checkpoint.save_atomic = full_disk
        torch.distributed.destroy_process_group = lingering
    return trainer.main(argv)


def test_a_rank_failing_at_the_last_checkpoint_leaves_one_line_on_the_others(tmp_path):
    # Rank 0 alone writes the checkpoint; the others, their part of it done, wait for it at the end of the
    # run, and found the connection closed there: gloo's traceback, which read like a second error.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=2, save_every=0,
                                      loss_impl=LOSS_IMPL), main=_train_on_a_full_disk_on_rank_0)
    assert result.returncode == 1
    checkpoint_path = re.escape(str(tmp_path / "run" / "checkpoint.pt"))
    assert re.search(rf"^train: error: rank 0: writing {checkpoint_path} at step 2 failed: \[Errno 28\] ",
                     result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert ("train: error: rank 1: another process stopped at the end of the run (see its own output); no checkpoint "
            "was written before it\n") in result.stderr, result.stderr[-3000:]
    assert "Connection closed by peer" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_group_left_is_held_by_no_module_imported_after_it_started():
    # torch.distributed.nn.functional's defaults (group=group.WORLD) held the group when the module was imported
    # once the group was started, as torch._dynamo imports it at the first optimizer (torch 2.13): the group was
    # never freed, its connections never closed, and the test above failed (rank 1 not told that rank 0 had left).
    code = ("import sys, torch.distributed as dist; from train.tools import start_process_group; "
            "start_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1); group = dist.group.WORLD; "
            "import torch.distributed.nn.functional; dist.destroy_process_group(); "
            "print('references:', sys.getrefcount(group))")
    held = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    # (torch 2.8's gloo prints '[Gloo] Rank 0 is connected to 0 peer ranks...' to stdout as the group starts)
    references = re.findall(r"^references: (\d+)$", held.stdout, re.MULTILINE)
    assert references == ["2"], held  # `group` and getrefcount's argument


BUG = "CUDA error: an illegal memory access was encountered (injected on rank 1)"


def _put_a_bug_on_rank_1(where: str) -> None:
    """In this rank's process, on rank 1: an error no handler of the trainer's says (a CUDA error, as it
    reads), raised at start-up once the process group is started, or in the second training step."""
    from train import trainer

    if os.environ["RANK"] != "1":
        return

    def bug(*args, **kwargs):
        raise RuntimeError(BUG)

    if where == "start-up":
        trainer.seed_everything = bug
    else:
        step = trainer.Trainer.train_step
        trainer.Trainer.train_step = lambda self, *args: bug() if self.step == 1 else step(self, *args)


def _linger_after_leaving_the_group() -> None:
    """This process waits 60 s once it has left its process group, so that the other, which then finds the
    group gone, ends first and the launcher stops this one there, as torchrun stops the others once one has
    ended: what this process had not printed before leaving is then never seen."""
    destroy = torch.distributed.destroy_process_group

    def lingering(*args, **kwargs):
        destroy(*args, **kwargs)
        time.sleep(60)

    torch.distributed.destroy_process_group = lingering


def _train_with_a_bug_on_rank_1(argv, where):
    """train.trainer.main(argv) on a rank, with rank 1's bug (``where``); rank 1 lingers once it has left
    the group (_linger_after_leaving_the_group)."""
    from train import trainer

    _put_a_bug_on_rank_1(where)
    if os.environ["RANK"] == "1":
        _linger_after_leaving_the_group()
    return trainer.main(argv)


@pytest.mark.parametrize("where", ["start-up", "step"])
def test_a_ranks_unhandled_error_is_said_before_it_leaves_the_group(where, tmp_path):
    # An error no handler says (a bug, a CUDA error, running out of memory) had its traceback printed as
    # the interpreter ended, after the process had left the group: the others then ended ("another process
    # stopped (see its error)") and torchrun stopped this one, at times before it had printed anything.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=3, save_every=0,
                                      loss_impl=LOSS_IMPL), main=functools.partial(_train_with_a_bug_on_rank_1,
                                                                                   where=where))
    assert result.returncode == 1
    assert f"[rank1]: RuntimeError: {BUG}\n" in result.stderr, result.stderr[-3000:]  # (torch's excepthook's prefix)
    other = "start-up" if where == "start-up" else "step 2"
    assert f"train: error: rank 0: another process stopped during {other} (see its own output)" in result.stderr, \
        result.stderr[-3000:]


def _train_with_a_second_signal_on_rank_1(argv):
    """train.trainer.main(argv) on a rank; rank 1 gets a second SIGTERM in its second step, a while after the
    first (it quits at once, its line a stop), and lingers once it has left the group
    (_linger_after_leaving_the_group)."""
    from train import trainer

    if os.environ["RANK"] == "1":
        step = trainer.Trainer.train_step

        def signalled_twice(self, *args):
            if self.step == 1:
                self._on_signal(signal.SIGTERM, None)
                self._stop_signal_at -= trainer.SAME_STOP_SECONDS
                self._on_signal(signal.SIGTERM, None)
            return step(self, *args)

        trainer.Trainer.train_step = signalled_twice
        _linger_after_leaving_the_group()
    return trainer.main(argv)


def test_a_rank_that_quits_on_a_second_signal_is_not_called_an_error_by_the_others(tmp_path):
    # A second signal to one process alone (a second kill of its pid): it quits at once, its line a stop; the other
    # found the connection closed and said "another process stopped during step 2 (see its error)", of an error
    # nobody made. A closed connection does not tell an error from a stop: the line is true of both.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=3, save_every=0,
                                      loss_impl=LOSS_IMPL), main=_train_with_a_second_signal_on_rank_1)
    assert result.returncode != 0
    stop = "train: rank 1: stopped by a second SIGTERM: at once, without a checkpoint of this step\n"
    assert stop in result.stderr, result.stderr[-3000:]
    assert ("train: error: rank 0: another process stopped during step 2 (see its own output); no checkpoint was "
            "written before it\n") in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def _train_with_sigterm_to_both_ranks_in_the_final_verification(argv):
    """train.trainer.main(argv) on a rank; as rank 0 starts the final verification, it sends SIGTERM to itself and
    to rank 1 (waiting for it in a collective, or just before), as torchrun passes on the one it gets."""
    from train import trainer

    pid_file = os.path.join(os.path.dirname(argv[argv.index("--output") + 1]), "rank1.pid")
    if os.environ["RANK"] == "1":
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    else:
        sets = trainer.Trainer._evaluate_sets

        def signalled(self, evaluate, on_batch):
            if self.step == self.args.max_steps:
                with open(pid_file) as f:
                    os.kill(int(f.read()), signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)
            return sets(self, evaluate, on_batch)

        trainer.Trainer._evaluate_sets = signalled
    return trainer.main(argv)


def test_a_sigterm_during_the_final_verification_cuts_it_short_on_every_rank(tmp_path):
    # Rank 0 verifies alone while the others wait for it in a collective, where a signal is taken once it ends: the
    # final verification ran to its end and its checkpoint was written after it (a SIGKILL after torchrun's 30 s
    # cut both). Rank 0 cuts it short, every rank learns so in the verification's collective, all write the last
    # step's checkpoint (marked: the resume makes the verification), say it, and end as usual, without a hang.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    args = base_argv(data, str(tmp_path / "run"), pairs, batch_size=4, max_steps=2, save_every=0, loss_impl=LOSS_IMPL)
    result = train_on_ranks(args, main=_train_with_sigterm_to_both_ranks_in_the_final_verification)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        said = re.findall(rf"^train: rank {rank}: SIGTERM after the last step \(2\): the final verification "
                          r"is cut short; the run ends with its checkpoint, and --resume auto makes the verification$",
                          result.stderr, re.M)
        assert len(said) == 1, result.stderr[-3000:]
    assert "as usual" not in result.stderr and "done: 2 steps in " in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    state = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"] and len(state["rng"]) == 2
    assert not os.path.exists(tmp_path / "run" / "verification.jsonl") or all(
        r["step"] != 2 for r in read_jsonl(tmp_path / "run" / "verification.jsonl"))
    resumed = train_on_ranks(args + ["--resume", "auto"])
    assert resumed.returncode == 0 and "nothing to train" not in resumed.stderr, resumed.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "verification.jsonl")] == [2]
    assert not checkpoint.load(str(tmp_path / "run" / "checkpoint.pt")).get("verification_cut_short")


def _train_with_sigterm_in_the_last_step(argv, whom):
    """train.trainer.main(argv) on a rank; ``whom``: "both" (as rank 0 begins the last step, it sends SIGTERM to
    rank 1 and to itself, as torchrun passes on the one it gets) or "rank 1 after it" (rank 1 alone is signalled
    once its last step is done, before the final verification: a pre-empted node)."""
    from train import trainer

    pid_file = os.path.join(os.path.dirname(argv[argv.index("--output") + 1]), "rank1.pid")
    step = trainer.Trainer.train_step
    if whom == "both" and os.environ["RANK"] == "1":
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    elif whom == "both":
        def signalled(self, *args):
            if self.step == self.args.max_steps - 1:
                with open(pid_file) as f:
                    os.kill(int(f.read()), signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)
            return step(self, *args)

        trainer.Trainer.train_step = signalled
    elif os.environ["RANK"] == "1":
        def signalled_after(self, *args):
            done = step(self, *args)
            if self.step == self.args.max_steps:
                self._on_signal(signal.SIGTERM, None)
            return done

        trainer.Trainer.train_step = signalled_after
    return trainer.main(argv)


@pytest.mark.parametrize("whom", ["both", "rank 1 after it"])
def test_a_sigterm_in_the_last_step_leaves_the_final_verification_on_every_rank(whom, tmp_path):
    # A signal in the last step made the whole final verification (after an early checkpoint), where one a moment
    # later, in it, cuts it short. Every rank now agrees to leave it out, as it agrees on a stop at any step: the
    # last step's checkpoint, marked, written at once, the line, exit 0, without a hang; a resume verifies it.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    args = base_argv(data, str(tmp_path / "run"), pairs, batch_size=4, max_steps=2, save_every=0, loss_impl=LOSS_IMPL)
    result = train_on_ranks(args, main=functools.partial(_train_with_sigterm_in_the_last_step, whom=whom))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1) if whom == "both" else (1,):
        when = "during" if whom == "both" else "after"
        said = re.findall(rf"^train: rank {rank}: SIGTERM {when} the last step \(2\): the final verification is cut "
                          r"short; the run ends with its checkpoint, and --resume auto makes the verification$",
                          result.stderr, re.M)
        assert len(said) == 1, result.stderr[-3000:]
    assert result.stderr.count(" the last step (2): ") == (2 if whom == "both" else 1), result.stderr[-3000:]
    assert "as usual" not in result.stderr and "done: 2 steps in " in result.stderr, result.stderr[-3000:]
    assert "[step 2] pairs" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    # Rank 0, not signalled itself, said nothing: its training.log ended with done:, with no word of why the final
    # verification is missing. It says so, as it says a stop at an earlier step, once, before done:.
    other = ("a signal to another process in the last step (2) or after it: the final verification is cut short; "
             "the run ends with its checkpoint, and --resume auto makes the verification\n")
    log = (tmp_path / "run" / "training.log").read_text()
    assert result.stderr.count(other) == log.count(other) == (0 if whom == "both" else 1), result.stderr[-3000:]
    assert whom == "both" or log.index(other) < log.index("done: 2 steps in "), log
    state = checkpoint.load(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"] and len(state["rng"]) == 2
    assert read_jsonl(tmp_path / "run" / "verification.jsonl") == []
    resumed = train_on_ranks(args + ["--resume", "auto"])
    assert resumed.returncode == 0 and "nothing to train" not in resumed.stderr, resumed.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "verification.jsonl")] == [2]
    assert not checkpoint.load(str(tmp_path / "run" / "checkpoint.pt")).get("verification_cut_short")


def _train_with_rank_0_quitting_in_the_final_verification(argv):
    """train.trainer.main(argv) on a rank; rank 0 gets two SIGTERMs a while apart in its final verification (it
    quits at once, its line a stop) and lingers once it has left the group (_linger_after_leaving_the_group)."""
    from train import trainer

    if os.environ["RANK"] == "0":
        sets = trainer.Trainer._evaluate_sets

        def signalled_twice(self, evaluate, on_batch):
            if self.step == self.args.max_steps:
                self._on_signal(signal.SIGTERM, None)
                self._stop_signal_at -= trainer.SAME_STOP_SECONDS
                self._on_signal(signal.SIGTERM, None)
            return sets(self, evaluate, on_batch)

        trainer.Trainer._evaluate_sets = signalled_twice
        _linger_after_leaving_the_group()
    return trainer.main(argv)


def test_a_rank_whose_peer_stopped_after_the_last_step_names_no_step_past_it(tmp_path):
    # Rank 1 waits for rank 0's final verification in a collective; rank 0 gone there, rank 1 said "another process
    # stopped during step 3" of 2.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), pairs, batch_size=4, max_steps=2, save_every=0,
                                      loss_impl=LOSS_IMPL), main=_train_with_rank_0_quitting_in_the_final_verification)
    assert result.returncode != 0
    stop = "train: rank 0: stopped by a second SIGTERM: at once, without a checkpoint of this step\n"
    assert stop in result.stderr, result.stderr[-3000:]
    assert ("train: error: rank 1: another process stopped after the last step (2) (see its own output); no "
            "checkpoint was written before it\n") in result.stderr, result.stderr[-3000:]
    assert "step 3" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def _train_with_rank_0_failing_in_a_verification(argv, at_step):
    """train.trainer.main(argv) on a rank; rank 0's verification of step ``at_step`` raises (a set's file gone
    unreadable)."""
    from train import trainer

    if os.environ["RANK"] == "0":
        def failing(self, evaluate, on_batch):
            if self.step == at_step:
                raise OSError("injected: a set's file unreadable")

        trainer.Trainer._evaluate_sets = failing
    return trainer.main(argv)


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_a_failure_in_rank_0s_final_verification_writes_the_last_steps_checkpoint_on_every_rank(sharded, tmp_path):
    # A single process writes the last step's checkpoint before such an error ends the run (test_training). Under
    # torchrun, where a checkpoint takes every process (the random states gathered, sharded centres), the others
    # waited in the verification's collective: rank 0 wrote none, and they ended on finding it gone (gloo) or
    # waited until --dist-timeout (NCCL). The collective now carries the failure: every process writes its part of
    # the checkpoint, marked as cut short; rank 0's error ends the run, and the others end at once, exit status 0.
    if sharded and not arcface_ext.extension_available():
        pytest.skip("--sharded-classes needs the compiled op")
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    run = tmp_path / "run"
    argv = base_argv(data, str(run), pairs, batch_size=4, max_steps=2, save_every=1, loss_impl=LOSS_IMPL)
    argv += ["--sharded-classes"] if sharded else []
    result = train_on_ranks(argv, main=functools.partial(_train_with_rank_0_failing_in_a_verification, at_step=2),
                            timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    line = ("train: error: rank 0: the final verification failed (step 2); the last step's checkpoint is written, "
            f"marked as cut short: {run / 'checkpoint.pt'} (--resume auto makes the verification)\n")
    assert line in result.stderr, result.stderr[-3000:]
    assert "OSError: injected: a set's file unreadable" in result.stderr, result.stderr[-3000:]
    assert ("train: rank 1: rank 0's final verification failed (step 2; see its own output): this process ends, its "
            "part of the last step's checkpoint done\n") in result.stderr, result.stderr[-3000:]
    assert "another process stopped" not in result.stderr, result.stderr[-3000:]
    state = checkpoint.load(str(run / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"] and len(state["rng"]) == 2
    assert not (run / "verification.jsonl").exists() or not read_jsonl(run / "verification.jsonl")

    resumed = train_on_ranks(argv + ["--resume", "auto"], timeout=90)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(r["step"], r["target"]) for r in read_jsonl(run / "verification.jsonl")] == [(2, "pairs")]
    assert "verification_cut_short" not in checkpoint.load(str(run / "checkpoint.pt"))


def test_a_failure_in_rank_0s_verification_ends_the_others_at_once(tmp_path):
    # A verification before the last step: the others learn of rank 0's failure in the verification's collective
    # and end, one line each, exit status 0 (torchrun's summary names rank 0's error alone); they ended on finding
    # rank 0 gone (gloo: "another process stopped", exit status 1), or waited until --dist-timeout (NCCL). No
    # checkpoint is written for it: the last --save-every one is kept.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    run = tmp_path / "run"
    argv = base_argv(data, str(run), pairs, batch_size=4, max_steps=4, eval_every=2, save_every=1,
                     loss_impl=LOSS_IMPL)
    result = train_on_ranks(argv, main=functools.partial(_train_with_rank_0_failing_in_a_verification, at_step=2),
                            timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "OSError: injected: a set's file unreadable" in result.stderr, result.stderr[-3000:]
    assert ("train: rank 1: rank 0's verification failed (step 2; see its own output): this process ends\n"
            in result.stderr), result.stderr[-3000:]
    assert "another process stopped" not in result.stderr, result.stderr[-3000:]
    assert checkpoint.load(str(run / "checkpoint.pt"))["step"] == 1  # (--save-every's: step 2's comes after it)


def _train_with_rank_0_failing_in_its_final_verification_and_checkpoint(argv):
    """train.trainer.main(argv) on a rank; rank 0's final verification raises, and so does its part of the
    checkpoint written after it, before that part's collectives (out of memory again, checking that the weights
    are finite). Rank 0 lingers 2 s once it has left the group, so that the others say their line before the
    launcher stops them."""
    from train import trainer

    if os.environ["RANK"] == "0":
        def failing(self, evaluate, on_batch):
            if self.step == self.args.max_steps:
                checkpoint.all_finite = out_of_memory
                raise OSError("injected: a set's file unreadable")

        def out_of_memory(module):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB")

        destroy = torch.distributed.destroy_process_group

        def lingering(*args, **kwargs):
            destroy(*args, **kwargs)
            time.sleep(2)

        trainer.Trainer._evaluate_sets = failing
        torch.distributed.destroy_process_group = lingering
    return trainer.main(argv)


def test_rank_0s_part_of_the_checkpoint_failing_after_its_final_verification_is_one_line_on_the_others(tmp_path):
    # The others, in that checkpoint's collectives, found rank 0 gone and said gloo's words as the reason: "[.../gloo/
    # transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:42891. This is typically caused by ... GLHF!".
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    run = tmp_path / "run"
    argv = base_argv(data, str(run), pairs, batch_size=4, max_steps=2, save_every=1, loss_impl=LOSS_IMPL)
    result = train_on_ranks(argv, main=_train_with_rank_0_failing_in_its_final_verification_and_checkpoint,
                            timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "OSError: injected: a set's file unreadable" in result.stderr, result.stderr[-3000:]
    assert ("train: error: rank 0: the final verification failed (step 2), and the last step's checkpoint was not "
            "written: RuntimeError: CUDA out of memory. Tried to allocate 2.00 MiB\n") in result.stderr, \
        result.stderr[-3000:]
    assert ("train: rank 1: rank 0's final verification failed (step 2; see its own output), and the last step's "
            "checkpoint was not written: another process stopped (see its own output)\n") in result.stderr, \
        result.stderr[-3000:]
    assert "Connection closed" not in result.stderr, result.stderr[-3000:]
    assert checkpoint.load(str(run / "checkpoint.pt"))["step"] == 1


def test_a_failure_in_rank_0s_final_verification_is_torchruns_failure(tmp_path):
    # The others end with exit status 0 (test_a_failure_in_rank_0s_final_verification_writes_...): torchrun itself,
    # whose status a job's script reads, still ends with 1, and its summary's root cause is rank 0's error.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    pairs = make_pairs_list(str(tmp_path / "pairs"))
    run = tmp_path / "run"
    script = tmp_path / "failing_verification_on_rank_0.py"
    script.write_text("import os, sys\n"
                      "from train import trainer\n"
                      "def failing(self, evaluate, on_batch):\n"
                      "    raise OSError('injected: a set\\'s file unreadable')\n"
                      "if os.environ['RANK'] == '0':\n"
                      "    trainer.Trainer._evaluate_sets = failing\n"
                      "sys.exit(trainer.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *base_argv(data, str(run), pairs, batch_size=4, max_steps=2, save_every=0,
                                                     loss_impl=LOSS_IMPL)],
                            cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 1, result.stderr[-4000:]
    assert ("train: rank 1: rank 0's final verification failed (step 2; see its own output): this process ends, its "
            "part of the last step's checkpoint done\n") in result.stderr, result.stderr[-4000:]
    summary = result.stderr[result.stderr.find("Failures:"):]
    root_cause = summary.split("Root Cause")[-1]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "OSError: injected: a set's file unreadable" in \
        root_cause, result.stderr[-4000:]
    assert summary.count("exitcode  : 1 ") == 1, result.stderr[-4000:]  # (rank 1, if listed, stopped by torchrun)
    state = checkpoint.load(str(run / "checkpoint.pt"))
    assert state["step"] == 2 and state["verification_cut_short"] and len(state["rng"]) == 2


def _train_with_a_full_disk_on_rank_0(argv):
    """train.trainer.main(argv) on a rank; on rank 0, metrics.jsonl cannot be appended to from its second
    record on (a full disk), and the process lingers once it has left the group
    (_linger_after_leaving_the_group)."""
    from train import trainer

    if os.environ["RANK"] == "0":
        def open_(path, mode="r", *args, **kwargs):
            if "a" in mode and os.path.basename(path) == "metrics.jsonl" and os.path.exists(path):
                raise OSError(28, "No space left on device", path)
            return open(path, mode, *args, **kwargs)

        trainer.open = open_
        _linger_after_leaving_the_group()
    return trainer.main(argv)


def test_a_log_rank_0_cannot_write_is_said_before_it_leaves_the_group(tmp_path):
    # Rank 0's one line for a log it cannot write (a full disk) was printed after the process had left the
    # group: the other ended ("another process stopped (see its error)") and torchrun stopped rank 0, at
    # times before it had printed its error, which then nobody saw.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    run = tmp_path / "run"
    result = train_on_ranks(base_argv(data, str(run), batch_size=4, max_steps=3, save_every=0, loss_impl=LOSS_IMPL),
                            main=_train_with_a_full_disk_on_rank_0)
    assert result.returncode == 1
    assert (f"train: error: writing {run / 'metrics.jsonl'} failed: [Errno 28] No space left on device. No checkpoint "
            "was written before it") in result.stderr, result.stderr[-3000:]
    assert "train: error: rank 1: another process stopped during step" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def _sleep_until_terminated(seconds: float) -> None:
    """time.sleep(seconds) for a rank made slower than --dist-timeout, but ending once its SIGTERM has been handled:
    torch.multiprocessing terminates the ranks still running once one has failed (the other rank, when it has
    waited past --dist-timeout), and the rank's handler of the moment (the trainer's, which notes it, or
    stop_on_signals', which raises) takes the signal as it took it in the middle of the whole sleep. So the slow
    rank still outlasts the other's timeout whatever the machine's load, without sleeping out the rest of the
    `seconds` after the other has ended (about 54 of the 60 s, in the tests below where the handler notes it). The
    tests below sleep 60 s, ten times their --dist-timeout, where 12 s let a rank that reached the collective more
    than 6 s late (its own start-up slower, on 2 cores beside other tests) wait less than the timeout."""
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler):  # (its default action ends the process as the sleep's would)
        time.sleep(seconds)
        return
    terminated = []

    def note(number, frame):
        terminated.append(number)
        handler(number, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        deadline = time.monotonic() + seconds
        while not terminated and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if signal.getsignal(signal.SIGTERM) is note:  # (a handler that raised may have set another)
            signal.signal(signal.SIGTERM, handler)


def _train_with_rank_0_slow(argv, where):
    """train.trainer.main(argv) on a rank; rank 0 takes 60 s longer (or until terminated) at ``where``: reading
    its verification sets ("start-up", while the others wait for it at the start-up's barrier), or writing the
    checkpoint of step 2 ("step") or the last one ("end"), while the others go on to the next step's collectives
    or wait for it at the end of the run."""
    from train import checkpoint as checkpoint_module, data, trainer

    if os.environ["RANK"] == "0":
        def slow(real):
            def late(*args, **kwargs):
                _sleep_until_terminated(60)  # (ten times the test's --dist-timeout; then it finds the other ended)
                return real(*args, **kwargs)
            return late

        if where == "start-up":
            data.build_verification_sets = slow(data.build_verification_sets)
        else:
            checkpoint_module.save_atomic = slow(checkpoint_module.save_atomic)
    return trainer.main(argv)


@pytest.mark.parametrize("where, when, save_every", [
    ("start-up", "during start-up (rank 0 reads the verification sets", 0),
    ("step", "during step 3 (rank 0 verifies and writes the checkpoints", 2),
    ("end", "at the end of the run (rank 0 verifies and writes the checkpoints", 0)])
def test_a_rank_waiting_longer_than_dist_timeout_says_so(where, when, save_every, tmp_path):
    # Rank 0 verifies and writes the checkpoints alone while the others wait at their next collective, as long
    # as the process group's timeout: torch's default for NCCL is 10 minutes, which writing 8.4 GB of centres
    # and momentum (WebFace42M's) to a slow disk can outlast, and the others ended with gloo's or NCCL's
    # traceback. --dist-timeout sets it (30 minutes by default), and a process that waited longer says so.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=3, save_every=save_every,
                                      loss_impl=LOSS_IMPL, dist_timeout=0.1),
                            main=functools.partial(_train_with_rank_0_slow, where=where))
    assert result.returncode == 1
    assert (f"train: error: rank 1: waited more than --dist-timeout 0.1 minutes for the other processes {when} "
            "while the others wait: a slow disk or a long verification needs a longer --dist-timeout)\n") \
        in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def _train_with_rank_1_slow(argv):
    """train.trainer.main(argv) on a rank; rank 1 takes 60 s longer (or until terminated) before its step 2,
    while rank 0 waits for it at the step's collectives."""
    from train import trainer

    if os.environ["RANK"] == "1":
        train_step = trainer.Trainer.train_step

        def late(self, *args, **kwargs):
            if self.step == 1:
                _sleep_until_terminated(60)  # (ten times the test's --dist-timeout; then it finds the other ended)
            return train_step(self, *args, **kwargs)

        trainer.Trainer.train_step = late
    return trainer.main(argv)


def test_rank_0_waiting_longer_than_dist_timeout_does_not_blame_itself(tmp_path):
    # Rank 0 waits for the others too (one reading its shard from a slower disk, say): its line said "rank 0
    # verifies and writes the checkpoints while the others wait", of its own wait.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    result = train_on_ranks(base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=3, save_every=0,
                                      loss_impl=LOSS_IMPL, dist_timeout=0.1), main=_train_with_rank_1_slow)
    assert result.returncode == 1
    assert re.search(r"^train: error: rank 0: waited more than --dist-timeout 0\.1 minutes for the other processes "
                     r"during step 2 \(another process fell behind \(its data on a slower disk, say\) or hung\)",
                     result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert "rank 0 verifies" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("minutes", [DIST_TIMEOUT_LEAST_MINUTES, DIST_TIMEOUT_MOST_MINUTES])
def test_the_ends_of_dist_timeouts_range_start_a_process_group(minutes):
    # torch counts the timeout in whole milliseconds and adds it to its clocks in 64-bit nanoseconds: a
    # --dist-timeout under 1 ms, or past 1.5e8 minutes (2e8 was taken), made the store of init_process_group
    # time out at once ("The client socket has timed out after 0ms", "... after 12000000000000ms"); torch 2.4.1's
    # store counts its connection's timeout in whole seconds (0.001 minutes: "... timed out after 0s").
    timeout = datetime.timedelta(minutes=minutes)
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout)
    group = torch.distributed.ProcessGroupGloo(store, 0, 1, timeout)
    ones = torch.ones(2)
    group.allreduce([ones]).wait()
    group.barrier().wait()
    assert ones.tolist() == [1.0, 1.0]


def test_a_ranks_unhandled_error_is_torchruns_root_cause(tmp_path):
    # torchrun's failure summary shows a failing process's traceback when the process wrote it to its error
    # file (TORCHELASTIC_ERROR_FILE: torch's @record does, on the way out of the function it decorates);
    # otherwise "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html".
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    script = tmp_path / "bug_on_rank_1.py"
    script.write_text("import os, sys\n"
                      "from train import trainer\n"
                      "step = trainer.Trainer.train_step\n"
                      "def bug_on_rank_1(self, *args):\n"
                      "    if self.step == 1 and os.environ['RANK'] == '1':\n"
                      f"        raise RuntimeError({BUG!r})\n"
                      "    return step(self, *args)\n"
                      "trainer.Trainer.train_step = bug_on_rank_1\n"
                      "sys.exit(trainer.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *base_argv(data, str(tmp_path / "run"), batch_size=4, max_steps=3,
                                                     save_every=0, loss_impl=LOSS_IMPL)],
                            cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    summary = result.stderr[result.stderr.find("Failures:"):]
    assert f"RuntimeError: {BUG}" in summary and "To enable traceback" not in summary.split("Root Cause")[-1], \
        result.stderr[-4000:]
    assert result.stderr.count(f"[rank1]: RuntimeError: {BUG}") == 1, result.stderr[-4000:]  # (not again at exit)


def test_an_unhandled_error_is_written_as_torchrun_reads_it(tmp_path, monkeypatch, capsys):
    # torchrun's own reader of its error files (the failure summary's): the format is torch's, not ours.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from train.tools import say_unhandled_error

    def said(error, **kwargs):
        try:
            raise error
        except BaseException:
            return say_unhandled_error(**kwargs)

    error_file = tmp_path / "error.json"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert not said(RuntimeError(BUG))  # not under torchrun: the interpreter prints it, as ever
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    # What a handler says, a stop, and another process's failure: not this process's error to report.
    for handled in (SystemExit(1), KeyboardInterrupt(), RuntimeError("[pair.cc:553] Connection closed by peer"),
                    ValueError("said further out")):
        assert not said(handled, handled=(ValueError,)), handled
    assert capsys.readouterr().err == "" and not error_file.exists()

    assert said(RuntimeError(BUG))
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n") and err.endswith(f"RuntimeError: {BUG}\n"), err
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(error_file))
    summary = str(ChildFailedError("train", {1: failure}))
    assert f"RuntimeError: {BUG}" in summary and "Traceback (most recent call last):" in summary, summary
    assert os.listdir(tmp_path) == ["error.json"]  # (written whole: no temporary left beside it)
    # An error file that cannot be written leaves the traceback said, and the error the one unwinding.
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file / "error.json"))
    assert said(RuntimeError(BUG)) and capsys.readouterr().err.endswith(f"RuntimeError: {BUG}\n")


def _train_counting_all_reduces(argv):
    """train.trainer.main(argv) on a rank, then the number of all-reduces its DDP modules made."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from train.trainer import main

    calls = []
    init = DistributedDataParallel.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)

        def hook(state, bucket):
            calls.append(bucket)
            return default_hooks.allreduce_hook(None, bucket)
        self.register_comm_hook(None, hook)

    DistributedDataParallel.__init__ = counting_init  # (in the rank's own process)
    code = main(argv)
    print(f"rank {os.environ['RANK']}: {len(calls)} all-reduces", flush=True)
    return code


def test_compiled_ddp_accumulates_without_all_reduces(tmp_path):
    """--gradient-acc under --compile: DDP all-reduces the backbone's gradients in a step's last pass
    only, as without --compile, with the same losses. (torch.compile wraps the DDP module, whose
    no_sync the earlier passes skipped: every gradient bucket was all-reduced in every pass.)"""
    data = make_face_folder(str(tmp_path / "faces"))
    counts, losses = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "--compile-backend", "aot_eager"])):
        args = base_argv(data, str(tmp_path / name), batch_size=4, gradient_acc=2, max_steps=2, save_every=0,
                         loss_impl=LOSS_IMPL) + extra
        result = train_on_ranks(args, main=_train_counting_all_reduces)
        assert result.returncode == 0, result.stderr[-3000:]
        counts[name] = sorted(re.findall(r"rank \d: (\d+) all-reduces", result.stdout))
        losses[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
    assert len(counts["eager"]) == 2 and counts["compiled"] == counts["eager"], counts
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)


def _train_with_fp16_overflows(argv, from_step):
    """train.trainer.main(argv) on a rank, its fp16 scaler starting at 2^-14 and every step's gradients from
    ``from_step`` on overflowing (an inf put into one after DDP's all-reduce, on every rank alike)."""
    from train import trainer

    class GradScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, init_scale=2.0 ** -14, **kwargs)

        def unscale_(self, optimizer):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls >= from_step:
                optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
            return super().unscale_(optimizer)

    torch.amp.GradScaler = GradScaler
    return trainer.main(argv)


def test_a_collapsed_fp16_loss_scale_stops_every_rank_at_the_same_step(tmp_path):
    # The collapse is seen on the device and carried by the next step's collective (no sync of its own): every
    # rank stops there, none is left waiting in a collective.
    data = make_face_folder(str(tmp_path / "faces"), identities=4, images=4)
    run = tmp_path / "run"
    argv = base_argv(data, str(run), None, batch_size=4, max_steps=6, save_every=3, loss_impl=LOSS_IMPL,
                     loss_amp="fp16", grad_clip=0)
    result = train_on_ranks(argv, main=functools.partial(_train_with_fp16_overflows, from_step=2), timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("training diverged: the fp16 loss scale fell to 7.62939e-06 at step 4 (3 steps in a "
                               "row skipped for inf/NaN gradients") >= 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "timed out" not in result.stderr, result.stderr[-3000:]
    assert checkpoint.load(str(run / "checkpoint.pt"))["step"] == 3
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][-1] == 4
