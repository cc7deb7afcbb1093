"""`toss-filter`: a thin typer shell over `toss_filter.api`. Options become a config dataclass; no logic here.

Exit codes: 0 success; 1 an unexpected error (a traceback: please report it); 2 a problem with the input, an option,
a model, the Hub, or a failed --verify (one line on stderr); 130 interrupted by Ctrl-C (SIGINT) or SIGTERM (one line
on stderr; completed shards are kept, so the same command resumes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from toss_filter.config import ExecutorConfig, RefineConfig, ScoreConfig, SelectConfig
from toss_filter.default_model import EMBEDDED_MODEL_ID
from toss_filter.errors import ConfigError, TossError
from toss_filter.run import default_run_dir

app = typer.Typer(
    help=(
        "Token-level safe data selection (TOSS, Li et al. ICLR 2026). Scores every response token of a "
        "fine-tuning set as S = NLL under a utility-oriented reference minus NLL under a safety-degraded "
        "reference, and masks (labels = -100) the highest-scoring share, so a trainer never learns them.\n\n"
        "Quick start: toss-filter filter data.jsonl --safety-model S --utility-model U --output out/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Input = Annotated[str, typer.Argument(help="A .jsonl/.json/.parquet file, a save_to_disk directory, or a datasets.load_dataset name.")]
SafetyModel = Annotated[str, typer.Option("--safety-model", help="Safety-degraded reference: a model directory or a LoRA adapter directory.")]
UtilityModel = Annotated[str, typer.Option("--utility-model", help="Utility-oriented reference: a model directory or a LoRA adapter directory.")]
BaseModel = Annotated[Optional[str], typer.Option("--base-model", help="Base model of the adapters (default: the base named in each adapter_config.json).")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Tokens, score shards, stats and config; re-running resumes from it. Default: OUTPUT-run.")]
Split = Annotated[Optional[str], typer.Option("--split", help="Split of a dataset dict or Hub dataset (default: train).")]
Column = Annotated[Optional[list[str]], typer.Option("--column", help="Rename an input column: canonical=actual, e.g. --column prompt=question. Canonical names: messages, prompt, completion, instruction, input, output, system_prompt, question, response.")]
Template = Annotated[str, typer.Option("--template", help="chat (the model's chat template), paper (Human:/Assistant: as in the TOSS experiments), or a Jinja file.")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Truncate rows to N tokens; stats.json counts the truncated rows.")]
SkipInvalid = Annotated[bool, typer.Option("--skip-invalid", help="A row that cannot be read or tokenized goes to OUTPUT-rejected (reason \"invalid: ...\") instead of stopping the run (even with --keep-empty: it has no tokens); stats.json counts rows_invalid.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Read, tokenize and score only the first N input rows (a trial run).")]
ScoreReasoning = Annotated[bool, typer.Option("--score-reasoning/--no-score-reasoning", help="Score reasoning (reasoning_content, <think> blocks) like the rest of each response. --no-score-reasoning keeps it out of the scores and the masking; the output still trains on it.")]
MaxInvalid = Annotated[Optional[int], typer.Option("--max-invalid", help="With --skip-invalid: stop anyway (exit 2, naming the row) once more than N rows are invalid.")]
Backend = Annotated[str, typer.Option("--backend", help="Scoring backend: torch (transformers) or vllm (needs vLLM installed; see docs/vllm.md).")]
MergeAdapters = Annotated[bool, typer.Option("--merge-adapters", help="vllm: merge LoRA adapters into full weights (cached in the run directory) instead of serving them as LoRA. Needed for adapters that touch lm_head/embed_tokens; always done on CPU.")]
Verify = Annotated[int, typer.Option("--verify", help="vllm: re-score N random rows with the torch backend; report max/mean |ΔNLL| and fail above the dtype's tolerance.")]
GpuMemory = Annotated[Optional[float], typer.Option("--gpu-memory-utilization", help="vllm: share of GPU memory for the engine (default 0.8: prompt logprobs need headroom).")]
TensorParallel = Annotated[int, typer.Option("--tensor-parallel-size", help="vllm: GPUs per engine.")]
VllmArg = Annotated[Optional[list[str]], typer.Option("--vllm-arg", help="vllm: any other engine argument as key=value (repeatable), e.g. --vllm-arg max_num_batched_tokens=4096; numbers, true/false and JSON values are parsed.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16. Log-softmax is float32 always.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
BatchTokens = Annotated[Optional[int], typer.Option("--max-batch-tokens", show_default=False, help="Padded tokens per forward pass of the torch backend and --verify [default: 2048 on CPU, 8192 on GPU]; vLLM's is --vllm-arg max_num_batched_tokens (default 2048).")]
ShardRows = Annotated[int, typer.Option("--shard-rows", help="Rows per shard: the unit of every step, of parallel work and of resume.")]
DatasetName = Annotated[Optional[str], typer.Option("--name", help="The config of a Hub dataset that has several (datasets.load_dataset's name).")]
NumProc = Annotated[int, typer.Option("--num-proc", help="Tokenizer processes.")]
ShardSlice = Annotated[Optional[str], typer.Option("--shard-slice", help="I/N: score only every N-th shard from the I-th (Slurm arrays, torchrun, any launcher); a final `select` assembles the slices.")]
ExecutorOpt = Annotated[str, typer.Option("--executor", help="local (this process) or ray (Ray Data: one scorer actor per replica; docs/scale.md).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="ray: the cluster to join (default: RAY_ADDRESS, else a local Ray).")]
Replicas = Annotated[int, typer.Option("--replicas", help="ray: scorer actors, each holding both references.")]
GpusPerReplica = Annotated[float, typer.Option("--gpus-per-replica", help="ray: GPUs per replica (a vLLM replica with 2+ runs tensor-parallel).")]
CpusPerReplica = Annotated[int, typer.Option("--cpus-per-replica", help="ray: CPUs per replica, also its torch thread count.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="local: torch threads of the scorer (default: torch's choice).")]
Deterministic = Annotated[bool, typer.Option("--deterministic", help="GPU: batch-invariant scores (vLLM's batch-invariant mode, deterministic torch kernels); docs/scale.md.")]
RemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model repositories to run their own code.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle-weights", help="Load a model, adapter or base directory that has only pickle weights (pytorch_model.bin, *.pt, adapter_model.bin; no .safetensors). Off: refused, since unpickling can run code; weights load from safetensors only.")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Where the trainer-ready data goes: a save_to_disk directory (input_ids, attention_mask, labels), or one file with --format parquet|jsonl|torchtune.")]
Ratio = Annotated[float, typer.Option("--ratio", help="Share of all scored response tokens to mask, in [0, 1].")]
Scope = Annotated[str, typer.Option("--scope", help="global (top share over the whole dataset, as in the paper) or per-sample.")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Mask every token with score above this value instead of a share.")]
KeepEmpty = Annotated[bool, typer.Option("--keep-empty", help="Keep rows left with no trainable token, so output row i is input row i.")]
Rounds = Annotated[int, typer.Option("--rounds", help="TOSS-Pro: scoring rounds, refining the safety adapter on each round's flagged tokens in between (1 = plain TOSS).")]
RefineEpochs = Annotated[float, typer.Option("--refine-epochs", help="TOSS-Pro: epochs of each refinement.")]
RefineRate = Annotated[float, typer.Option("--refine-learning-rate", help="TOSS-Pro: constant learning rate of each refinement.")]
RefineBatch = Annotated[int, typer.Option("--refine-batch-size", help="TOSS-Pro: rows per optimiser step.")]
RefineMicroBatch = Annotated[int, typer.Option("--refine-micro-batch-size", help="TOSS-Pro: rows per forward pass.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, log lines or summary; errors only.")]
Strategy = Annotated[str, typer.Option("--strategy", help="toss (by token score, the paper), or a baseline at the same token budget: sample (whole rows by mean score), first-k (earliest response tokens), random.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of --strategy random.")]
NoReport = Annotated[bool, typer.Option("--no-report", help="Do not write RUN_DIR/report.html.")]
Format = Annotated[str, typer.Option("--format", help="arrow (save_to_disk directory), parquet, jsonl, or torchtune (tokens + pre-shifted labels); docs/trainers.md.")]
AssistantMasks = Annotated[bool, typer.Option("--emit-assistant-masks", help="Add an assistant_masks column, for TRL <= 1.6 with packing (which drops labels). Off: axolotl wants exactly three columns.")]
RepoId = Annotated[Optional[str], typer.Option("--push-to-hub", help="After writing, push OUTPUT (arrow) to this Hub dataset, ORG/NAME, with a dataset card; token from HF_TOKEN or `hf auth login`.")]
HubPrivate = Annotated[bool, typer.Option("--hub-private", help="With --push-to-hub: create the repo private (only applies when it is created).")]


def _verbose(value: bool) -> bool:
    """`-v` after the command (`toss-filter filter ... -v`): the same as before it (`toss-filter -v filter ...`)."""
    if value:
        _configure_logging(True)
    return value


def _log_every(value: float) -> float:
    """`--log-every`: set the interval of the plain progress lines (a module-level setting of
    `toss_filter.steps.progress`: the bars are built deep in the steps and executors, which take only
    show_progress). Called on every invocation, with the default too, so one in-process run never leaks its value
    into the next."""
    if value < 0:
        raise typer.BadParameter("expected seconds >= 0 (0: no log lines)")
    from toss_filter.steps import progress

    progress.LOG_EVERY = value
    return value


Verbose = Annotated[bool, typer.Option("--verbose", "-v", callback=_verbose, help="Log details (as `toss-filter -v COMMAND`).")]
LogEvery = Annotated[float, typer.Option("--log-every", callback=_log_every, metavar="SECONDS", help="When stderr is not a terminal (a log file, a scheduler): one plain progress line per step every SECONDS (done/total, tok/s, eta); 0: none. A run shorter than SECONDS prints none.")]


def _load_config_file(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """`--config FILE`: a YAML mapping of this command's options (names as on the command line, with or without
    dashes) that become its defaults, so anything given on the command line wins."""
    if value is None:
        return value
    import yaml

    try:
        loaded = yaml.safe_load(value.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:  # safe_load: a !!python/... tag is refused, never constructed
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        typer.echo(f"toss-filter: error: --config {value}: cannot read it: {problem}{where}", err=True)
        raise typer.Exit(2) from None
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    params = {p.name: p for p in ctx.command.params if p.name not in ("config",)}
    defaults: dict[str, Any] = {}
    for key, item in loaded.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in params:
            raise typer.BadParameter(f"{value}: unknown option {key!r} for `{ctx.command.name}`")
        if isinstance(item, dict):  # column: {prompt: question}, vllm-arg: {max_num_batched_tokens: 4096}
            item = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in item.items()]
        elif params[name].multiple and not isinstance(item, list):  # column: prompt=question
            item = [item]
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=_load_config_file, exists=True, dir_okay=False,
    help="YAML file of options (e.g. ratio: 0.1, safety-model: path); command-line options override it.")]


def _columns(pairs: list[str] | None) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        canonical, sep, actual = pair.partition("=")
        if not sep or not canonical or not actual:
            raise ConfigError(f"--column expects canonical=actual, got {pair!r}")
        mapping[canonical.strip()] = actual.strip()
    return mapping


def _vllm_args(pairs: list[str] | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--vllm-arg expects key=value, got {pair!r}")
        try:
            value = json.loads(text)  # numbers, true/false, null, JSON lists and objects
        except ValueError:
            value = text
        args[key.strip().replace("-", "_")] = value
    return args


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler's stop, `kill`) as Ctrl-C: a KeyboardInterrupt in the main thread, so `finally` blocks
    remove temporary files and release what they hold, and `_run` exits 130 with its one line. A second SIGTERM
    ends the process at once (the default action)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def _on_sigterm(handler: Any) -> Any:
    """Install `handler` for SIGTERM; return the previous one (None where signals cannot be set: not the main
    thread)."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread of the main interpreter
        return None


def _run(action: Any) -> Any:
    previous = _on_sigterm(_interrupt)
    try:
        # toss-filter draws its own progress bars; the libraries' per-step bars would only interleave with them.
        # Only the command does this: importing the library leaves the user's own bars alone.
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        return action()
    except TossError as err:
        typer.echo(f"toss-filter: error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("toss-filter: interrupted; completed shards are kept, re-run to resume", err=True)
        raise typer.Exit(130) from None
    finally:
        if previous is not None:
            _on_sigterm(previous)


def _summary(stats: dict[str, Any], run_dir: Path, report: Path | None = None) -> None:
    typer.echo(
        f"rows in {stats['rows_in']}, out {stats['rows_out']}, rejected {stats['rows_rejected']}; "
        f"masked {stats['masked_tokens']} of {stats['scored_tokens']} scored response tokens "
        f"({stats['masked_share']:.1%})"
    )
    typer.echo(f"output:   {stats['output']}")
    typer.echo(f"rejected: {stats['rejected_output']}")
    typer.echo(f"stats:    {run_dir / 'stats.json'}")
    if report:
        typer.echo(f"report:   {report}")
    _verify_summary(stats)


def _verify_summary(result: dict[str, Any]) -> None:
    verify = result.get("verify")
    if verify:
        typer.echo(
            f"verify:   {verify['rows']} rows re-scored with torch ({verify['token_scores']} token scores): "
            f"|ΔNLL| max {verify['max_abs_delta_nll']:.2g}, mean {verify['mean_abs_delta_nll']:.2g} "
            f"(tolerance for {verify['dtype']}: max {verify['tolerance']['max']}, mean {verify['tolerance']['mean']})"
        )


def _config(cls: type, params: dict[str, Any], **overrides: Any) -> Any:
    """`cls` (a config dataclass) from a command's parameters: options are named after the config fields, so a
    command's `locals()` map onto its config; list options are parsed first."""
    params = params | {"columns": _columns(params.get("column")), "vllm_args": _vllm_args(params.get("vllm_arg"))}
    params |= {key: str(params[key]) for key in ("run_dir", "output") if params.get(key) is not None} | overrides
    return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls) if f.name in params})



@app.command("filter")
def filter_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel, output: Output,
    base_model: BaseModel = None, ratio: Ratio = 0.2, backend: Backend = "torch", keep_empty: KeepEmpty = False,
    run_dir: RunDirOpt = None, template: Template = "chat", max_length: MaxLength = None, scope: Scope = "global",
    skip_invalid: SkipInvalid = False, max_invalid: MaxInvalid = None, limit: Limit = None,
    score_reasoning: ScoreReasoning = True,
    threshold: Threshold = None, split: Split = None, column: Column = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = None, shard_rows: ShardRows = 1000,
    trust_remote_code: RemoteCode = False, allow_pickle_weights: AllowPickle = False,
    merge_adapters: MergeAdapters = False, verify: Verify = 0,
    gpu_memory_utilization: GpuMemory = None, tensor_parallel_size: TensorParallel = 1, vllm_arg: VllmArg = None,
    name: DatasetName = None, num_proc: NumProc = 1, executor: ExecutorOpt = "local", ray_address: RayAddress = None,
    replicas: Replicas = 1, gpus_per_replica: GpusPerReplica = 0.0, cpus_per_replica: CpusPerReplica = 1,
    threads: Threads = None, deterministic: Deterministic = False,
    strategy: Strategy = "toss", seed: Seed = 0, format: Format = "arrow", emit_assistant_masks: AssistantMasks = False,
    push_to_hub: RepoId = None, hub_private: HubPrivate = False,
    rounds: Rounds = 1, refine_epochs: RefineEpochs = 1.0, refine_learning_rate: RefineRate = 1e-4,
    refine_batch_size: RefineBatch = 16, refine_micro_batch_size: RefineMicroBatch = 4,
    no_report: NoReport = False, quiet: Quiet = False, log_every: LogEvery = 30.0, verbose: Verbose = False,
    config: ConfigFile = None,
) -> None:
    """Score and mask in one go: INPUT → OUTPUT (a save_to_disk dataset any trainer can load), plus
    RUN_DIR/report.html."""
    from toss_filter.api import filter_dataset

    run_dir = run_dir or default_run_dir(output)
    params = dict(locals())

    def action() -> dict[str, Any]:
        select_config = _config(SelectConfig, params)
        if push_to_hub:
            from toss_filter.hub import check_repo_id

            check_repo_id(push_to_hub)
            if format != "arrow":
                raise ConfigError("--push-to-hub pushes the arrow output: leave --format at arrow")
        elif hub_private:
            raise ConfigError("--hub-private only applies with --push-to-hub")
        refine = RefineConfig(rounds, refine_epochs, refine_learning_rate, refine_batch_size, refine_micro_batch_size)
        return filter_dataset(_config(ScoreConfig, params), select_config, show_progress=not quiet, refine=refine,
                              executor=_config(ExecutorConfig, params))

    stats = _run(action)
    report = None if no_report else _run(lambda: _write_report(run_dir))
    if not quiet:
        _summary(stats, run_dir, report)
    if push_to_hub:
        _push(output, push_to_hub, run_dir, hub_private, None, None, quiet)


@app.command("score")
def score_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where tokens and score shards go; re-running resumes.")],
    base_model: BaseModel = None, backend: Backend = "torch", template: Template = "chat",
    max_length: MaxLength = None, skip_invalid: SkipInvalid = False, max_invalid: MaxInvalid = None,
    score_reasoning: ScoreReasoning = True,
    limit: Limit = None, split: Split = None, column: Column = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = None, shard_rows: ShardRows = 1000,
    trust_remote_code: RemoteCode = False, allow_pickle_weights: AllowPickle = False,
    merge_adapters: MergeAdapters = False, verify: Verify = 0,
    gpu_memory_utilization: GpuMemory = None, tensor_parallel_size: TensorParallel = 1, vllm_arg: VllmArg = None,
    name: DatasetName = None, num_proc: NumProc = 1, shard_slice: ShardSlice = None, executor: ExecutorOpt = "local",
    ray_address: RayAddress = None, replicas: Replicas = 1, gpus_per_replica: GpusPerReplica = 0.0,
    cpus_per_replica: CpusPerReplica = 1, threads: Threads = None, deterministic: Deterministic = False,
    quiet: Quiet = False, log_every: LogEvery = 30.0, verbose: Verbose = False, config: ConfigFile = None,
) -> None:
    """Step 1 of 2: tokenize INPUT and score every response token under both references into RUN_DIR."""
    from toss_filter.api import score_dataset

    params = dict(locals())
    summary = _run(lambda: score_dataset(_config(ScoreConfig, params), _config(ExecutorConfig, params),
                                         show_progress=not quiet))
    if not quiet:
        reused = summary["reused_shard_roles"]
        typer.echo(f"scored {summary['rows']} rows into {run_dir} ({summary['resumed_shards']} of {summary['shards']} "
                   f"shards resumed" + (f"; {reused} reference-shard scores reused from another pair)" if reused else ")"))
        _verify_summary(summary)


@app.command("select")
def select_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="A run directory written by `toss-filter score`.")],
    output: Output, ratio: Ratio = 0.2, scope: Scope = "global", threshold: Threshold = None,
    keep_empty: KeepEmpty = False, strategy: Strategy = "toss", seed: Seed = 0, format: Format = "arrow",
    emit_assistant_masks: AssistantMasks = False, executor: ExecutorOpt = "local", ray_address: RayAddress = None,
    no_report: NoReport = False, quiet: Quiet = False, verbose: Verbose = False, config: ConfigFile = None,
) -> None:
    """Step 2 of 2: mask the top-scoring tokens from RUN_DIR's scores and write OUTPUT; re-run freely with
    another --ratio, nothing is re-scored."""
    from toss_filter.api import select_dataset

    params = dict(locals())
    stats = _run(lambda: select_dataset(_config(SelectConfig, params), _config(ExecutorConfig, params),
                                        show_progress=not quiet))
    report = None if no_report else _run(lambda: _write_report(run_dir))
    if not quiet:
        _summary(stats, run_dir, report)


@app.command("train-ref")
def train_ref_command(
    data: Annotated[list[str], typer.Argument(help="Training data: one or more inputs (as for filter), trained on together.")],
    base_model: Annotated[str, typer.Option("--base-model", help="The base model both references share (a directory or Hub id).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter directory to write (PEFT format + training.json).")],
    split: Split = None, column: Column = None, template: Template = "chat",
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate rows to N tokens.")] = 2048,
    max_rows: Annotated[Optional[int], typer.Option("--max-rows", help="Train on the first N rows only (default: all).")] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 16,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha.")] = 16,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = 0.0,
    target_modules: Annotated[str, typer.Option("--target-modules", help="Comma-separated module names, or all-linear.")] = "q_proj,v_proj",
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Constant learning rate.")] = 1e-5,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the data.")] = 2.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch (rows per optimiser step), reached by accumulation.")] = 64,
    micro_batch_size: Annotated[int, typer.Option("--micro-batch-size", help="Rows per forward pass.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the LoRA init and data order.")] = 42,
    init_adapter: Annotated[Optional[str], typer.Option("--init-adapter", help="Continue this adapter of the same base (its rank, alpha and targets) instead of a fresh one: the recipe trains θs from θu.")] = None,
    trust_remote_code: RemoteCode = False, quiet: Quiet = False, log_every: LogEvery = 30.0, verbose: Verbose = False,
    config: ConfigFile = None,
) -> None:
    """Train a reference: LoRA SFT on DATA's response tokens, tokenized exactly as `filter` does. Defaults are the
    paper's recipe. Train the safety-degraded reference on harmful compliant Q&A and the utility-oriented one on
    benign task data (docs/references.md)."""
    from toss_filter.train import TrainRefConfig, train_reference

    params = dict(locals())
    modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    record = _run(lambda: train_reference(_config(TrainRefConfig, params, target_modules=modules),
                                          show_progress=not quiet))
    if not quiet:
        typer.echo(f"trained on {record['rows_trained']} rows ({record['response_tokens']} response tokens), "
                   f"{record['optimizer_steps']} steps, loss {record['first_loss']:.3f} → {record['final_loss']:.3f}")
        typer.echo(f"adapter:  {output}")


@app.command("push")
def push_command(
    output: Annotated[Path, typer.Argument(help="An arrow output (save_to_disk directory) written by filter or select.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="The Hub dataset to push to, ORG/NAME.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (only applies when it is created).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created from main if missing).")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN or `hf auth login`); never logged or stored.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="The run directory that describes OUTPUT (default: OUTPUT-run).")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Publish OUTPUT to the Hugging Face Hub with a dataset card (method, citation, settings, models, source,
    stats, masked share by position, how to train on it); docs/hub.md."""
    _push(output, repo_id, run_dir or default_run_dir(output), private, revision, token, quiet)


def _push(output: Path, repo_id: str, run_dir: Path, private: bool, revision: str | None, token: str | None,
          quiet: bool) -> None:
    from toss_filter.hub import push_output

    result = _run(lambda: push_output(output, repo_id, run_dir, private=private, revision=revision, token=token))
    if not quiet:
        typer.echo(f"pushed:   {result['rows']} rows to {result['url']} ({result['revision']})")


@app.command("inspect")
def inspect_command(
    input: Input, template: Template = "chat",
    rows: Annotated[int, typer.Option("--rows", min=1, help="How many rows to show, from the first.")] = 3,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="The model or adapter directory (or Hub name) whose tokenizer and chat template to use: the one you will pass as --safety-model.")] = EMBEDDED_MODEL_ID,
    base_model: BaseModel = None, max_length: MaxLength = None, split: Split = None, column: Column = None,
    name: DatasetName = None, trust_remote_code: RemoteCode = False,
    score_reasoning: ScoreReasoning = True, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Show the first rows as `filter` tokenizes them, response tokens highlighted, with their counts. Loads the
    tokenizer only, no model."""
    from rich.console import Console

    from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
    from toss_filter.inspect import inspect_rows, render
    from toss_filter.score.models import load_tokenizer, resolve_spec

    def action() -> Any:
        # allow_pickle: no weights load here, so a pickle-only model directory is no risk
        loaded = load_tokenizer(resolve_spec("tokenizer", tokenizer, base_model, allow_pickle=True), trust_remote_code)
        encode = ConversationTokenizer(loaded, resolve_format(loaded, template), max_length, score_reasoning)
        return render(inspect_rows(input, encode, rows, split, _columns(column), name), loaded)

    shown = _run(action)
    if not quiet:  # with --quiet, only the exit code says whether the rows tokenize
        Console().print(shown)


@app.command("estimate")
def estimate_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel, base_model: BaseModel = None,
    template: Template = "chat", max_length: MaxLength = None, score_reasoning: ScoreReasoning = True,
    limit: Limit = None, split: Split = None, column: Column = None, name: DatasetName = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = None, trust_remote_code: RemoteCode = False,
    allow_pickle_weights: AllowPickle = False,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="Measure the scoring rate here (a few seconds of forward passes of the real references on a sample of the rows), or use --rate.")] = True,
    rate: Annotated[Optional[float], typer.Option("--rate", min=0.001, help="With --no-measure: model tokens/s to estimate with (e.g. model_tokens_per_s of an earlier run.json).")] = None,
    quiet: Quiet = False, verbose: Verbose = False, config: ConfigFile = None,
) -> None:
    """Rows, tokens, the longest row against the references' context, and about how long and how much memory a
    `filter` run of the same options would take (torch backend)."""
    from toss_filter.estimate import describe, estimate_run

    if measure == (rate is not None):
        raise typer.BadParameter("give --rate with --no-measure, and only then", param_hint="--rate")
    params = dict(locals())
    # estimate writes nothing: the run directory of a ScoreConfig is not used
    result = _run(lambda: estimate_run(_config(ScoreConfig, params, run_dir=""), rate, show_progress=not quiet))
    if not quiet:
        typer.echo("\n".join(describe(result)))


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory on which `select` or `filter` has finished.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="HTML file to write (default: RUN_DIR/report.html).")] = None,
    rows: Annotated[int, typer.Option("--rows", help="How many most-masked rows, and how many random rows, to show.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sample of rows.")] = 0,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Write one self-contained HTML file showing what was masked and why (docs/report.md)."""
    from toss_filter.report import write_report

    path = _run(lambda: write_report(run_dir, output or run_dir / "report.html", rows_shown=rows, seed=seed))
    if not quiet:
        typer.echo(f"report:   {path}")


@app.command("eval-refs")
def eval_refs_command(
    inputs: Annotated[list[str], typer.Argument(help="Labelled JSONL files (any row shape `filter` reads), filtered together in this order.")],
    safety_model: SafetyModel, utility_model: UtilityModel,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for input.jsonl, run/ (resumable), filtered/, eval-refs.json and eval-refs.png.")],
    base_model: BaseModel = None, ratio: Ratio = 0.2,
    label_column: Annotated[str, typer.Option("--label-column", help="The field naming each row's group.")] = "label",
    positive: Annotated[str, typer.Option("--positive", help="The group the references should flag; every other group is compared with it.")] = "harmful",
    source_column: Annotated[str, typer.Option("--source-column", help="The field naming each row's source (up to its first / or #), for the per-source table and the in/out-of-source bookkeeping; a `family` field, where a row has one, names its source family instead.")] = "source",
    template: Template = "chat", max_length: MaxLength = None, dtype: Dtype = "auto", device: Device = "auto",
    max_batch_tokens: BatchTokens = None, trust_remote_code: RemoteCode = False,
    allow_pickle_weights: AllowPickle = False,
    rounds: Rounds = 1, refine_epochs: RefineEpochs = 1.0, refine_learning_rate: RefineRate = 1e-4,
    refine_batch_size: RefineBatch = 16, refine_micro_batch_size: RefineMicroBatch = 4,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Measure how well two references separate a positive group (harmful) from every other group of labelled
    rows, through the real pipeline at --ratio: masked share per group, AUROC of the per-row masked share and
    mean score, and the share of rows losing more than half their response tokens."""
    from toss_filter.eval_refs import EvalRefsConfig, evaluate_references, source_table, summary_table

    params = dict(locals())
    refine = RefineConfig(rounds, refine_epochs, refine_learning_rate, refine_batch_size, refine_micro_batch_size)
    result = _run(lambda: evaluate_references(_config(EvalRefsConfig, params), show_progress=not quiet,
                                              refine=refine))
    if not quiet:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 160)  # a log gets whole columns, not 80 wide
        for table in (summary_table(result, out_of_source=True), summary_table(result), source_table(result)):
            if table is not None:
                console.print(table)
        typer.echo(f"json:     {output / 'eval-refs.json'}")
    if "plot_skipped" in result:
        typer.echo(f"plot:     skipped: {result['plot_skipped']}", err=True)
    elif not quiet:
        typer.echo(f"plot:     {result['plot']}")


def _write_report(run_dir: Path) -> Path:
    from toss_filter.report import write_report

    return write_report(run_dir, run_dir / "report.html")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="toss-filter: %(message)s")
    # raised inside transformers by its own Trainer/peft calls; nothing a user can act on
    gradient_checkpointing = ".*is_gradient_checkpointing.*is deprecated"
    if verbose:  # also after `main` configured a quiet root (`toss-filter filter ... -v`): lower it, show the warning
        logging.getLogger().setLevel(logging.INFO)
        warnings.filterwarnings("default", message=gradient_checkpointing, category=FutureWarning)
    else:
        warnings.filterwarnings("ignore", message=gradient_checkpointing, category=FutureWarning)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details (or -v after the command).")] = False) -> None:
    _configure_logging(verbose)


if __name__ == "__main__":
    app()
