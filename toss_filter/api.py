"""The Python API: one function per entry point, each a config dataclass in and a summary dict out. The CLI calls
exactly these.

    score_dataset(ScoreConfig, executor=ExecutorConfig())   load → tokenize → score, into the run directory
    select_dataset(SelectConfig, executor=ExecutorConfig()) select → write, from the run directory, then the
                                                            report and the Hub push that SelectConfig asks for
    filter_dataset(ScoreConfig, SelectConfig, refine=RefineConfig(), executor=ExecutorConfig())  all of it

Configs check their values when built; what needs the disk (an output that would overwrite the input or the run
directory, a directory there that toss-filter did not write) is checked here, before any work.

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


def _check_select(config: SelectConfig, input: str | None) -> None:
    """Refuse, before any work, an output that would overwrite the input, the run directory or a directory that
    toss-filter did not write, and a malformed Hub repo id."""
    from toss_filter.data.write import check_output, check_output_dir, rejected_path

    check_paths(input, config.run_dir, config.output)
    check_output(Path(config.output), config.format, config.emit_assistant_masks)
    check_output_dir(rejected_path(Path(config.output)), "the rejected rows' directory")
    if config.push_to_hub:
        from toss_filter.hub import check_repo_id

        check_repo_id(config.push_to_hub)


def _after_select(config: SelectConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """What `config` asks for beside the output: RUN_DIR/report.html (`stats["report"]`), the Hub push
    (`stats["pushed"]`)."""
    if config.report:
        from toss_filter.report import write_report

        stats["report"] = str(write_report(config.run_dir, Path(config.run_dir) / "report.html"))
    if config.push_to_hub:
        from toss_filter.hub import push_output

        stats["pushed"] = push_output(Path(config.output), config.push_to_hub, Path(config.run_dir),
                                      private=config.hub_private)
    return stats


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
        return _on_executor(executor, lambda running: score_step(config, running, show_progress))


def select_dataset(config: SelectConfig, executor: ExecutorConfig | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Mask the unsafe tokens chosen from the run directory's scores and write the output, the rejected rows, the
    sidecar and stats.json, then the report and the push `config` asks for; returns the stats (with `report` and
    `pushed` where they were done)."""
    from toss_filter.steps.select import select_step

    _check_select(config, _recorded_input(config.run_dir))
    with _locked(select=config):
        stats = _on_executor(executor, lambda running: select_step(config, running, show_progress))
    return _after_select(config, stats)


def filter_dataset(score_config: ScoreConfig, select_config: SelectConfig, show_progress: bool = True,
                   refine: RefineConfig | None = None, executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """`score_dataset`, then TOSS-Pro's rounds if `refine.rounds > 1` (`toss_filter.refine`), then
    `select_dataset` (the report and the push included), over the same run directory and one executor; returns the
    stats (also RUN_DIR/stats.json)."""
    from toss_filter.steps.score import score_step
    from toss_filter.steps.select import select_step

    rounds = bool(refine and refine.rounds > 1)
    if rounds:  # TOSS-Pro's training stack loads only when asked for
        from toss_filter.refine import check_refinable, refine_rounds
    if score_config.shard_slice:
        from toss_filter.errors import ConfigError

        raise ConfigError("--shard-slice scores part of the shards: run `score` once per slice, then `select`")
    _check_select(select_config, score_config.input)
    if rounds:
        check_refinable(score_config, select_config)

    def work(running: Any) -> dict[str, Any]:
        score_step(score_config, running, show_progress)
        if rounds:
            refine_rounds(score_config, select_config, refine, show_progress)
        return select_step(select_config, running, show_progress)

    with _locked(score=score_config, select=select_config):
        stats = _on_executor(executor, work)
    return _after_select(select_config, stats)
