"""Progress bars for the steps: rich bars on stderr, only where stderr is a terminal. In a log or a pipe, the last
frame of a bar would land between the lines a script reads (an error must stay the only line on stderr)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

console = Console(stderr=True)


class Progress:
    """One bar: `advance(n, tokens=0)` as work completes; the rate shown is tokens/s when tokens are counted."""

    def __init__(self, description: str, total: int | None, unit: str, enabled: bool = True):
        self.description, self.total, self.unit = description, total, unit
        self.enabled = enabled and console.is_terminal
        self._bar: RichProgress | None = None
        self._tokens, self._started = 0, time.perf_counter()

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
        self._tokens += tokens
        if self._bar is not None:
            rate = self._tokens / max(time.perf_counter() - self._started, 1e-9)
            self._bar.update(self._task, advance=done, rate=f"{rate:,.0f} tok/s" if self._tokens else "")

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
