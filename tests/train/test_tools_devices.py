"""The commands' ``--device`` on a device type other than cpu and cuda (Apple's mps, Intel's xpu):
what ``train.tools.torch_device`` takes (each where torch says it is there), the commands that refuse
it, and what the others do differently there. No such device here: torch's availability is
monkeypatched, and the commands are run up to their device check (the device named before any file),
so none of this has run on MPS or XPU hardware."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from train.embed import embed_images
from train.tools import torch_device


@pytest.fixture
def mps_available(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


@pytest.fixture
def one_xpu(monkeypatch):
    if not hasattr(torch, "xpu"):
        pytest.skip("this torch has no torch.xpu")
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 1)


@pytest.fixture
def no_other_devices(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)


def test_mps_and_xpu_are_taken_where_torch_sees_them(mps_available, one_xpu):
    assert torch_device("mps") == torch.device("mps")
    assert torch_device("mps:0") == torch.device("mps:0")
    assert torch_device("xpu") == torch.device("xpu")
    assert torch_device("xpu:0") == torch.device("xpu:0")
    assert torch_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("text, message", [
    ("mps", "--device mps, but torch sees no MPS device (Apple's GPUs)"),
    ("xpu", "--device xpu, but torch sees no XPU device (Intel's GPUs)"),
    ("xpu:1", "--device xpu:1, but torch sees no XPU device (Intel's GPUs)"),
])
def test_mps_and_xpu_are_refused_where_torch_sees_none(no_other_devices, text, message):
    # (both were taken, and failed when a tensor first went there: torch's traceback, after the model was read)
    with pytest.raises(ValueError) as error:
        torch_device(text)
    assert str(error.value).startswith(message), error.value


def test_a_torch_without_mps_is_said(no_other_devices, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"sees no MPS device \(Apple's GPUs\): this torch is built without it$"):
        torch_device("mps")


@pytest.mark.parametrize("text, message", [
    ("mps:1", "--device mps:1, but torch sees 1 MPS device: mps or mps:0"),
    ("xpu:1", "--device xpu:1, but torch sees 1 XPU device(s)"),
])
def test_a_device_past_those_torch_sees_is_refused(mps_available, one_xpu, text, message):
    with pytest.raises(ValueError) as error:
        torch_device(text)
    assert str(error.value) == message


@pytest.mark.parametrize("text", ["meta", "hpu", "xla"])
def test_device_types_the_tools_do_not_run_on_are_refused(text):
    # (torch.device took them: the tools went on, to torch's error or the meta device's empty tensors)
    with pytest.raises(ValueError) as error:
        torch_device(text)
    assert str(error.value) == f"--device {text}: the tools run on cpu, cuda, mps or xpu"


def test_a_name_that_is_no_device_lists_mps_and_xpu():
    with pytest.raises(ValueError) as error:
        torch_device("metal")
    assert str(error.value) == "--device 'metal' is not a torch device (cpu, cuda, cuda:1, mps, xpu, ...)"


def _commands(tmp_path) -> dict[str, tuple[str, list[str]]]:
    """Each command that embeds with a PyTorch model (module, argv), its model a file that is not there:
    the device is checked first, so its error is the device's."""
    model, folder, out = str(tmp_path / "absent.pt"), str(tmp_path), str(tmp_path / "out")
    return {
        "embed": ("train.embed", ["--model", model, "--images", folder, "--output", out + ".npy"]),
        "verify": ("train.verify", ["--model", model, "--data", "synthetic", "--output", out + ".json"]),
        "ijb": ("train.ijb", ["--model", model, "--data-root", folder, "--output", out + ".json"]),
        "tinyface": ("train.tinyface", ["--model", model, "--data-root", folder, "--output", out + ".json"]),
        "search": ("train.tools.search", ["--model", model, "--gallery", folder, "--probes", folder,
                                          "--output", out + ".csv"]),
        "cluster": ("train.tools.cluster", ["--model", model, "--images", folder, "--output", out + ".csv"]),
        "roc": ("train.tools.roc", ["--model", model, "--images", folder, "--output", out + ".csv"]),
        "quality": ("train.tools.quality", ["--model", model, "--images", folder, "--output", out + ".csv"]),
        "quality --pairs": ("train.tools.quality", ["--model", model, "--pairs", str(tmp_path / "pairs.txt"),
                                                    "--output", out + ".csv"]),
        "clean": ("train.tools.clean", ["--model", model, "--data", folder, "--output", out]),
    }


COMMANDS = ["embed", "verify", "ijb", "tinyface", "search", "cluster", "roc", "quality", "quality --pairs", "clean"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device, message", [
    ("mps", "--device mps, but torch sees no MPS device"),
    ("xpu:0", "--device xpu:0, but torch sees no XPU device"),
])
def test_every_command_says_there_is_no_such_device_before_any_work(tmp_path, capsys, no_other_devices, command,
                                                                     device, message):
    module, argv = _commands(tmp_path)[command]
    try:
        code = importlib.import_module(module).main([*argv, "--device", device])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert message in err.strip().splitlines()[-1], err
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("command", ["detect", "align"])
@pytest.mark.parametrize("device", ["mps", "xpu:0"])
def test_the_detector_tools_refuse_a_device_onnxruntime_does_not_run_on(tmp_path, capsys, mps_available, one_xpu,
                                                                        command, device):
    # Their --device is the detector's, which onnxruntime runs on the CPU or on CUDA: it was taken, and the
    # detector ran on the CPU without a word.
    from train.tools import align, detect

    argv = ["--detector", str(tmp_path / "det.onnx"), "--images", str(tmp_path), "--device", device,
            "--output", str(tmp_path / ("out.txt" if command == "detect" else "out"))]
    with pytest.raises(SystemExit) as exit_info:
        (detect if command == "detect" else align).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    kind = device.split(":")[0]
    assert err.strip().splitlines()[-1].endswith(
        f"--device {device}: the detector runs on onnxruntime, here on cpu or cuda (with onnxruntime-gpu), not on "
        f"{kind}: leave --device out"), err
    assert not os.path.exists(tmp_path / "out.txt") and not os.path.exists(tmp_path / "out")


def test_align_says_a_device_name_that_is_none(tmp_path, capsys):
    # (detect said it; align, with --detector, gave torch's traceback once the photos were listed)
    from train.tools import align

    with pytest.raises(SystemExit) as exit_info:
        align.main(["--detector", str(tmp_path / "det.onnx"), "--images", str(tmp_path), "--device", "gpu",
                    "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip().splitlines()[-1].endswith("--device 'gpu' is not a device (cpu, cuda, cuda:1, ...)"), err


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_clean_under_torchrun_refuses_mps_and_xpu_before_the_process_group(tmp_path, capsys, monkeypatch,
                                                                           mps_available, one_xpu, device):
    # One process on mps or xpu embeds as on cuda; several would all take the one device, through gloo: untried.
    # (it went on to init_process_group, which waits for the other ranks)
    from train.tools import clean

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("the process group was started"))
    code = clean.main(["--model", str(tmp_path / "absent.pt"), "--data", str(tmp_path), "--output",
                       str(tmp_path / "out"), "--embeddings", str(tmp_path / "e.npy"), "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert (f"--device {device} under torchrun: clean's processes share out CUDA devices, or run on the CPU; on "
            f"{device} run one process (python -m train.tools.clean)") in err.strip().splitlines()[-1], err


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, index):
        return torch.full((3, 4, 4), index, dtype=torch.uint8), ""


def test_the_images_are_copied_to_a_device_other_than_cuda_without_non_blocking(monkeypatch):
    # A non-blocking copy from pageable memory to mps can read the batch's memory after it is freed
    # (pytorch/pytorch#139550): only CUDA, whose batches are pinned, copies without blocking. Shown on the
    # CPU, the one device here that is not CUDA.
    copies, to = [], torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
    features = embed_images(backbone, _Images(), device="cpu", batch_size=2, workers=0)
    assert features.shape == (5, 8) and np.isfinite(features).all()
    assert copies and not any(copies), copies


def test_an_onnx_model_on_mps_or_xpu_is_said_to_run_on_the_cpu(tmp_path, capsys):
    # embed, search, ... --device mps with an ONNX --model or --detector: onnxruntime runs it on the CPU (the
    # PyTorch work, the cosines, on the device); it was said of CUDA without onnxruntime-gpu alone.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from train.onnx_backbone import open_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    path = str(tmp_path / "identity.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    open_session(path, "cpu")
    assert capsys.readouterr().err == ""
    open_session(path, torch.device("mps"))
    assert capsys.readouterr().err == (f"note: {path} runs on the CPU: onnxruntime is given the CPU or CUDA only here "
                                       "(what PyTorch computes runs on mps)\n")


def test_the_tests_hand_made_onnx_models_name_an_ir_version_every_admitted_onnxruntime_reads():
    # onnx.helper.make_model writes onnx's own newest IR version unless told, which an older onnxruntime refuses:
    # on Python 3.9, whose newest are onnx 1.19 (IR 12) and onnxruntime 1.19.2 (IR 10 at most), "Unsupported model
    # IR version: 12, max supported IR version: 10". IR 8 is opset 17's, read from onnxruntime 1.17 on (pyproject's
    # lower bound is 1.19).
    import ast
    import pathlib

    tests = pathlib.Path(__file__).resolve().parents[1]
    calls = [(path, node) for path in sorted(tests.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "make_model"]  # helper.make_model
    unnamed = [f"{path.relative_to(tests)}:{node.lineno}" for path, node in calls
               if {k.arg: getattr(k.value, "value", None) for k in node.keywords}.get("ir_version") != 8]
    assert len(calls) >= 2  # test_export's, and the one above
    assert unnamed == []


# torch's two wordings of an operator without a kernel on the device (torch 2.x; the first from MPS's
# fallback, the second from the dispatcher), as users have reported them
_NO_ROLL_ON_MPS = ("The operator 'aten::roll' is not currently implemented for the MPS device. If you want this op to "
                   "be considered for addition please comment on https://github.com/pytorch/pytorch/issues/141287 and "
                   "mention use-case, that resulted in missing op as well as commit hash. As a temporary fix, you can "
                   "set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this "
                   "op. WARNING: this will be slower than running natively on MPS.")
_NO_KERNEL_ON_XPU = ("Could not run 'aten::_linalg_eigh.eigenvalues' with arguments from the 'XPU' backend. This could "
                     "be because the operator doesn't exist for this backend, or was omitted during the "
                     "selective/custom build process (if using custom build).")


@pytest.mark.parametrize("text, line", [
    (_NO_ROLL_ON_MPS, "this torch has no MPS kernel for aten::roll: start the command again with "
                      "PYTORCH_ENABLE_MPS_FALLBACK=1 in its environment (torch then runs that operator on the CPU), "
                      "or use --device cpu"),
    (_NO_KERNEL_ON_XPU, "this torch has no XPU kernel for aten::_linalg_eigh.eigenvalues: start the command again "
                        "with PYTORCH_ENABLE_XPU_FALLBACK=1 in its environment (torch then runs that operator on the "
                        "CPU), or use --device cpu")])
def test_an_operator_torch_lacks_on_the_device_is_one_line(tmp_path, capsys, monkeypatch, text, line):
    # a tool's inference on mps/xpu meets an operator torch has no kernel for there: one line and exit 2, as
    # any bad input, where it was torch's traceback
    from train.embed import run_stoppable
    from train.signals import run_tool
    from train.tools import search

    def lacking(*args):
        raise NotImplementedError(text)

    assert run_tool(lacking, tool="search") == 2
    assert capsys.readouterr().err == f"search: error: {line}\n"
    monkeypatch.setattr(search, "run", lacking)  # through a tool's main, past its argument checks
    assert search.main(["--model", "m.pt", "--gallery", "g", "--probes", "p", "--output", "out.csv"]) == 2
    assert capsys.readouterr().err == f"search: error: {line}\n"
    assert run_stoppable(lacking, [], "ijb") == 2  # ijb's and tinyface's
    assert capsys.readouterr().err == f"ijb: error: {line}\n"
    from train.tools import clean
    monkeypatch.setattr(clean, "run", lacking)
    assert clean.main(["--model", "m.pt", "--data", "d", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"clean: error: {line}\n"


def test_another_not_implemented_error_stays_a_traceback(tmp_path, monkeypatch):
    # a NotImplementedError of the project's own (an abstract method) is a bug, shown whole
    from train.embed import run_stoppable
    from train.signals import run_tool

    def abstract(*args):
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        run_tool(abstract, tool="search")
    with pytest.raises(NotImplementedError):
        run_stoppable(abstract, [], "ijb")
    from train.tools import clean
    monkeypatch.setattr(clean, "run", abstract)
    with pytest.raises(NotImplementedError):
        clean.main(["--model", "m.pt", "--data", "d", "--output", str(tmp_path / "out")])
