"""export, embed, verify and make_bin the way a user deploying a model makes mistakes: a stop
(Ctrl-C, SIGTERM) at any point, outputs named as inputs, a normalising graph asked for norms,
photos whose names a table cannot hold."""

import contextlib
import json
import os
import shutil
import signal
import sys

import pytest

from train import embed, export, verify
from train.signals import Stopped, signals_held, stop_on_signals
from train.tools import make_bin

from conftest import HeldFile
from trainer_fixtures import REPO, one_thread, signalled_while_importing_torch, two_step_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return two_step_checkpoint(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """A folder holding backbone.pt, backbone.json, backbone.onnx and backbone_normalized.onnx."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("exported")
    assert export.main(["--checkpoint", trained[0], "--output", str(folder), "--normalized-onnx"]) == 0
    return folder


def code_of(main, argv):
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse's own checks
        return exit_info.code


def test_a_stop_unwinds_and_one_during_writing_comes_after_it():
    def kill_self():
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ignored = []
    with pytest.raises(Stopped) as stop:
        with stop_on_signals():
            try:
                kill_self()
            finally:  # the clean-up: a second signal would interrupt it
                ignored.append(signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
    assert stop.value.exit_status == 143 and stop.value.name == "SIGTERM" and not stop.value.after_writing
    assert ignored == [True]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # back as they were

    done = []
    with pytest.raises(Stopped) as stop:
        with stop_on_signals():
            with signals_held():
                kill_self()
                done.append("the block went on")
    assert done and stop.value.after_writing
    # A stop after the block (while the tool reports) says the outputs were written too.
    with pytest.raises(Stopped) as stop:
        with stop_on_signals():
            with signals_held():
                pass
            kill_self()
    assert stop.value.after_writing
    # A block that fails is not "written": the stop says so.
    with pytest.raises(Stopped) as stop:
        with stop_on_signals():
            with signals_held():
                kill_self()
                raise OSError("disk full")
    assert not stop.value.after_writing and isinstance(stop.value.__context__, OSError)
    # Not an Exception: an `except Exception` around an exporter does not take it for the exporter's error.
    assert not issubclass(Stopped, Exception)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_signals_ignored_from_the_start_stay_ignored_and_threads_are_left_alone():
    import threading

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background by a script
    try:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)  # nothing happens
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    # Outside the main thread (a tool's main() run in a thread): no handler set, no error.
    failures = []

    def in_a_thread():
        try:
            with stop_on_signals():
                with signals_held():
                    pass
        except BaseException as error:  # noqa: B036 (the test reports any)
            failures.append(error)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert failures == []


def test_a_test_starts_with_ctrl_c_and_sigterm_as_from_a_terminal():
    # (conftest's _ctrl_c_and_sigterm_as_from_a_terminal; the next test runs this one in a pytest that
    # began with SIGINT ignored.)
    import subprocess

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(Stopped) as stop:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)
    assert stop.value.name == "SIGINT"
    # A child process's Ctrl-C is not ignored either (an ignored signal stays ignored across exec).
    child = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is "
                            "signal.default_int_handler)"], capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "True", child.stderr


@pytest.mark.slow
def test_pytest_started_as_a_background_job_still_stops_its_tests_tools():
    # `pytest ... &` in a script (a non-interactive shell) starts with SIGINT ignored: the tests that
    # Ctrl-C a tool (clean, cluster, roc, search, quality) failed, the first of them in the process.
    import subprocess

    test = f"{os.path.abspath(__file__)}::test_a_test_starts_with_ctrl_c_and_sigterm_as_from_a_terminal"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], capture_output=True,
                         text=True, timeout=240, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture
def restore_signals():
    yield
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("tool", ["make_bin", "preview"])
@pytest.mark.parametrize("when", ["working", "writing"])
def test_a_signal_to_make_bin_or_preview_is_one_line(tool, when, tmp_path, monkeypatch, capsys, restore_signals):
    # Their work had no stop of its own: Ctrl-C was a KeyboardInterrupt traceback, SIGTERM a death by the signal
    # without a word. A stop while the output is written waits for it, and says it is whole.
    from train import checkpoint
    from train.tools import preview

    module, out = (make_bin, tmp_path / "s.bin") if tool == "make_bin" else (preview, tmp_path / "s.png")
    argv = ([str(out), "--synthetic", "--pairs", "10", "--image-size", "16"] if tool == "make_bin" else
            ["--output", str(out), "--data", "synthetic", "--image-size", "16", "--count", "4"])
    write_atomic = checkpoint.write_atomic

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return write_atomic(*args, **kwargs)

    if when == "working":
        def signalled_work(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not reached: the handler raises")

        monkeypatch.setattr(module, "synthetic_pairs" if tool == "make_bin" else "grid", signalled_work)
    else:
        monkeypatch.setattr(module.checkpoint, "write_atomic", signalled)
    assert module.main(argv) == 143
    said = ": nothing written" if when == "working" else " as the outputs were written: they are whole"
    assert capsys.readouterr().err == f"{tool}: stopped by SIGTERM{said}\n"
    assert out.exists() == (when == "writing")


def earlier_export(folder):
    os.makedirs(folder, exist_ok=True)
    for name in ("backbone.pt", "backbone.json", "backbone.onnx", "backbone_normalized.onnx"):
        (folder / name).write_text(name)


def test_sigterm_during_the_export_leaves_the_folder_as_it_was(trained, tmp_path, monkeypatch, capsys,
                                                               restore_signals):
    ckpt, _ = trained
    earlier_export(tmp_path)

    def stopped_while_exporting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached: the handler raises")

    monkeypatch.setattr(export, "export_onnx", stopped_while_exporting)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--normalized-onnx"]) == 143
    assert capsys.readouterr().err == "export: stopped by SIGTERM: nothing written\n"
    # No private folder left, every earlier file as it was.
    assert sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.onnx", "backbone.pt",
                                            "backbone_normalized.onnx"]
    assert all((tmp_path / name).read_text() == name for name in os.listdir(tmp_path))
    # A folder the export made is gone again, with new/, which it made above it (40206f9).
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "new" / "export")]) == 143
    assert capsys.readouterr().err == "export: stopped by SIGTERM: nothing written\n"
    assert not (tmp_path / "new").exists()


def test_sigterm_while_the_files_move_into_place_waits_for_them(trained, tmp_path, monkeypatch, capsys,
                                                                 restore_signals):
    ckpt, _ = trained
    earlier_export(tmp_path)
    replace = os.replace
    moved = []

    def replace_then_signal(source, target):
        if os.path.dirname(target) != str(tmp_path):  # a write in the private folder
            return replace(source, target)
        if not moved:
            os.kill(os.getpid(), signal.SIGTERM)  # held until every file has moved
        replace(source, target)
        moved.append(os.path.basename(target))

    monkeypatch.setattr(export.os, "replace", replace_then_signal)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path), "--no-onnx"]) == 143
    err = capsys.readouterr().err
    assert "export: stopped by SIGTERM as the files moved into place: the export is whole" in err
    # The new state dict and settings, and the old graphs (they are not the new backbone's) gone.
    assert moved[-1] == "backbone.pt" and sorted(os.listdir(tmp_path)) == ["backbone.json", "backbone.pt"]
    assert json.loads((tmp_path / "backbone.json").read_text())["network"] == "small"


def test_export_output_mistakes_are_one_line_errors(trained, tmp_path, capsys, monkeypatch):
    ckpt, _ = trained
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert export.main(["--checkpoint", ckpt, "--output", str(afile), "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert err == f"export: error: --output {afile} is a file, not a folder to export into\n"
    assert afile.read_text() == "mine"

    (tmp_path / "out" / "backbone.json").mkdir(parents=True)
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "backbone.json is a folder: the export writes a file of that name" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "out") == ["backbone.json"]

    # A file one or two folders up is named, as train.plots and the face tools name it (was "...: cannot make
    # the folder: Not a directory").
    for output in (afile / "sub", afile / "sub" / "deeper"):
        assert export.main(["--checkpoint", ckpt, "--output", str(output), "--no-onnx"]) == 2
        assert capsys.readouterr().err == (f"export: error: --output {output}: cannot make the folder: {afile} "
                                           "is a file\n")
    assert afile.read_text() == "mine"

    # A read-only folder, at --output or above it (was "cannot write in --output <it> (...)", or "...: cannot make
    # the folder: Permission denied").
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    real_access = os.access  # (root, who may run the tests, writes in a folder of mode 555)
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == locked else real_access(path, mode))
    for output in (locked, os.path.join(locked, "new")):
        assert export.main(["--checkpoint", ckpt, "--output", output, "--no-onnx"]) == 2
        assert capsys.readouterr().err == (f"export: error: --output {output}: cannot write in {locked} (read-only, "
                                           "or not yours)\n")
    assert os.listdir(locked) == []


@pytest.mark.parametrize("module, argv, flag", [
    ("train.export", ["--checkpoint", "", "--output", "out"], "--checkpoint"),  # (was "no checkpoint at ")
    ("train.export", ["--checkpoint", "backbone.pt", "--output", ""], "--output"),  # (exported into .)
    ("train.embed", ["--model", "", "--images", "faces", "--output", "e.npy"], "--model"),  # ("no checkpoint at ")
    ("train.embed", ["--model", "backbone.pt", "--images", "faces", "--output", ""], "--output"),
    ("train.verify", ["--model", "backbone.pt", "--data", ""], "--data"),  # ("none of lfw, ... found in --data ")
    ("train.tinyface", ["--model", "backbone.pt", "--data-root", ""], "--data-root"),  # ("--data-root : no such")
    ("train.tools.roc", ["--embeddings", ""], "--embeddings"),  # (a TypeError's traceback)
    ("train.tools.cluster", ["--model", "backbone.pt", "--images", ""], "--images"),  # (a traceback)
    ("train.tools.search", ["--model", "backbone.pt", "--gallery", "faces", "--probes", "faces", "--probe-labels", ""],
     "--probe-labels"),  # (a traceback)
    ("train.tools.clean", ["--model", "backbone.pt", "--data", "faces", "--output", "c", "--embeddings", ""],
     "--embeddings"),  # (taken for none)
    ("train.tools.align", ["--images", "faces", "--detector", "", "--output", "crops"], "--detector"),  # (traceback)
    ("train.tools.make_bin", ["--image-folder", "", "m.bin"], "--image-folder"),  # (a traceback)
    ("train.tools.pack_rec", ["faces", ""], "output_dir"),  # (packed into .)
])
def test_an_empty_path_is_a_one_line_error(module, argv, flag, tmp_path, capsys, monkeypatch):
    # --model "$MODEL" with the variable empty: said so, before anything is read or written (the folder the
    # command runs in holds nothing afterwards).
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"{module.rsplit('.', 1)[1]}: error: {flag} is empty (an empty shell variable?): "
                                    "give a path")
    assert os.listdir(tmp_path) == []


def test_normalized_onnx_below_opset_10_is_refused_up_front(trained, tmp_path, capsys):
    ckpt, _ = trained
    code = code_of(export.main, ["--checkpoint", ckpt, "--output", str(tmp_path / "out"), "--normalized-onnx",
                                 "--opset", "9"])
    err = capsys.readouterr().err
    assert code == 2 and "--normalized-onnx needs --opset 10 or later" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--no-onnx", "--opset", "12"], "--opset goes with the ONNX graph, which --no-onnx does not write"),  # (ignored)
    (["--no-onnx", "--onnx-prelu"], "--onnx-prelu goes with the ONNX graph, which --no-onnx does not write"),
    (["--embedding-size", "-5"], "--embedding-size must be at least 1, got -5"),  # (a traceback from torch)
    (["--image-size", "0"], "--image-size must be at least 1, got 0"),
])
def test_export_option_mistakes_are_usage_errors(trained, tmp_path, capsys, argv, message):
    ckpt, _ = trained
    code = code_of(export.main, ["--checkpoint", ckpt, "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1] == f"export: error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_normalising_graph_has_no_norms_to_give(exported, trained, tmp_path, capsys):
    _, faces = trained
    normalized = str(exported / "backbone_normalized.onnx")
    code = code_of(embed.main, ["--model", normalized, "--images", faces, "--output", str(tmp_path / "e.npy"),
                                "--norms", str(tmp_path / "n.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "gives embeddings of unit length" in err and not os.listdir(tmp_path)
    first, second = sorted(embed.list_images(faces))[:2]
    assert embed.main(["--model", normalized, "--compare", first, second]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "feature norms" not in out
    # The backbone's own graph has them.
    assert embed.main(["--model", str(exported / "backbone.onnx"), "--compare", first, second]) == 0
    assert "feature norms" in capsys.readouterr().out


def test_outputs_never_replace_what_a_run_reads(exported, trained, tmp_path, capsys):
    ckpt, faces = trained
    settings = exported / "backbone.json"
    kept = settings.read_text()
    image = sorted(embed.list_images(faces))[0]
    image_bytes = open(image, "rb").read()
    for model in ("backbone.pt", "backbone.onnx", "backbone_normalized.onnx"):
        code = code_of(embed.main, ["--model", str(exported / model), "--images", faces, "--output",
                                    str(tmp_path / "e.csv"), "--overwrite"] +
                       (["--norms", str(settings)] if model != "backbone_normalized.onnx" else []))
        err = capsys.readouterr().err
        if model == "backbone_normalized.onnx":
            assert code == 0
            continue
        assert code == 2 and f"{settings} is one of the files this run reads" in err, err
    # An image's name among the photos: it would replace one, or be one the next time.
    for target in (image, os.path.join(faces, "new.png")):
        code = code_of(embed.main, ["--model", ckpt, "--images", faces, "--output", str(tmp_path / "f.npy"),
                                    "--norms", target, "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "is an image's name in" in err and "whose images this run reads" in err, err
    assert open(image, "rb").read() == image_bytes and not os.path.exists(os.path.join(faces, "new.png"))

    # verify --output: not the model's settings, nor a set it reads, nor an image a pairs list names.
    first, second = sorted(embed.list_images(faces))[:2]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{first} {second} 0\n{first} {first} 1\n")
    for output in (settings, pairs):
        code = code_of(verify.main, ["--model", str(exported / "backbone.pt"), "--targets", str(pairs),
                                     "--output", str(output), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "one of the files this run reads" in err, err
    shutil.copy(first, tmp_path / "a.png")
    pairs.write_text("a.png a.png 1\n")
    code = code_of(verify.main, ["--model", ckpt, "--targets", str(pairs), "--output", str(tmp_path / "b.jpg")])
    assert code == 2 and "is an image's name in" in capsys.readouterr().err
    # A list found in --data, and the photos it names in another folder.
    lists, photos = tmp_path / "lists", tmp_path / "photos"
    lists.mkdir()
    photos.mkdir()
    shutil.copy(first, photos / "0.png")
    (lists / "mine.txt").write_text("../photos/0.png ../photos/0.png 1\n")
    for output in (lists / "mine.txt", photos / "0.png"):
        code = code_of(verify.main, ["--model", ckpt, "--data", str(lists), "--targets", "mine.txt", "--output",
                                     str(output), "--overwrite"])
        assert code == 2 and "one of the files this run reads" in capsys.readouterr().err
    # backbone_normalized.onnx's settings are backbone.json too.
    code = code_of(verify.main, ["--model", str(exported / "backbone_normalized.onnx"), "--targets", str(pairs),
                                 "--output", str(settings), "--overwrite"])
    assert code == 2 and f"{settings} is one of the files this run reads" in capsys.readouterr().err
    assert settings.read_text() == kept

    # make_bin: not an image its pairs list names (by a .bin link to it; a name not ending in .bin is refused).
    pairs.write_text(f"{first} {second} 0\n" * 10)
    os.symlink(first, tmp_path / "first.bin")
    code = code_of(make_bin.main, [str(tmp_path / "first.bin"), "--pairs-list", str(pairs), "--overwrite"])
    assert code == 2 and "one of the files this run reads" in capsys.readouterr().err
    assert open(image, "rb").read() == image_bytes


def test_verify_shows_no_xnorm_for_a_normalising_graph(exported, trained, tmp_path, capsys):
    ckpt, faces = trained
    images = sorted(embed.list_images(faces))
    pairs = tmp_path / "pairs.txt"  # 10 pairs, one a fold: 5 same, 5 different
    pairs.write_text("".join(f"{images[k]} {images[k]} 1\n{images[k]} {images[-1 - k]} 0\n" for k in range(5)))
    assert verify.main(["--model", str(exported / "backbone_normalized.onnx"), "--targets", str(pairs)]) == 0
    out = capsys.readouterr().out
    assert "pairs: accuracy" in out and "xnorm" not in out
    assert verify.main(["--model", str(exported / "backbone.onnx"), "--targets", str(pairs)]) == 0
    assert "xnorm" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform != "linux", reason="names of any bytes: a Linux file system's")
def test_photos_whose_names_a_table_cannot_hold_are_left_out(trained, tmp_path, capsys):
    ckpt, faces = trained
    folder = tmp_path / "faces"
    shutil.copytree(faces, folder)
    source = sorted(embed.list_images(str(folder)))[0]
    odd = [os.path.join(str(folder), "line\nbreak.png"), os.path.join(str(folder), "carriage\rreturn.png"),
           os.fsdecode(os.path.join(os.fsencode(str(folder)), b"latin-\xe9.png"))]
    for path in odd:
        shutil.copy(source, path)
    for output in ("e.npy", "e.csv"):
        assert embed.main(["--model", ckpt, "--images", str(folder), "--output", str(tmp_path / output),
                           "--workers", "0"]) == 1
        captured = capsys.readouterr()
        assert captured.err.count("its name is not UTF-8 text without line breaks") == 3
        assert "16 images" in captured.out and "3 images left out (the warnings above say why)" in captured.out
    names, vectors = embed.read_table(str(tmp_path / "e.npy"))
    assert len(names) == vectors.shape[0] == 16
    assert embed.read_table(str(tmp_path / "e.csv"))[0] == names


@pytest.mark.parametrize("pipe_size_names", [True, False], ids=["fcntl's names", "python 3.9's fcntl"])
def test_a_held_file_keeps_its_reader_until_released(pipe_size_names, tmp_path, monkeypatch):
    # conftest.HeldFile, by which the signal tests below (and test_align's, test_detect's) signal a tool that
    # provably has not ended: its reader gets the data only on the release, and a rerun finds a plain file.
    # Python 3.9's fcntl has no F_GETPIPE_SZ / F_SETPIPE_SZ: the pipe was left at 64 KiB, and the data cut there.
    import fcntl
    import stat
    import subprocess

    if not pipe_size_names:
        for name in ("F_GETPIPE_SZ", "F_SETPIPE_SZ"):
            monkeypatch.delattr(fcntl, name, raising=False)

    data = bytes(range(256)) * 400  # more than a pipe's default 64 KiB
    path = tmp_path / "photo.png"
    held = HeldFile(path, data)
    reader = subprocess.Popen([sys.executable, "-c", "import sys\nwith open(sys.argv[1], 'rb') as f:\n"
                               "    sys.stdout.buffer.write(f.read())\n", str(path)], stdout=subprocess.PIPE)
    with held:
        held.wait_for_reader(reader)
        assert reader.poll() is None  # it waits for the data, which has not come
    assert reader.communicate(timeout=60)[0] == data and reader.returncode == 0
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["photo.png"]
    held.release()  # again: nothing changes
    unread = HeldFile(tmp_path / "unread.png", data)
    unread.release()  # no reader came: the file is there for the next
    assert (tmp_path / "unread.png").read_bytes() == data
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    with HeldFile(tmp_path / "never.png", b"x") as never:
        with pytest.raises(AssertionError, match=r"the run ended \(exit status 0\) before it read .*never\.png"):
            never.wait_for_reader(gone)


# python -m train.verify whose evaluation, after its first batch, reads the file argv[1] (a test's HeldFile, which
# holds it there until the signal has gone) before it goes on; verify's arguments follow.
VERIFY_HELD_AFTER_A_BATCH = """\
import sys
from train import verify

evaluate, held = verify.evaluate, sys.argv[1]


def evaluate_held(*args, on_batch=None, **kwargs):
    def after_batch(count):
        global held
        if held:
            with open(held, "rb") as f:
                f.read()
            held = None
        if on_batch is not None:
            on_batch(count)
    return evaluate(*args, on_batch=after_batch, **kwargs)


verify.evaluate = evaluate_held
sys.exit(verify.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_ctrl_c_stops_verify_without_a_traceback(trained, tmp_path, tmp_path_factory):
    import subprocess

    ckpt, _ = trained
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    output = tmp_path / "results.json"
    held = HeldFile(tmp_path_factory.mktemp("held") / "go", b"go")
    run = subprocess.Popen([sys.executable, "-c", VERIFY_HELD_AFTER_A_BATCH, held.path, "--model", ckpt, "--data",
                            "synthetic", "--output", str(output), "--batch-size", "8"],
                           cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with held:
        first = run.stdout.readline()  # the model's line, printed as the sets' evaluation starts
        held.wait_for_reader(run)  # a batch in: the evaluation cannot end before the signal
        run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert first.startswith(ckpt) and run.returncode == 130, (first + out, err)
    assert err.endswith("\nverify: stopped by SIGINT: nothing written\n") and "Traceback" not in err, err
    assert not output.exists() and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_embed_and_its_workers_without_a_traceback(trained, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group: the decoding workers leave it to the
    main process, which stops (130) with one line; none prints a traceback."""
    import subprocess

    ckpt, faces = trained
    many = tmp_path / "many"
    source = sorted(embed.list_images(faces))
    for k in range(3000):
        os.makedirs(many / f"id{k // 100}", exist_ok=True)
        if k != 20:
            os.link(source[k % len(source)], many / f"id{k // 100}" / f"{k}.png")
    # Image 20 is held back until the signal has gone: the signal goes once a worker opens it (the
    # workers are up, the embedding under way), and the run cannot end before it.
    with open(source[20 % len(source)], "rb") as f:
        held = HeldFile(many / "id0" / "20.png", f.read())
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    output = tmp_path / "e.npy"
    run = subprocess.Popen([sys.executable, "-m", "train.embed", "--model", ckpt, "--images", str(many), "--output",
                            str(output), "--workers", "2", "--batch-size", "1"],
                           cwd=repo, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        with held:
            held.wait_for_reader(run)
            os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 130 and "Traceback" not in err and "Stopped" not in err, err
        assert err.rstrip().endswith("\nembed: stopped by SIGINT: nothing written") and not output.exists(), err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)


# Every command whose imports take seconds, with what its lines begin with (its stops and errors say its name).
_IMPORTING = {**{name: f"{name}: " for name in ("export", "embed", "verify", "ijb", "tinyface", "plots")},
              **{f"tools.{name}": f"{name}: " for name in ("align", "clean", "cluster", "detect", "make_bin",
                                                          "pack_rec", "preview", "quality", "roc", "search")}}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("tool", list(_IMPORTING))
@pytest.mark.slow
def test_a_signal_while_the_tool_imports_torch_is_one_line(tmp_path, tool, signum):
    # `python -m train.<tool>` spends seconds importing torch: Ctrl-C there printed a KeyboardInterrupt
    # traceback, and SIGTERM ended the process silently, killed by the signal. (The tools of train.tools
    # import their package first: it imported torch too, before the tool could take the signals.)
    argv = {"export": ["--checkpoint", "runs/small/checkpoint.pt", "--output", str(tmp_path / "export")],
            "embed": ["--model", "backbone.pt", "--images", "faces", "--output", str(tmp_path / "e.npy")],
            "verify": ["--model", "backbone.pt", "--targets", "synthetic", "--output", str(tmp_path / "v.json")],
            "plots": [str(tmp_path)]  # (read before its imports: a folder)
            }.get(tool, ["--output", str(tmp_path / "out")])  # (the others' arguments are read after them)
    done = signalled_while_importing_torch(f"train.{tool}", argv, signum)
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    assert done.stderr == f"{_IMPORTING[tool]}stopped by {signal.Signals(signum).name}: nothing written\n"
    assert os.listdir(tmp_path) == []


def test_a_signal_while_a_tool_imports_torch_with_its_reader_gone_exits_as_a_stop(tmp_path):
    # python -m train.tools.roc ... 2>&1 | head, and Ctrl-C, which ends head too, in the seconds of the import: the
    # stop's line raised a BrokenPipeError in the handler, and the exit status was 120, not 130.
    done = signalled_while_importing_torch("train.tools.roc", ["--output", str(tmp_path / "out")], signal.SIGINT,
                                           reader_gone=True)
    assert done.returncode == 128 + signal.SIGINT and os.listdir(tmp_path) == []
