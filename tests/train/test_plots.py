"""The run's figures (``train.plots``), drawn from the logs a run leaves."""

import os

import numpy as np
import pytest
from PIL import Image

from train.plots import plot_loss


def test_the_loss_plot_of_a_single_logged_step_shows_it(tmp_path):
    pytest.importorskip("matplotlib")
    plot_loss([{"step": 10, "loss": 39.2, "lr": 0.07}], str(tmp_path / "loss.png"))
    pixels = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    middle = pixels[h // 4:3 * h // 4, w // 4:3 * w // 4]  # where a lone point lands, away from the axis label
    blue = (np.abs(middle - (31, 119, 180)).sum(axis=2) < 30).sum()  # matplotlib's tab:blue, the loss's colour
    assert blue > 20, "the loss's only point is not drawn"



def green_pixels(path) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - (44, 160, 44)).sum(axis=2) < 30).sum())  # matplotlib's tab:green


def test_the_loss_plot_of_a_run_with_a_teacher_shows_its_distillation_term(tmp_path):
    # metrics.jsonl's "distill" (--teacher) was logged but not drawn; a run without one keeps its one panel.
    pytest.importorskip("matplotlib")
    records = [{"step": 10 * k, "loss": 40.0 - k, "lr": 0.1, "distill": 0.5 / k} for k in range(1, 6)]
    plot_loss(records, str(tmp_path / "distilled.png"))
    plot_loss([{key: r[key] for key in ("step", "loss", "lr")} for r in records], str(tmp_path / "plain.png"))
    assert green_pixels(tmp_path / "distilled.png") > 100 and green_pixels(tmp_path / "plain.png") == 0
    distilled, plain = (Image.open(tmp_path / name).size for name in ("distilled.png", "plain.png"))
    assert distilled[1] > plain[1]  # a panel below

@pytest.fixture
def run_without_plots(tmp_path):
    """A short run with verification, trained with --no-plots (the fixtures' default)."""
    import arcface_ext

    from trainer_fixtures import base_argv, make_face_folder, make_pairs_list, train_one_thread

    data, pairs = make_face_folder(str(tmp_path / "train")), make_pairs_list(str(tmp_path / "pairs"))
    run = tmp_path / "run"
    impl = "fused" if arcface_ext.extension_available() else "reference"
    # (One thread: two OpenMP threads of a tiny network only spin when the cores are shared.)
    assert train_one_thread(base_argv(data, str(run), pairs, loss_impl=impl, max_steps=4, eval_every=2)) == 0
    assert not {"loss.png", "verification.png", "target_angle.png"} & set(os.listdir(run))
    return run


def test_the_command_draws_a_runs_figures_from_its_folder(run_without_plots, capsys):
    pytest.importorskip("matplotlib")
    from train.plots import main

    assert main([str(run_without_plots)]) == 0
    names = ("loss.png", "verification.png", "target_angle.png")
    assert capsys.readouterr().out.split() == [str(run_without_plots / name) for name in names]
    for name in names:
        assert Image.open(run_without_plots / name).format == "PNG"
    assert not [n for n in os.listdir(run_without_plots) if n.endswith(".tmp")]


def test_the_command_keeps_figures_in_another_folder_unless_overwrite(run_without_plots, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from train.plots import main

    elsewhere = tmp_path / "figures"
    elsewhere.mkdir()
    (elsewhere / "loss.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as stop:
        main([str(run_without_plots), "--output", str(elsewhere)])
    assert stop.value.code == 2 and "holds loss.png: kept (--overwrite replaces them)" in capsys.readouterr().err
    assert (elsewhere / "loss.png").read_bytes() == b"mine"
    assert main([str(run_without_plots), "--output", str(elsewhere), "--overwrite"]) == 0
    assert Image.open(elsewhere / "loss.png").format == "PNG"
    assert not {"loss.png", "verification.png", "target_angle.png"} & set(os.listdir(run_without_plots))


def test_the_command_refuses_a_folder_it_cannot_write_in_before_drawing(run_without_plots, tmp_path, capsys,
                                                                        monkeypatch):
    # (was "error: [Errno 13] Permission denied: '<folder>/.loss.png.<...>.tmp'", or Errno 20 under a file)
    pytest.importorskip("matplotlib")
    from train.plots import main

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        main([str(run_without_plots), "--output", str(tmp_path / "afile" / "figures")])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"plots: error: --output {tmp_path / 'afile' / 'figures'}: cannot make the folder: "
        f"{tmp_path / 'afile'} is a file")
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    real_access = os.access  # (root, who runs the tests here, writes in a folder of mode 555)
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == locked else real_access(path, mode))
    for argv, named in (([locked], locked), ([str(run_without_plots), "--output", f"{locked}/new"],
                                             f"--output {locked}/new")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
            f"plots: error: {named}: cannot write in {locked} (read-only, or not yours)")
    assert os.listdir(locked) == []


def test_a_drawing_that_fails_takes_back_the_folders_it_made(run_without_plots, tmp_path, capsys, monkeypatch):
    # The first figure's write makes a new --output n1/n2 (checkpoint.write_atomic); a failure in it (a full disk)
    # left n1/n2 empty, as 5032f90 took back the other tools' folders. A folder that was there stays.
    pytest.importorskip("matplotlib")
    import train.plots
    from train.checkpoint import write_atomic

    def full_disk(f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.plots, "_save", lambda fig, path, extension="png": write_atomic(path, full_disk))
    (tmp_path / "there").mkdir()
    for output in ("n1/n2", "there/n2"):
        assert train.plots.main([str(run_without_plots), "--output", str(tmp_path / output)]) == 2
        assert capsys.readouterr().err == "plots: error: [Errno 28] No space left on device\n"
    assert sorted(os.listdir(tmp_path)) == ["pairs", "run", "there", "train"] and os.listdir(tmp_path / "there") == []


def test_the_command_names_a_folder_with_nothing_to_draw(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from train.plots import main

    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "target_angle.png not drawn: " in err and "not a readable checkpoint" in err
    assert f"plots: error: {tmp_path}: nothing to draw" in err
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "missing")])
    assert stop.value.code == 2 and "not a folder (a run's --output)" in capsys.readouterr().err


def test_the_command_names_logs_it_cannot_draw(tmp_path, capsys):
    # A record without a figure's keys (another program's jsonl) was a KeyError traceback; a log whose
    # only line is cut short drew nothing without a word.
    pytest.importorskip("matplotlib")
    from train.plots import main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"plots: error: {tmp_path / 'metrics.jsonl'}: record 1 has no 'lr' (not a " \
        "log of this trainer?)\n"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    (tmp_path / "verification.jsonl").write_text('{"step": 1, "targ')
    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"note: the last line of {tmp_path / 'verification.jsonl'} is not JSON (a write cut short): left out" in err
    assert os.path.exists(tmp_path / "loss.png") and not os.path.exists(tmp_path / "verification.png")


def test_a_log_line_that_is_not_utf8_is_named_as_a_broken_line(tmp_path, capsys):
    # Bytes that are not UTF-8 (a damaged disk block, another program's file) were the codec's words alone,
    # naming neither the log nor its line, from the plots and from a resume alike (both read it with
    # read_jsonl); at the end of the log they are a write cut short, left out as a torn JSON line is.
    pytest.importorskip("matplotlib")
    from train.plots import main

    good = b'{"step": 1, "loss": 2.0, "lr": 0.1}\n'
    (tmp_path / "metrics.jsonl").write_bytes(good + b'{"step": 2, "lo\xff\xfe\n' + good)
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"plots: error: {tmp_path / 'metrics.jsonl'}: line 2 is not JSON (not UTF-8 "
                                       "text: invalid start byte); delete or repair that line\n")
    # (a line that is not JSON likewise: it was read_jsonl's SystemExit, exit status 1 without "error:")
    (tmp_path / "metrics.jsonl").write_bytes(good + b'{"step": 2, "lo\n' + good)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"plots: error: {tmp_path / 'metrics.jsonl'}: line 2 is not JSON (")
    # (json's reason alone, before its position, was 'Invalid control character at': the line's end read as part of
    # the string it cut short)
    assert err == (f"plots: error: {tmp_path / 'metrics.jsonl'}: line 2 is not JSON (Unterminated string starting at "
                   "column 13); delete or repair that line\n")
    (tmp_path / "metrics.jsonl").write_bytes(good + b'\x00\xff\x17')
    assert main([str(tmp_path)]) == 0
    assert f"note: the last line of {tmp_path / 'metrics.jsonl'} is not JSON (a write cut short): left out" in \
        capsys.readouterr().err
    assert os.path.exists(tmp_path / "loss.png")
