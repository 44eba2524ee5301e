"""The progress bar's fields (train.progress): drawn whole or left out, never cut at the terminal's width."""

import io
import re

import pytest

from train.progress import fitted_postfix, whole_fields_bar

# A long run's fields, as the trainer formats them (an fp16 scale and the centres' own rate among them).
FIELDS = {"img_s": "1234", "loss": "48.422", "lr": "0.002041", "centres_lr": "0.000692", "loss_scale": "65536",
          "skipped": "2"}
PRIORITY = ["loss", "lr", "img_s", "centres_lr", "loss_scale", "skipped"]


def drawn_fields(line: str) -> list[tuple[str, str]]:
    """The ``name=value`` fields of a bar's drawing, up to the first one cut short (a value tqdm cut reads as
    another: ``lr=0.00`` of 0.002041, found by its mismatch with FIELDS)."""
    return re.findall(r"\b(\w+)=([^,\]\s]*)", line)


def last_drawing(stream: io.StringIO) -> str:
    return stream.getvalue().rsplit("\r", 1)[-1].split("\x1b")[0].rstrip()  # (the spaces that clear a longer one)


def a_long_runs_bar(stream, **kwargs):
    """A bar near the end of 300000 steps, 12:34:56 in: tqdm's counters before the fields take ~60 columns."""
    bar = whole_fields_bar(total=300000, initial=299990, desc="train", unit="step", file=stream, mininterval=0,
                           first=("loss", "lr"), **kwargs)
    bar.start_t -= 45296
    bar.last_print_t -= 0.15
    bar.update(1)  # (a rate: 6.67 steps a second)
    return bar


@pytest.mark.parametrize("ncols", [60, 70, 80, 90, 100, 120, 140, 160])
def test_the_bar_draws_each_field_whole_or_leaves_it_out(ncols):
    # tqdm cut the line at the terminal's width mid-number: at 100 columns `centres_lr=0.00` (of 0.000692), at 80
    # `lr=0.00204`; in a long run at 80 columns even the loss.
    stream = io.StringIO()
    bar = a_long_runs_bar(stream, ncols=ncols)
    bar.set_fields(FIELDS)
    line = last_drawing(stream)
    bar.close()
    shown = drawn_fields(line)
    assert len(line) <= ncols and line.endswith("]"), line
    assert all(FIELDS.get(name) == value for name, value in shown), (line, shown)
    # The loss and lr first, the others after them in their order; drawn in the fields' order all the same.
    assert sorted(name for name, _ in shown) == sorted(PRIORITY[:len(shown)]), line
    assert [name for name, _ in shown] == [name for name in FIELDS if name in dict(shown)], line
    # (what each width takes past tqdm's 58 columns: the loss at 80, the loss and lr at 90, all at 160)
    assert len(shown) == {60: 0, 70: 0, 80: 1, 90: 2, 100: 3, 120: 4, 140: 5, 160: 6}[ncols], line


def test_the_bar_fits_its_fields_to_a_resized_terminal(monkeypatch):
    # dynamic_ncols: the width read at each drawing, the fields fitted to it then, not when they were set.
    width = [160]
    monkeypatch.setattr("tqdm.std._screen_shape_wrapper", lambda: lambda fp: (width[0], 24))
    stream = io.StringIO()
    bar = a_long_runs_bar(stream, dynamic_ncols=True)
    bar.set_fields(FIELDS)
    assert [name for name, _ in drawn_fields(last_drawing(stream))] == list(FIELDS)
    width[0] = 90
    bar.refresh()
    line = last_drawing(stream)
    bar.close()
    assert drawn_fields(line) == [("loss", "48.422"), ("lr", "0.002041")] and len(line) <= 90, line


def test_a_bar_of_unknown_width_draws_every_field():
    stream = io.StringIO()
    bar = a_long_runs_bar(stream)  # (no ncols: a stream that is no terminal, as tqdm's own)
    bar.set_fields(FIELDS)
    line = last_drawing(stream)
    bar.close()
    assert drawn_fields(line) == list(FIELDS.items()), line


def test_fitted_postfix_keeps_the_first_names_and_then_the_order():
    fields = {"distill": "0.1234", "img_s": "99", "loss": "9.876", "lr": "0.1", "margin": "0.3"}
    fits = [(lambda limit: lambda postfix: len(postfix) <= limit)(limit) for limit in (0, 11, 18, 34, 44, 100)]
    assert [fitted_postfix(fields, ("loss", "lr"), fit) for fit in fits] == [
        "", "loss=9.876", "loss=9.876, lr=0.1", "distill=0.1234, loss=9.876, lr=0.1",
        "distill=0.1234, img_s=99, loss=9.876, lr=0.1", "distill=0.1234, img_s=99, loss=9.876, lr=0.1, margin=0.3"]
