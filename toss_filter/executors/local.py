"""The local executor: every shard in this process, one worker for the whole pool."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from toss_filter.config import ExecutorConfig
from toss_filter.executors.base import Placement, PoolTally, Worker
from toss_filter.progress import Progress


class LocalExecutor:
    name = "local"

    def __init__(self, config: ExecutorConfig):
        self.config = config

    def describe(self) -> dict[str, Any]:
        return asdict(self.config)

    def close(self) -> None:
        """Nothing to release (the Ray executor's `close()` shuts down a Ray it started)."""

    def map_shards(self, fn: Callable[[int], Any], shards: Sequence[int], description: str | None = None,
                   show_progress: bool = False) -> list[Any]:
        results = []
        with Progress(description or "", len(shards), "shards", bool(description) and show_progress) as progress:
            for shard in shards:
                results.append(fn(shard))
                progress.advance(1)
        return results

    def run_pool(self, make_worker: Callable[[Placement], Worker], units: list[Any], *, description: str,
                 unit_name: str, show_progress: bool, shared_dir: Path | None = None) -> dict[str, Any]:
        if not units:
            return PoolTally(description, 0, unit_name, False).summary()
        started = time.perf_counter()
        worker = make_worker(Placement(threads=self.config.threads))
        try:
            getattr(worker, "load", lambda: None)()
            arrange = getattr(worker, "arrange", None)
            units = arrange(units) if arrange else units
            load_s = time.perf_counter() - started
            with PoolTally(description, len(units), unit_name, show_progress) as tally:
                for unit in units:
                    unit_started = time.time()
                    result = worker(unit, tally.partial)
                    tally.done(result, unit_started, load_s=load_s, describe=worker.describe(), counted=True)
            return tally.summary()
        finally:
            worker.close()
