"""Progress bars on stderr for the commands: drawn on a terminal only. A log file or a pipe (a cluster
job's log, ``2> log.txt``) gets the commands' own lines instead, where a bar's redraws, ten a second,
would bury them."""

from __future__ import annotations

import functools
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


def fitted_postfix(fields: dict[str, str], first: tuple[str, ...], fits) -> str:
    """tqdm's postfix (``name=value, ...``, in ``fields``' order) of as many of ``fields`` as ``fits`` (a
    postfix -> bool) takes whole, given in priority order: the names in ``first``, then the others in their
    order. A field that does not fit is left out whole, it and those after it in priority: tqdm would cut the line
    at the terminal's width, mid-number, and a cut number reads as another value (``lr=0.00`` of 0.000692)."""
    ranked = [*(name for name in first if name in fields), *(name for name in fields if name not in first)]

    def postfix(names) -> str:
        return ", ".join(f"{name}={value}" for name, value in fields.items() if name in names)

    kept: set[str] = set()
    for name in ranked:
        if not fits(postfix(kept | {name})):
            break
        kept.add(name)
    return postfix(kept)


@functools.cache
def _whole_fields_bar():
    from tqdm import tqdm

    class WholeFieldsBar(tqdm):
        """tqdm's bar, its postfix's fields left out whole (fitted_postfix) to fit the terminal's width at each
        drawing: the counters, the elapsed time and the rate before them grow, and the width changes with a
        resize (dynamic_ncols)."""

        def __init__(self, *args, first: tuple[str, ...] = (), **kwargs):
            self._fields: dict[str, str] = {}
            self._first = first
            super().__init__(*args, **kwargs)

        def set_fields(self, fields: dict[str, str]) -> None:
            """The postfix's fields (name -> formatted value), in the order drawn."""
            self._fields = dict(fields)
            self.set_postfix(self._fields)  # (all of them where the width is not known)

        @property
        def format_dict(self):
            drawn = super().format_dict
            if self._fields and drawn.get("ncols"):
                # (tqdm trims the line to its width: a postfix fits when the line still ends with it)
                drawn["postfix"] = fitted_postfix(self._fields, self._first, lambda postfix: self.format_meter(
                    **{**drawn, "postfix": postfix}).endswith(f"{postfix}]"))
            return drawn

    return WholeFieldsBar


def whole_fields_bar(*, first: tuple[str, ...] = (), **kwargs):
    """A tqdm bar (tqdm's arguments) whose ``set_fields`` draws the fields that fit the terminal's width whole,
    those named in ``first`` before the others (fitted_postfix)."""
    return _whole_fields_bar()(first=first, **kwargs)
