"""Progress of the long jobs (convert, teacher cache, training epochs,
evaluation, sweep): a tqdm bar on a terminal, plain lines in a log.

``progress(iterable, total=N, desc="convert train", unit="img")`` returns a
tqdm bar when standard error is a terminal. Otherwise (``> log.txt 2>&1``,
CI, nohup, a pipe) it returns a :class:`LineProgress` with the same interface
(iterate, ``update``, ``set_postfix``, ``close``, ``with``) that writes one
plain line each time another ``every`` (10 %) of the total is done, at most
one per ``min_seconds`` (so a short job does not fill the log), and a final
line at the end. :func:`log_line` writes one summary line (the trainer's
epoch line, the sweep's run line): above the bar on a terminal, as is
otherwise. Everything goes to standard error, where the bar would; standard
output keeps each job's result. The JSON-lines logs and TensorBoard are not
touched here.

Hand-written around tqdm because tqdm has no line mode: on a file it still
writes carriage-return updates. The lines use tqdm's own formatter.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

from tqdm import tqdm

LINE_FORMAT = "{desc}: {percentage:3.0f}% ({n_fmt}/{total_fmt}) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def live_terminal() -> bool:
    """Whether standard error (where progress goes) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def log_line(text: str) -> None:
    """One line of progress, on standard error (above a live bar on a terminal)."""
    if live_terminal():
        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", enabled: bool = True, initial: int = 0, every: float = 0.1,
             min_seconds: float = 10.0, final_line: bool = True, **tqdm_only):
    """A tqdm bar on a terminal, else a :class:`LineProgress` (see the module
    doc); ``enabled=False`` shows nothing. ``final_line=False`` leaves out
    the 100 % line when the caller prints its own summary; ``tqdm_only``
    (``leave``, ``mininterval``) apply to the bar."""
    if enabled and live_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                    **tqdm_only)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, enabled=enabled, initial=initial,
                        every=every, min_seconds=min_seconds, final_line=final_line)


class LineProgress:
    """tqdm's interface for logs: a line at each ``every`` of ``total`` done
    (at most one per ``min_seconds``) and one at :meth:`close`."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 desc: str = "", unit: str = "it", enabled: bool = True, initial: int = 0,
                 every: float = 0.1, min_seconds: float = 10.0, final_line: bool = True):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.enabled, self.initial, self.n = enabled, initial, initial
        self.every, self.min_seconds, self.final_line = every, min_seconds, final_line
        self.postfix = ""
        self.start = self._last_line = time.perf_counter()
        self._step = max(1, round((total or 0) * every)) if total else None
        self._next = initial + self._step if self._step else None
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._next is not None and self.n >= self._next:
            while self._next <= self.n:
                self._next += self._step
            if self.n < self.total and time.perf_counter() - self._last_line >= self.min_seconds:
                self._write()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = self.n - self.initial
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 rate=done / elapsed if elapsed > 0 and done else None,
                                 postfix=self.postfix or None, initial=self.initial,
                                 bar_format=LINE_FORMAT if self.total else None)

    def _write(self) -> None:
        if self.enabled:
            print(self.line(), file=sys.stderr, flush=True)
        self._last_line = time.perf_counter()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.final_line:
                self._write()
