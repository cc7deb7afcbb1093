"""The configs of the entry points, one dataclass each, and the shared parts they are made of.

    ModelsConfig     the two references: which models, and how they read and score rows
    DataConfig       the input: where it is, its columns, which rows
    ScoreConfig      ModelsConfig + DataConfig + the run directory and the engine   (load → tokenize → score)
    EstimateConfig   ModelsConfig + DataConfig                                                (`estimate`)
    SelectConfig     scores → output: the rule, the formats, the report and the Hub          (select → write)
    ExecutorConfig   where the shards run (this process, or a Ray cluster): provenance, never part of a shard
    RefineConfig     TOSS-Pro's rounds
    EvalRefsConfig   ModelsConfig + labelled inputs: how well a pair of references separates harm (`eval-refs`)
    TrainRefConfig   one reference adapter: data, base, LoRA and optimiser (`train-ref`)

Each field carries its help (and its choices) in its metadata, as TRL's configs do: the CLI builds its options from
them (`toss_filter.cli`), so an option's help is written once, here. `__post_init__` checks values only; what needs
the disk (paths that would overwrite each other, an existing output) is checked by the API entry points
(`toss_filter.api`). Fields with defaults are keyword-only, so the shared parts compose without reordering the
required fields (`ScoreConfig(input, safety_model, utility_model, run_dir, ...)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from toss_filter.errors import ConfigError
from toss_filter.plan import parse_slice
from toss_filter.select.rules import STRATEGIES

BACKENDS = ("torch", "vllm")
SCOPES = ("global", "per-sample")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXECUTORS = ("local", "ray")
OUTPUT_FORMATS = ("arrow", "parquet", "jsonl", "torchtune")


def option(default: Any = MISSING, *, help: str, choices: tuple[str, ...] | None = None, factory: Any = MISSING,
           flag: str | None = None) -> Any:
    """A config field with its help, its choices and (where it is not `--field-name`) its command-line flag in
    metadata. A field with a default (or `factory`) is keyword-only."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), **({"flag": flag} if flag else {})}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata, kw_only=True)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata, kw_only=True)


@dataclass
class ModelsConfig:
    """The two references, and how they read and score rows."""

    safety_model: str = option(help="Safety-degraded reference: a model directory or a LoRA adapter directory.")
    utility_model: str = option(help="Utility-oriented reference: a model directory or a LoRA adapter directory.")
    base_model: str | None = option(None, help="Base model of the adapters (default: the base named in each "
                                               "adapter_config.json).")
    template: str = option("chat", help="chat (the model's chat template), paper (Human:/Assistant: as in the TOSS "
                                        "experiments), or a Jinja file.")
    max_length: int | None = option(None, help="Truncate rows to N tokens; stats.json counts the truncated rows.")
    dtype: str = option("auto", choices=DTYPES, help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or "
                                                      "float16. Log-softmax is float32 always.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")
    max_batch_tokens: int | None = option(None, help="Padded tokens per forward pass of the torch backend and "
                                                     "--verify [default: 2048 on CPU, 8192 on GPU]; vLLM's is "
                                                     "--vllm-arg max_num_batched_tokens (default 2048).")
    trust_remote_code: bool = option(False, help="Allow model repositories to run their own code.")
    allow_pickle_weights: bool = option(False, help="Load a model, adapter or base directory that has only pickle "
                                                    "weights (pytorch_model.bin, *.pt, adapter_model.bin; no "
                                                    ".safetensors). Off: refused, since unpickling can run code; "
                                                    "weights load from safetensors only.")

    def __post_init__(self) -> None:
        _choices(self)
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be at least 2")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError("--max-batch-tokens must be positive")

    def models(self) -> dict[str, Any]:
        """This part's fields, to build another config of the same models (`eval-refs` builds a ScoreConfig)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelsConfig)}


@dataclass
class DataConfig:
    """The input, and which of its rows to read."""

    input: str = option(help="A .jsonl/.json/.parquet file, a save_to_disk directory, or a datasets.load_dataset "
                             "name.")
    split: str | None = option(None, help="Split of a dataset dict or Hub dataset (default: train).")
    name: str | None = option(None, help="The config of a Hub dataset that has several (datasets.load_dataset's "
                                         "name).")
    columns: dict[str, str] = option(factory=dict, flag="--column", help=(
        "Rename an input column: canonical=actual, e.g. --column prompt=question. Canonical names: messages, prompt, "
        "completion, instruction, input, output, system_prompt, question, response."))
    score_reasoning: bool = option(True, flag="--score-reasoning/--no-score-reasoning", help=(
        "Score reasoning (reasoning_content, <think> blocks) like the rest of each response. --no-score-reasoning "
        "keeps it out of the scores and the masking; the output still trains on it."))
    limit: int | None = option(None, help="Read, tokenize and score only the first N input rows (a trial run).")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be 1 or more, got {self.limit}")


@dataclass
class EstimateConfig(ModelsConfig, DataConfig):
    """What `estimate` measures: the input and the references of a `filter` run, nothing written."""

    def __post_init__(self) -> None:
        ModelsConfig.__post_init__(self)
        DataConfig.__post_init__(self)


@dataclass
class ScoreConfig(ModelsConfig, DataConfig):
    """What to score, with which references, into which run directory, on which engine."""

    run_dir: str = option(help="Tokens, score shards, stats and config; re-running resumes from it. Default: "
                               "OUTPUT-run.")
    skip_invalid: bool = option(False, help="A row that cannot be read or tokenized goes to OUTPUT-rejected (reason "
                                            "\"invalid: ...\") instead of stopping the run (even with --keep-empty: it "
                                            "has no tokens); stats.json counts rows_invalid.")
    max_invalid: int | None = option(None, help="With --skip-invalid: stop anyway (exit 2, naming the row) once more "
                                                "than N rows are invalid.")
    backend: str = option("torch", choices=BACKENDS, help="Scoring backend: torch (transformers) or vllm (needs vLLM "
                                                          "installed; see docs/vllm.md).")
    shard_rows: int = option(1000, help="Rows per shard: the unit of every step, of parallel work and of resume.")
    num_proc: int = option(1, help="Tokenizer processes.")
    shard_slice: str | None = option(None, help="I/N: score only every N-th shard from the I-th (Slurm arrays, "
                                                "torchrun, any launcher); a final `select` assembles the slices.")
    deterministic: bool = option(False, help="GPU: batch-invariant scores (vLLM's batch-invariant mode, "
                                             "deterministic torch kernels); docs/scale.md.")
    merge_adapters: bool = option(False, help="vllm: merge LoRA adapters into full weights (cached in the run "
                                              "directory) instead of serving them as LoRA. Needed for adapters that "
                                              "touch lm_head/embed_tokens; always done on CPU.")
    verify: int = option(0, help="vllm: re-score N random rows with the torch backend; report max/mean |ΔNLL| and "
                                 "fail above the dtype's tolerance.")
    gpu_memory_utilization: float | None = option(None, help="vllm: share of GPU memory for the engine (default 0.8: "
                                                             "prompt logprobs need headroom).")
    tensor_parallel_size: int = option(1, help="vllm: GPUs per engine.")
    vllm_args: dict[str, Any] = option(factory=dict, flag="--vllm-arg", help=(
        "vllm: any other engine argument as key=value (repeatable), e.g. --vllm-arg max_num_batched_tokens=4096; "
        "numbers, true/false and JSON values are parsed."))

    def __post_init__(self) -> None:
        ModelsConfig.__post_init__(self)
        DataConfig.__post_init__(self)
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
        if self.shard_rows < 1 or self.num_proc < 1:
            raise ConfigError("--shard-rows and --num-proc must be positive")
        parse_slice(self.shard_slice)


@dataclass
class SelectConfig:
    """How to turn scores into the output, and what to write beside it."""

    run_dir: str = option(help="A run directory written by `toss-filter score`.")
    output: str = option(flag="--output", help="Where the trainer-ready data goes: a save_to_disk directory "
                                               "(input_ids, attention_mask, labels), or one file with --format "
                                               "parquet|jsonl|torchtune.")
    ratio: float = option(0.2, help="Share of all scored response tokens to mask, in [0, 1] (global top-k, "
                                    "k = floor(ratio × N)).")
    scope: str = option("global", choices=SCOPES, help="global (top share over the whole dataset, as in the paper) "
                                                        "or per-sample (the top share of each row); toss only.")
    threshold: float | None = option(None, help="Mask every token with score above this value instead of a share; "
                                                "toss only.")
    keep_empty: bool = option(False, help="Keep rows left with no trainable token, so output row i is input row i.")
    strategy: str = option("toss", choices=STRATEGIES, help=(
        "toss (by token score, the paper), or a baseline at the same token budget: sample (whole rows by mean "
        "score), first-k (earliest response tokens), random."))
    seed: int = option(0, help="Seed of --strategy random.")
    format: str = option("arrow", choices=OUTPUT_FORMATS, help="arrow (save_to_disk directory), parquet, jsonl, or "
                                                               "torchtune (tokens + pre-shifted labels); "
                                                               "docs/trainers.md.")
    emit_assistant_masks: bool = option(False, help="Add an assistant_masks column, for TRL <= 1.6 with packing "
                                                    "(which drops labels). Off: axolotl wants exactly three columns.")
    report: bool = option(True, flag="--report/--no-report", help="Write RUN_DIR/report.html.")
    push_to_hub: str | None = option(None, help="After writing, push OUTPUT (arrow) to this Hub dataset, ORG/NAME, "
                                                "with a dataset card; token from HF_TOKEN or `hf auth login`.")
    hub_private: bool = option(False, help="With --push-to-hub: create the repo private (only applies when it is "
                                           "created).")

    def __post_init__(self) -> None:
        _choices(self)
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"--ratio must be within [0, 1], got {self.ratio}")
        if self.strategy != "toss" and (self.scope != "global" or self.threshold is not None):
            raise ConfigError(f"--scope and --threshold refine --strategy toss only, not {self.strategy}")
        if self.push_to_hub and self.format != "arrow":
            raise ConfigError("--push-to-hub pushes the arrow output: leave --format at arrow")
        if self.hub_private and not self.push_to_hub:
            raise ConfigError("--hub-private only applies with --push-to-hub")

    def flagging(self) -> dict[str, Any]:
        """The settings that decide which tokens a TOSS-Pro round flags (so `select` can tell if they changed)."""
        return {"ratio": self.ratio, "scope": self.scope, "threshold": self.threshold}

    def rule(self) -> dict[str, Any]:
        """The settings that decide the output's content, not where it goes or what is written beside it (the
        select key hashes them)."""
        beside = ("report", "push_to_hub", "hub_private")
        return {key: value for key, value in as_dict(self).items() if key not in beside} | {
            "output": None, "run_dir": None, "format": None}


@dataclass
class ExecutorConfig:
    """Where the shards run: provenance, never part of what a shard holds."""

    executor: str = option("local", choices=EXECUTORS, help="local (this process) or ray (Ray Data: one worker "
                                                            "actor per replica; docs/scale.md).")
    ray_address: str | None = option(None, help="ray: the cluster to join (default: RAY_ADDRESS, else a local Ray).")
    replicas: int = option(1, help="ray: worker actors, each holding both references.")
    gpus_per_replica: float = option(0.0, help="ray: GPUs per replica (a vLLM replica with 2+ runs "
                                               "tensor-parallel).")
    cpus_per_replica: int = option(1, help="ray: CPUs per replica, also its torch thread count.")
    threads: int | None = option(None, help="local: torch threads of the worker (default: torch's choice).")

    def __post_init__(self) -> None:
        _choices(self)
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
    """TOSS-Pro: `rounds` scoring rounds (1 = plain TOSS) with a refinement of θs between each two. The optimiser
    settings are those of `train-ref` (constant learning rate, accumulation up to `batch_size`)."""

    rounds: int = option(1, help="TOSS-Pro: scoring rounds, refining the safety adapter on each round's flagged "
                                 "tokens in between (1 = plain TOSS).")
    epochs: float = option(1.0, flag="--refine-epochs", help="TOSS-Pro: epochs of each refinement.")
    learning_rate: float = option(1e-4, flag="--refine-learning-rate", help="TOSS-Pro: constant learning rate of "
                                                                            "each refinement.")
    batch_size: int = option(16, flag="--refine-batch-size", help="TOSS-Pro: rows per optimiser step.")
    micro_batch_size: int = option(4, flag="--refine-micro-batch-size", help="TOSS-Pro: rows per forward pass.")
    seed: int = option(42, flag="--refine-seed", help="TOSS-Pro: seed of each refinement's data order.")

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.epochs <= 0 or self.learning_rate <= 0:
            raise ConfigError("--rounds must be 1 or more, --refine-epochs and --refine-learning-rate positive")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError("--refine-batch-size must be a positive multiple of --refine-micro-batch-size")


@dataclass
class EvalRefsConfig(ModelsConfig):
    """Which references to evaluate (`ModelsConfig`), on which labelled rows, at which ratio."""

    inputs: list[str] = option(help="Labelled JSONL files (any row shape `filter` reads), filtered together in this "
                                    "order.")
    output: str = option(flag="--output", help="Directory for input.jsonl, run/ (resumable), filtered/, "
                                               "eval-refs.json and eval-refs.png.")
    label_column: str = option("label", help="The field naming each row's group.")
    positive: str = option("harmful", help="The group the references should flag; every other group is compared "
                                           "with it.")
    source_column: str = option("source", help=(
        "The field naming each row's source (up to its first / or #), for the per-source table and the "
        "in/out-of-source bookkeeping; a `family` field, where a row has one, names its source family instead."))
    ratio: float = option(0.2, help="Share of all scored response tokens masked (global top-k, as filter --ratio).")

    def __post_init__(self) -> None:
        ModelsConfig.__post_init__(self)
        if not self.inputs:
            raise ConfigError("eval-refs needs at least one labelled input file")
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"--ratio must be within (0, 1), got {self.ratio}")


@dataclass
class TrainRefConfig:
    """A reference adapter: which data, which base, which LoRA and optimiser settings (defaults: the paper's)."""

    data: str | list[str] = option(help="Training data: one or more inputs (as for filter), trained on together in "
                                        "order (--max-rows counts over all of them).")
    base_model: str = option(help="The base model both references share (a directory or Hub id).")
    output: str = option(flag="--output", help="Adapter directory to write (PEFT format + training.json).")
    split: str | None = option(None, help="Split of a dataset dict or Hub dataset (default: train).")
    columns: dict[str, str] = option(factory=dict, flag="--column", help="Rename an input column: canonical=actual.")
    template: str = option("chat", help="chat (the model's chat template), paper (Human:/Assistant:), or a Jinja "
                                        "file.")
    max_length: int = option(2048, help="Truncate rows to N tokens.")
    max_rows: int | None = option(None, help="Train on the first N rows only (default: all).")
    rank: int = option(16, help="LoRA rank r.")
    alpha: int = option(16, help="LoRA alpha.")
    dropout: float = option(0.0, help="LoRA dropout.")
    target_modules: list[str] = option(factory=lambda: ["q_proj", "v_proj"], help="Comma-separated module names, or "
                                                                                  "all-linear.")
    learning_rate: float = option(1e-5, help="Constant learning rate.")
    epochs: float = option(2.0, help="Passes over the data.")
    batch_size: int = option(64, help="Global batch (rows per optimiser step), reached by accumulation.")
    micro_batch_size: int = option(4, help="Rows per forward pass.")
    seed: int = option(42, help="Seed of the LoRA init and data order.")
    trust_remote_code: bool = option(False, help="Allow model repositories to run their own code.")
    init_adapter: str | None = option(None, help="Continue this adapter of the same base (its rank, alpha and "
                                                 "targets) instead of a fresh one: the recipe trains θs from θu.")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError("--batch-size must be a positive multiple of --micro-batch-size")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.rank < 1:
            raise ConfigError("--learning-rate, --epochs and --rank must be positive")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError("--max-rows must be positive")


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


def _choices(config: Any) -> None:
    """Refuse a field value outside the choices in its metadata."""
    for item in dataclasses.fields(config):
        allowed = item.metadata.get("choices")
        value = getattr(config, item.name)
        if allowed and value not in allowed:
            flag = item.metadata.get("flag") or f"--{item.name.replace('_', '-')}"
            raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
