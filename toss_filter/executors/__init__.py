"""Where the shards run: `local` (this process) or `ray` (a Ray cluster, or a local Ray). Both run the same step
code over the same shard descriptors; only the placement differs, so their shard files are byte-identical."""

from __future__ import annotations

from toss_filter.config import ExecutorConfig


def make_executor(config: ExecutorConfig | None = None):  # -> steps.score.Executor
    config = config or ExecutorConfig()
    if config.executor == "ray":
        from toss_filter.executors.ray import RayExecutor

        return RayExecutor(config)
    from toss_filter.executors.local import LocalExecutor

    return LocalExecutor(config)
