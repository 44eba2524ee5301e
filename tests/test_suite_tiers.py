"""The quick run's guard (tests/conftest.py): tests of the quick run that took long and are not marked slow
are named at its end, so that the README's few minutes do not drift unseen."""
import types

import conftest


class _Reporter:
    def __init__(self):
        self.lines = []

    def write_line(self, line):
        self.lines.append(line)


def _config(runslow):
    return types.SimpleNamespace(getoption=lambda name: runslow if name == "--runslow" else None)


def test_long_unmarked_tests_outside_the_core_files_are_named_longest_first(monkeypatch):
    seconds = {"tests/train/test_a.py::test_long": 5.0, "tests/train/test_a.py::test_longer": 9.25,
               "tests/train/test_a.py::test_short": 1.0, "tests/test_op.py::test_core_and_long": 30.0,
               "tests/test_b.py::test_at_the_bar": conftest.SLOW_REPORT_SECONDS}
    assert conftest.unmarked_slow_tests(seconds) == ["tests/train/test_a.py::test_longer",
                                                     "tests/train/test_a.py::test_long"]
    monkeypatch.setattr(conftest, "_test_seconds", seconds)
    reporter = _Reporter()
    conftest.pytest_terminal_summary(reporter, _config(runslow=False))
    assert reporter.lines == [f"2 test(s) of the quick run took over {conftest.SLOW_REPORT_SECONDS:g} s and are not "
                              "marked slow: mark them @pytest.mark.slow",
                              "  9.2 s tests/train/test_a.py::test_longer", "  5.0 s tests/train/test_a.py::test_long"]
    reporter = _Reporter()
    conftest.pytest_terminal_summary(reporter, _config(runslow=True))  # (the whole suite: nothing to mark)
    assert reporter.lines == []


def test_set_up_and_tear_down_count_with_the_call(monkeypatch):
    # (A fixture that trains a model is the test's time as much as its call.)
    monkeypatch.setattr(conftest, "_test_seconds", {})
    for when, took in (("setup", 3.0), ("call", 1.0), ("teardown", 1.0)):
        conftest.pytest_runtest_logreport(types.SimpleNamespace(nodeid="tests/train/t.py::test_x", when=when,
                                                                duration=took))
    assert conftest.unmarked_slow_tests(conftest._test_seconds) == ["tests/train/t.py::test_x"]
