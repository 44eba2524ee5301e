"""Ctrl-C and SIGTERM in the command-line tools: a stop unwinds (``finally`` blocks remove what was
half made) and the tool exits with 128 + the signal's number, without a traceback; the steps that
write a tool's outputs hold the signals until the outputs are whole."""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main process by Ctrl-C (SIGINT) or SIGTERM inside :func:`stop_on_signals`.
    A BaseException, as KeyboardInterrupt is, so that an ``except Exception`` around code that fails
    in many ways (torch's ONNX exporter, onnxruntime) does not take the stop for that code's failure."""

    def __init__(self, number: int):
        super().__init__(number)
        self.number, self.name = number, signal.Signals(number).name
        self.after_writing = False  # it came during a :func:`signals_held` block that then ended whole

    @property
    def exit_status(self) -> int:
        return 128 + self.number


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM raise :class:`Stopped` in the main process while the block runs. The first
    signal decides: the signals stay ignored after it until the process exits, so that a second
    Ctrl-C (a key held, or pressed again while worker processes are ended) cannot interrupt the
    clean-up, or the exit after it, with a traceback."""
    stopped = []

    def stop(number, frame):
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        stopped.append(number)
        raise Stopped(number)

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        if not stopped:
            for number, handler in previous.items():
                signal.signal(number, handler)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while the block runs, and arrive as it ends: a block of renames that must
    all happen, or none, is not cut in the middle. Under :func:`stop_on_signals`, a stop that came
    during a block that then ended normally is raised with ``after_writing`` set, so that the tool
    says its outputs were written rather than that nothing was.

    The signals are not blocked (a thread's signal mask holds only that thread, and a process-wide
    signal goes to any thread that does not block it: torch's own threads): for the block, their
    handler notes them; the main thread runs Python's handlers, so nothing is missed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    came = []

    def note(number, frame):
        came.append(number)

    previous = {number: signal.signal(number, note) for number in STOP_SIGNALS}
    ended = False
    try:
        yield
        ended = True
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if came:
            handler = previous[came[0]]
            try:
                if callable(handler):
                    handler(came[0], None)
                elif handler == signal.SIG_DFL:
                    signal.raise_signal(came[0])  # its default action: the process ends by it
            except Stopped as stop:
                stop.after_writing = ended
                raise
