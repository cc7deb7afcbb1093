"""Progress for the steps: rich bars on stderr where stderr is a terminal; elsewhere (a log file, a pipe, a
scheduler's capture) a plain line every LOG_EVERY seconds, which a scheduler's log reader can follow:

    toss-filter: score: 12/40 shard-roles, 3,412 tok/s, eta 0:01:05

A bar's last frame would land between the lines a script reads; a plain line is only printed once an interval
has passed, so a short run prints none and an error stays the only line on stderr of a failing short run. Lines
come as work completes (per batch while scoring), never from a timer thread, so a line is never torn by another.

LOG_EVERY is a module-level setting, not a parameter: the bars are built deep inside the steps and executors
(`steps.tokenize`, `executors.local`, `executors.ray`), which take only `show_progress`, and how often to print is
a display choice of the process, like the console itself. The CLI sets it from `--log-every` on every command
that shows progress; API users may set `toss_filter.progress.LOG_EVERY` (seconds; 0 disables the lines).
`show_progress=False` (`--quiet`) disables both the bars and the lines.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

console = Console(stderr=True)

LOG_EVERY: float = 30.0
"""Seconds between plain progress lines when stderr is not a terminal; 0 disables them (see the module docstring)."""

_clock = time.perf_counter  # the tests replace it to reach an interval without waiting


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Progress:
    """One bar: `advance(n, tokens=0)` as work completes; the rate shown is tokens/s when tokens are counted, else
    units/s."""

    def __init__(self, description: str, total: int | None, unit: str, enabled: bool = True):
        self.description, self.total, self.unit = description, total, unit
        terminal = console.is_terminal
        self.enabled = enabled and terminal
        self.log_every = LOG_EVERY if enabled and not terminal else 0.0
        self._bar: RichProgress | None = None
        self._done, self._tokens, self._started = 0, 0, _clock()
        self._logged_at, self._lines = self._started, 0

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=console)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    def advance(self, done: int, tokens: int = 0) -> None:
        self._done += done
        self._tokens += tokens
        if self._bar is not None:
            rate = self._tokens / max(_clock() - self._started, 1e-9)
            self._bar.update(self._task, advance=done, rate=f"{rate:,.0f} tok/s" if self._tokens else "")
        elif self.log_every > 0:
            now = _clock()
            if now - self._logged_at >= self.log_every:
                self._logged_at, self._lines = now, self._lines + 1
                self._log(self.line(now))

    def line(self, now: float, finished: bool = False) -> str:
        """The plain progress line at time `now` (of `_clock`): done/total, the rate once there is one, and the
        ETA once there is a rate (or the elapsed time, `finished`)."""
        elapsed = max(now - self._started, 1e-9)
        done = f"{self._done:,}/{self.total:,}" if self.total is not None else f"{self._done:,}"
        parts = [f"toss-filter: {self.description}: {done} {self.unit}"]
        if self._tokens:
            parts.append(f"{self._tokens / elapsed:,.0f} tok/s")
        elif self._done:
            parts.append(f"{self._done / elapsed:,.1f} {self.unit}/s")
        if finished:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total is not None and 0 < self._done <= self.total:
            parts.append(f"eta {_duration(elapsed * (self.total - self._done) / self._done)}")
        return ", ".join(parts)

    @staticmethod
    def _log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # sys.stderr as it is now (a test runner swaps it)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self._lines and exc[0] is None:  # a run long enough to log also logs that the step finished
            self._log(self.line(_clock(), finished=True))
