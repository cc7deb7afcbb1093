"""One config dataclass per entry point: `ScoreConfig` (load → tokenize → score) and `SelectConfig`
(select → write). `filter` is both, run back to back over the same run directory. `ExecutorConfig` says where
the shards run (this process, or a Ray cluster); it is provenance, never part of what a shard holds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toss_filter.errors import ConfigError
from toss_filter.plan import parse_slice
from toss_filter.select.rules import STRATEGIES

BACKENDS = ("torch", "vllm")
SCOPES = ("global", "per-sample")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ScoreConfig:
    """What to score and with which references.

    > Data
    - `input`: a .jsonl/.json/.parquet file, a `save_to_disk` directory, or a `datasets.load_dataset` name.
    - `split`: the split of a dataset dict or Hub dataset (default `train`); `name`: a Hub dataset's config.
    - `columns`: canonical column → input column, e.g. `{"prompt": "question", "completion": "answer"}`.
    - `template`: `chat` (the model's chat template), `paper` (the authors' Human:/Assistant: format), or a Jinja file.
    - `max_length`: truncate rows to this many tokens (counted in stats.json).
    - `score_reasoning`: score reasoning tokens like the rest of each response (default). False keeps them out of
      the scores and the masking, while the output still trains on them.
    - `skip_invalid`: a row that cannot be loaded or tokenized goes to OUTPUT-rejected (`reason` "invalid: ...")
      instead of stopping the run; `max_invalid`: with it, stop anyway once more than this many rows are invalid.
    - `limit`: read, tokenize and score only the first `limit` input rows (None: all of them).

    > Models
    - `safety_model`, `utility_model`: full HF model directories or PEFT LoRA adapter directories.
    - `base_model`: the base of the adapters (default: the base recorded in each adapter's config).
    - `allow_pickle_weights`: load a model or adapter directory that has only pickle weights (`pytorch_model.bin`,
      `*.pt`, `adapter_model.bin`, no `.safetensors`); off, such a directory is refused, since unpickling can run
      code, and weights load from safetensors only.

    > Execution
    - `run_dir`: where tokens, score shards, stats and the resolved config live; a re-run resumes from it.
    - `max_batch_tokens`: the padded token budget of one torch forward pass (None: 2048 on CPU, 8192 on an
      accelerator); `shard_rows`: rows per shard, the unit of every step and of resume.
    - `num_proc`: tokenizer processes. `shard_slice`: `"I/N"` scores only every N-th shard from the I-th (for
      Slurm arrays or any launcher; a final `select` assembles the slices).

    > vLLM backend (`backend="vllm"`, docs/vllm.md; refused with the torch backend)
    - `merge_adapters`: serve LoRA adapters merged into full weights (cached in the run directory), not as LoRA.
    - `verify`: re-score this many random rows with the torch backend and fail above the dtype's tolerance.
    - `gpu_memory_utilization` (default 0.8), `tensor_parallel_size`: the vLLM engine arguments of those names.
    - `vllm_args`: any other vLLM engine arguments, e.g. `{"max_num_batched_tokens": 4096}`; they win.
    """

    input: str
    safety_model: str
    utility_model: str
    run_dir: str
    base_model: str | None = None
    split: str | None = None
    name: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    template: str = "chat"
    max_length: int | None = None
    skip_invalid: bool = False
    score_reasoning: bool = True
    max_invalid: int | None = None
    limit: int | None = None
    backend: str = "torch"
    dtype: str = "auto"
    device: str = "auto"
    max_batch_tokens: int | None = None
    shard_rows: int = 1000
    num_proc: int = 1
    shard_slice: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    merge_adapters: bool = False
    verify: int = 0
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    vllm_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("dtype", self.dtype, DTYPES)
        vllm_only = {"--merge-adapters": self.merge_adapters, "--verify": self.verify,
                     "--gpu-memory-utilization": self.gpu_memory_utilization is not None,
                     "--tensor-parallel-size": self.tensor_parallel_size != 1, "--vllm-arg": self.vllm_args}
        given = [name for name, value in vllm_only.items() if value]
        if self.backend != "vllm" and given:
            raise ConfigError(f"{', '.join(given)}: only for --backend vllm")
        if self.verify < 0 or self.tensor_parallel_size < 1:
            raise ConfigError("--verify must be 0 or more, and --tensor-parallel-size 1 or more")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be within (0, 1], got {self.gpu_memory_utilization}")
        if self.max_invalid is not None and (not self.skip_invalid or self.max_invalid < 0):
            raise ConfigError("--max-invalid only applies with --skip-invalid, and must be 0 or more")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be 1 or more, got {self.limit}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be at least 2")
        if (self.max_batch_tokens is not None and self.max_batch_tokens < 1) or self.shard_rows < 1 or self.num_proc < 1:
            raise ConfigError("--max-batch-tokens, --shard-rows and --num-proc must be positive")
        parse_slice(self.shard_slice)


@dataclass
class SelectConfig:
    """How to turn scores into the output.

    - `ratio`: share of all scored response tokens to mask (global top-k; k = floor(ratio × N)).
    - `strategy`: `toss` (by token score, the paper), or a baseline at the same budget k: `sample` (whole rows by
      mean score, SEAL-style), `first-k` (earliest response positions), `random` (seeded by `seed`).
    - `scope`: `global` (the paper) or `per-sample` (the top share of each row); `toss` only.
    - `threshold`: mask every token whose score is above it instead of a share (overrides `ratio`); `toss` only.
    - `keep_empty`: keep rows left with no trainable token, so output row i is input row i.
    - `format`: `arrow` (a save_to_disk directory), `parquet`, `jsonl` or `torchtune` (one file each; see
      `toss_filter.data.write.save_output`); `emit_assistant_masks` adds an `assistant_masks` column (TRL <= 1.6).
    """

    run_dir: str
    output: str
    ratio: float = 0.2
    scope: str = "global"
    threshold: float | None = None
    keep_empty: bool = False
    strategy: str = "toss"
    seed: int = 0
    format: str = "arrow"
    emit_assistant_masks: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"--ratio must be within [0, 1], got {self.ratio}")
        _choice("scope", self.scope, SCOPES)
        _choice("strategy", self.strategy, STRATEGIES)
        # here, not at import: the CLI's --help stays light
        from toss_filter.data.write import check_output, check_output_dir, rejected_path

        check_paths(None, self.run_dir, self.output)
        check_output(Path(self.output), self.format, self.emit_assistant_masks)
        check_output_dir(rejected_path(Path(self.output)), "the rejected rows' directory")
        if self.strategy != "toss" and (self.scope != "global" or self.threshold is not None):
            raise ConfigError(f"--scope and --threshold refine --strategy toss only, not {self.strategy}")

    def flagging(self) -> dict[str, Any]:
        """The settings that decide which tokens a TOSS-Pro round flags (so `select` can tell if they changed)."""
        return {"ratio": self.ratio, "scope": self.scope, "threshold": self.threshold}


EXECUTORS = ("local", "ray")


@dataclass
class ExecutorConfig:
    """Where the shards run.

    - `executor`: `local` (this process; `threads` torch threads) or `ray` (Ray Data over shard descriptors, one
      actor per replica that builds the scorer once and scores whole shards).
    - `ray_address`: the cluster to join (default: `RAY_ADDRESS`, else a local Ray started for the run).
    - `replicas`: scorer actors; `gpus_per_replica` (a vLLM replica with 2+ runs tensor-parallel),
      `cpus_per_replica` (also its torch thread count).
    - `threads`: torch threads of a local scorer (default: torch's own choice, all cores).
    - `deterministic`: ask the backend for batch-invariant results on GPU (docs/scale.md says what it
      guarantees); on CPU results are deterministic already.
    """

    executor: str = "local"
    ray_address: str | None = None
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: int = 1
    threads: int | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        _choice("executor", self.executor, EXECUTORS)
        if self.replicas < 1 or self.cpus_per_replica < 1 or self.gpus_per_replica < 0:
            raise ConfigError("--replicas and --cpus-per-replica must be 1 or more, --gpus-per-replica 0 or more")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be 1 or more")
        ray_only = {"--ray-address": self.ray_address, "--replicas": self.replicas != 1,
                    "--gpus-per-replica": self.gpus_per_replica, "--cpus-per-replica": self.cpus_per_replica != 1}
        given = [name for name, value in ray_only.items() if value]
        if self.executor != "ray" and given:
            raise ConfigError(f"{', '.join(given)}: only for --executor ray")


@dataclass
class RefineConfig:
    """TOSS-Pro settings: `rounds` scoring rounds (1 = plain TOSS) with a refinement of θs between each two.
    The optimiser settings are those of `train-ref` (constant learning rate, accumulation up to `batch_size`)."""

    rounds: int = 1
    epochs: float = 1.0
    learning_rate: float = 1e-4
    batch_size: int = 16
    micro_batch_size: int = 4
    seed: int = 42

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.epochs <= 0 or self.learning_rate <= 0:
            raise ConfigError("--rounds must be 1 or more, --refine-epochs and --refine-learning-rate positive")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError("--refine-batch-size must be a positive multiple of --refine-micro-batch-size")


def check_paths(input: str | None, run_dir: str, output: str) -> None:
    """Refuse an `output` (or its `-rejected` sibling) that is the input or holds it, or that is, holds or lies in
    the run directory: writing it would overwrite or delete the other. `input` is checked only if it is a local
    path (None or a Hub name: not at all)."""
    out = Path(output).resolve()
    rejected = out.with_name(out.name + "-rejected")
    run = Path(run_dir).resolve()
    if run in (out, rejected):
        raise ConfigError("--output and --run-dir must be different directories")
    for target, name in ((out, "--output"), (rejected, "--output's -rejected sibling")):
        if target.is_relative_to(run):
            raise ConfigError(f"{name} {target} is inside the run directory {run}: name a path outside it")
        if run.is_relative_to(target):
            raise ConfigError(f"the run directory {run} is inside {name} {target}: writing the output would replace "
                              "it; name a --run-dir outside it")
    if input is None or not Path(input).exists():
        return
    source = Path(input).resolve()
    for target in (out, rejected):
        if source == target or source.is_relative_to(target) or target.is_relative_to(source):
            raise ConfigError(f"--output {out} would overwrite the input {source}: name an output that is neither "
                              "the input nor inside it (nor holds it)")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
