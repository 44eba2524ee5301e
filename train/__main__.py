"""``python -m train``: train a face-recognition backbone (see ``--help``; no arguments runs the demo)."""

import sys

from .signals import Stopped, readers_may_leave, stop_on_signals, trainer_start_up_stop_line

said = None  # the one line said here: a stop while importing, or main's refusal
try:
    # Importing the trainer (torch, ...) takes seconds: Ctrl-C or SIGTERM then is a stop at start-up too,
    # one line, not a KeyboardInterrupt's traceback or a silent end.
    with stop_on_signals():
        from .trainer import main
except Stopped as stop:
    said, status = trainer_start_up_stop_line(stop.name), stop.exit_status
else:
    try:
        status = main()
    except SystemExit as refused:
        if not isinstance(refused.code, str):
            raise
        # main's refusal, "train: error: ...", said here rather than by the interpreter on its way out.
        said, status = refused.code, 1
if said is not None:
    # (With its reader gone, 2>&1 | head, or a tee that the Ctrl-C ended too, the line failed where it was said, or
    # at the interpreter's last flush, and the exit status was 120, not the stop's or the refusal's.)
    with readers_may_leave():
        print(said, file=sys.stderr)
sys.exit(status)
