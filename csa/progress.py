"""Progress of long steps: a tqdm bar on a terminal, a plain line every ~25 s anywhere else.

A notebook executed by papermill, a pipe or a log file is not a terminal: there a redrawn bar is either
invisible (papermill's log) or hundreds of carriage-return frames.  :func:`progress_bar` then returns a
:class:`PlainProgress` that prints one ordinary line (``descriptors: 512/1564 img (33%), 1 min 40 s,
about 3 min 20 s left``) when :data:`PLAIN_EVERY_S` seconds passed since the last such line of any bar
(a shared :class:`Heartbeat`), and a closing line for a step that printed any.  So a long run says
something at least every ~30 s while a short step stays silent.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

__all__ = ["PLAIN_EVERY_S", "Heartbeat", "PlainProgress", "HEARTBEAT", "progress_bar", "is_terminal",
           "format_duration"]

PLAIN_EVERY_S = 25.0   # seconds between plain progress lines; one step more stays under ~30 s


class Heartbeat:
    """Says when a plain progress line is due: ``every`` seconds after the last one (or after the first ask)."""

    def __init__(self, every: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock, self.last = float(every), clock, None

    def due(self) -> bool:
        """True (and the clock restarts) when ``every`` seconds passed since the last line."""
        now = self.clock()
        if self.last is None:
            self.last = now
            return False
        if now - self.last >= self.every:
            self.last = now
            return True
        return False

    def beat(self) -> None:
        """A line was printed now by someone else (e.g. a training epoch line)."""
        self.last = self.clock()


HEARTBEAT = Heartbeat()   # shared by every bar of the process, so back-to-back steps cannot add up silences


def format_duration(seconds: float) -> str:
    """``75`` -> ``'1 min 15 s'``, ``3725`` -> ``'1 h 2 min'``, ``9.4`` -> ``'9 s'``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class PlainProgress:
    """The subset of tqdm's interface the package uses (iterate, ``update``, ``set_postfix``, ``close``,
    context manager), printing plain lines paced by a :class:`Heartbeat`."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", stream: TextIO | None = None, heartbeat: Heartbeat | None = None):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.n, self.postfix, self.printed_n = desc, unit, 0, "", -1
        self.stream = stream if stream is not None else sys.stderr
        self.heartbeat = heartbeat if heartbeat is not None else HEARTBEAT
        self.start, self.printed, self.closed = self.heartbeat.clock(), 0, False
        if self.heartbeat.last is None:   # the first bar of the process starts the shared clock
            self.heartbeat.beat()

    def line(self) -> str:
        """The progress line for the current count."""
        elapsed = self.heartbeat.clock() - self.start
        text = f"{self.desc}: {self.n}" if self.desc else str(self.n)
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), {format_duration(elapsed)}"
            if 0 < self.n < self.total:
                text += f", about {format_duration(elapsed * (self.total - self.n) / self.n)} left"
        else:
            text += f" {self.unit}, {format_duration(elapsed)}"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.printed, self.printed_n = self.printed + 1, self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.heartbeat.due():
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        """A last line when this step printed any (so its log ends on the finished count)."""
        if not self.closed and self.printed and self.printed_n != self.n:
            self._print()
            self.heartbeat.beat()
        self.closed = True

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a Jupyter kernel's output, a pipe or a file is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # closed or not a real stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, stream: TextIO | None = None, heartbeat: Heartbeat | None = None,
                 **tqdm_options: Any) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`PlainProgress`; with
    ``disable`` a silent tqdm.  ``tqdm_options`` (``leave``, ``dynamic_ncols``...) apply to the bar only."""
    stream = stream if stream is not None else sys.stderr
    if disable or is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, **tqdm_options)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, heartbeat=heartbeat)
