"""Shared test machinery: the `cuda` and `slow` markers, the one tolerance table, and comparisons
that say where and by how much two tensors differ. Test modules import the helpers with
`from conftest import ...` (tests/ is not a package, so pytest puts it on sys.path)."""
import contextlib
import importlib.util
import multiprocessing.forkserver
import os
import pathlib
import signal
import sys
import threading
import time

import pytest
import torch

import emulator

# dtype of the compared tensor -> (atol, rtol). atol is relative to the largest magnitude in the
# expected tensor (gradients hold entries near zero that no elementwise rtol can hold), rtol is
# elementwise: |actual - expected| <= atol * max|expected| + rtol * |expected|.
# fp64 and fp32 are the "1e-10" and "1e-5 relative"; a 16-bit gradient is rounded once on
# the way out, so its tolerance is one ulp of that dtype. Losses are always fp32 or fp64.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# (m1, m2, m3, lambda_) of the margin families the issue names.
MARGINS = {
    "arcface": (1.0, 0.5, 0.0, 0.0),
    "cosface": (1.0, 0.0, 0.35, 0.0),
    "sphereface": (4.0, 0.0, 0.0, 0.0),
    "sphereface_lambda": (4.0, 0.0, 0.0, 5.0),
    "combined": (1.0, 0.3, 0.2, 0.0),
}


def margin_kwargs(name):
    m1, m2, m3, lambda_ = MARGINS[name]
    return dict(m1=m1, m2=m2, m3=m3, lambda_=lambda_)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (whole trainer and tool runs in subprocesses, torchrun "
                          "groups, the emulator's build): about seven more minutes on a 2-core CPU; CI runs them")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when none is visible)")
    config.addinivalue_line("markers", "gpu_only: needs a real GPU even where the CUDA emulator runs the "
                                       "`cuda` tests (memory, streams, devices)")
    config.addinivalue_line("markers", "slow: over about a second on a 2-core CPU (a trainer, tool or torchrun run "
                                       "in subprocesses); skipped unless --runslow is given")
    if emulator.EMULATED:
        emulator.install()


def _skip_slow_tests(config, items):
    """`python -m pytest -q` (the README's command) takes a few minutes: the tests marked slow, most of
    the suite's time, are skipped unless --runslow is given (CI gives it in a run of its own)."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI does)")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


# The op's own correctness files: a user's check of an install runs all of them, whatever their time.
CORE_TEST_FILES = frozenset({"test_op.py", "test_reference.py", "test_row_margins.py", "test_subcenter.py",
                             "test_other_devices.py", "test_sampling.py", "test_chunked.py", "test_readme.py",
                             "test_cuda.py", "test_fuzz.py"})
# A test of the quick run over this many seconds (set-up, call and tear-down) is named at its end: mark it
# slow. Three times the bar a test is marked at (about 1.5 s here), so that a loaded machine names none.
SLOW_REPORT_SECONDS = 4.5
_test_seconds: dict[str, float] = {}


def unmarked_slow_tests(seconds, threshold=SLOW_REPORT_SECONDS):
    """The ids of the tests in ``seconds`` (test id -> seconds) that took over ``threshold`` outside the core
    files, longest first (in the quick run a test marked slow is skipped, in no time)."""
    over = [nodeid for nodeid, took in seconds.items()
            if took > threshold and os.path.basename(nodeid.split("::")[0]) not in CORE_TEST_FILES]
    return sorted(over, key=lambda nodeid: -seconds[nodeid])


def pytest_runtest_logreport(report):
    _test_seconds[report.nodeid] = _test_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, config):
    """The quick run (no --runslow) keeps to a few minutes only while long tests are marked slow, and only
    their authors mark them: the ones that were not are named here, with their time."""
    if config.getoption("--runslow"):
        return
    over = unmarked_slow_tests(_test_seconds)
    if over:
        terminalreporter.write_line(f"{len(over)} test(s) of the quick run took over {SLOW_REPORT_SECONDS:g} s "
                                    "and are not marked slow: mark them @pytest.mark.slow")
        for nodeid in over:
            terminalreporter.write_line(f"  {_test_seconds[nodeid]:.1f} s {nodeid}")


@pytest.fixture(autouse=True)
def _ctrl_c_and_sigterm_as_from_a_terminal():
    """Each test runs with SIGINT raising KeyboardInterrupt and SIGTERM's default action, as in a process
    started from a terminal, whatever the handlers were; they are put back after it. pytest started as
    a background job of a script (``pytest ... &`` in a non-interactive shell, or a CI runner doing so)
    begins with SIGINT ignored, and train.signals.stop_on_signals keeps an ignored signal ignored (a
    job started in the background wants it so): a test's own Ctrl-C (os.kill(os.getpid(), SIGINT)) then
    did nothing, and the first such test failed (clean exited 0, not 130); a child process inherits
    the ignored SIGINT too, and the tests that Ctrl-C one skipped as 'finished before the signal'.
    A test that leaves a handler of its own behind no longer changes the tests after it either."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for number, handler in before.items():
        signal.signal(number, signal.SIG_DFL if handler is None else handler)  # (None: not set from Python)


@pytest.fixture(autouse=True)
def _torch_threads_as_before():
    """A test that changes torch's intra-op thread count leaves it as it was for the next: bench_loader's
    main() sets 1 (test_data's test_loader_benchmark_runs_on_a_pack_of_its_own), and the tests after it
    that do not set their own (test_detect, test_quality, test_roc, test_search, test_verification, ...)
    ran on one thread in a whole run and on every core when run alone, their float sums with it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_faulted_gpu_worker_lives_on(request):
    """On a GPU, after each `cuda` test, waits for its kernels. A kernel fault (an illegal address or
    instruction, a trap) leaves the process's CUDA context unusable: every later test in the process
    would fail at once and use up --maxfail (gpu_check.sh). Under pytest-xdist the worker then exits,
    and xdist reports the test as crashed and starts a fresh worker for the rest; in one process the
    error is this test's."""
    yield
    if emulator.EMULATED or request.node.get_closest_marker("cuda") is None or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:  # torch.AcceleratorError too
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(f"{request.node.nodeid}: the CUDA context is lost ({error}); this worker exits\n")
            sys.stderr.flush()
            os._exit(70)
        raise


@pytest.fixture(autouse=True)
def _wgmma_kernels_run_in_wgmma_tests(request):
    """On the emulator (CI), fails a test of tests/test_cuda.py that launched a wgmma kernel without
    saying wgmma in its id: gpu_check.sh runs that file's -k "not wgmma" tests apart from its
    -k wgmma ones, so that a tile the hardware reads otherwise cannot take the other paths' tests
    down with it. (tests/test_gpu_check.py checks the names statically; this sees tiles turned on
    through fixtures and helpers too. Tests that read the launch log themselves hide their launches.)"""
    watched = emulator.EMULATED and request.node.path.name == "test_cuda.py"
    if watched:
        emulator.take_launch_log()
    yield
    if watched and "wgmma" not in request.node.nodeid:
        launched = sorted({name for name in emulator.take_launch_log() if "wgmma" in name})
        if launched:
            pytest.fail(f"{request.node.nodeid} launched {launched} but does not say wgmma in its id: "
                        "gpu_check.sh would run it in the cuda stage, not in cuda-wgmma")


def pytest_collection_modifyitems(config, items):
    _skip_slow_tests(config, items)
    # Asked only when a collected test carries the marker, never at import time.
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    if emulator.EMULATED:
        # ARCFACE_EXT_EMULATE_CUDA=1: the CUDA source runs on the CPU (tests/emulator).
        skip = pytest.mark.skip(reason="needs a real GPU; the CUDA emulator runs the other `cuda` tests")
        for item in items:
            if item.get_closest_marker("gpu_only"):
                item.add_marker(skip)
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@contextlib.contextmanager
def largest_tensor_made():
    """Records every tensor the operations inside make (forward and backward): yields a one-element list
    whose item is, on leaving, the largest one's element count (to show no N x C matrix is formed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    largest = [0]

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())
            return out

    with Recording():
        yield largest


def _describe_mismatch(actual, expected, atol, rtol, name):
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    both_nan = a.isnan() & e.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    allowed = atol + rtol * e.abs()
    bad = diff > allowed
    lines = [f"{name}: {int(bad.sum())} of {e.numel()} elements differ "
             f"(atol={atol:.3g}, rtol={rtol:.3g}, shape {tuple(e.shape)})"]
    if bad.any():
        rel = diff / e.abs()  # inf where expected is 0
        worst = int(diff.reshape(-1).argmax())
        lines.append(f"  max abs error {float(diff.max()):.6g} at {_index(worst, e.shape)}, "
                     f"max rel error {float(rel[bad].max()):.6g}, max |expected| {float(e.abs().max()):.6g}")
        for flat in bad.reshape(-1).nonzero().reshape(-1)[:5].tolist():
            idx = _index(flat, e.shape)
            lines.append(f"  at {idx}: actual {float(a.reshape(-1)[flat]):.10g}, "
                         f"expected {float(e.reshape(-1)[flat]):.10g}")
    return bad.any(), "\n".join(lines)


def _index(flat, shape):
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape))) if len(shape) else ()


def assert_close_report(actual, expected, *, atol, rtol, name="tensor"):
    """Elementwise |actual - expected| <= atol + rtol * |expected| (NaN matches NaN); on failure
    the message names the first mismatching indices and the largest absolute/relative errors."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    failed, report = _describe_mismatch(actual, expected, atol, rtol, name)
    assert not failed, report


def assert_matches_reference(actual, expected, *, name="tensor", dtype=None, min_scale=0.0):
    """Compares against the reference with the table's tolerance for `dtype` (by default the
    actual tensor's dtype), atol scaled by the expected tensor's largest magnitude (or by
    min_scale, where the expected values are all (near) zero)."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    finite = expected.detach()[expected.detach().isfinite()]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, min_scale)
    assert_close_report(actual, expected, atol=atol * scale, rtol=rtol, name=name)


def random_inputs(n, dim, num_classes, *, seed, dtype=torch.float64, ignored=(), device="cpu"):
    """Embeddings (n, dim), class centres (num_classes, dim) and labels (rows ``ignored`` set to -1), drawn in
    fp64 on the CPU from ``seed``, so that every dtype and every device sees the same values (rounded once to
    ``dtype``), then moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[list(ignored)] = -1
    return embeddings.to(device, dtype), weight.to(device, dtype), labels.to(device)


def loss_and_grads(loss_fn, embeddings, weight, labels, *, grad_seed=0, **kwargs):
    """Runs loss_fn on fresh leaf copies of embeddings and weight and back-propagates: 1 for a
    scalar loss, a fixed uneven weight per row for reduction="none" (so that per-row scaling is
    exercised). Returns (loss, target_cosine or None, grad_embeddings, grad_weight)."""
    x = embeddings.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = loss_fn(x, w, labels, **kwargs)
    loss, target_cosine = out if isinstance(out, tuple) else (out, None)
    if loss.dim() == 0:
        loss.backward()
    else:
        generator = torch.Generator().manual_seed(grad_seed)
        upstream = torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5
        (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    return loss.detach(), target_cosine, x.grad, w.grad


NON_FINITE_CASES = ["nan-row", "inf-row", "nan-class", "inf-class", "nan-target-class"]


def put_non_finite(case, embeddings, weight, labels):
    """Puts a NaN or inf into row 1 of the embeddings, into row 3's target centre (class 7), or into
    the last class centre (no row's target), in place."""
    bad = float("nan") if case.startswith("nan") else float("inf")
    labels[3] = 7
    if case.endswith("row"):
        embeddings[1, 5] = bad
    elif case == "nan-target-class":
        weight[7, 2] = bad
    else:
        weight[-1, 0] = bad


def assert_non_finite_where_expected(ours, expected, names):
    """Each output is non-finite exactly where the expected one is (by row for 2-D gradients), and the
    gradients are somewhere."""
    for name, a, e in zip(names, ours, expected):
        a_bad = ~a.isfinite() if a.dim() < 2 else ~a.isfinite().all(dim=1)
        e_bad = ~e.isfinite() if e.dim() < 2 else ~e.isfinite().all(dim=1)
        assert torch.equal(a_bad.cpu(), e_bad.cpu()), (f"{name}: non-finite at {a_bad.nonzero().flatten().tolist()}, "
                                                       f"expected at {e_bad.nonzero().flatten().tolist()}")
    assert bool(e_bad.any()), "the case must reach the gradients"


def settle(group=None):
    """Before a gloo group is destroyed. Before torch 2.8, destroying one held the GIL while joining
    its worker threads, one of which could still be releasing a finished collective's tensors, which
    takes the GIL (pytorch#154976): seen hung on 2.4.1. A barrier and a pause that lets go of the GIL
    give the threads time to finish first."""
    torch.distributed.barrier(group=group)
    time.sleep(0.1)


class HeldFile:
    """A named pipe at ``path`` standing in for a file that a tool under test reads (one image among its
    inputs): the process that opens it waits there until :meth:`release`, then reads ``data``, and the
    path is a plain file of ``data`` for whoever opens it after (a rerun). A run that reads it cannot
    end before the release, so a signal sent once :meth:`wait_for_reader` returns reaches the tool mid-run
    whatever the load; a wait for its progress alone did not (the run could end first on a loaded
    machine, and the test skipped). ``data`` must fit a pipe's buffer (on Linux, made as large as
    /proc/sys/fs/pipe-max-size allows). A context manager that releases on leaving."""

    def __init__(self, path, data: bytes):
        self.path, self.data = str(path), data
        self._writer = None
        os.mkfifo(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def wait_for_reader(self, process, timeout: float = 60) -> None:
        """Returns once a process has opened the file (it then waits for the data); fails if
        ``process`` (a ``subprocess.Popen``) ends first or ``timeout`` seconds pass."""
        import errno

        deadline = time.monotonic() + timeout
        while self._writer is None:
            try:  # without a reader, a writer's non-blocking open fails with ENXIO
                self._writer = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise
                assert process.poll() is None, f"the run ended (exit status {process.returncode}) before it read " \
                                               f"{self.path}"
                assert time.monotonic() < deadline, f"no process opened {self.path} within {timeout} s"
                time.sleep(0.01)

    def release(self) -> None:
        """The reader (if any) gets ``data``, and the path becomes a plain file of it. Idempotent."""
        import fcntl
        import stat

        if not stat.S_ISFIFO(os.lstat(self.path).st_mode):
            return
        # Held open for reading and writing (which never waits on Linux) while the path is replaced: a
        # reader that opens the pipe meanwhile waits for this data rather than for a writer that never
        # comes, and the data stays in the buffer where no reader came or the reader has ended.
        holder = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        try:
            # Linux's, up to pipe-max-size (Python names them from 3.10; 3.9 has the numbers of fcntl(2) alone)
            linux = sys.platform.startswith("linux")
            get_size = getattr(fcntl, "F_GETPIPE_SZ", 1032 if linux else None)
            set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031 if linux else None)
            if get_size is not None and len(self.data) > fcntl.fcntl(holder, get_size):
                fcntl.fcntl(holder, set_size, len(self.data))
            folder, name = os.path.split(self.path)
            plain = os.path.join(folder, f".{name}.held")  # no image's name: no tool lists it
            with open(plain, "wb") as f:
                f.write(self.data)
            os.replace(plain, self.path)
            written = os.write(holder, self.data)  # into an empty buffer that holds it all
            assert written == len(self.data), f"{self.path}: {written} of {len(self.data)} bytes went into the pipe"
        finally:
            os.close(holder)
            if self._writer is not None:
                os.close(self._writer)
                self._writer = None


def spawn_ranks(worker, args, nprocs, timeout=240):
    """torch.multiprocessing.spawn(worker, args, nprocs), each rank forked from a forkserver that imported
    torch and arcface_ext once, where a spawned rank imports them itself: 2-3 s of CPU a rank on the CI
    machine's two cores. As a spawned rank does, each takes the caller's environment, working directory
    and, from OMP_NUM_THREADS, its thread count. Ranks still running after `timeout` seconds (one waiting
    in a collective that another never joins) are killed, and the call raises TimeoutError."""
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "arcface_ext"])  # read at its start
    # Started (once) without OMP_NUM_THREADS, so that a rank without it has torch's default thread count.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("OMP_NUM_THREADS", raising=False)
        multiprocessing.forkserver.ensure_running()
    ranks = torch.multiprocessing.start_processes(_spawned_rank, args=(worker, dict(os.environ), os.getcwd(), args),
                                                  nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError(f"{worker.__name__}: {nprocs} rank(s) still running after {timeout} s; killed")


def _spawned_rank(rank, worker, environ, cwd, args):
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    worker(rank, *args)


def load_benchmark(name):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
