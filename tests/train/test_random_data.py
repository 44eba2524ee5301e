"""`--data random`: fixed random images on the device and labels drawn per step (train/data/random.py), the
trainer's no-I/O source for timing a step, and what the trainer and the tools make of it."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
import torch

from train import checkpoint, insightface_config
from train.config import parse_args, unused_options
from train.data import RandomBatches, RandomFaces, build_train_dataset, build_train_loader, build_verification_sets
from train.trainer import main
import trainer_fixtures
from trainer_fixtures import LOSS_IMPL, base_argv, read_jsonl, run_killed_at

one_thread = trainer_fixtures.one_thread  # (the fixture, for usefixtures below)


def test_the_images_are_one_fixed_uint8_batch_and_the_same_for_a_seed():
    faces = RandomFaces(1000, image_size=24, seed=3)
    images = faces.images(5)
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.uint8
    assert torch.equal(images, RandomFaces(1000, image_size=24, seed=3).images(5))
    assert not torch.equal(images, RandomFaces(1000, image_size=24, seed=4).images(5))
    assert int(images.min()) < 10 and int(images.max()) > 245  # noise over the whole range, not a constant
    loader = build_train_loader(faces, batch_size=5, num_workers=2, seed=3)
    assert isinstance(loader, RandomBatches)  # no DataLoader, no worker processes, whatever num_workers says
    batches = iter(loader)
    (a, la), (b, lb) = next(batches), next(batches)
    assert a is b and torch.equal(a, images)  # one tensor, made once
    assert la.dtype == torch.int64 and la.shape == (5,) and not torch.equal(la, lb)


def test_the_labels_of_a_step_depend_on_seed_step_and_rank_alone():
    faces = RandomFaces(10**9, seed=7)  # far more classes than any test could hold a list of
    uninterrupted = [labels for _, labels in _take(build_train_loader(faces, batch_size=64, num_workers=0, seed=7), 6)]
    resumed = [labels for _, labels in _take(build_train_loader(faces, batch_size=64, num_workers=0, seed=7,
                                                                start_step=4), 2)]
    assert torch.equal(resumed[0], uninterrupted[4]) and torch.equal(resumed[1], uninterrupted[5])
    assert torch.equal(RandomFaces(10**9, seed=7).labels(3, 64), uninterrupted[3])
    assert not torch.equal(RandomFaces(10**9, seed=8).labels(3, 64), uninterrupted[3])
    assert not torch.equal(faces.labels(3, 64, rank=1), uninterrupted[3])
    drawn = torch.cat(uninterrupted)
    assert 0 <= int(drawn.min()) and int(drawn.max()) < 10**9 and int(drawn.max()) > 10**8  # uniform, all classes


def test_millions_of_classes_cost_no_memory_of_their_own():
    tracemalloc.start()
    try:
        faces = RandomFaces(50_000_000, image_size=16, seed=0)
        batches = iter(build_train_loader(faces, batch_size=8, num_workers=0, seed=0))
        next(batches)
        faces.fingerprint()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # (Python's allocations; a list or array per class would be hundreds of MB)
    assert len(faces) == 50_000_000 and faces.classes_digest() is None


def test_the_options_of_random_data():
    with pytest.raises(SystemExit, match=r"^--data random needs --num-classes: "):
        parse_args(["--data", "random"])
    args = parse_args(["--data", "random", "--num-classes", "3000000", "--num-workers", "4"])
    assert (args.val_targets, args.image_size, args.num_classes) == ([], 112, 3000000)
    assert any(note.startswith("--num-workers 4 is not used: --data random has no loader") for note in
               unused_options(args))


def test_tools_that_read_faces_refuse_random_data_and_verification_names_are_skipped():
    with pytest.raises(ValueError, match=r"^--data random is noise drawn for timing a training step .*: name a set"):
        build_train_dataset("random")
    with pytest.raises(ValueError, match=r"random, the noise for timing a step, is a source of its own"):
        build_train_dataset("random,elsewhere")
    with pytest.warns(UserWarning, match=r"'lfw': --data random has no folder of sets; skipped"):
        assert build_verification_sets("random", ["lfw"]) == {}


def test_arcface_torchs_synthetic_rec_is_random_data(tmp_path, monkeypatch):
    # configs/speed.py: one fixed random tensor over 300k classes; was --data synthetic, the demo's 100 faces.
    monkeypatch.setenv("WORLD_SIZE", "1")
    path = tmp_path / "speed.py"
    path.write_text("config.rec = 'synthetic'\nconfig.num_classes = 300000\nconfig.num_image = 100000\n"
                    "config.num_epoch = 30\nconfig.val_targets = []\n")
    args = parse_args(["--config", str(path)])
    assert (args.data, args.num_classes, args.val_targets) == ("random", 300000, [])
    assert insightface_config.read(str(path))["rec"] == "synthetic"


def _take(loader, count):
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def _argv(output, **overrides):
    options = {"num_classes": 100000, "max_steps": 6, "save_every": 3, "loss_impl": LOSS_IMPL}
    return base_argv("random", str(output), **{**options, **overrides})


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_on_random_data_says_so_and_resumes_as_it_would_have_gone_on(tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(_argv(full)) == 0
    log = (full / "training.log").read_text()
    assert "data random: one fixed batch of 32px uint8 noise on the training device, labels uniform over 100000 " \
           "identities each step" in log
    assert "verification: none" in log
    assert json.loads((full / "args.json").read_text())["data"] == "random"

    run_killed_at(4, _argv(killed), monkeypatch)
    assert checkpoint.load(str(killed / "checkpoint.pt"))["step"] == 3
    assert main(_argv(killed, resume="auto")) == 0
    losses = [[r["loss"] for r in read_jsonl(os.path.join(run, "metrics.jsonl"))] for run in (full, killed)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]  # the same labels after the resume: exact floats

    # A tool that reads the run's faces says what the run's data is rather than looking for a folder "random".
    from train.quantize import read_faces

    with pytest.raises(ValueError, match=r"^--int8 \(the run's --data\) random is noise drawn for timing a training "):
        read_faces("random", 8, image_size=32, run={"data": "random"}, flag="--int8 (the run's --data)")


@pytest.mark.slow
def test_on_a_cpu_the_trainer_takes_a_thread_a_cpu_of_its_cgroups_quota(tmp_path, monkeypatch):
    # The intra-op threads were one a CPU of the affinity: a container held to 3 CPUs' quota (docker --cpus 3)
    # on a host of 64 ran 64 threads. (Random data has no loader workers to leave CPUs to.)
    import train.tools
    from train.trainer import Trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 64, raising=False)
    monkeypatch.setattr(train.tools, "_cgroup_cpu_quota", lambda root: 3)
    run = Trainer(parse_args(_argv(tmp_path / "run", num_classes=10)))
    try:
        assert torch.get_num_threads() == 3  # (one_thread sets the count back after the test)
    finally:
        run.release_output()


def test_bench_step_times_both_losses_and_its_eager_baseline_is_arcface():
    from arcface_ext import reference
    from conftest import load_benchmark

    bench = load_benchmark("bench_step")
    torch.manual_seed(0)
    loss = bench.EagerPartialFC(300, 16)
    embeddings, labels = torch.randn(8, 16), torch.randint(0, 300, (8,))
    expected = reference.combined_margin_loss(embeddings, loss.weight.detach(), labels, s=64.0, m2=0.5)
    torch.testing.assert_close(loss(embeddings, labels), expected, atol=1e-4, rtol=1e-5)
    # Partial FC's sample: every class of the batch, the labels as their positions in it, rate x C rows.
    loss.sample_rate = 0.1
    index, positions = loss.sample(labels)
    assert index.numel() == 30 and torch.equal(index[positions], labels)


def test_a_tiny_bench_step_run_writes_its_rows(tmp_path, capsys):
    from conftest import load_benchmark

    out = tmp_path / "rows.json"
    load_benchmark("bench_step").main(["--C", "50", "5000", "--network", "small", "--image-size", "16",
                                       "--batch-size", "4", "--embedding-size", "16", "--warmup", "0",
                                       "--repeats", "1", "--no-memory", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["C"]) for r in rows] == [("ours", 50), ("eager-pfc", 50), ("ours", 5000), ("eager-pfc", 5000)]
    for row in rows:
        assert row["images_per_s"] > 0 and row["network"] == "small" and row["batch_size"] == 4
        assert {"device", "torch", "cuda", "git_sha"} <= set(row) and row["peak_mb"] is None
    assert rows[2]["state_mb"] - rows[0]["state_mb"] > 4950 * 16 * 4 * 3 / 2**20 * 0.99  # centres, grads, momentum
    assert "images/s" in printed and "x eager" in printed


def test_bench_step_measures_the_cuda_peak_over_the_timed_steps_alone(monkeypatch):
    # The first step's cuDNN autotuning, with its trial workspaces, would be the first impl's peak alone.
    from conftest import load_benchmark

    bench = load_benchmark("bench_step")
    calls = []

    class Event:
        def __init__(self, **_):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, _):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    times = bench.time_steps({"ours": lambda: calls.append("step")}, torch.device("cuda"), warmup=2, repeats=3)
    assert calls == ["step", "step", "reset", "step", "step", "step"] and times == {"ours": [1.0] * 3}


def test_bench_steps_loss_amp_follows_amp_and_its_refusals():
    from conftest import load_benchmark

    bench = load_benchmark("bench_step")
    # Both losses' GEMMs in one dtype: eager-pfc's cosines are under --amp's autocast.
    assert bench.parse_args(["--amp", "fp16"]).loss_amp == "fp16"
    assert bench.parse_args(["--amp", "fp16", "--loss-amp", "none"]).loss_amp == "none"
    assert bench.parse_args([]).loss_amp == "none"
    for argv, said in ((["--repeats", "0"], "--repeats 0: at least 1"), (["--C", "50", "0"], "--C 0: at least 1"),
                       (["--batch-size", "0"], "--batch-size 0: at least 1")):
        with pytest.raises(SystemExit, match=f"^{said}$"):
            bench.main([*argv, "--no-memory"])


def test_bench_step_runs_itself_again_with_the_arguments_it_was_given(monkeypatch):
    # (For the CPU's memory, with glibc's mmap threshold pinned: this call's arguments, not the process's.)
    from conftest import load_benchmark

    bench = load_benchmark("bench_step")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no /proc/self/clear_refs: no re-run")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    class Ran(Exception):
        pass

    def execve(path, argv, env):
        raise Ran(argv, env)

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(Ran) as ran:
        bench.main(["--C", "50", "--repeats", "1"])
    argv, env = ran.value.args
    assert argv[2:] == ["--C", "50", "--repeats", "1"] and env["MALLOC_MMAP_THRESHOLD_"]


def test_bench_steps_largest_c_search_brackets_the_limit_and_keeps_to_its_time(monkeypatch):
    from conftest import load_benchmark

    bench = load_benchmark("bench_step")
    tried = []

    def fits(impl, num_classes, options, device):
        tried.append(num_classes)
        return num_classes <= 123_456

    monkeypatch.setattr(bench, "fits", fits)
    found, failed = bench.largest_c("ours", None, torch.device("cuda"), start=1000, limit=10**7)
    assert found <= 123_456 < failed and failed - found <= found // 100
    assert bench.largest_c("ours", None, torch.device("cuda"), start=1000, limit=50_000) == (50_000, None)
    tried.clear()
    assert bench.largest_c("ours", None, torch.device("cuda"), start=1000, limit=10**7, deadline=0.0) == (1000, None)
    assert tried == [1000]  # (past its time: the bracket it has, no more tries)


def test_a_run_on_random_data_read_from_another_folder_keeps_its_data_a_name(tmp_path, monkeypatch):
    # (A folder named random where the run was started is not the run's data: export --int8 refuses, not reads it.)
    from train.quantize import run_paths

    started_in = tmp_path / "started_in"
    (started_in / "random").mkdir(parents=True)
    (started_in / "synthetic").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_paths({"data": "random"}, str(started_in))["data"] == "random"
    assert run_paths({"data": "synthetic"}, str(started_in))["data"] == "synthetic"


def test_bench_step_says_what_the_trainers_options_refuse_in_one_line(capsys):
    from conftest import load_benchmark

    bench = load_benchmark("bench_step")
    with pytest.raises(SystemExit) as refused:
        bench.main(["--network", "nosuch", "--C", "10", "--no-memory"])
    assert str(refused.value.code).startswith("argument --network: invalid choice: 'nosuch'")
    assert "usage" not in capsys.readouterr().err  # (not the trainer's usage, forty lines of it)
    with pytest.raises(SystemExit, match=r"^--sample-rate must be in \(0, 1\], got 1.5$"):
        bench.main(["--sample-rate", "1.5", "--C", "10", "--no-memory"])
