"""Long jobs' progress in a log: a line per tenth and per step where rich would draw only the
end, and rich's own bar, untouched, on a terminal."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from models import progress as progress_module
from models.progress import Progress


def run(terminal: bool, items: int = 100) -> str:
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=terminal, width=100)) as bar:
        task = bar.add_task("drafts", total=items, stream="kestrel")
        for _ in range(items):
            bar.advance(task)
        steps = bar.add_task("locate", total=3)
        for name in ("tokenizer", "weights", "save"):
            bar.update(steps, advance=1, description=name)
    return out.getvalue()


def logged(text: str) -> list[tuple[str, str]]:
    """The plain lines `Progress` adds: (what, done/total); rich's own final bars left out."""
    return [(m[1], m[2]) for m in re.finditer(r"^(.+) (\d+/\d+) \d+ s$", text, re.M)]


def test_a_log_gets_a_line_at_each_tenth_and_at_each_step() -> None:
    lines = logged(run(terminal=False))
    assert lines[:11] == [("stream=kestrel drafts", f"{k}/100") for k in range(0, 101, 10)]
    assert lines[11:] == [("locate", "0/3"), ("tokenizer", "1/3"), ("weights", "2/3"), ("save", "3/3")]


def test_a_slow_task_gets_a_line_every_interval_between_tenths(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 31))  # each call 31 s later than the last
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=False, width=100)) as bar:
        task = bar.add_task("train", total=1000)
        for _ in range(5):  # 5 of 1000: no tenth reached, but 31 s apart each
            bar.advance(task)
    assert logged(out.getvalue()) == [("train", f"{k}/1000") for k in range(6)]


def test_a_terminal_gets_richs_bar_and_no_extra_lines() -> None:
    text = run(terminal=True)
    assert "drafts" in text and logged(text) == []
