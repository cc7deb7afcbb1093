"""The Python API: one function per entry point, each a config dataclass in and a summary dict out.

    score_dataset(ScoreConfig, executor=ExecutorConfig())   load → tokenize → score, into the run directory
    select_dataset(SelectConfig, executor=ExecutorConfig()) select → write, from the run directory
    filter_dataset(ScoreConfig, SelectConfig, refine=RefineConfig(), executor=ExecutorConfig())  all of it

Each step goes through the run directory (`toss_filter.run`), shard by shard (`toss_filter.plan`), on the
executor `executor` names (`toss_filter.executors`), so the steps can run separately, resume, and scale out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toss_filter.config import ExecutorConfig, RefineConfig, ScoreConfig, SelectConfig


def _on_executor(executor: ExecutorConfig | None, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    from toss_filter.executors import make_executor

    running = make_executor(executor)
    try:
        return work(running)
    finally:
        running.close()


def score_dataset(config: ScoreConfig, executor: ExecutorConfig | None = None,
                  show_progress: bool = True) -> dict[str, Any]:
    """Tokenize `config.input` and write per-token NLLs under both references into `config.run_dir`, resuming
    from complete shards; returns the run summary (also RUN_DIR/run.json)."""
    from toss_filter.steps.score import score_step

    return _on_executor(executor, lambda running: score_step(config, running, show_progress, executor))


def select_dataset(config: SelectConfig, executor: ExecutorConfig | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Mask the unsafe tokens chosen from the run directory's scores and write the output, the rejected rows, the
    sidecar and stats.json; returns the stats."""
    from toss_filter.steps.select import select_step

    return _on_executor(executor, lambda running: select_step(config, running, show_progress))


def filter_dataset(score_config: ScoreConfig, select_config: SelectConfig, show_progress: bool = True,
                   refine: RefineConfig | None = None, executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """`score_dataset`, then TOSS-Pro's rounds if `refine.rounds > 1` (`toss_filter.refine`), then
    `select_dataset`, over the same run directory and one executor; returns the stats (also RUN_DIR/stats.json)."""
    from toss_filter.refine import check_refinable, refine_rounds
    from toss_filter.steps.score import score_step
    from toss_filter.steps.select import select_step

    if score_config.shard_slice:
        from toss_filter.errors import ConfigError

        raise ConfigError("--shard-slice scores part of the shards: run `score` once per slice, then `select`")
    if refine and refine.rounds > 1:
        check_refinable(score_config, select_config)

    def work(running: Any) -> dict[str, Any]:
        score_step(score_config, running, show_progress, executor)
        if refine and refine.rounds > 1:
            refine_rounds(score_config, select_config, refine, show_progress)
        return select_step(select_config, running, show_progress)

    return _on_executor(executor, work)
