"""``python -m train``: train a face-recognition backbone (see ``--help``; no arguments runs the demo)."""

import sys

from .signals import Stopped, stop_on_signals

try:
    # Importing the trainer (torch, ...) takes seconds: Ctrl-C or SIGTERM then is a stop at start-up too,
    # one line, not a KeyboardInterrupt's traceback or a silent end.
    with stop_on_signals():
        from .trainer import main
except Stopped as stop:
    print(f"stopped by {stop.name} during the start-up, before the first step", file=sys.stderr)
    sys.exit(stop.exit_status)

sys.exit(main())
