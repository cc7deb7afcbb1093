"""toss-filter: token-level safe data selection (TOSS) as a preprocessing step before fine-tuning.

The pipeline, one module per step: data/load → data/tokenize → score/ → select → data/write.

    from toss_filter import ScoreConfig, SelectConfig, filter_dataset
    stats = filter_dataset(ScoreConfig("data.jsonl", "safety-adapter", "utility-adapter", run_dir="run"),
                           SelectConfig(run_dir="run", output="out", ratio=0.2))
"""

from toss_filter.config import RefineConfig, ScoreConfig, SelectConfig
from toss_filter.errors import ConfigError, InputError, TossError
from toss_filter.pipeline import filter_dataset, score, select

__all__ = ["ScoreConfig", "SelectConfig", "RefineConfig", "filter_dataset", "score", "select", "TossError", "InputError", "ConfigError"]
__version__ = "0.1.0"
