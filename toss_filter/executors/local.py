"""The local executor: every shard in this process, one scorer for the whole run."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from toss_filter.config import ExecutorConfig
from toss_filter.steps.progress import Progress
from toss_filter.steps.score import ScoreJob, ShardScorer, units


class LocalExecutor:
    name = "local"

    def __init__(self, config: ExecutorConfig):
        self.config = config

    def close(self) -> None:
        """Nothing to release (the Ray executor's `close()` shuts down a Ray it started)."""

    def map_shards(self, fn: Callable[[int], Any], shards: Sequence[int]) -> list[Any]:
        return [fn(shard) for shard in shards]

    def score(self, job: ScoreJob, missing: list[tuple[str, int]], show_progress: bool) -> dict[str, Any]:
        started = time.perf_counter()
        scorer = ShardScorer(job)
        try:
            work = units(missing, scorer.one_model_at_a_time)  # asking may load the weights (timed with them)
            load_s = time.perf_counter() - started
            score_s, tokens = 0.0, 0
            with Progress("score", len(work), "shard-roles", show_progress) as progress:
                for unit in work:
                    result = scorer.score(unit, lambda rows_done, tokens_done: progress.advance(0, tokens_done))
                    score_s += result["seconds"]
                    tokens += result["tokens"]
                    progress.advance(1)
            return {"scorer": scorer.describe(), "score_s": score_s, "tokens": tokens,
                    "load_models_s": round(load_s, 3)}
        finally:
            scorer.close()
