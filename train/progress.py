"""Progress bars on stderr for the commands: drawn on a terminal only. A log file or a pipe (a cluster
job's log, ``2> log.txt``) gets the commands' own lines instead, where a bar's redraws, ten a second,
would bury them."""

from __future__ import annotations

import os
import sys


def is_terminal(stream) -> bool:
    """Whether ``stream`` shows a progress bar: a terminal that knows its width (tqdm draws nothing in
    one of 0 columns, as a pseudo-terminal without a size reports)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # a stream without a file (captured), or a closed one
        return False


def progress_bar(total: int, desc: str, unit: str, *, leave: bool = True):
    """A tqdm bar of ``total`` ``unit``s on stderr; None where stderr is no terminal, without tqdm, or
    for nothing to count."""
    if total == 0 or not is_terminal(sys.stderr):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=leave)
