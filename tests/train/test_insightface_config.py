"""insightface arcface_torch config files (configs/*.py) given to --config: read without running
them, base.py's defaults under them, and their epochs, margins and switches turned into this
trainer's options."""
import math
import os
import re

import pytest

from train import insightface_config
from train.config import parse_args
from train.trainer import LearningRateSchedule, wandb_run_name
from train.trainer import main

from trainer_fixtures import make_face_folder, one_thread, read_jsonl  # noqa: F401

# The shape of arcface_torch's configs (values of this test's own choosing).
WEBFACE_VIT = '''from easydict import EasyDict as edict

# a comment, as theirs have
config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_t_dp005_mask0"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 384
config.optimizer = "adamw"
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
'''


def write(tmp_path, text, name="wf42m_vit_t.py"):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


def test_a_webface_vit_config_becomes_these_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = parse_args(["--config", write(tmp_path, WEBFACE_VIT)])
    steps_per_epoch = 42474557 // (384 * 8)
    assert (args.max_steps, args.warmup_steps) == (steps_per_epoch * 40, steps_per_epoch * 4)
    assert (args.loss, args.m1, args.m2, args.m3, args.arcface_s) == ("combined", 1.0, 0.0, 0.4, 64.0)
    assert args.network == "vit_t_dp005_mask0" and args.image_size == 112 and args.embedding_size == 512
    assert (args.optimizer, args.lr, args.decay, args.lr_schedule) == ("adamw", 0.001, 0.1, "poly")
    assert (args.amp, args.loss_amp, args.sample_rate, args.sharded_classes) == ("fp16", "none", 0.3, True)
    assert args.num_classes == 2059906 and args.data == "/train_tmp/WebFace42M" and args.val_targets == []
    assert (args.eval_every, args.save_every, args.log_every) == (2000, 2000, 10)  # base.py's frequent
    assert (args.seed, args.num_workers, args.grad_clip) == (2048, 2, 5.0)  # base.py, train_v2.py
    assert args.output == os.path.join("work_dirs", "wf42m_vit_t")
    assert capsys.readouterr().err == ""
    # One process: the centres stay replicated (its partial FC splits them across GPUs only).
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_args(["--config", write(tmp_path, WEBFACE_VIT)]).sharded_classes is False


@pytest.mark.parametrize("margins, grad, note", [
    ((1.0, 0.0, 0.4), "exact", False),  # CosFace: the same gradient either way
    ((1.0, 0.5, 0.0), "straight_through", False),  # ArcFace: its loss adds the angle under no_grad
    ((1.0, 0.3, 0.2), "exact", True),  # its loss would drop m2: said, and both applied here
])
def test_margins_train_as_arcface_torchs_loss_does(tmp_path, capsys, margins, grad, note):
    args = parse_args(["--config", write(tmp_path, WEBFACE_VIT.replace("(1.0, 0.0, 0.4)", str(margins)))])
    assert (args.m1, args.m2, args.m3, args.margin_grad) == (*margins, grad)
    err = capsys.readouterr().err
    assert ("applies only m3 when m3 > 0 (m2 is dropped)" in err) == note, err


def test_gradient_accumulation_counts_optimiser_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    text = WEBFACE_VIT + ("config.gradient_acc = 4\nconfig.frequent = 50\nconfig.using_wandb = True\n"
                          "config.momentum = 0.8\nconfig.save_all_states = True\n")
    args = parse_args(["--config", write(tmp_path, text), "--lr", "0.002"])  # the command line wins
    passes_per_epoch = 42474557 // (384 * 2)
    assert args.gradient_acc == 4 and args.max_steps == passes_per_epoch * 40 // 4
    assert (args.eval_every, args.log_every, args.lr) == (500, 12, 0.002)
    err = capsys.readouterr().err
    # What happens instead is said: a bare "ignored" read as if no full checkpoint were written.
    assert ("ignored arcface_torch settings: save_all_states (checkpoint.pt holds every state anyway, for --resume), "
            "momentum") in err and args.wandb is True
    assert (args.wandb_project, args.wandb_entity, args.wandb_run_name) == ("arcface-ext", None, None)


def test_batch_and_accumulation_of_the_command_line_keep_the_epochs(tmp_path, monkeypatch, capsys):
    # --gradient-acc 2 on half the GPUs (as the README advises) or another --batch-size stands for the
    # config's batch_size / gradient_acc: the steps follow, as for an edited file. Taken as overrides
    # of the steps counted for the file's values, the run was 40 or 10 epochs where the config says 20.
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = write(tmp_path, WEBFACE_VIT.replace("num_epoch = 40", "num_epoch = 20"))

    def epochs(args):
        return args.max_steps * args.batch_size * args.gradient_acc * 4 / 42474557

    assert math.isclose(epochs(parse_args(["--config", path])), 20, abs_tol=0.01)
    for flags in (["--gradient-acc", "2"], ["--batch_size=64"], ["--batch-size", "96", "--gradient_acc", "3"],
                  ["--batch-s", "64"], ["--gradient-a", "2"]):  # (abbreviations, which the parser takes)
        args = parse_args(["--config", path, *flags])
        assert math.isclose(epochs(args), 20, abs_tol=0.01), flags
        assert args.warmup_steps == args.max_steps // 10 and args.eval_every == 2000 // args.gradient_acc, flags
    # --max-steps given stays as given.
    assert parse_args(["--config", path, "--batch-size", "64", "--max-steps", "7"]).max_steps == 7
    # Fewer images than a batch: one step, said so (was without a word).
    small = write(tmp_path, WEBFACE_VIT.replace("42474557", "1000"), "small.py")
    assert parse_args(["--config", small]).max_steps == 1
    assert ("config.num_image 1000 in batches of 384 x 4 process(es) for 40 epoch(s) is no step, as train_v2.py "
            "counts them: one here") in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"config.batch_size = 0: at least 1 expected$"):  # was a ZeroDivisionError
        parse_args(["--config", write(tmp_path, WEBFACE_VIT + "config.batch_size = 0\n", "zero.py")])


def test_wandb_settings(tmp_path, capsys):
    text = WEBFACE_VIT + ("config.using_wandb = True\nconfig.wandb_project = 'faces'\nconfig.wandb_entity = 'lab'\n"
                          "config.suffix_run_name = 'try2'\nconfig.wandb_key = 'secret'\nconfig.wandb_log_all = True\n"
                          "config.notes = 'n'\nconfig.wandb_resume = False\nconfig.output = 'out/vit'\n")
    args = parse_args(["--config", write(tmp_path, text)])
    assert (args.wandb, args.wandb_project, args.wandb_entity) == (True, "faces", "lab")
    # Named after the --output in force: the config's, or the command line's.
    assert wandb_run_name(args, args.output) == "vit_try2"
    other = parse_args(["--config", write(tmp_path, text), "--output", str(tmp_path / "elsewhere")])
    assert wandb_run_name(other, other.output) == "elsewhere_try2"
    err = capsys.readouterr().err
    assert "config.wandb_key is not read: log in once with `wandb login`, or set WANDB_API_KEY" in err
    assert "ignored" not in err and "does not have" not in err
    assert "secret" not in str(vars(args))
    # Off unless asked for, whatever else the file says about W&B.
    args = parse_args(["--config", write(tmp_path, WEBFACE_VIT + "config.wandb_project = 'faces'\n")])
    assert args.wandb is False


def test_save_artifacts_is_wandb_artifacts(tmp_path, capsys):
    # train_v2.py logs model.pt as a W&B model artifact each epoch and at the end (was: ignored, "no W&B model
    # artifacts"); without using_wandb it has no W&B run to log to, and logs none.
    text = WEBFACE_VIT + "config.using_wandb = True\nconfig.save_artifacts = True\n"
    args = parse_args(["--config", write(tmp_path, text)])
    assert (args.wandb, args.wandb_artifacts) == (True, True)
    assert "ignored" not in capsys.readouterr().err
    args = parse_args(["--config", write(tmp_path, WEBFACE_VIT + "config.save_artifacts = True\n")])
    assert (args.wandb, args.wandb_artifacts) == (False, False)
    assert ("ignored arcface_torch settings: save_artifacts (without using_wandb, as in train_v2.py: no W&B run to "
            "log to)") in capsys.readouterr().err
    assert parse_args(["--config", write(tmp_path, WEBFACE_VIT + "config.using_wandb = True\n")]).wandb_artifacts \
        is False


def test_keys_arcface_torch_lacks_are_reported(tmp_path, capsys):
    # An older arcface_torch's config.loss or config.decay_epoch would otherwise pass unnoticed.
    text = WEBFACE_VIT + "config.decay_epoch = [8, 14]\nconfig.loss = 'cosface'\nconfig.wandb_project = 'p'\n"
    args = parse_args(["--config", write(tmp_path, text)])
    assert args.sample_rate == 0.3
    # (config.decay_epoch, reported here before, is older arcface_torch's step schedule: read, test below)
    assert capsys.readouterr().err.strip().endswith("keys arcface_torch's train_v2.py does not have, ignored: loss")
    # An older arcface_torch's config.loss = 'cosface' (configs/3millions.py still has one) without a
    # margin_list: train_v2.py trains base.py's ArcFace, and so does this; said, with the line for CosFace.
    text = ("config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
            "config.loss = 'cosface'\n")
    args = parse_args(["--config", write(tmp_path, text, "old.py")])
    assert (args.m2, args.m3) == (0.5, 0.0)
    assert ("config.loss = 'cosface' is older arcface_torch's (train.py); train_v2.py reads margin_list alone, "
            "(1.0, 0.5, 0.0) here: for the loss it names, set config.margin_list = (1.0, 0.0, 0.4)"
            in capsys.readouterr().err)
    # A misspelt key is an error: with a note only, the run went on at the default it meant to change.
    for line, message in (("config.smaple_rate = 0.2", "config.smaple_rate is no key of arcface_torch's train_v2.py: "
                                                       "config.sample_rate misspelt? (its value would be dropped, and "
                                                       "sample_rate left at 0.3)"),
                          ("config.num_images = 10", "config.num_images is no key of arcface_torch's train_v2.py: "
                                                     "config.num_image misspelt?")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            parse_args(["--config", write(tmp_path, WEBFACE_VIT + line + "\n")])


def test_a_config_named_as_train_v2_py_takes_it(tmp_path, monkeypatch, capsys):
    # train_v2.py takes `configs/ms1mv2_r50` (no .py) as its argument: --config takes that name, and
    # the config given as an argument is named in the error (was a bare "unrecognized arguments").
    monkeypatch.chdir(tmp_path)
    write(tmp_path, WEBFACE_VIT)
    assert parse_args(["--config", "wf42m_vit_t"]).network == "vit_t_dp005_mask0"
    for argument in ("wf42m_vit_t.py", "wf42m_vit_t"):
        with pytest.raises(SystemExit):
            parse_args([argument])
        assert capsys.readouterr().err.strip().endswith(
            f"unrecognized arguments: {argument} (a config file goes after --config: --config {argument}; "
            "arcface_torch's train_v2.py takes it as its argument)")
    # Another file given as an argument (a .rec without --data) is not called a config.
    (tmp_path / "faces.rec").write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(["faces.rec"])
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: faces.rec")


def test_base_defaults_fill_what_a_config_leaves_out(tmp_path):
    config = insightface_config.read(write(tmp_path, "config.rec = 'x'\nconfig.num_classes = 3\n"
                                                     "config.num_image = 10\nconfig.num_epoch = 1\n"))
    assert config["margin_list"] == (1.0, 0.5, 0.0) and config["network"] == "r50" and config["lr"] == 0.1
    assert config["rec"] == "x" and config["gradient_acc"] == 1


def test_a_config_importing_another_takes_its_settings(tmp_path, monkeypatch):
    # `from configs.wf42m_vit_t import config` binds the other file's config, edits and all: read
    # without it, the run took base.py's fp16, decay and margins instead.
    monkeypatch.setenv("WORLD_SIZE", "1")
    write(tmp_path, WEBFACE_VIT)
    path = write(tmp_path, "from configs.wf42m_vit_t import config\n\nconfig.lr = 0.002\n", "edited.py")
    args = parse_args(["--config", path])
    assert (args.lr, args.decay, args.amp, args.m3, args.sample_rate, args.optimizer) == (
        0.002, 0.1, "fp16", 0.4, 0.3, "adamw")
    # `config = edict()` after the import starts over, as it does in Python.
    path = write(tmp_path, "from .wf42m_vit_t import config\nconfig = edict()\nconfig.rec = 'x'\n"
                           "config.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n", "fresh.py")
    assert insightface_config.read(path)["sample_rate"] == 1.0
    with pytest.raises(SystemExit, match=r"missing.py:1: `from configs.ms1mv2_r50 import config` .* read from "
                                         r"ms1mv2_r50.py beside this file, and there is none$"):
        parse_args(["--config", write(tmp_path, "from configs.ms1mv2_r50 import config\n", "missing.py")])


def test_the_base_py_beside_a_config_gives_its_defaults(tmp_path, capsys):
    # get_config merges the checkout's own configs/base.py, edits included.
    write(tmp_path, "config = edict()\nconfig.margin_list = (1.0, 0.0, 0.35)\nconfig.seed = 7\n", "base.py")
    config = insightface_config.read(write(tmp_path, "config.rec = 'x'\nconfig.num_classes = 3\n"
                                                     "config.num_image = 10\nconfig.num_epoch = 1\n"))
    assert (config["margin_list"], config["seed"], config["lr"]) == ((1.0, 0.0, 0.35), 7, 0.1)
    # Its W&B placeholders are no names: the defaults stand (a run under entity "entity" fails to start).
    write(tmp_path, "config.wandb_key = 'XXXXXXXX'\nconfig.wandb_entity = 'entity'\nconfig.wandb_project = 'project'\n",
          "base.py")
    args = parse_args(["--config", write(tmp_path, WEBFACE_VIT + "config.using_wandb = True\n")])
    assert (args.wandb, args.wandb_entity, args.wandb_project) == (True, None, "arcface-ext")
    assert "wandb_key" not in capsys.readouterr().err
    # An older arcface_torch's base.py, which chose its data in `if` blocks and held functions: its
    # plain lines are read, the others left out with a note (an error would stop a config that ran).
    write(tmp_path, "config = edict()\nconfig.lr = 0.2\nif config.lr > 0.1:\n    config.rec = 'x'\n"
                    "def lr_step_func(epoch):\n    return 1\nconfig.lr_func = lr_step_func\n", "base.py")
    config = insightface_config.read(str(tmp_path / "wf42m_vit_t.py"))
    assert config["lr"] == 0.001 and config["rec"] == "/train_tmp/WebFace42M" and "lr_func" not in config
    assert re.search(r"note: .*base.py, read as the defaults of .*wf42m_vit_t.py \(as arcface_torch's get_config "
                     r"merges it\), has lines that are not `config.<key> = <value>`, left out: 3, 5, 7$",
                     capsys.readouterr().err.strip())
    config = insightface_config.read(write(tmp_path, "config.rec = 'x'\nconfig.num_classes = 3\n"
                                                     "config.num_image = 10\nconfig.num_epoch = 1\n", "other.py"))
    assert config["lr"] == 0.2


def test_a_base_py_that_does_not_parse_is_named_as_the_configs_defaults(tmp_path):
    # The error names base.py, which the command line did not: it says why that file was read.
    write(tmp_path, "print 'hello'\nconfig.lr = 0.2\n", "base.py")
    path = write(tmp_path, "config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 10\nconfig.num_epoch = 1\n")
    with pytest.raises(SystemExit, match=r"base.py: not a Python config file: .* \(read as the defaults of "
                                         r".*wf42m_vit_t.py, as arcface_torch's get_config merges the configs/base.py "
                                         r"beside a config\)$"):
        insightface_config.read(path)


@pytest.mark.parametrize("text, message", [
    ("import os\nconfig.rec = os.getcwd()\n", r"cannot read `os.getcwd\(\)`"),
    ("print('hello')\n", "only `config.<key> = <value>` lines are read"),
    ("config.warmup_epoch = config.num_epoch // 10\n", "config.num_epoch is used before it is set"),
    ("config.rec = 'x'\nconfig.num_classes = 3\n", "this one lacks num_image, num_epoch"),
    ("config = (\n", "not a Python config file"),
    ("config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
     "config.interclass_filtering_threshold = None\n", r"config.interclass_filtering_threshold = None: a number"),
    ("config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
     "config.batch_size = '128'\n", r"config.batch_size = '128': an integer"),
    ("config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
     "config.margin_list = (1.0, 0.5)\n", r"margin_list = \(1.0, 0.5\): three numbers"),
    # (was read letter by letter: targets l, f and w)
    ("config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
     "config.val_targets = 'lfw'\n", r"config.val_targets = 'lfw': a list of names expected"),
    # (was --data synthetic, and a class count that did not match it)
    ("config.rec = None\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n",
     r"config.rec = None: a path expected"),
    # (was a UnicodeDecodeError traceback; Python 3.14's parser says "Non-UTF-8 code starting with '\xe9'")
    ("config.rec = 'caf\xe9'\n".encode("latin-1"),
     "not a Python config file: .*('utf-8' codec can't decode|Non-UTF-8 code starting with)"),
])
def test_what_cannot_be_read_is_named(tmp_path, text, message):
    with pytest.raises(SystemExit, match=message):
        parse_args(["--config", write(tmp_path, text)])


def test_a_config_in_another_encoding_is_read_by_its_coding_line(tmp_path):
    # Python reads a `# -*- coding: latin-1 -*-` file in that encoding; so does this (the file was
    # decoded as UTF-8 whatever it said).
    text = "# -*- coding: latin-1 -*-\nconfig.rec = '/data/caf\xe9'\n".encode("latin-1")
    assert insightface_config.read(write(tmp_path, text))["rec"] == "/data/caf\xe9"


def test_interclass_filtering_maps_to_the_flag(tmp_path, monkeypatch):
    text = ("config.rec = 'x'\nconfig.num_classes = 30\nconfig.num_image = 900\nconfig.num_epoch = 1\n"
            "config.sample_rate = 0.3\nconfig.interclass_filtering_threshold = 0.4\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(["--config", write(tmp_path, text)])
    assert (args.interclass_filter, args.sample_rate, args.sharded_classes) == (0.4, 0.3, False)
    # Eight processes: sharded centres, as arcface_torch's partial FC, which filter their own classes.
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = parse_args(["--config", write(tmp_path, text)])
    assert (args.interclass_filter, args.sharded_classes) == (0.4, True)
    # A threshold <= 0 is off, as arcface_torch reads it.
    args = parse_args(["--config", write(tmp_path, text.replace("= 0.4", "= -1"))])
    assert args.interclass_filter == 0.0


def test_a_negative_warm_up_is_what_arcface_torchs_poly_scheduler_makes_of_it(tmp_path, monkeypatch, capsys):
    # configs/3millions.py: warmup_epoch = -1. PolyScheduler never warms up then, and decays as
    # base_lr * (1 - (t - w) / (T - w))^2 with w = -W: the same as no warm-up from a lower rate.
    monkeypatch.setenv("WORLD_SIZE", "1")
    text = ("config.rec = 'synthetic'\nconfig.num_classes = 300000\nconfig.num_image = 100000\n"
            "config.batch_size = 512\nconfig.num_epoch = 30\nconfig.warmup_epoch = -1\nconfig.lr = 0.1\n")
    args = parse_args(["--config", write(tmp_path, text, "3millions.py")])
    steps, warmup = 100000 // 512 * 30, -(100000 // 512)
    assert (args.max_steps, args.warmup_steps) == (steps, 0)
    assert "warmup_epoch -1 < 0" in capsys.readouterr().err

    def poly_scheduler(t):  # arcface_torch's, for t >= warmup
        return 0.1 * (1 - (t - warmup) / (steps - warmup)) ** 2

    for t in (0, 1, steps // 2, steps - 1):
        assert math.isclose(args.lr * (1 - t / args.max_steps) ** 2, poly_scheduler(t), rel_tol=1e-12)


def test_negative_warm_up_steps_are_refused():
    with pytest.raises(SystemExit, match=r"^--warmup-steps must be at least 0, got -5$"):
        parse_args(["--warmup-steps", "-5"])


def test_a_network_this_trainer_lacks_is_named_with_the_config(tmp_path):
    text = "config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
    path = write(tmp_path, text + "config.network = 'r1024'\n")
    with pytest.raises(SystemExit, match=f"^{re.escape(path)}: network 'r1024' is not one this trainer has: "):
        parse_args(["--config", path])


@pytest.mark.parametrize("network", ["r2060", "mbf_large"])
def test_a_config_naming_arcface_torchs_r2060_or_mbf_large_is_read(tmp_path, network):
    text = "config.rec = 'x'\nconfig.num_classes = 3\nconfig.num_image = 9\nconfig.num_epoch = 1\n"
    args = parse_args(["--config", write(tmp_path, text + f"config.network = {network!r}\n")])
    assert args.network == network and args.image_size == 112


def test_a_config_trains_and_its_class_count_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = make_face_folder(str(tmp_path / "faces"))
    text = (f"config.rec = {data!r}\nconfig.num_classes = 8\nconfig.num_image = 64\nconfig.num_epoch = 1\n"
            f"config.network = 'small'\nconfig.embedding_size = 64\nconfig.batch_size = 16\nconfig.verbose = 2\n"
            f"config.frequent = 1\nconfig.val_targets = []\nconfig.output = {str(tmp_path / 'run')!r}\n"
            "config.fp16 = True\n")
    path = write(tmp_path, text, "tiny.py")
    overrides = ["--image-size", "32", "--num-workers", "0", "--no-plots", "--no-tensorboard"]
    assert main(["--config", path, *overrides]) == 0
    # Its fp16 on a CPU, where torch's fp16 convolutions crawl (r18: 8x slower), is said.
    assert "note: --amp fp16 on the CPU runs several times slower than fp32" in capsys.readouterr().err
    curve = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert len(curve) == 64 // 16 and all(math.isfinite(v) for v in curve)
    with pytest.raises(SystemExit, match="--num-classes is 9, but .* holds 8 identities"):
        main(["--config", path, *overrides, "--num-classes", "9"])


def test_the_notes_on_a_config_are_said_once_and_kept_in_training_log(tmp_path, monkeypatch, capsys):
    # Said as the trainer's notes are, by the main process alone (under torchrun each process said them, 8 times
    # on 8 GPUs, without "note:"), and kept in training.log with the run's others (a lowered --lr was unexplained).
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = make_face_folder(str(tmp_path / "faces"))
    text = (f"config.rec = {data!r}\nconfig.num_classes = 8\nconfig.num_image = 32\nconfig.num_epoch = 1\n"
            "config.network = 'small'\nconfig.embedding_size = 64\nconfig.batch_size = 16\nconfig.val_targets = []\n"
            f"config.output = {str(tmp_path / 'run')!r}\nconfig.dali = True\n")
    path = write(tmp_path, text, "tiny.py")
    note = f"note: {path}: ignored arcface_torch settings: dali (PyTorch's DataLoader reads the data)"
    monkeypatch.setenv("RANK", "1")
    parse_args(["--config", path])
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    assert main(["--config", path, "--image-size", "32", "--num-workers", "0", "--no-plots", "--no-tensorboard"]) == 0
    assert capsys.readouterr().err.startswith(note + "\n")
    assert [line.split(" ", 2)[2] for line in (tmp_path / "run" / "training.log").read_text().splitlines()[1:2]] == [
        note]


def test_dali_aug_is_ignored_and_its_kinds_named(tmp_path, capsys):
    # arcface_torch's DALI augmentations (a resize, a blur, an HSV shift, grayscale) are not taken over: their
    # draws are DALI's; the note names the flags that do those things here.
    parse_args(["--config", write(tmp_path, WEBFACE_VIT + "config.dali_aug = True\n")])
    assert ("dali_aug (DALI's augmentations; --blur-augmentation, --hue-augmentation, --grayscale-augmentation and "
            "--low-res-augmentation are their kinds here)") in capsys.readouterr().err


# The shapes of older arcface_torch's configs (its train.py's, before train_v2.py; values of this test's own
# choosing): a step schedule as config.decay_epoch, and before that as config.lr_func, a function of the epoch.
GLINT_DECAY_EPOCH = '''from easydict import EasyDict as edict

# make training faster
config = edict()
config.loss = "arcface"
config.network = "r18"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.5
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 96
config.lr = 0.1  # batch size is 512

config.rec = "/train_tmp/glint"
config.num_classes = 36023
config.num_image = 1709165
config.num_epoch = 12
config.warmup_epoch = 1
config.decay_epoch = [5, 8, 10]
config.val_targets = ["lfw", "cfp_fp"]
'''
MS1M_LR_FUNC = '''from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.network = "r34"
config.output = None
config.fp16 = False
config.batch_size = 64
config.lr = 0.1  # batch size is 512

config.rec = "/train_tmp/ms1m"
config.num_classes = 9343
config.num_image = 517951
config.num_epoch = 14
config.warmup_epoch = -1
config.val_targets = ["lfw"]

def lr_step_func(epoch):
    return ((epoch + 1) / (4 + 1)) ** 2 if epoch < config.warmup_epoch else 0.1 ** len(
        [m for m in [6, 9, 12] if m - 1 <= epoch])
config.lr_func = lr_step_func
'''


def train_py_multiplier(step, warmup_step, decay_step):  # older arcface_torch's train.py, re-typed
    if step < warmup_step:
        return step / warmup_step
    return 0.1 ** len([m for m in decay_step if m <= step])


def test_an_older_configs_decay_epoch_is_its_step_schedule(tmp_path, monkeypatch, capsys):
    # train.py: lr / 512 x batch_size x world_size, x 0.1 at each decay epoch's step after a linear warm-up
    # of warmup_epoch. Was read as train_v2.py's poly schedule with the decay epochs ignored, at lr 0.1.
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = write(tmp_path, GLINT_DECAY_EPOCH, "glint_r18.py")
    args = parse_args(["--config", path])
    total = 96 * 4
    decay_step = [x * 1709165 // total for x in (5, 8, 10)]
    warmup_step = 1709165 // total * 1
    assert (args.lr_schedule, args.lr_steps, args.warmup_steps) == ("step", decay_step, warmup_step)
    assert math.isclose(args.lr, 0.1 / 512 * total, rel_tol=1e-12) and args.max_steps == 1709165 // total * 12
    schedule = LearningRateSchedule(args.lr_schedule, args.max_steps, args.warmup_steps, args.lr_steps)
    for step in (warmup_step, warmup_step + 1, decay_step[0] - 1, decay_step[0], decay_step[1], decay_step[2] + 7,
                 args.max_steps - 1):
        assert math.isclose(schedule(step), train_py_multiplier(step, warmup_step, decay_step), rel_tol=1e-12)
    err = capsys.readouterr().err
    assert (f"note: {path}: config.decay_epoch [5, 8, 10] is older arcface_torch's step schedule (its train.py: lr x "
            "0.1 at each, after the warm-up, from lr x batch_size x world_size / 512): --lr-schedule step --lr-steps "
            f"{','.join(map(str, decay_step))} --warmup-steps {warmup_step} --lr 0.075\n") in err
    assert "decay_epoch" not in err.split("ignored:")[-1]
    # Its warmup_epoch = -1 is no warm-up at the base rate (not the PolyScheduler's lower rate).
    args = parse_args(["--config", write(tmp_path, GLINT_DECAY_EPOCH.replace("warmup_epoch = 1", "warmup_epoch = -1"),
                                         "glint_r18.py")])
    assert args.warmup_steps == 0 and math.isclose(args.lr, 0.075)
    # A decay at epoch 0 is a lower rate from the first step; two at one step, or no list, are refused.
    args = parse_args(["--config", write(tmp_path, GLINT_DECAY_EPOCH.replace("[5, 8, 10]", "[0, 8]"), "zero.py")])
    assert args.lr_steps == [decay_step[1]] and math.isclose(args.lr, 0.0075)
    for value, message in (("[5, 5]", "config.decay_epoch divides the learning rate by 10 more than once at one step "
                                      f"\\(epoch 5, step {decay_step[0]}\\)"),
                           ("8", "config.decay_epoch = 8: a list of epochs expected")):
        with pytest.raises(SystemExit, match=message):
            parse_args(["--config", write(tmp_path, GLINT_DECAY_EPOCH.replace("[5, 8, 10]", value), "bad.py")])


def test_an_older_configs_lr_func_is_read_not_run(tmp_path, monkeypatch, capsys):
    # Earlier, train.py's LambdaLR took config.lr_func, stepped once an epoch; the function was refused
    # ("only `config.<key> = <value>` lines are read"), whatever the network. Its returned expression is
    # evaluated for each epoch as the lines are, and read as a warm-up and decays.
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write(tmp_path, MS1M_LR_FUNC, "ms1m_r34.py")
    args = parse_args(["--config", path])
    steps_per_epoch = 517951 // (64 * 2)
    assert (args.lr_schedule, args.warmup_steps) == ("step", 0)
    assert args.lr_steps == [5 * steps_per_epoch, 8 * steps_per_epoch, 11 * steps_per_epoch]  # (epochs m - 1)
    assert math.isclose(args.lr, 0.1 / 512 * 128) and args.max_steps == steps_per_epoch * 14
    schedule = LearningRateSchedule(args.lr_schedule, args.max_steps, args.warmup_steps, args.lr_steps)

    def lr_step_func(epoch):  # the config's, re-typed, with its warmup_epoch
        return ((epoch + 1) / (4 + 1)) ** 2 if epoch < -1 else 0.1 ** len([m for m in [6, 9, 12] if m - 1 <= epoch])

    for step in range(0, args.max_steps, 97):
        assert math.isclose(schedule(step), lr_step_func(step // steps_per_epoch), rel_tol=1e-12)
    assert ("config.lr_func (lr_step_func: x 0.1 from epochs 5, 8, 11 of 0-13) is older arcface_torch's step "
            "schedule" in capsys.readouterr().err)
    # A warm-up of 3 epochs: linear over their steps here (its per-epoch shape said as ignored); a lambda too.
    text = MS1M_LR_FUNC.replace("warmup_epoch = -1", "warmup_epoch = 3").replace("(4 + 1)", "(3 + 1)")
    args = parse_args(["--config", write(tmp_path, text, "warm.py")])
    assert args.warmup_steps == 3 * steps_per_epoch and args.lr_steps[0] == 5 * steps_per_epoch
    assert ("ignored arcface_torch settings: lr_func's warm-up shape (0.0625, 0.25, 0.562 of lr in epochs 0-2, one "
            f"value an epoch; linear over its {3 * steps_per_epoch} steps here)") in capsys.readouterr().err
    head = MS1M_LR_FUNC.split("def lr_step_func")[0]
    text = head + "config.lr_func = lambda e: 0.1 ** len([m for m in (4,) if m <= e])\n"
    assert parse_args(["--config", write(tmp_path, text, "lambda.py")]).lr_steps == [4 * steps_per_epoch]
    # What is not that shape, or would need running, is refused, naming the line or the epoch.
    for function, message in (
            ("def f(epoch):\n    return 0.5 ** epoch\n", r"config.lr_func\(1\) = 0.5: only older arcface_torch's step "
                                                         r"shape is read"),
            ("def f(epoch):\n    return __import__('os').getcwd()\n", r":19: cannot read `__import__\('os'\)"),
            ("def f(epoch):\n    x = 1\n    return x\n", r":18: config.lr_func = f: only a function of the epoch "
                                                        r"that returns one expression is read"),
            ("@print\ndef f(epoch):\n    return 1\n", r":19: config.lr_func = f: only a function of the epoch "),
            ("def f(epoch):\n    return len(epoch)\n", r"config.lr_func = f cannot be read at epoch 0: "),
            ("def f(epoch):\n    return 0.1 ** len([m for m in [3, 3] if m <= epoch])\n",
             r"config.lr_func divides the learning rate by 10 more than once at one step \(epoch 3, ")):
        with pytest.raises(SystemExit, match=message) as stop:
            parse_args(["--config", write(tmp_path, head + function + "config.lr_func = f\n", "bad.py")])
        assert "\n" not in str(stop.value)
    with pytest.raises(SystemExit, match=r"config.lr_func = 0.1: a function of the epoch expected"):
        parse_args(["--config", write(tmp_path, head + "config.lr_func = 0.1\n", "bad.py")])


@pytest.mark.parametrize("lines, message", [
    # Values no config holds, refused before they are made (hours of `9 ** 9 ** 9`, 80 GB of a list).
    ("config.lr = 9 ** 9 ** 9\n",
     r":18: `9 \*\* 9 \*\* 9` would be larger than a config holds \(at most 1000000 items"),
    ("config.val_targets = ['lfw'] * 10 ** 10\n", r":18: `\['lfw'\] \* 10 \*\* 10` would be larger than a config"),
    ("config.lr = 7 ** 3000 * 7 ** 3000\n", r"`7 \*\* 3000 \* 7 \*\* 3000` .*or integers of 10000 bits\): not read"),
    ("config.lr = 1 / 0\n", r":18: config.lr cannot be read: division by zero"),  # (was a traceback)
    # An lr_func's evaluation is counted over its epochs: nested comprehensions, or 10 ** 9 epochs of it; it
    # compares numbers alone (those lists, 10 ** 12 items a side). decay_epoch's steps are counted at once.
    ("config.lr_func = lambda e: 0.1 ** len([m for m in [[n for n in [0] * 3000] for k in [0] * 3000] if e < 0])\n",
     r":18: config.lr_func takes more than 200000 steps to read for its epochs"),
    ("config.num_epoch = 10 ** 9\nconfig.lr_func = lambda e: 1\n", r"takes more than 200000 steps to read"),
    ("config.lr_func = lambda e: 1 if [[[0] * 10 ** 4] * 10 ** 4] * 10 ** 4 == [[[0] * 10 ** 4] * 10 ** 4] * 10 ** 4 "
     "else 0.1\n",
     r"cannot be read at epoch 0: `.*` compares other than numbers"),
    ("config.decay_epoch = [8] * 10 ** 5\n", r"config.decay_epoch divides the learning rate by 10 more than once"),
])
def test_a_crafted_config_is_refused_in_one_line_not_evaluated_at_length(tmp_path, lines, message):
    # The file is parsed, never run, and neither may its values take the reader's memory or hours.
    head = MS1M_LR_FUNC.split("def lr_step_func")[0]
    with pytest.raises(SystemExit, match=message) as stop:
        parse_args(["--config", write(tmp_path, head + lines, "crafted.py")])
    assert "\n" not in str(stop.value) and len(str(stop.value)) < 400
