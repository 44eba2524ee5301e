"""Small on-disk face data for the trainer tests: an ImageFolder of synthetic identities and a
pairs list of other identities, both tiny enough that a few training steps take a second."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

import arcface_ext
from conftest import spawn_ranks
from train.data.synthetic import render_face

IMAGE_SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
# The fused op where it is built, else the reference: the trainer tests run either way.
LOSS_IMPL = "fused" if arcface_ext.extension_available() else "reference"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (and OMP_NUM_THREADS=1 for the trainer and its subprocesses): the
    networks here are tiny, and spare OpenMP threads only spin when the cores are shared. (Not
    the test's own ``monkeypatch``, whose ``undo()`` mid-test would leave the rest of the test to
    the trainer's thread count: a run compared with one before the undo then differs.)"""
    previous = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(previous)


def train_one_thread(argv: list[str]) -> int:
    """``python -m train`` with ``argv`` on one thread, as ``one_thread`` runs the tests: for
    module-scoped fixtures, which that function-scoped fixture does not reach."""
    from train.trainer import main

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            return main(argv)
        finally:
            torch.set_num_threads(threads)


def train_on_ranks(argv: list[str], nprocs: int = 2, main=None, timeout: float = 240) -> subprocess.CompletedProcess:
    """What ``torchrun --standalone --nproc_per_node nprocs -m train argv`` gives (the exit code, and the
    ranks' stdout and stderr, rank 0's first), for the tests of what the ranks train rather than of how
    torchrun starts and stops them: the ranks are forked from conftest.spawn_ranks's forkserver (torch
    imported once), with the variables torchrun gives its workers. (A torchrun of the trainer took 3.5 s on
    two idle cores, most of it three interpreters starting and ending.) One rank: ``python -m train argv``.
    ``main``: what each rank runs instead of train.trainer.main (a module's function, which the ranks import)."""
    store = None
    with tempfile.TemporaryDirectory() as logs, pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # where the tests run torchrun
        if nprocs > 1:
            # The ranks' store is served from here, as torchrun's agent serves its workers' (they all connect
            # to it, TORCHELASTIC_USE_AGENT_STORE), on a port the system gives it as it starts listening. A
            # free port found by binding port 0 and closing it, for rank 0 to bind, could be taken by another
            # process in between: rank 0 then failed with EADDRINUSE.
            store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            # (torchrun's OMP_NUM_THREADS, 1, where the caller has none; torch 2.4 reads the restart count where
            # the agent's store is used, for its keys' prefix)
            variables = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": store.port, "WORLD_SIZE": nprocs,
                         "LOCAL_WORLD_SIZE": nprocs, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", 1),
                         "TORCHELASTIC_USE_AGENT_STORE": True, "TORCHELASTIC_RESTART_COUNT": 0}
            for name, value in variables.items():
                patch.setenv(name, str(value))
        try:
            spawn_ranks(_trainer_rank, args=(argv, nprocs, logs, main), nprocs=nprocs, timeout=timeout)
            code = 0
        except torch.multiprocessing.ProcessExitedException as failed:
            code = failed.exit_code
        finally:
            del store  # its server stops
        streams = []
        for kind in ("out", "err"):
            paths = [os.path.join(logs, f"rank{rank}.{kind}") for rank in range(nprocs)]
            streams.append("".join(open(path).read() for path in paths if os.path.exists(path)))
    return subprocess.CompletedProcess(["train_on_ranks", *argv], code, *streams)


def _trainer_rank(rank: int, argv: list[str], nprocs: int, logs: str, main) -> None:
    if nprocs > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    for fd, kind in ((1, "out"), (2, "err")):
        with open(os.path.join(logs, f"rank{rank}.{kind}"), "w") as stream:
            os.dup2(stream.fileno(), fd)
    code = 1
    try:
        if main is None:
            from train.trainer import main
        code = main(argv)
    except SystemExit as stop:  # as the interpreter ends on one: a message is printed, the exit code 1
        code = stop.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if code:
        sys.exit(code)


def forward_backward(model, x):
    """The output of ``model(x)`` and the gradients of mean(output²), by parameter name."""
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_onnx_export_matches(checkpoint_path: str, output, capsys, image_size: int) -> None:
    """``python -m train.export`` of a training checkpoint into ``output``: its ``backbone.onnx``,
    run by onnxruntime at another batch size than the one traced, gives the PyTorch backbone's
    embeddings. Skipped without onnx and onnxruntime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from train import checkpoint, export

    assert export.main(["--checkpoint", checkpoint_path, "--output", str(output)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert os.path.exists(os.path.join(output, "backbone.pt"))
    model, _ = checkpoint.load_backbone(checkpoint_path)
    session = ort.InferenceSession(os.path.join(output, "backbone.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, image_size, image_size)
    got = session.run(["embedding"], {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def output_dtypes(model: torch.nn.Module, modules: dict, x: torch.Tensor):
    """(model(x), {name: dtype of that module's output}) for the named submodules."""
    seen = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
               for name, module in modules.items()]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def make_face_folder(root: str, identities: int = 8, images: int = 8, size: int = IMAGE_SIZE) -> str:
    """``root/id_XXX/NN.png`` for synthetic identities 0 .. identities-1."""
    for who in range(identities):
        folder = os.path.join(root, f"id_{who:03d}")
        os.makedirs(folder, exist_ok=True)
        for sample in range(images):
            Image.fromarray(render_face(0, who, sample, size)).save(os.path.join(folder, f"{sample:02d}.png"))
    return root


def make_pairs_list(root: str, pairs: int = 40, identities: int = 10, size: int = IMAGE_SIZE) -> str:
    """A pairs list (``image1 image2 0|1`` a line) over identities the training folder lacks."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(pairs):
        first = int(rng.integers(identities))
        second = first if k % 2 == 0 else (first + 1 + int(rng.integers(identities - 1))) % identities
        names = []
        for j, who in enumerate((first, second)):
            name = f"p{k:03d}_{j}.png"
            Image.fromarray(render_face(0, 10_000 + who, k * 2 + j, size)).save(os.path.join(root, name))
            names.append(name)
        lines.append(f"{names[0]} {names[1]} {int(k % 2 == 0)}\n")
    path = os.path.join(root, "pairs.txt")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def signalled_while_importing_torch(module: str, argv: list[str], signum: int, *, reader_gone: bool = False
                                    ) -> subprocess.CompletedProcess:
    """``python -m <module> argv`` (from the checkout, as from a terminal: Ctrl-C's SIGINT at its default)
    with ``signum`` sent to itself as it imports torch, the seconds a command spends before its own work.
    ``reader_gone``: its stdout and stderr a pipe whose reader has gone (``2>&1 | head``, whose reader the
    Ctrl-C ended too), stdout block-buffered as a user has it; nothing captured."""
    driver = (
        "import builtins, os, runpy, sys\n"
        "real_import = builtins.__import__\n"
        "def import_(name, *args, **kwargs):\n"
        "    if name == 'torch':\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = import_\n"
        f"sys.argv = [{module.rsplit('.', 1)[-1]!r}, *{argv!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")

    def run(**streams) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", driver], cwd=REPO, timeout=120,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **streams)

    if not reader_gone:
        return run(capture_output=True, text=True)
    read, write = os.pipe()
    os.close(read)
    try:
        return run(stdout=write, stderr=write,
                   env={name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"})
    finally:
        os.close(write)


def base_argv(data: str, output: str, pairs: str | None = None, **overrides) -> list[str]:
    """A tiny, fast run on the CPU: the small network at 32px, batch 16, no workers, no plots.
    The CPU even where a GPU is present: the tests resume runs and compare them bit for bit, which
    cuDNN's convolutions do not promise (tests/test_cuda.py trains on the GPU)."""
    options = {
        "device": "cpu", "data": data, "output": output, "val-targets": pairs or "none", "network": "small",
        "image-size": IMAGE_SIZE, "batch-size": 16, "embedding-size": 64, "num-workers": 0,
        "max-steps": 8, "log-every": 1, "eval-every": 0, "save-every": 4, "seed": 0,
    }
    options.update({k.replace("_", "-"): v for k, v in overrides.items()})
    argv = []
    for key, value in options.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    argv += ["--no-plots", "--no-tensorboard"]
    return argv


def two_step_checkpoint(root) -> tuple[str, str]:
    """(a checkpoint after two steps on a small face folder, so that BN statistics are not at their
    defaults; that folder), made under ``root``: what the export, embed and verify tests take."""
    import arcface_ext

    data = make_face_folder(str(root / "faces"), identities=4, images=4)
    loss_impl = "fused" if arcface_ext.extension_available() else "reference"
    argv = base_argv(data, str(root / "run"), batch_size=8, max_steps=2, loss_impl=loss_impl)
    assert train_one_thread(argv) == 0
    return str(root / "run" / "checkpoint.pt"), data


# The faces of other people that the cluster and search tests embed with trained_backbone's model (render_face's
# people 0 to 5 at samples 500 and on, never trained on), each collection a relative path -> (person, sample).
# Defined here once: those tests make their folders of them, and trained_backbone takes a seed whose model tells
# them apart as the tests expect (tells_the_test_people_apart).
CLUSTER_PEOPLE = 5
# test_cluster's people 0 and 1 alone, their first 3 faces each: two clusters.
TWO_PEOPLE = [(who, 500 + sample) for who in range(2) for sample in range(3)]


def cluster_collection() -> dict[str, tuple[int, int]]:
    """test_cluster's collection: 5 people, 3 to 7 faces each, a nested folder a person
    (``2025/event0/00.png``)."""
    return {f"{'2024' if who % 2 else '2025'}/event{who}/{sample:02d}.png": (who, 500 + sample)
            for who in range(CLUSTER_PEOPLE) for sample in range(3 + who)}


def search_collections() -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """test_search's (gallery, probes), a folder a person (``person0/00.png``): people 0 to 3 enrolled with
    3 faces each; 2 other faces of each of them and of people 4 and 5, who are not enrolled."""
    gallery = {f"person{who}/{sample:02d}.png": (who, 500 + sample) for who in range(4) for sample in range(3)}
    probes = {f"person{who}/{sample:02d}.png": (who, 500 + sample) for who in range(6) for sample in (3, 4)}
    return gallery, probes


def save_faces(folder, faces: dict[str, tuple[int, int]], size: int = IMAGE_SIZE) -> str:
    """Each face of ``faces`` (a relative path -> (person, sample)) rendered at ``size``, saved under
    ``folder``; that folder."""
    for name, (who, sample) in faces.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(render_face(0, who, sample, size)).save(path)
    return str(folder)


def tells_the_test_people_apart(ckpt: str) -> bool:
    """Whether the model of ``ckpt`` gives what the cluster and search tests expect of their faces, at their
    threshold (cosine 0.55): :func:`cluster_collection` clustered as its people, none of them duplicates (cosine
    0.99), nor of their crops for a model from 112 pixels; :data:`TWO_PEOPLE` alone, two clusters; the probes of
    :func:`search_collections` found as their person among the gallery's templates, those of people not enrolled
    as no one."""
    from detector_fixtures import crop_for_model
    from train.embed import embed_files, load_model
    from train.ijb import template_features
    from train.tools.cluster import cluster_embeddings

    collection = list(cluster_collection().values())
    gallery, probes = (list(faces.values()) for faces in search_collections())
    model, settings = load_model(ckpt, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for who, sample in sorted({*collection, *TWO_PEOPLE, *gallery, *probes}):
            paths[who, sample] = os.path.join(folder, f"{who}_{sample}.png")
            Image.fromarray(render_face(0, who, sample, IMAGE_SIZE)).save(paths[who, sample])
        for who, sample in collection:
            paths["crop", who, sample] = os.path.join(folder, f"crop_{who}_{sample}.png")
            crop_for_model(render_face(0, who, sample, 112), IMAGE_SIZE).save(paths["crop", who, sample])
        keys = list(paths)
        unit = embed_files(model, [paths[key] for key in keys], settings["image_size"])
    row = {key: k for k, key in enumerate(keys)}

    for faces in (collection, [("crop", *key) for key in collection], TWO_PEOPLE):
        clusters, first = cluster_embeddings(torch.from_numpy(unit[[row[key] for key in faces]]), 0.55)
        people = {}
        for key, c in zip(faces, clusters.tolist()):
            people.setdefault(c, set()).add(key[-2])
        if -1 in people or len(people) != len({key[-2] for key in faces}) \
                or any(len(p) != 1 for p in people.values()) or (first != np.arange(len(faces))).any():
            return False

    enrolled, templates = template_features(unit[[row[key] for key in gallery]],
                                            np.array([who for who, _ in gallery]), np.arange(len(gallery)))
    for who, sample in probes:
        cosines = templates @ unit[row[who, sample]]
        found = int(enrolled[cosines.argmax()]) if cosines.max() >= 0.55 else None
        if found != (who if who in enrolled else None):
            return False
    return True


# The (seed, steps) whose model trained_backbone found to tell the tests' people apart in this test session.
_TELLS_APART: list[tuple[int, int]] = []


def trained_backbone(root) -> tuple[str, str]:
    """(a model's checkpoint after 80 or 50 steps on 8 synthetic identities of 24 images, backbone.pt beside a
    backbone.json recording a verification threshold, cosine 0.55), made under ``root``: what the cluster,
    search, roc and quality tests embed faces of other people with. So small a model is at the mercy of the
    CPU's rounding: trained with seed 0 it told the cluster tests' people apart on one CPU (an AMD EPYC) and
    not on another (an Intel Xeon), and on that one with torch 2.13 but not 2.4, as seeds 0 to 6 did for
    4 of 7 on one machine; at 80 steps, none of seeds 0 to 19 did on the AMD EPYC (two faces of a person at
    cosine 0.99, duplicates), where 50 steps kept seed 0's apart. So the first of seeds 0 to 19, each at 80
    steps and then 50, whose model tells the tests' people apart is taken (:func:`tells_the_test_people_apart`),
    and the tests test the tools on a model that can; the next module's model is trained with that seed and
    step count at once (the same model: training is deterministic on one machine)."""
    from train import checkpoint

    faces = make_face_folder(str(root / "train"), identities=8, images=24)
    loss_impl = "fused" if arcface_ext.extension_available() else "reference"
    ckpt = str(root / "run" / "checkpoint.pt")
    for seed, steps in [*_TELLS_APART, *((seed, steps) for seed in range(20) for steps in (80, 50))]:
        shutil.rmtree(root / "run", ignore_errors=True)
        argv = base_argv(faces, str(root / "run"), batch_size=32, max_steps=steps, save_every=0, log_every=20,
                         loss_impl=loss_impl, seed=seed)
        assert train_one_thread(argv) == 0
        if tells_the_test_people_apart(ckpt):
            _TELLS_APART[:] = [(seed, steps)]
            break
        print(f"trained_backbone: seed {seed}'s model after {steps} steps does not tell the tests' people apart",
              file=sys.stderr)
    else:
        raise AssertionError("no model of seeds 0 to 19 at 80 or 50 steps tells the cluster and search tests' "
                             "people apart")
    model, settings = checkpoint.load_backbone(ckpt)
    torch.save(model.state_dict(), root / "backbone.pt")
    (root / "backbone.json").write_text(json.dumps({**settings, "threshold": 0.9}))  # cosine 0.55
    return ckpt, str(root / "backbone.pt")


def fail_if_called(monkeypatch, owner, name: str, message: str) -> None:
    """``owner.name`` (a tool's embedding, face detection or image decoding) made to fail the test with
    ``message``: for the tests of what a tool checks before that slow work (minutes for a large folder)."""
    def called(*args, **kwargs):
        raise AssertionError(message)

    monkeypatch.setattr(owner, name, called)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_killed_at(step, argv_, monkeypatch, check=None):
    """``train.trainer.main(argv_)`` killed as it is about to train ``step`` (after ``check(trainer)``, if
    given), as a crash or a kill -9 would stop it: no checkpoint is written on the way out. A run that
    ends before ``step`` fails the test with main's exit status: the trainer's own stop (a SIGINT or
    SIGTERM from outside, 130 or 143) or an error (1) ended it, and its line is in the captured stderr."""
    from train.trainer import Trainer, main

    original_step = Trainer.train_step

    def train_step(self, images, labels):
        if self.step == step:
            if check is not None:
                check(self)
            raise RuntimeError("simulated kill")
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        status = main(argv_)
    except RuntimeError as error:
        if "simulated kill" not in str(error):
            raise
    else:
        pytest.fail(f"the run to be killed at step {step} ended before it, exit status {status} (0: its last step came "
                    "first; 130 or 143: a signal from outside the test; 1: an error; the captured stderr says which)")
    finally:
        monkeypatch.setattr(Trainer, "train_step", original_step)


def signal_once_training(command: list[str], output, signum: int, *, cwd: str, timeout: float) -> tuple[int, str]:
    """Starts ``command`` in a new session, sends ``signum`` to its whole process group (as a cluster
    scheduler or torchrun does, DataLoader workers included) once ``output/metrics.jsonl`` has a
    line, and returns (exit code, stderr)."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = os.path.join(output, "metrics.jsonl")
    try:
        deadline = time.time() + timeout
        while not os.path.exists(metrics) or not read_jsonl(metrics):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, f"training did not start within {timeout} s"
            time.sleep(0.1)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(an ImageFolder of 8 identities, a pairs list), made once a test module."""
    root = tmp_path_factory.mktemp("faces")
    return make_face_folder(str(root / "train")), make_pairs_list(str(root / "pairs"))
