"""The command-line entry points as a new user meets them: every option of every command's ``--help``
says what it does, and its default once."""

import argparse
import glob
import importlib
import os
import subprocess
import sys

import pytest
from PIL import Image

from train.config import build_parser
from trainer_fixtures import REPO

# Every command but python -m train (whose parser is build_parser's).
ENTRY_POINTS = ["train.verify", "train.embed", "train.export", "train.ijb", "train.tinyface", "train.plots",
                "train.tools.align", "train.tools.clean", "train.tools.cluster", "train.tools.detect",
                "train.tools.make_bin", "train.tools.mfr_check", "train.tools.pack_rec", "train.tools.preview",
                "train.tools.quality", "train.tools.roc", "train.tools.search"]


def test_the_commands_are_all_here():
    # A command added later is checked as these are (roc, search and quality were left out of the --help test).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = set()
    for path in glob.glob(os.path.join(root, "train", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__":' in f.read():
                found.add(os.path.relpath(path, root)[:-len(".py")].replace(os.sep, "."))
    assert found == set(ENTRY_POINTS)


class _Parsing(Exception):
    pass


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command's ``main`` builds, caught as it starts parsing."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsing

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parsing):
        importlib.import_module(module).main([])
    return seen[0]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("module", ["train"] + ENTRY_POINTS)
def test_every_option_has_a_help_text(module, monkeypatch):
    # python -m train's --network, --embedding-size, --channels-last, --optimizer, --max-steps and --seed,
    # train.verify's and train.embed's --device and --batch-size, train.export's --embedding-size and
    # --image-size, train.ijb's --target and --device, align's --format had none.
    parser = build_parser() if module == "train" else parser_of(module, monkeypatch)
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in options(parser)
               if not (a.help or "").strip()]
    assert not missing, f"python -m {module} --help says nothing of {missing}"


# The commands that decode images in --workers processes (train.ijb's and train.tinyface's default is set after
# parsing, by check_benchmark_options), with the most their default starts.
WORKERS = {"train.embed": 8, "train.ijb": 8, "train.tinyface": 8, "train.tools.align": 8, "train.tools.clean": 8,
           "train.tools.cluster": 8, "train.tools.detect": 4, "train.tools.pack_rec": 8, "train.tools.quality": 8,
           "train.tools.roc": 8, "train.tools.search": 8}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_the_default_workers_are_one_a_cpu_this_process_may_use(module, monkeypatch):
    # min(8, os.cpu_count()) counted the host's cores: 8 processes for a job bound to 3 of a host's 64 CPUs
    # (taskset, Slurm's binding), or held to 3 CPUs' quota (docker --cpus 3), which os.cpu_count() does not see.
    from train.embed import check_benchmark_options
    from train.tools import usable_cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    assert usable_cpus() <= 3  # (this machine's cgroup quota may make it fewer)
    parser = parser_of(module, monkeypatch)
    workers = [action for action in parser._actions if "--workers" in action.option_strings]
    assert bool(workers) == (module in WORKERS), module
    if workers:
        default = workers[0].default
        if module in ("train.ijb", "train.tinyface"):
            args = argparse.Namespace(**{action.dest: action.default for action in parser._actions})
            args.model = "model.pt"
            assert default is None and check_benchmark_options(parser, args, [], "") is None
            default = args.workers
        assert default == min(WORKERS[module], usable_cpus()), (module, default)
        assert "default: one a core this process may use, up to" in workers[0].help


def test_the_trainers_help_gives_each_default_once():
    # argparse's "(default: None)" followed options whose help said their default already ("default
    # lfw,cfp_fp,agedb_30 ... (default: None)"), and came twice after --wandb-entity's.
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    formatter = parser._get_formatter()
    for action in options(parser):
        said = formatter._get_help_string(action) or ""
        assert said.count("(default:") <= 1 and not ("(default: " in said and "; default " in said), said
    assert "(default: small)" in text and "(default: 512)" in text and "(default: 300)" in text


@pytest.mark.parametrize("module", ["train"] + ENTRY_POINTS)
def test_an_argument_error_is_a_line_that_begins_with_the_commands_name(module, capsys):
    # As the commands' own checks begin theirs ("roc: error: --images nope is not a folder"): argparse's
    # were "python -m train.tools.clean: error: ...", and train.embed's, train.verify's and train.export's
    # own "error: ...", naming no command in a pipeline of several (python -m train's "python -m train:
    # error: ..."). The usage line keeps the command to copy.
    name = module.rsplit(".", 1)[-1]
    with pytest.raises(SystemExit) as stop:
        importlib.import_module("train.trainer" if module == "train" else module).main(["--no-such-option"])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and err[-1].startswith(f"{name}: error: "), err
    assert err[0].startswith(f"usage: python -m {module} "), err
    assert all(line.startswith(" ") for line in err[1:-1]), err  # (the usage, wrapped, then the one error line)


def run_with_its_reader_gone(module: str, argv: list[str], cwd: str = REPO) -> int:
    """The exit status of ``python -m <module> argv`` whose stdout and stderr are a pipe closed before it starts
    (``2>&1 | head -0``), stdout block-buffered as a user has it."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    read, write = os.pipe()
    os.close(read)  # (the reader gone before the first line)
    try:
        return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, stdout=write, stderr=write,
                              timeout=120).returncode
    finally:
        os.close(write)


@pytest.mark.parametrize("module", ["train", "train.tools.roc"])
@pytest.mark.slow
def test_an_argument_error_whose_reader_went_away_exits_2(module):
    # python -m train --no-such-option 2>&1 | head -0: argparse's lines failed (it lets an OSError pass), the
    # bytes stayed in stderr's buffer, and its last flush at exit made the exit status 120, not argparse's 2.
    assert run_with_its_reader_gone(module, ["--no-such-option"]) == 2


@pytest.mark.slow
def test_an_arcface_torch_configs_notes_whose_reader_went_away_do_not_stop_the_run(tmp_path):
    # Its notes are said as the options are read, before the trainer's own lines: a note's BrokenPipeError
    # made an argument error exit 1, not 2 (and a run stop there, exit 1).
    (tmp_path / "faces.py").write_text("config.rec = 'synthetic'\nconfig.num_classes = 8\nconfig.num_image = 64\n"
                                       "config.num_epoch = 1\nconfig.dali = True\n")
    assert run_with_its_reader_gone("train", ["--config", "faces.py", "--no-such-option"], cwd=str(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["faces.py"]
    # And a run given the config trains to its end (its two steps), its checkpoint written.
    tiny = ["--synthetic-identities", "8", "--synthetic-images-per-identity", "8", "--network", "small",
            "--image-size", "16", "--batch-size", "32", "--eval-every", "0", "--val-targets", "none", "--no-plots",
            "--no-tensorboard", "--output", "run"]
    assert run_with_its_reader_gone("train", ["--config", "faces.py", *tiny], cwd=str(tmp_path)) == 0
    log = (tmp_path / "run" / "training.log").read_text()
    assert "ignored arcface_torch settings: dali" in log
    assert log.splitlines()[-1].split(" ", 2)[2].startswith("done: 2 steps in ")  # (after the line's date and time)
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("module, argv, status", [
    ("train.tools.align", ["--images", "nope", "--landmarks", "nope.txt", "--output", "out"], 2),
    ("train.tools.detect", ["--images", "nope", "--detector", "nope.onnx", "--output", "out.txt"], 2),
    ("train.tools.clean", ["--model", "nope.pt", "--data", "nope", "--output", "out"], 2),
    ("train.plots", ["."], 1)])  # (an empty folder: nothing to draw)
@pytest.mark.slow
def test_a_refusal_whose_reader_went_away_exits_as_it_would(tmp_path, module, argv, status):
    # The tools that say their own lines (not through run_tool): each raised a BrokenPipeError in its first
    # line, exit status 120 (align, given photos, aligned none of them).
    assert run_with_its_reader_gone(module, argv, cwd=str(tmp_path)) == status
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_align_whose_reader_went_away_aligns_on(tmp_path):
    # Its first line ("align: 1 face(s) of ...") raised a BrokenPipeError: no crop, exit status 120.
    os.mkdir(tmp_path / "photos")
    Image.new("RGB", (250, 250), (120, 90, 60)).save(tmp_path / "photos" / "a.jpg")
    (tmp_path / "faces.txt").write_text("a.jpg 100 110 150 110 125 135 105 160 145 160\n")
    assert run_with_its_reader_gone("train.tools.align", ["--images", "photos", "--landmarks", "faces.txt", "--output",
                                                          "out", "--workers", "0"], cwd=str(tmp_path)) == 0
    assert os.listdir(tmp_path / "out") == ["a.jpg"]


def test_the_trainers_own_refusals_begin_with_its_name(tmp_path, capsys):
    # Of its options and of what its set-up finds (the data here): the message alone ("--data '...': no such
    # folder ..."), where argparse's line and every other command's began with the command's name. Python
    # prints the SystemExit's message, exit status 1.
    from train.trainer import main

    for argv, said in ((["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
                       (["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run")],
                        f"--data '{tmp_path / 'nope'}': no such folder")):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert isinstance(refused.value.code, str) and refused.value.code.startswith(f"train: error: {said}"), \
            refused.value.code
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, dest", [("--teacher", "teacher"), ("--pretrained_model", "pretrained_model"),
                                        ("--pretrained-model", "pretrained_model"), ("--resume", "resume")])
def test_an_empty_path_on_the_command_line_is_refused_a_config_files_is_none(tmp_path, flag, dest):
    # --teacher "$TEACHER" with the variable empty was a run without a teacher, without a word (and --resume
    # "$RUN" a fresh run, --pretrained_model "$INIT" one from random weights); a config's "" stays none.
    from train.config import parse_args

    named = "--pretrained_model" if dest == "pretrained_model" else flag
    for argv in ([flag, ""], [f"{flag}="]):
        with pytest.raises(SystemExit, match=rf"^{named} is empty on the command line \(an empty shell variable\?\): "
                                             rf"give .*; a run .* leaves {named} out \(and out of its --config\)$"):
            parse_args(argv)
    config = tmp_path / "run.json"
    config.write_text(f'{{"{dest}": ""}}')
    assert not getattr(parse_args(["--config", str(config)]), dest)


@pytest.mark.parametrize("flag", ["--config", "--output", "--models_base_dir"])
def test_an_empty_config_or_output_on_the_command_line_is_refused(tmp_path, flag):
    # --config "$CFG" with the variable empty was a run of every default, without a word; --output "$OUT" was
    # refused as "--output  exists and is not a folder", of a folder that does not exist. A config's "" output is
    # none, as its other paths' "": the default folder.
    from train.config import parse_args

    named = "--output" if flag == "--models_base_dir" else flag
    tail = "" if flag == "--config" else r" \(and out of its --config\)"
    for argv in ([flag, ""], [f"{flag}="]):
        with pytest.raises(SystemExit, match=rf"^{named} is empty on the command line \(an empty shell variable\?\): "
                                             rf"give .*; a run .* leaves {named} out{tail}$"):
            parse_args(argv)
    config = tmp_path / "run.json"
    config.write_text('{"output": "", "network": "r18"}')
    assert parse_args(["--config", str(config)]).output == os.path.join("runs", "r18")


@pytest.mark.parametrize("flag", ["--data", "--data-set", "--data_set"])
def test_an_empty_data_on_the_command_line_is_refused(tmp_path, flag, monkeypatch):
    # --data "$DATA" with the variable empty named the current folder: run where a pack lies (pack_rec's output
    # given as .), it trained on that pack without a word, and preview drew it as the tiles of "" (a blank name).
    from train.config import parse_args
    from train.tools import preview

    monkeypatch.chdir(tmp_path)
    for argv in ([flag, ""], [f"{flag}="]):
        with pytest.raises(SystemExit, match=r"^--data is empty on the command line \(an empty shell variable\?\): "
                                             r"give the training set .*; a run on synthetic faces leaves --data out "
                                             r"\(and out of its --config\)$"):
            parse_args(argv)
    with pytest.raises(SystemExit, match=r"^preview: error: --data is empty on the command line "):
        preview.main(["--output", "tiles.png", flag, ""])
    assert os.listdir(tmp_path) == []
