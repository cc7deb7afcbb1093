"""The Python API: one function per entry point, each a config dataclass in and a summary dict out.

    score_dataset(ScoreConfig, executor=ExecutorConfig())   load → tokenize → score, into the run directory
    select_dataset(SelectConfig, executor=ExecutorConfig()) select → write, from the run directory
    filter_dataset(ScoreConfig, SelectConfig, refine=RefineConfig(), executor=ExecutorConfig())  all of it

Each step goes through the run directory (`toss_filter.run`), shard by shard (`toss_filter.plan`), on the
executor `executor` names (`toss_filter.executors`), so the steps can run separately, resume, and scale out.

One writer at a time (`toss_filter.lock`): `score_dataset` holds the run directory's lock (a `--shard-slice` run
its slice's lock, which other slices share the directory with), `select_dataset` the run directory's and the
output's, and `filter_dataset` both for its whole duration (the locks are re-entrant, so the steps inside it do
not lock again). A second process on the same run directory or output is refused at once (LockError).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from toss_filter.config import ExecutorConfig, RefineConfig, ScoreConfig, SelectConfig, check_paths


def _on_executor(executor: ExecutorConfig | None, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    from toss_filter.executors import make_executor

    running = make_executor(executor)
    try:
        return work(running)
    finally:
        running.close()


@contextmanager
def _locked(score: ScoreConfig | None = None, select: SelectConfig | None = None) -> Iterator[None]:
    """Hold the locks of `score`'s run directory (its slice's, for a shard slice) and of `select`'s run directory
    and output, released on the way out whatever happens."""
    from toss_filter.files import sweep_leftovers
    from toss_filter.lock import output_lock, run_dir_lock
    from toss_filter.plan import parse_slice

    with ExitStack() as stack:
        if score is not None:
            stack.enter_context(run_dir_lock(score.run_dir, parse_slice(score.shard_slice)))
        if select is not None:
            stack.enter_context(run_dir_lock(select.run_dir))
            stack.enter_context(output_lock(select.output))
        exclusive = select.run_dir if select is not None else None if score.shard_slice else score.run_dir
        if exclusive is not None:  # no other writer can be at work in it: sweep what killed ones left
            sweep_leftovers(Path(exclusive), recursive=True)
        if select is not None:
            sweep_leftovers(Path(select.output).parent, Path(select.output).name)
        yield


def _recorded_input(run_dir: str) -> str | None:
    """The input a run directory was scored from (run.json), if it says."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("input")
    except (OSError, ValueError, AttributeError):
        return None


def score_dataset(config: ScoreConfig, executor: ExecutorConfig | None = None,
                  show_progress: bool = True) -> dict[str, Any]:
    """Tokenize `config.input` and write per-token NLLs under both references into `config.run_dir`, resuming
    from complete shards; returns the run summary (also RUN_DIR/run.json)."""
    from toss_filter.steps.score import score_step

    with _locked(score=config):
        return _on_executor(executor, lambda running: score_step(config, running, show_progress, executor))


def select_dataset(config: SelectConfig, executor: ExecutorConfig | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Mask the unsafe tokens chosen from the run directory's scores and write the output, the rejected rows, the
    sidecar and stats.json; returns the stats."""
    from toss_filter.steps.select import select_step

    check_paths(_recorded_input(config.run_dir), config.run_dir, config.output)
    with _locked(select=config):
        return _on_executor(executor, lambda running: select_step(config, running, show_progress))


def filter_dataset(score_config: ScoreConfig, select_config: SelectConfig, show_progress: bool = True,
                   refine: RefineConfig | None = None, executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """`score_dataset`, then TOSS-Pro's rounds if `refine.rounds > 1` (`toss_filter.refine`), then
    `select_dataset`, over the same run directory and one executor; returns the stats (also RUN_DIR/stats.json)."""
    from toss_filter.steps.score import score_step
    from toss_filter.steps.select import select_step

    rounds = bool(refine and refine.rounds > 1)
    if rounds:  # TOSS-Pro's training stack loads only when asked for
        from toss_filter.refine import check_refinable, refine_rounds
    if score_config.shard_slice:
        from toss_filter.errors import ConfigError

        raise ConfigError("--shard-slice scores part of the shards: run `score` once per slice, then `select`")
    check_paths(score_config.input, select_config.run_dir, select_config.output)
    if rounds:
        check_refinable(score_config, select_config)

    def work(running: Any) -> dict[str, Any]:
        score_step(score_config, running, show_progress, executor)
        if rounds:
            refine_rounds(score_config, select_config, refine, show_progress)
        return select_step(select_config, running, show_progress)

    with _locked(score=score_config, select=select_config):
        return _on_executor(executor, work)
