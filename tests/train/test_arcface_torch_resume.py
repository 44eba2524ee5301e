"""--resume of a run that insightface's arcface_torch trained (train_v2.py with save_all_states): its
checkpoint_gpu_<rank>.pt files, made here as it writes them, continue with their step, learning rate and
optimizer state, put together from every rank's file; what cannot continue is refused in one line."""

import copy
import os
import re

import pytest
import torch

import arcface_ext
from train import checkpoint
from train.config import parse_args
from train.trainer import Trainer, main

from trainer_fixtures import base_argv, faces, one_thread, read_jsonl, train_on_ranks  # noqa: F401

BASE_LR = 0.1


def argv(faces, output, **overrides):
    return base_argv(faces[0], str(output), **{"loss_impl": "reference", "lr": BASE_LR, **overrides})


def save_arcface_torch_run(folder, backbone, centres, world, optimizer="sgd", global_step=6, epoch=3, schedule=None):
    """A CPU re-creation of what train_v2.py saves with save_all_states: on each of ``world`` GPUs, its
    PartialFC_V2 weight (rows C // W, one more for r < C % W, in class order) and torch's optimizer over its
    two groups [backbone.parameters(), that weight] after two steps (the backbone's gradients the same on
    every rank, as DDP averages them; the frozen embedding scale none), and the PolyScheduler's state.
    (``schedule``: its max_steps and warmup_steps, in passes, where given.) -> the per-rank optimizer state dicts,
    for comparison."""
    os.makedirs(folder, exist_ok=True)
    classes, start, saved = centres.shape[0], 0, []
    for rank in range(world):
        rows = classes // world + int(rank < classes % world)
        model = copy.deepcopy(backbone)  # (each GPU's copy of the backbone, stepped alike)
        weight = torch.nn.Parameter(centres[start:start + rows].clone())
        groups = [{"params": model.parameters()}, {"params": [weight]}]
        opt = (torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
               else torch.optim.AdamW(groups, lr=BASE_LR, weight_decay=5e-4))
        for step in range(2):
            generator = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator) if p.requires_grad else None
            weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(100 * rank + step))
            opt.step()
        weight.data.copy_(centres[start:start + rows])  # (the weights compared: the file's, whatever the steps did)
        torch.save({"epoch": epoch, "global_step": global_step, "state_dict_backbone": backbone.state_dict(),
                    "state_dict_softmax_fc": {"weight": weight.detach()}, "state_optimizer": opt.state_dict(),
                    "state_lr_scheduler": {"base_lr": BASE_LR, "last_epoch": global_step, **(schedule or {})}},
                   os.path.join(folder, f"checkpoint_gpu_{rank}.pt"))
        saved.append(opt.state_dict())
        start += rows
    return saved


@pytest.fixture
def arcface_torch_run(faces, tmp_path):
    """(this trainer's fresh backbone and centres, the folder of an arcface_torch run of them on 3 GPUs: 8
    classes split 3/3/2, their optimizer states)."""
    fresh = Trainer(parse_args(argv(faces, tmp_path / "fresh", max_steps=1)))
    fresh.release_output()
    centres = torch.randn(fresh.margin_loss.weight.shape)
    states = save_arcface_torch_run(str(tmp_path / "it"), fresh.backbone, centres, world=3)
    return fresh.backbone, centres, tmp_path / "it", states


def test_an_arcface_torch_run_continues_with_its_step_lr_and_momentum(faces, tmp_path, arcface_torch_run, capsys):
    backbone, centres, folder, states = arcface_torch_run
    run = Trainer(parse_args(argv(faces, tmp_path / "on", max_steps=20, warmup_steps=2,
                                  resume=str(folder / "checkpoint_gpu_1.pt"))))
    run.release_output()
    assert "resumed arcface_torch's run from" in capsys.readouterr().err
    assert run.step == 6 and run.scheduler.last_epoch == 6
    poly = (1 - (6 - 2) / (20 - 2)) ** 2  # (--lr-schedule poly, insightface_config's)
    assert all(group["lr"] == pytest.approx(BASE_LR * poly) for group in run.optimizer.param_groups)
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in run.backbone.state_dict().items())
    assert torch.equal(run.margin_loss.weight.detach(), centres)
    # The backbone's momentum, parameter by parameter in insightface's order; the frozen scale has none.
    names = [name for name, _ in backbone.named_parameters()]
    for name, param in run.backbone.named_parameters():
        theirs = states[0]["state"].get(names.index(name))
        if theirs is None:
            assert not param.requires_grad and param not in run.optimizer.state
        else:
            assert torch.equal(run.optimizer.state[param]["momentum_buffer"], theirs["momentum_buffer"]), name
    assert len(states[0]["state"]) == len(run.optimizer.state)  # (the backbone's and the centres')
    # The centres' momentum: the three ranks' rows in class order.
    assembled = torch.cat([s["state"][len(names)]["momentum_buffer"] for s in states])
    assert torch.equal(run.optimizer.state[run.margin_loss.weight]["momentum_buffer"], assembled)


def test_the_backbone_is_rank_0s_whichever_file_is_given(faces, tmp_path, arcface_torch_run):
    # Its DDP does not broadcast buffers: each GPU's BatchNorm statistics are its own; its model.pt is rank 0's.
    backbone, _, folder, _ = arcface_torch_run
    other = torch.load(folder / "checkpoint_gpu_2.pt")
    other["state_dict_backbone"]["bn1.running_mean"] += 1
    torch.save(other, folder / "checkpoint_gpu_2.pt")
    run = Trainer(parse_args(argv(faces, tmp_path / "on", resume=str(folder / "checkpoint_gpu_2.pt"))))
    run.release_output()
    assert torch.equal(run.backbone.bn1.running_mean, backbone.bn1.running_mean)


def test_an_arcface_torch_run_trains_on_from_its_folder_and_from_auto(faces, tmp_path, arcface_torch_run, capsys):
    """--resume FOLDER, and --resume auto into that folder (config.resume = True): the steps after its own, in
    this trainer's checkpoint; arcface_torch's log set aside in the folder it continues in, its checkpoints kept
    there beside this trainer's."""
    _, _, folder, _ = arcface_torch_run
    assert main(argv(faces, tmp_path / "on", max_steps=8, resume=str(folder))) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "on" / "metrics.jsonl")] == [7, 8]
    assert checkpoint.load(str(tmp_path / "on" / "checkpoint.pt"))["step"] == 8
    capsys.readouterr()
    (folder / "training.log").write_text("arcface_torch's log\n")
    assert main(argv(faces, folder, max_steps=8, resume="auto")) == 0
    assert (f"note: the other files in {folder} (arcface_torch's log, an earlier start's) are now in "
            f"{folder / 'earlier-1'}; its checkpoint_gpu_<rank>.pt stay" in capsys.readouterr().err)
    assert checkpoint.load(str(folder / "checkpoint.pt"))["step"] == 8
    assert (folder / "earlier-1" / "training.log").read_text() == "arcface_torch's log\n"
    assert sorted(n for n in os.listdir(folder) if n.startswith("checkpoint_gpu")) == [
        "checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt", "checkpoint_gpu_2.pt"]


@pytest.mark.slow
def test_no_done_line_gives_a_time_for_arcface_torchs_steps(faces, tmp_path, arcface_torch_run, capsys):
    # Its files hold no time: steps 1-6 took arcface_torch a time no one here knows. The resume's done line said none,
    # but the next resume's said the checkpoint's, this trainer's steps 7-8 alone, as the 10 steps': `done: 10 steps in
    # 2 s`.
    _, _, folder, _ = arcface_torch_run
    assert main(argv(faces, tmp_path / "on", max_steps=8, resume=str(folder))) == 0
    assert re.search(r"\ndone: 8 steps \(resumed at step 6: \d+ s in this process\); ", capsys.readouterr().err)
    assert main(argv(faces, tmp_path / "on", max_steps=10, resume="auto")) == 0
    err = capsys.readouterr().err
    assert re.search(r"\ndone: 10 steps \(resumed at step 8: \d+ s in this process\); ", err), err


def test_auto_continues_arcface_torch_s_run_again_after_a_start_that_wrote_no_checkpoint(faces, tmp_path,
                                                                                         arcface_torch_run, capsys):
    # A first start into its folder that stops before this trainer's first checkpoint (a crash, a second
    # Ctrl-C): the same command again continues its run, not one from scratch (its files were in earlier-1/).
    _, _, folder, _ = arcface_torch_run
    first = Trainer(parse_args(argv(faces, folder, max_steps=20, resume="auto")))
    first.release_output()
    (folder / "metrics.jsonl").write_text('{"step": 7}\n')  # (what that start logged)
    capsys.readouterr()
    again = Trainer(parse_args(argv(faces, folder, max_steps=20, resume="auto")))
    again.release_output()
    assert again.step == 6 and "resumed arcface_torch's run from" in capsys.readouterr().err
    assert (folder / "earlier-1" / "metrics.jsonl").read_text() == '{"step": 7}\n'


def _resumed_shard(argv):
    """On a rank: the run that --resume makes (nothing trained), its rows of the class centres and their
    momentum written into --output as rank<r>.pt."""
    run = Trainer(parse_args(argv))
    run.release_output()
    loss = run.margin_loss
    torch.save({"start": loss.class_start, "weight": loss.weight.detach(),
                "momentum": run.optimizer.state[loss.weight]["momentum_buffer"]},
               os.path.join(run.output, f"rank{os.environ['RANK']}.pt"))
    torch.distributed.destroy_process_group()
    return 0


@pytest.mark.slow
@pytest.mark.skipif(not arcface_ext.extension_available(), reason="--sharded-classes runs on the built extension")
def test_sharded_classes_take_their_rows_of_the_assembled_state(faces, tmp_path, arcface_torch_run):
    # arcface_torch's 3 GPUs' files (rows 3/3/2) continued on 2 processes with --sharded-classes (4/4 each).
    _, centres, folder, states = arcface_torch_run
    index = len(states[0]["param_groups"][0]["params"])
    momentum = torch.cat([s["state"][index]["momentum_buffer"] for s in states])
    done = train_on_ranks(argv(faces, tmp_path / "on", sharded_classes=True, loss_impl="fused", resume=str(folder)),
                          nprocs=2, main=_resumed_shard)
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        shard = torch.load(tmp_path / "on" / f"rank{rank}.pt")
        rows = slice(shard["start"], shard["start"] + shard["weight"].shape[0])
        assert shard["weight"].shape[0] == 4 and torch.equal(shard["weight"], centres[rows])
        assert torch.equal(shard["momentum"], momentum[rows])


def test_a_sharded_process_reads_its_rows_alone(arcface_torch_run):
    # Rows [2, 6) of the 3/3/2 split: rank 0's last, rank 1's three and none of rank 2's; the momentum alike.
    # (A --sharded-classes process of a WebFace42M run need not hold its 2M x 512 matrices whole.)
    backbone, centres, folder, states = arcface_torch_run
    first = str(folder / "checkpoint_gpu_0.pt")
    state = checkpoint.load(first)
    files, _ = checkpoint.insightface_run(first, state)
    rows, why = checkpoint.insightface_class_centres(first, state, files, rows=(2, 6))
    assert why == "" and torch.equal(rows, centres[2:6])
    _, centre_state = checkpoint.insightface_optimizer_state(files, backbone, "sgd", rows=(2, 6))
    index = len(states[0]["param_groups"][0]["params"])
    momentum = torch.cat([s["state"][index]["momentum_buffer"] for s in states])
    assert torch.equal(centre_state["momentum_buffer"], momentum[2:6])
    whole, _ = checkpoint.insightface_class_centres(first, state, files)
    assert torch.equal(whole, centres)


def test_gradient_accumulation_counts_its_passes_as_steps(faces, tmp_path, arcface_torch_run, capsys):
    # global_step counts passes (its scheduler steps each pass); a step here is --gradient-acc of them.
    backbone, centres, folder, _ = arcface_torch_run
    save_arcface_torch_run(str(folder), backbone, centres, world=3, global_step=7)
    run = Trainer(parse_args(argv(faces, tmp_path / "on", max_steps=20, batch_size=8, gradient_acc=2,
                                  resume=str(folder / "checkpoint_gpu_0.pt"))))
    run.release_output()
    assert run.step == 3 and run.scheduler.last_epoch == 3
    assert "global_step 7, 1 pass(es) into a step of --gradient-acc 2" in capsys.readouterr().err


def test_settings_its_files_record_apart_from_this_runs_are_noted(faces, tmp_path, arcface_torch_run, capsys):
    # Its optimizer's groups keep lr (initial_lr), weight_decay and momentum, its PolyScheduler max_steps and
    # warmup_steps in passes: the same settings (its steps halved by --gradient-acc 2) go on without a note.
    backbone, centres, folder, _ = arcface_torch_run
    save_arcface_torch_run(str(folder), backbone, centres, world=3, schedule={"max_steps": 40, "warmup_steps": 4})
    same = argv(faces, tmp_path / "on", max_steps=20, warmup_steps=2, batch_size=8, gradient_acc=2,
                resume=str(folder))
    Trainer(parse_args(same)).release_output()
    assert "other settings" not in capsys.readouterr().err
    other = argv(faces, tmp_path / "on2", max_steps=30, warmup_steps=2, batch_size=8, gradient_acc=2, lr=0.2,
                 decay=1e-4, resume=str(folder))
    Trainer(parse_args(other)).release_output()
    notes = [line for line in capsys.readouterr().err.splitlines() if "other settings" in line]
    assert notes == ["note: that run's files record other settings than this run's: its lr 0.1, this run's --lr 0.2, "
                     "its max-steps 20, this run's --max-steps 30, its decay 0.0005, this run's --decay 0.0001; it "
                     "goes on with this run's (give that run's config as --config to go on as it went)"]


def test_an_adamw_run_continues_with_its_moments(faces, tmp_path, arcface_torch_run):
    backbone, centres, folder, _ = arcface_torch_run
    states = save_arcface_torch_run(str(folder), backbone, centres, world=3, optimizer="adamw")
    run = Trainer(parse_args(argv(faces, tmp_path / "on", optimizer="adamw", resume=str(folder))))
    run.release_output()
    ours = run.optimizer.state[run.margin_loss.weight]
    index = len(list(backbone.parameters()))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours[key], torch.cat([s["state"][index][key] for s in states]))
    assert float(ours["step"]) == 2.0
    conv = dict(run.backbone.named_parameters())["conv1.weight"]
    assert torch.equal(run.optimizer.state[conv]["exp_avg"], states[0]["state"][0]["exp_avg"])


def test_what_cannot_continue_is_refused_in_a_line(faces, tmp_path, arcface_torch_run):
    backbone, centres, folder, _ = arcface_torch_run
    first = folder / "checkpoint_gpu_0.pt"

    def refusal(**overrides):
        with pytest.raises(SystemExit) as stop:
            main(argv(faces, tmp_path / "on", **{"resume": str(first), **overrides}))
        assert "\n" not in stop.value.code
        return stop.value.code

    assert refusal(optimizer="adamw") == (f"train: error: --resume {first}: that run stepped with SGD, this one with "
                                          "--optimizer adamw: give --optimizer sgd")
    assert refusal(embedding_size=32) == (f"train: error: --resume {first} does not fit --network small "
                                          "--embedding-size 32 --image-size 32: it holds --network small "
                                          "--embedding-size 64 --image-size 32")
    # Its optimizer over other parameters than the network's: of another shape, fewer.
    state = torch.load(first)
    shape = tuple(state["state_optimizer"]["state"][0]["momentum_buffer"].shape)
    state["state_optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(2, 2)
    torch.save(state, first)
    assert refusal() == (f"train: error: --resume {first}: checkpoint_gpu_0.pt's optimizer state of conv1.weight has "
                         f"momentum_buffer of shape (2, 2), the parameter {shape}")
    state["state_optimizer"]["param_groups"][0]["params"].pop()
    torch.save(state, first)
    assert refusal().startswith(f"train: error: --resume {first}: checkpoint_gpu_0.pt's optimizer holds "
                                f"{len(list(backbone.parameters())) - 1} backbone parameters, the network "
                                f"{len(list(backbone.parameters()))}")
    # A rank's file missing; a run of another number of classes.
    os.remove(first)
    assert refusal(resume=str(folder)) == (f"train: error: --resume {folder / 'checkpoint_gpu_1.pt'}: arcface_torch's "
                                           "run cannot be put together from its files: no checkpoint_gpu_0.pt beside "
                                           "it")
    save_arcface_torch_run(str(folder), backbone, centres[:7], world=3)
    assert refusal() == (f"train: error: --resume {first}: arcface_torch's 3 files hold 7 x 64 class centres, this "
                         "run 8 x 64 (8 classes); resume needs the same data (use --pretrained_model to fine-tune)")


def test_its_run_goes_on_with_this_runs_centres_lr_scale(faces, tmp_path, arcface_torch_run, capsys):
    # Its two groups stepped at one rate: --centres-lr-scale 10 gives the centres ten times the backbone's from the
    # step on, under this run's schedule, and the note says its scale was 1.
    _, _, folder, _ = arcface_torch_run
    run = Trainer(parse_args(argv(faces, tmp_path / "on", max_steps=20, warmup_steps=2, centres_lr_scale=10,
                                  resume=str(folder))))
    run.release_output()
    poly = (1 - (6 - 2) / (20 - 2)) ** 2
    assert [group["lr"] for group in run.optimizer.param_groups] == pytest.approx([BASE_LR * poly, BASE_LR * poly * 10])
    run.scheduler.step()
    poly = (1 - (7 - 2) / (20 - 2)) ** 2
    assert [group["lr"] for group in run.optimizer.param_groups] == pytest.approx([BASE_LR * poly, BASE_LR * poly * 10])
    notes = [line for line in capsys.readouterr().err.splitlines() if "other settings" in line]
    assert notes == ["note: that run's files record other settings than this run's: its centres-lr-scale 1, this run's "
                     "--centres-lr-scale 10; it goes on with this run's (give that run's config as --config to go on "
                     "as it went)"]


def test_a_margin_warm_up_that_lowers_its_margin_is_noted(faces, tmp_path, arcface_torch_run, capsys):
    # arcface_torch has no margin warm-up: its run trained at the whole margin. --margin-warmup-steps 10 from its
    # step 6 trains at 0.6 of it (the margin comes from the step), which the note says; a warm-up over by step 6
    # changes nothing, and gets none.
    _, _, folder, _ = arcface_torch_run
    Trainer(parse_args(argv(faces, tmp_path / "on", max_steps=20, warmup_steps=2, margin_warmup_steps=10,
                            resume=str(folder)))).release_output()
    notes = [line for line in capsys.readouterr().err.splitlines() if "other settings" in line]
    assert notes == ["note: that run's files record other settings than this run's: its margin the whole from its "
                     "first step (arcface_torch warms up none), this run's --margin-warmup-steps 10 (margin 0.3 at "
                     "step 6, the whole at step 10); it goes on with this run's (give that run's config as --config "
                     "to go on as it went)"]
    Trainer(parse_args(argv(faces, tmp_path / "on2", max_steps=20, warmup_steps=2, margin_warmup_steps=6,
                            resume=str(folder)))).release_output()
    assert "other settings" not in capsys.readouterr().err
