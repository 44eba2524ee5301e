"""Ctrl-C and SIGTERM in the command-line tools: a stop unwinds (``finally`` blocks remove what was
half made) and the tool exits with 128 + the signal's number, without a traceback; the steps that
write a tool's outputs hold the signals until the outputs are whole, and a stop after them says the
outputs were written."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by Ctrl-C (SIGINT) or SIGTERM inside :func:`stop_on_signals`.
    A BaseException, as KeyboardInterrupt is, so that an ``except Exception`` around code that fails
    in many ways (torch's ONNX exporter, onnxruntime) does not take the stop for that code's failure.
    ``after_writing``: a :func:`signals_held` block of that run had ended whole before the stop
    (the outputs are in place)."""

    def __init__(self, number: int, after_writing: bool = False):
        super().__init__(number)
        self.number, self.name = number, signal.Signals(number).name
        self.after_writing = after_writing

    @property
    def exit_status(self) -> int:
        return 128 + self.number


class _Run:
    written = False


_runs: list[_Run] = []  # the stop_on_signals blocks running, innermost last


def _main_thread() -> bool:
    """Only the main thread sets signal handlers (and Python runs them there)."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handled_by(handler: Callable):
    """``handler`` takes Ctrl-C and SIGTERM while the block runs, but for a signal the process was started
    ignoring (``nohup``, a job started in the background by a script), which stays ignored; the handlers of
    before are back once it ends."""
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number, before in previous.items():
        if before != signal.SIG_IGN:
            signal.signal(number, handler)
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before if before is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM raise :class:`Stopped` in the main thread while the block runs. After the
    first, both are ignored until the block ends, so that a second Ctrl-C (a key held, or pressed again
    while worker processes are ended) cannot interrupt the clean-up with a traceback; the handlers of
    before are back once it ends. A signal the process was started ignoring (``nohup``, a job started
    in the background by a script) stays ignored. Outside the main thread it changes nothing."""
    if not _main_thread():
        yield
        return
    run = _Run()

    def stop(number, frame):
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(number, after_writing=run.written)

    with _handled_by(stop):
        _runs.append(run)
        try:
            yield
        finally:
            _runs.remove(run)


@contextlib.contextmanager
def stop_while_importing(module: str, prefix: str):
    """Around a tool's imports (torch: seconds). Run as ``python -m train.<tool>`` (``module`` is
    ``"__main__"``), Ctrl-C or SIGTERM there is the line of a stop before any work, ``stopped by SIGINT:
    nothing written``, and exit 128 + the signal's number, not a KeyboardInterrupt traceback or an end
    by the signal without a word; the handlers of before are back once the imports are done (then
    :func:`run_tool` takes over). Imported as a module, or outside the main thread: nothing changes.
    Imported as ``"__mp_main__"`` (a spawned worker of the tool's pool or loader re-imports the tool so):
    Ctrl-C is ignored, it is the main process's.
    ``prefix``: what the tool's other lines begin with, its name (``"cluster: "``), the line's beginning too."""
    if module == "__mp_main__" and _main_thread():  # the tool's worker, started by spawn (macOS's default)
        # A Ctrl-C at the terminal reaches the whole process group, and the tool's main process says it in one
        # line: its worker ignores it (until its pool's initializer or loader's worker_init_fn takes over), where
        # each worker, importing torch for seconds, added a KeyboardInterrupt traceback under that line.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if module != "__main__" or not _main_thread():
        yield
        return

    def stop(number, frame):
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        with readers_may_leave():  # (a Ctrl-C ends a pipe's reader too: the line raised, exit status 120)
            print(f"{prefix}stopped by {signal.Signals(number).name}: nothing written", file=sys.stderr)
        raise SystemExit(128 + number)

    with _handled_by(stop):
        yield


def stop_with_the_main_process() -> None:
    """For a pool's worker process (its initializer): Ctrl-C ignored, SIGTERM's default action. A Ctrl-C at the
    terminal reaches the whole process group, and it is the main process's to handle (it ends its workers, with a
    SIGTERM each where the pool terminates them); a forked worker inherits the main process's handlers, whose
    SIGTERM would raise in the worker rather than end it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def trainer_stop_line(message: str) -> str:
    """A line of a stop that each of ``python -m train``'s processes says for itself (at start-up, a second
    signal): ``message`` (``stopped by SIGINT ...``) in one process; ``train: rank R: <message>`` under torchrun
    (WORLD_SIZE > 1), in the form of its error lines (``train: error: rank R: ...``), the rank telling which
    process a signal stopped. Here, not in train.trainer: ``python -m train`` says it while importing torch too."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"train: rank {int(os.environ.get('RANK', '0'))}: {message}"
    return message


def trainer_start_up_stop_line(name: str) -> str:
    """:func:`trainer_stop_line` of a stop before the first step (``name``: ``SIGINT``), said by
    ``python -m train`` while it imports torch and by train.trainer while it sets the run up."""
    return trainer_stop_line(f"stopped by {name} during the start-up, before the first step")


@contextlib.contextmanager
def signals_held(final: bool = True):
    """Ctrl-C and SIGTERM wait while the block runs, and arrive as it ends: a block of renames that must
    all happen, or none, is not cut in the middle. A block that ends normally marks the
    :func:`stop_on_signals` run it is in as written (not with ``final`` False: files written into a
    staging folder that the run moves into place later), so that a stop from then on (the one that
    waited, or one during the report after it) comes with ``after_writing`` set and the tool says its
    outputs are in place rather than that nothing was written.

    The signals are not blocked (a thread's signal mask holds only that thread, and a process-wide
    signal goes to any thread that does not block it: torch's own threads): for the block, their
    handler notes them; the main thread runs Python's handlers, so none is missed."""
    if not _main_thread():
        yield
        if _runs and final:
            _runs[-1].written = True
        return
    came = []

    def note(number, frame):
        came.append(number)

    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    try:
        with _handled_by(note):
            yield
            if _runs and final:
                _runs[-1].written = True
    finally:
        if came:
            handler = previous[came[0]]
            if callable(handler):
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(came[0])  # its default action: the process ends by it


_MISSING_OP = re.compile(r"(?:The operator|Could not run) '([^']+)'.*?"
                         r"(?:for the|from the) '?(MPS|XPU)'? (?:device|backend)", re.DOTALL)


def missing_device_op(error: BaseException) -> str | None:
    """One line for torch's NotImplementedError of an operator that has no kernel on Apple's mps or
    Intel's xpu (the tools' inference there is plain PyTorch that has not run on either), saying what
    to do; None for any other NotImplementedError, which stays a bug to see whole."""
    found = _MISSING_OP.search(str(error))
    if not isinstance(error, NotImplementedError) or found is None:
        return None
    operator, device = found.groups()
    fallback = (f"start the command again with PYTORCH_ENABLE_{device}_FALLBACK=1 in its environment (torch then runs "
                f"that operator on the CPU), or ")
    return f"this torch has no {device} kernel for {operator}: {fallback}use --device cpu"


def point_at_devnull(stream) -> None:
    """``stream``, whose reader has gone (a BrokenPipeError), written to /dev/null from now on: its file
    descriptor made /dev/null's, the bytes the pipe refused (kept in its buffer) flushed there, so that the
    interpreter's last flush fails silently too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
    with contextlib.suppress(BrokenPipeError):
        stream.flush()


class ReaderMayLeave:
    """A stream (``sys.stderr``, ``sys.stdout``) whose reader may go away (``python -m train ... 2>&1 | head``,
    ``less`` quit): from its first BrokenPipeError on, it points at /dev/null (:func:`point_at_devnull`, as
    :func:`train.tools.say` does), and the work carries on to its outputs: a training run to its checkpoints
    (what it says goes to its training.log still), a tool to its files. The error ended them, a run without
    the checkpoint of its last steps, a tool with nothing written."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            point_at_devnull(self.stream)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            point_at_devnull(self.stream)

    def __getattr__(self, name):  # isatty, fileno, encoding: the stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def readers_may_leave():
    """``sys.stdout`` and ``sys.stderr`` as :class:`ReaderMayLeave` while in the block (each one with a file
    descriptor: pytest's captured streams and the like are left as they are). Flushed through it at the end:
    stdout in a pipe is block-buffered, and what waited in its buffer failed at the interpreter's last flush
    (exit status 120)."""
    streams = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        with contextlib.suppress(AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is an OSError)
            stream.fileno()
            streams[name] = ReaderMayLeave(stream)
            setattr(sys, name, streams[name])
    try:
        yield
    finally:
        for name, wrapper in streams.items():
            with contextlib.suppress(OSError, ValueError):  # (a full disk: the interpreter's last flush says it)
                wrapper.flush()
            if isinstance(getattr(sys, name), ReaderMayLeave):
                setattr(sys, name, wrapper.stream)


def run_tool(work: Callable[[], int], *, tool: str, errors: tuple[type[BaseException], ...] = (OSError, ValueError),
             whole: str = " as the outputs were written: they are whole",
             said: Callable[[Stopped], str | None] | None = None, blank_line: bool = True,
             out: Callable[..., None] = print) -> int:
    """A command-line tool's ``work()`` (its exit status) under :func:`stop_on_signals`: one of ``errors``
    is a line ``<tool>: error: ...`` (``tool``: its short name, ``embed``, ``roc``) and exit status 2;
    Ctrl-C or SIGTERM a line ``<tool>: stopped by SIGINT`` followed by ``whole`` when its outputs were in
    place (``after_writing``), else ": nothing written", or by what ``said(stop)`` gives where that is not
    None; and exit 128 + the signal's number.
    An operator torch lacks on mps or xpu is a line and exit status 2 too (:func:`missing_device_op`).
    ``blank_line``: a line break first, ending a line of progress the stop cut. ``out`` prints the lines
    (to stderr): ``print``, or a benchmark's ``train.tools.say`` (:func:`train.embed.run_stoppable`).
    A run that fails or is stopped takes back the folders it made for its outputs, while empty
    (:func:`train.tools.taking_back_folders`)."""
    from train.tools import taking_back_folders

    prefix = f"{tool}: "
    with readers_may_leave():  # (its lines too: a reader gone, they raised where they were said)
        try:
            with stop_on_signals():
                return taking_back_folders(work)
        except errors as error:
            out(f"{prefix}error: {error}", file=sys.stderr)
            return 2
        except NotImplementedError as error:
            text = missing_device_op(error)
            if text is None:
                raise
            out(f"{prefix}error: {text}", file=sys.stderr)
            return 2
        except Stopped as stop:
            text = said(stop) if said is not None else None
            if text is None:
                text = whole if stop.after_writing else ": nothing written"
            out(f"{chr(10) if blank_line else ''}{prefix}stopped by {stop.name}{text}", file=sys.stderr)
            return stop.exit_status
