"""toss-filter: token-level safe data selection (TOSS) as a preprocessing step before fine-tuning.

The pipeline, one folder per step: data/load → data/tokenize → score/ → select/ → data/write, run shard by shard
(`toss_filter.plan`) by `toss_filter.steps`, on the executor of choice (`toss_filter.executors`).

    from toss_filter import ScoreConfig, SelectConfig, filter_dataset
    stats = filter_dataset(ScoreConfig("data.jsonl", "safety-adapter", "utility-adapter", run_dir="run"),
                           SelectConfig(run_dir="run", output="out", ratio=0.2))

Importing the package is cheap: torch, transformers and datasets load only when a step runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ScoreConfig": "toss_filter.config", "SelectConfig": "toss_filter.config", "RefineConfig": "toss_filter.config",
    "TossError": "toss_filter.errors", "InputError": "toss_filter.errors", "ConfigError": "toss_filter.errors",
    "filter_dataset": "toss_filter.api", "score_dataset": "toss_filter.api", "select_dataset": "toss_filter.api",
}
__all__ = list(_EXPORTS)


def _installed_version() -> str:
    # pyproject.toml holds the one version; the installed metadata carries it, and the run provenance records it.
    from importlib import metadata

    try:
        return metadata.version("toss-filter")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # looked up on use, so that importing the package stays cheap
        return _installed_version()
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'toss_filter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
