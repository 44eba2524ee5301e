"""``python -m train``: train a face-recognition backbone (see ``--help``; no arguments runs the demo)."""

import sys

from .trainer import main

sys.exit(main())
