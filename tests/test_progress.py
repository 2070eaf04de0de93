"""Progress lines of long steps when the output is not a terminal (csa.progress), checked with a fake clock."""
from __future__ import annotations

import io

from tqdm import tqdm

from csa.progress import Heartbeat, PlainProgress, format_duration, is_terminal, progress_bar
from csa.training.train import epoch_line_due


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_and_a_closing_line():
    clock, out = FakeClock(), io.StringIO()
    beat = Heartbeat(every=25, clock=clock)
    bar = progress_bar(total=100, desc="descriptors", unit="img", stream=out, heartbeat=beat)
    assert isinstance(bar, PlainProgress)
    for _ in range(100):   # 100 steps of 1 s each: lines after 25, 50 and 75 s, then the closing line
        clock.now += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["descriptors: 25/100 img (25%), 25 s, about 1 min 15 s left",
                     "descriptors: 50/100 img (50%), 50 s, about 50 s left",
                     "descriptors: 75/100 img (75%), 1 min 15 s, about 25 s left",
                     "descriptors: 100/100 img (100%), 1 min 40 s"]
    bar.close()   # closing twice prints nothing more
    assert len(out.getvalue().splitlines()) == 4


def test_a_short_step_stays_silent_and_bars_share_the_clock():
    clock, out = FakeClock(), io.StringIO()
    beat = Heartbeat(every=25, clock=clock)
    for step in range(3):   # three steps of 15 s: none alone reaches 25 s, together they must speak
        for _ in progress_bar(range(15), desc=f"step {step}", stream=out, heartbeat=beat):
            clock.now += 1.0
    lines = out.getvalue().splitlines()
    # the shared clock: step 0 is silent, step 1 speaks 25 s after the start and closes on its count,
    # step 2 ends 15 s after that closing line, so it stays silent
    assert lines == ["step 1: 10/15 it (67%), 10 s, about 5 s left", "step 1: 15/15 it (100%), 15 s"]


def test_no_line_is_silent_longer_than_the_interval_plus_one_step():
    clock, out = FakeClock(), io.StringIO()
    beat = Heartbeat(every=25, clock=clock)
    stamps = []

    class Stamped(io.StringIO):
        def write(self, text):
            if text.strip():
                stamps.append(clock.now)
            return super().write(text)

    stream = Stamped()
    start = clock.now
    for step in range(6):
        for _ in progress_bar(range(7), desc=f"step {step}", stream=stream, heartbeat=beat):
            clock.now += 3.0
    times = [start, *stamps]
    assert max(b - a for a, b in zip(times, times[1:])) <= 25 + 3
    assert clock.now - stamps[-1] <= 25 + 3


def test_terminal_gets_tqdm_and_disable_is_silent():
    term = Terminal()
    assert is_terminal(term) and not is_terminal(io.StringIO())
    bar = progress_bar(total=3, desc="x", stream=term)
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    for _ in progress_bar(range(5), desc="quiet", disable=True, stream=out):
        pass
    assert out.getvalue() == ""


def test_unknown_total_and_postfix():
    clock, out = FakeClock(), io.StringIO()
    beat = Heartbeat(every=10, clock=clock)
    bar = PlainProgress(iter(range(1000)), desc="batches", unit="batch", stream=out, heartbeat=beat)
    bar.set_postfix(loss="0.1234")
    clock.now += 61
    bar.update(7)
    assert out.getvalue().splitlines() == ["batches: 7 batch, 1 min 1 s (loss 0.1234)"]


def test_format_duration():
    assert [format_duration(s) for s in (0, 9.4, 59.6, 75, 3600, 3725)] == \
        ["0 s", "9 s", "1 min 0 s", "1 min 15 s", "1 h 0 min", "1 h 2 min"]


def test_epoch_lines_fold_in_a_log_and_not_on_a_terminal():
    clock = FakeClock()
    beat = Heartbeat(every=25, clock=clock)
    printed = []
    for epoch in range(1, 81):   # 80 epochs of 2 s
        clock.now += 2.0
        if epoch_line_due(epoch, 1, 80, terminal=False, heartbeat=beat):
            printed.append(epoch)
    assert printed[0] == 1 and printed[-1] == 80
    assert 6 <= len(printed) <= 9, printed   # 160 s of training: first, last and one every ~25 s
    assert max(b - a for a, b in zip(printed, printed[1:])) * 2.0 <= 25 + 2
    assert all(epoch_line_due(e, 1, 80, terminal=True, heartbeat=beat) for e in range(1, 81))
