"""arcface_ext.optim's SGD and AdamW against torch.optim's: the same parameters, state and state dicts bit
for bit, checkpoints resumed either way, and without torch's parameter-sized temporaries."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from arcface_ext.optim import SGD, AdamW

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpu_only])])
@pytest.mark.parametrize("foreach", [None, False, True])  # None: the default, the trainer's
def test_sgd_steps_as_torchs_bit_for_bit(foreach, device):
    # Weight decay added to the gradients in place: the same parameters, momentum and state dict as
    # torch.optim.SGD's, so that checkpoints of either resume alike. A group without decay, one that
    # maximizes (torch's own path), a parameter without a gradient, nesterov, a first step without momentum.
    # On a GPU too, where torch's foreach kernels do the adding (gpu_check.sh's suite stage runs it).
    def steps(optimizer_class):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(300, 16, generator=gen).to(device)) for _ in range(5)]
        groups = [{"params": params[:2]}, {"params": params[2:3], "weight_decay": 0.0},
                  {"params": params[3:4], "maximize": True}, {"params": params[4:], "nesterov": True}]
        optimizer = optimizer_class(groups, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=foreach)
        for step in range(6):
            for index, param in enumerate(params):
                param.grad = None if (index, step) == (1, 2) else torch.randn(param.shape, generator=gen).to(device)
            optimizer.step()
        return params, optimizer.state_dict()

    ours, ours_state = steps(SGD)
    torchs, torchs_state = steps(torch.optim.SGD)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
    assert ours_state["param_groups"] == torchs_state["param_groups"]
    assert ours_state["state"].keys() == torchs_state["state"].keys()
    assert all(torch.equal(ours_state["state"][k]["momentum_buffer"], torchs_state["state"][k]["momentum_buffer"])
               for k in ours_state["state"])


@pytest.mark.parametrize("optimizer_class", [SGD, AdamW])
def test_a_closure_steps_as_in_torchs(optimizer_class, monkeypatch):
    # PyTorch Lightning steps every optimizer with a closure that runs the training step and its backward, then
    # clips the gradients: ours refused one (ValueError). Called first, as torch's steps call it, in grad mode.
    monkeypatch.setattr(AdamW, "slice_numel", 100)  # the large parameter stepped a slice at a time
    torch_class = optimizer_class.__mro__[1]
    options = {"momentum": 0.9} if optimizer_class is SGD else {}

    def steps(cls):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(30, 8), (7,)]]
        optimizer = cls(params, lr=0.1, weight_decay=0.05, **options)
        losses = []
        for _ in range(3):
            inputs = [torch.randn(p.shape, generator=gen) for p in params]

            def closure():
                optimizer.zero_grad()
                loss = sum((p * x).square().sum() for p, x in zip(params, inputs))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                return loss

            with torch.no_grad():  # as Lightning's step is called; the closure needs grad mode
                losses.append(optimizer.step(closure))
        return params, losses, optimizer.state_dict()

    ours, ours_losses, ours_state = steps(optimizer_class)
    torchs, torchs_losses, torchs_state = steps(torch_class)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
    assert all(torch.equal(a, b) for a, b in zip(ours_losses, torchs_losses))
    assert ours_state["state"].keys() == torchs_state["state"].keys()
    for index, state in torchs_state["state"].items():
        assert all(torch.equal(ours_state["state"][index][key], value) for key, value in state.items())


def test_sgd_fused_under_a_grad_scaler_steps_as_torchs():
    # Fused, torch's kernel unscales the gradients itself (GradScaler hands it grad_scale): a decay added to
    # the still-scaled gradients before it would be divided by the scale (the update 0.1 off here).
    def steps(optimizer_class):
        gen = torch.Generator().manual_seed(5)
        param = torch.nn.Parameter(torch.randn(50, 8, generator=gen))
        optimizer = optimizer_class([param], lr=0.1, momentum=0.9, weight_decay=0.05, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            optimizer.zero_grad()
            scaler.scale((param * torch.randn(param.shape, generator=gen)).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        return param

    try:
        torchs = steps(torch.optim.SGD)
    except RuntimeError as error:  # a torch without CPU fused SGD or a CPU GradScaler
        pytest.skip(str(error))
    assert torch.equal(steps(SGD), torchs)


def test_sgd_runs_its_step_hooks_once():
    # torch wraps each optimizer class's step in its hooks when the first of that class is made: once
    # torch.optim.SGD has one, this SGD's step must not run them again through torch's.
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer, calls = SGD([param], lr=0.1, weight_decay=0.1), []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    param.grad = torch.ones(3)
    optimizer.step()
    assert calls == ["pre", "post"]
    assert torch.equal(param.detach(), torch.full((3,), 1 - 0.1 * 1.1))


# The optimizers whose second step test_*_makes_no_* measure, and their arguments.
SECOND_STEPS = {"SGD": dict(lr=0.1, momentum=0.9, weight_decay=5e-4), "AdamW": dict(lr=1e-3, weight_decay=0.1)}


@pytest.fixture(scope="module")
def second_step_extra_mb():
    """What a second step of ours and of torch's optimizers (SECOND_STEPS) adds to the resident set at its
    peak, in MB, for 256 MB of fp32 centres, by (name, "ours" or "torch"): each in a process of its own, its
    peak resident set reset before the step (glibc's mmap threshold pinned, so that freed temporaries leave
    the resident set). The processes are forked from one child that imported torch once (not a child each,
    which took 2 s of CPU to import it)."""
    code = (
        "import os, sys, torch\n"
        "import arcface_ext.optim\n"
        "def mb(key): return int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]) // 1024\n"
        "def extra(module, name, arguments):\n"
        "    centres = torch.nn.Parameter(torch.zeros(125_000, 512))  # 256 MB of fp32\n"
        "    centres.grad = torch.ones_like(centres)\n"
        "    optimizer = getattr(module, name)([centres], **arguments)\n"
        "    optimizer.step()  # the state made\n"
        "    before = mb('VmRSS')\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "    optimizer.step()\n"
        "    return mb('VmHWM') - before\n"
        f"for name, arguments in {SECOND_STEPS!r}.items():\n"
        "    for kind, module in (('ours', arcface_ext.optim), ('torch', torch.optim)):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            code = 1\n"
        "            try:\n"
        "                print(name, kind, extra(module, name, arguments), flush=True)\n"
        "                code = 0\n"
        "            finally:\n"
        "                os._exit(code)\n"
        "        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, (name, kind)\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=240)
    assert child.returncode == 0, child.stderr[-2000:]
    return {(name, kind): int(mb) for name, kind, mb in (line.split() for line in child.stdout.splitlines())}


@pytest.mark.slow
def test_sgd_makes_no_copy_of_the_gradients(second_step_extra_mb):
    # torch's SGD copies each gradient to add the weight decay to it: at a million 512-D class centres,
    # 1.95 GB at the step's peak.
    extra = {kind: second_step_extra_mb["SGD", kind] for kind in ("ours", "torch")}
    assert extra["torch"] > 200, extra  # the copy this measures is seen
    assert extra["ours"] < 32, extra


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("optimizer_class", [SGD, AdamW])
def test_a_parameter_listed_twice_steps_as_in_torchs(optimizer_class, foreach, monkeypatch):
    # torch deprecates it (a warning) and steps the parameter once for each listing; ours had added SGD's
    # decay to its gradient twice in place, and AdamW's foreach slices differed. Such a group takes torch's path.
    monkeypatch.setattr(AdamW, "slice_numel", 1000)
    torch_class = optimizer_class.__mro__[1]
    options = {"momentum": 0.9} if optimizer_class is SGD else {}

    def steps(cls):
        gen = torch.Generator().manual_seed(5)
        large, small = (torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(50, 40), (7,)])
        with pytest.warns(UserWarning, match="duplicate"):
            optimizer = cls([large, small, large], lr=0.1, weight_decay=0.05, foreach=foreach, **options)
        for _ in range(3):
            large.grad, small.grad = torch.randn(large.shape, generator=gen), torch.randn(small.shape, generator=gen)
            optimizer.step()
        return large, small

    assert all(torch.equal(a, b) for a, b in zip(steps(optimizer_class), steps(torch_class)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpu_only])])
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_steps_as_torchs_bit_for_bit(amsgrad, foreach, device, monkeypatch):
    # Large tensors stepped a slice at a time by torch's functional AdamW: the same parameters, moments
    # and state dict as torch.optim.AdamW's. Slices of 1000 elements here (none divides the tensors), a
    # tensor of a slice or less and one of several, a group that maximizes and one without decay, a
    # parameter without a gradient for a step, one that is not contiguous (torch's own path), a group
    # of another lr. On a GPU too, where torch's default is foreach (gpu_check.sh's suite stage runs it).
    monkeypatch.setattr(AdamW, "slice_numel", 1000)

    def steps(first, then):  # three steps, a checkpoint's state dict loaded into a new optimizer, three more
        gen = torch.Generator().manual_seed(5)
        shapes = [(337, 17), (20,), (5003,), (64, 64), (90, 40)]
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in shapes]
        params[4] = torch.nn.Parameter(params[4].detach().t())  # (40, 90), not contiguous

        def build(optimizer_class):
            groups = [{"params": params[:2]}, {"params": params[2:3], "maximize": True, "weight_decay": 0.0},
                      {"params": params[3:], "lr": 0.01}]
            return optimizer_class(groups, lr=1e-3, weight_decay=0.1, amsgrad=amsgrad, foreach=foreach)

        optimizer = build(first)
        for step in range(6):
            if step == 3:
                saved = optimizer.state_dict()
                optimizer = build(then)
                optimizer.load_state_dict(saved)
            for index, param in enumerate(params):
                grad = torch.randn(param.shape, generator=gen).to(device)
                param.grad = None if (index, step) == (0, 2) else grad
            optimizer.step()
        return params, optimizer.state_dict()

    torchs, torchs_state = steps(torch.optim.AdamW, torch.optim.AdamW)
    # Ours throughout, and a checkpoint of either resumed in the other.
    for first, then in [(AdamW, AdamW), (torch.optim.AdamW, AdamW), (AdamW, torch.optim.AdamW)]:
        ours, ours_state = steps(first, then)
        assert all(torch.equal(a, b) for a, b in zip(ours, torchs)), (first, then)
        assert ours_state["param_groups"] == torchs_state["param_groups"]
        # In the same order (a checkpoint's bytes): the sliced tensors' states had come last.
        assert list(ours_state["state"]) == list(torchs_state["state"]), (first, then)
        for index, state in torchs_state["state"].items():
            assert ours_state["state"][index].keys() == state.keys()
            for key, value in state.items():
                assert ours_state["state"][index][key].dtype == value.dtype
                assert ours_state["state"][index][key].device == value.device
                assert torch.equal(ours_state["state"][index][key], value), (first, then, index, key)


def test_adamw_leaves_fused_and_step_hooks_to_torch(monkeypatch):
    # fused=True steps in torch's kernel (under a GradScaler it unscales there); hooks run once even
    # when torch.optim.AdamW's step has been wrapped in them as well.
    monkeypatch.setattr(AdamW, "slice_numel", 10)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def steps(optimizer_class, **options):
        gen = torch.Generator().manual_seed(5)
        param = torch.nn.Parameter(torch.randn(50, 8, generator=gen))
        optimizer, calls = optimizer_class([param], lr=0.1, weight_decay=0.05, **options), []
        optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
        optimizer.register_step_post_hook(lambda *_: calls.append("post"))
        for _ in range(3):
            param.grad = torch.randn(param.shape, generator=gen)
            optimizer.step()
        return param, calls

    (ours, calls), (torchs, _) = steps(AdamW), steps(torch.optim.AdamW)
    assert calls == ["pre", "post"] * 3
    assert torch.equal(ours, torchs)
    try:
        torchs, _ = steps(torch.optim.AdamW, fused=True)
    except RuntimeError as error:  # a torch without CPU fused AdamW
        pytest.skip(str(error))
    assert torch.equal(steps(AdamW, fused=True)[0], torchs)


def test_adamw_resumes_moments_of_another_memory_format(monkeypatch):
    # A checkpoint of a run with --channels-last resumed without it (an option a resume may change): the
    # moments load channels_last beside a contiguous parameter. torch's step takes them; the sliced one
    # raised (a view of them as one row). They step in torch's own step now, as torch's.
    monkeypatch.setattr(AdamW, "slice_numel", 1000)

    def resumed(optimizer_class):
        gen = torch.Generator().manual_seed(5)
        param = torch.nn.Parameter(torch.randn(10, 30, 2, 2, generator=gen).to(memory_format=torch.channels_last))
        optimizer = optimizer_class([param], lr=0.01, weight_decay=0.1)
        for step in range(4):
            if step == 2:
                saved = copy.deepcopy(optimizer.state_dict())  # (as torch.save keeps them: channels_last)
                param = torch.nn.Parameter(param.detach().contiguous())
                optimizer = optimizer_class([param], lr=0.01, weight_decay=0.1)
                optimizer.load_state_dict(saved)
            param.grad = torch.randn(param.shape, generator=gen)
            optimizer.step()
        return param, optimizer.state_dict()["state"][0]

    (ours, ours_state), (torchs, torchs_state) = resumed(AdamW), resumed(torch.optim.AdamW)
    assert torch.equal(ours, torchs)
    assert all(torch.equal(ours_state[key], torchs_state[key]) for key in torchs_state)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # (torch's own, inside dynamo)
def test_adamw_under_torch_compile_steps_each_tensor_once(monkeypatch):
    # torch.compile(optimizer.step): torch's step graph-breaks, so the sliced step was compiled as a frame of
    # its own, which took one sliced tensor's state for another's (step counts 5 and 1 after 3 steps). Now
    # the sliced tensors step eagerly (torch's eager results) and the rest in torch's compiled step.
    # On Python 3.12 and 3.13 dynamo compiled the choice of the sliced tensors too, and its groups say
    # capturable=True there: nothing was sliced (failed here; 3.11's dynamo runs that part of the step eagerly).
    monkeypatch.setattr(AdamW, "slice_numel", 1000)
    torch._dynamo.reset()

    def steps(optimizer_class, compiled):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(3000,), (20,), (50, 50)]]
        optimizer = optimizer_class(params, lr=0.01, weight_decay=0.1)
        step = torch.compile(optimizer.step, backend="eager") if compiled else optimizer.step
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, generator=gen)
            step()
        return params, [optimizer.state[param]["step"].item() for param in params]

    (ours, counts), (eager, _), (compiled, _) = (steps(AdamW, True), steps(torch.optim.AdamW, False),
                                                 steps(torch.optim.AdamW, True))
    torch._dynamo.reset()
    assert counts == [3.0, 3.0, 3.0]
    assert torch.equal(ours[0], eager[0]) and torch.equal(ours[2], eager[2])  # sliced
    assert torch.equal(ours[1], compiled[1])


@pytest.mark.slow
def test_adamw_makes_no_parameter_sized_temporaries(second_step_extra_mb):
    # torch's AdamW divides sqrt(exp_avg_sq) into new tensors the size of each parameter (two at once a
    # tensor at a time, the CPU's default): at a million 512-D class centres, 3.9 GB at the step's peak.
    extra = {kind: second_step_extra_mb["AdamW", kind] for kind in ("ours", "torch")}
    assert extra["torch"] > 400, extra  # the two temporaries this measures are seen
    assert extra["ours"] < 48, extra  # two slices of 16 MiB


def test_importing_the_package_imports_no_compiler():
    # torch.compiler.disable on AdamW's methods imported torch._dynamo at `import arcface_ext`: a second more for
    # every command and every process of a run (1.3 s here), which only a torch.compile of the step needs.
    code = ("import sys, torch; before = 'torch._dynamo' in sys.modules; import arcface_ext; "
            "print(before, 'torch._dynamo' in sys.modules)")
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.split()
    if before == "True":
        pytest.skip("this torch imports torch._dynamo itself")
    assert after == "False", "import arcface_ext imported torch._dynamo"
