"""What an executor is: it knows no step, and no step knows which executor runs it.

An executor offers two things:
- `map_shards(fn, shards, description, show_progress)`: `[fn(s) for s in shards]`, possibly in other processes
  (`fn` is picklable), with a progress bar of shards when `description` names one;
- `run_pool(make_worker, units, ...)`: a pool of stateful workers, each built once by `make_worker(placement)` (a
  model loads once per worker, not per unit), that run every unit between them. A worker is any callable that
  takes a unit and returns at least `{"tokens", "seconds"}`, with `describe()` and `close()`; it may also have
  `load()`, called once when it starts (its model loads there, timed as its start), and `arrange(units)`, the order
  it works best in, where the executor runs every unit on that one worker.

`PoolTally` is the progress and timing of a pool, written once for every executor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from toss_filter.progress import Progress


@dataclass(frozen=True)
class Placement:
    """What one worker is given: its torch threads (None: torch's choice) and its GPUs."""

    threads: int | None = None
    gpus: float = 0.0


class Worker(Protocol):
    def __call__(self, unit: Any, on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Do one unit; return at least `{"tokens", "seconds"}`. `on_progress(rows, tokens)` as parts finish."""

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Executor(Protocol):
    name: str

    def map_shards(self, fn: Callable[[int], Any], shards: Sequence[int], description: str | None = None,
                   show_progress: bool = False) -> list[Any]: ...

    def run_pool(self, make_worker: Callable[[Placement], Worker], units: list[Any], *, description: str,
                 unit_name: str, show_progress: bool, shared_dir: Path | None = None) -> dict[str, Any]:
        """Run every unit on a pool of workers; return `PoolTally.summary()`. `shared_dir` is a directory every
        worker must see (the run directory), where the executor can check that they do."""

    def describe(self) -> dict[str, Any]:
        """The executor and its settings, for a run's provenance."""

    def close(self) -> None:
        """Release what the executor started (a local Ray)."""


class PoolTally:
    """Progress and timing of a pool run. `work_s` is the wall time from the first unit's start to the last one's
    end, so `tokens / work_s` is the throughput of all workers together; `load_s` the slowest worker's build."""

    def __init__(self, description: str, total: int, unit_name: str, show_progress: bool):
        self.progress = Progress(description, total, unit_name, show_progress)
        self.tokens, self.describe = 0, None
        self.span = [float("inf"), 0.0]
        self.loads: dict[str, float] = {}
        self.workers: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> PoolTally:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def partial(self, rows: int, tokens: int) -> None:
        """Tokens of a unit still running (the local worker reports them per batch)."""
        self.progress.advance(0, tokens)

    def done(self, result: dict[str, Any], started: float, worker: str = "local", load_s: float = 0.0,
             describe: dict[str, Any] | None = None, where: dict[str, Any] | None = None,
             counted: bool = False) -> None:
        """One unit finished: `started` is its wall-clock start (time.time()); `counted` when its tokens were
        already shown through `partial`."""
        self.tokens += int(result["tokens"])
        self.span = [min(self.span[0], started), max(self.span[1], started + float(result["seconds"]))]
        self.loads[worker] = load_s
        entry = self.workers.setdefault(worker, {"worker": worker, **(where or {}), "units": 0})
        entry["units"] += 1
        self.describe = describe if describe is not None else self.describe
        self.progress.advance(1, 0 if counted else int(result["tokens"]))

    def summary(self) -> dict[str, Any]:
        return {"describe": self.describe, "work_s": max(self.span[1] - self.span[0], 0.0) if self.workers else 0.0,
                "tokens": self.tokens, "load_s": round(max(self.loads.values(), default=0.0), 3),
                "workers": list(self.workers.values())}
