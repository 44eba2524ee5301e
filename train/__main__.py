"""``python -m train``: train a face-recognition backbone (see ``--help``; no arguments runs the demo)."""

import sys

from .signals import Stopped, readers_may_leave, stop_on_signals

try:
    # Importing the trainer (torch, ...) takes seconds: Ctrl-C or SIGTERM then is a stop at start-up too,
    # one line, not a KeyboardInterrupt's traceback or a silent end.
    with stop_on_signals():
        from .trainer import main
except Stopped as stop:
    with readers_may_leave():  # (a Ctrl-C ends a pipe's reader too: the line failed, exit status 120)
        print(f"stopped by {stop.name} during the start-up, before the first step", file=sys.stderr)
    sys.exit(stop.exit_status)

try:
    status = main()
except SystemExit as refused:
    if not isinstance(refused.code, str):
        raise
    # main's refusal, "train: error: ...", said here rather than by the interpreter on its way out: with its
    # reader gone (2>&1 | head) that line failed there, and the exit status was 120, not 1.
    with readers_may_leave():
        print(refused.code, file=sys.stderr)
    status = 1
sys.exit(status)
