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

from toss_filter.config import (DataConfig, EstimateConfig, EvalRefsConfig, ExecutorConfig, ModelsConfig, RefineConfig,
                                 ScoreConfig, SelectConfig, TrainRefConfig)
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

def _field(config: type, name: str) -> dataclasses.Field:
    return {item.name: item for item in dataclasses.fields(config)}[name]


def opt(config: type, name: str, *flags: str, suffix: str = "", **kwargs: Any) -> Any:
    """The option of config field `name`: its flag and help come from the field's metadata (toss_filter.config)."""
    metadata = _field(config, name).metadata
    return typer.Option(*(flags or (metadata.get("flag") or f"--{name.replace('_', '-')}",)),
                        help=metadata["help"] + suffix, **kwargs)


Input = Annotated[str, typer.Argument(help=_field(DataConfig, "input").metadata["help"])]
SafetyModel = Annotated[str, opt(ModelsConfig, "safety_model")]
UtilityModel = Annotated[str, opt(ModelsConfig, "utility_model")]
BaseModel = Annotated[Optional[str], opt(ModelsConfig, "base_model")]
Template = Annotated[str, opt(ModelsConfig, "template")]
MaxLength = Annotated[Optional[int], opt(ModelsConfig, "max_length")]
Dtype = Annotated[str, opt(ModelsConfig, "dtype")]
Device = Annotated[str, opt(ModelsConfig, "device")]
BatchTokens = Annotated[Optional[int], opt(ModelsConfig, "max_batch_tokens", show_default=False)]
RemoteCode = Annotated[bool, opt(ModelsConfig, "trust_remote_code")]
AllowPickle = Annotated[bool, opt(ModelsConfig, "allow_pickle_weights")]
Split = Annotated[Optional[str], opt(DataConfig, "split")]
DatasetName = Annotated[Optional[str], opt(DataConfig, "name")]
Column = Annotated[Optional[list[str]], opt(DataConfig, "columns")]
ScoreReasoning = Annotated[bool, opt(DataConfig, "score_reasoning")]
Limit = Annotated[Optional[int], opt(DataConfig, "limit")]
RunDirOpt = Annotated[Optional[Path], opt(ScoreConfig, "run_dir", suffix=" Default: OUTPUT-run.")]
SkipInvalid = Annotated[bool, opt(ScoreConfig, "skip_invalid")]
MaxInvalid = Annotated[Optional[int], opt(ScoreConfig, "max_invalid")]
Backend = Annotated[str, opt(ScoreConfig, "backend")]
ShardRows = Annotated[int, opt(ScoreConfig, "shard_rows")]
NumProc = Annotated[int, opt(ScoreConfig, "num_proc")]
ShardSlice = Annotated[Optional[str], opt(ScoreConfig, "shard_slice")]
Deterministic = Annotated[bool, opt(ScoreConfig, "deterministic")]
MergeAdapters = Annotated[bool, opt(ScoreConfig, "merge_adapters")]
Verify = Annotated[int, opt(ScoreConfig, "verify")]
GpuMemory = Annotated[Optional[float], opt(ScoreConfig, "gpu_memory_utilization")]
TensorParallel = Annotated[int, opt(ScoreConfig, "tensor_parallel_size")]
VllmArg = Annotated[Optional[list[str]], opt(ScoreConfig, "vllm_args")]
ExecutorOpt = Annotated[str, opt(ExecutorConfig, "executor")]
RayAddress = Annotated[Optional[str], opt(ExecutorConfig, "ray_address")]
Replicas = Annotated[int, opt(ExecutorConfig, "replicas")]
GpusPerReplica = Annotated[float, opt(ExecutorConfig, "gpus_per_replica")]
CpusPerReplica = Annotated[int, opt(ExecutorConfig, "cpus_per_replica")]
Threads = Annotated[Optional[int], opt(ExecutorConfig, "threads")]
Output = Annotated[Path, opt(SelectConfig, "output", "--output", "-o")]
Ratio = Annotated[float, opt(SelectConfig, "ratio")]
Scope = Annotated[str, opt(SelectConfig, "scope")]
Threshold = Annotated[Optional[float], opt(SelectConfig, "threshold")]
KeepEmpty = Annotated[bool, opt(SelectConfig, "keep_empty")]
Strategy = Annotated[str, opt(SelectConfig, "strategy")]
Seed = Annotated[int, opt(SelectConfig, "seed")]
Format = Annotated[str, opt(SelectConfig, "format")]
AssistantMasks = Annotated[bool, opt(SelectConfig, "emit_assistant_masks")]
Report = Annotated[bool, opt(SelectConfig, "report")]
RepoId = Annotated[Optional[str], opt(SelectConfig, "push_to_hub")]
HubPrivate = Annotated[bool, opt(SelectConfig, "hub_private")]
Rounds = Annotated[int, opt(RefineConfig, "rounds")]
RefineEpochs = Annotated[float, opt(RefineConfig, "epochs")]
RefineRate = Annotated[float, opt(RefineConfig, "learning_rate")]
RefineBatch = Annotated[int, opt(RefineConfig, "batch_size")]
RefineMicroBatch = Annotated[int, opt(RefineConfig, "micro_batch_size")]
RefineSeed = Annotated[int, opt(RefineConfig, "seed")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, log lines or summary; errors only.")]

def _verbose(value: bool) -> bool:
    """`-v` after the command (`toss-filter filter ... -v`): the same as before it (`toss-filter -v filter ...`)."""
    if value:
        _configure_logging(True)
    return value


def _log_every(value: float) -> float:
    """`--log-every`: set the interval of the plain progress lines (a module-level setting of
    `toss_filter.progress`: the bars are built deep in the steps and executors, which take only
    show_progress). Called on every invocation, with the default too, so one in-process run never leaks its value
    into the next."""
    if value < 0:
        raise typer.BadParameter("expected seconds >= 0 (0: no log lines)")
    from toss_filter import progress

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
    # a key may be the option's flag (column, no-report) or its field name (columns, report)
    by_flag = {flag.lstrip("-").replace("-", "_"): p.name for p in params.values() for flag in p.opts}
    by_flag |= {flag.lstrip("-").replace("-", "_"): p.name for p in params.values() for flag in p.secondary_opts}
    defaults: dict[str, Any] = {}
    for key, item in loaded.items():
        flag = str(key).lstrip("-").replace("-", "_")
        name = params[flag].name if flag in params else by_flag.get(flag)
        if name is None:
            raise typer.BadParameter(f"{value}: unknown option {key!r} for `{ctx.command.name}`")
        if flag in [o.lstrip("-").replace("-", "_") for o in params[name].secondary_opts]:
            item = not item  # no-report: true is report: false
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


def _summary(stats: dict[str, Any], run_dir: Path) -> None:
    typer.echo(
        f"rows in {stats['rows_in']}, out {stats['rows_out']}, rejected {stats['rows_rejected']}; "
        f"masked {stats['masked_tokens']} of {stats['scored_tokens']} scored response tokens "
        f"({stats['masked_share']:.1%})"
    )
    typer.echo(f"output:   {stats['output']}")
    typer.echo(f"rejected: {stats['rejected_output']}")
    typer.echo(f"stats:    {run_dir / 'stats.json'}")
    if stats.get("report"):
        typer.echo(f"report:   {stats['report']}")
    _verify_summary(stats)
    if stats.get("pushed"):
        _pushed(stats["pushed"])


def _verify_summary(result: dict[str, Any]) -> None:
    verify = result.get("verify")
    if verify:
        typer.echo(
            f"verify:   {verify['rows']} rows re-scored with torch ({verify['token_scores']} token scores): "
            f"|ΔNLL| max {verify['max_abs_delta_nll']:.2g}, mean {verify['mean_abs_delta_nll']:.2g} "
            f"(tolerance for {verify['dtype']}: max {verify['tolerance']['max']}, mean {verify['tolerance']['mean']})"
        )


def _config(cls: type, params: dict[str, Any], prefix: str = "", **overrides: Any) -> Any:
    """`cls` (a config dataclass) from a command's parameters: options are named after the config fields (or
    `prefix` + the field, where two configs of one command share a name: `refine_seed`), so a command's `locals()`
    map onto its config; list options are parsed first."""
    params = params | {"columns": _columns(params.get("columns")), "vllm_args": _vllm_args(params.get("vllm_args"))}
    params |= {key: str(params[key]) for key in ("run_dir", "output") if params.get(key) is not None} | overrides
    values = {f.name: params[prefix + f.name] if prefix + f.name in params else params.get(f.name, f.default)
              for f in dataclasses.fields(cls) if prefix + f.name in params or f.name in params}
    return cls(**values)



@app.command("filter")
def filter_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel, output: Output,
    base_model: BaseModel = None, ratio: Ratio = 0.2, backend: Backend = "torch", keep_empty: KeepEmpty = False,
    run_dir: RunDirOpt = None, template: Template = "chat", max_length: MaxLength = None, scope: Scope = "global",
    skip_invalid: SkipInvalid = False, max_invalid: MaxInvalid = None, limit: Limit = None,
    score_reasoning: ScoreReasoning = True,
    threshold: Threshold = None, split: Split = None, columns: Column = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = None, shard_rows: ShardRows = 1000,
    trust_remote_code: RemoteCode = False, allow_pickle_weights: AllowPickle = False,
    merge_adapters: MergeAdapters = False, verify: Verify = 0,
    gpu_memory_utilization: GpuMemory = None, tensor_parallel_size: TensorParallel = 1, vllm_args: VllmArg = None,
    name: DatasetName = None, num_proc: NumProc = 1, executor: ExecutorOpt = "local", ray_address: RayAddress = None,
    replicas: Replicas = 1, gpus_per_replica: GpusPerReplica = 0.0, cpus_per_replica: CpusPerReplica = 1,
    threads: Threads = None, deterministic: Deterministic = False,
    strategy: Strategy = "toss", seed: Seed = 0, format: Format = "arrow", emit_assistant_masks: AssistantMasks = False,
    push_to_hub: RepoId = None, hub_private: HubPrivate = False,
    rounds: Rounds = 1, refine_epochs: RefineEpochs = 1.0, refine_learning_rate: RefineRate = 1e-4,
    refine_batch_size: RefineBatch = 16, refine_micro_batch_size: RefineMicroBatch = 4, refine_seed: RefineSeed = 42,
    report: Report = True, quiet: Quiet = False, log_every: LogEvery = 30.0, verbose: Verbose = False,
    config: ConfigFile = None,
) -> None:
    """Score and mask in one go: INPUT → OUTPUT (a save_to_disk dataset any trainer can load), plus
    RUN_DIR/report.html."""
    from toss_filter.api import filter_dataset

    run_dir = run_dir or default_run_dir(output)
    params = dict(locals())
    stats = _run(lambda: filter_dataset(
        _config(ScoreConfig, params), _config(SelectConfig, params), show_progress=not quiet,
        refine=_config(RefineConfig, params, prefix="refine_"), executor=_config(ExecutorConfig, params)))
    if not quiet:
        _summary(stats, run_dir)


@app.command("score")
def score_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where tokens and score shards go; re-running resumes.")],
    base_model: BaseModel = None, backend: Backend = "torch", template: Template = "chat",
    max_length: MaxLength = None, skip_invalid: SkipInvalid = False, max_invalid: MaxInvalid = None,
    score_reasoning: ScoreReasoning = True,
    limit: Limit = None, split: Split = None, columns: Column = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = None, shard_rows: ShardRows = 1000,
    trust_remote_code: RemoteCode = False, allow_pickle_weights: AllowPickle = False,
    merge_adapters: MergeAdapters = False, verify: Verify = 0,
    gpu_memory_utilization: GpuMemory = None, tensor_parallel_size: TensorParallel = 1, vllm_args: VllmArg = None,
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
    report: Report = True, push_to_hub: RepoId = None, hub_private: HubPrivate = False, quiet: Quiet = False,
    verbose: Verbose = False, config: ConfigFile = None,
) -> None:
    """Step 2 of 2: mask the top-scoring tokens from RUN_DIR's scores and write OUTPUT; re-run freely with
    another --ratio, nothing is re-scored."""
    from toss_filter.api import select_dataset

    params = dict(locals())
    stats = _run(lambda: select_dataset(_config(SelectConfig, params), _config(ExecutorConfig, params),
                                        show_progress=not quiet))
    if not quiet:
        _summary(stats, run_dir)


@app.command("train-ref")
def train_ref_command(
    data: Annotated[list[str], typer.Argument(help=_field(TrainRefConfig, "data").metadata["help"])],
    base_model: Annotated[str, opt(TrainRefConfig, "base_model")],
    output: Annotated[Path, opt(TrainRefConfig, "output", "--output", "-o")],
    split: Split = None, columns: Column = None, template: Template = "chat",
    max_length: Annotated[int, opt(TrainRefConfig, "max_length")] = 2048,
    max_rows: Annotated[Optional[int], opt(TrainRefConfig, "max_rows")] = None,
    rank: Annotated[int, opt(TrainRefConfig, "rank")] = 16,
    alpha: Annotated[int, opt(TrainRefConfig, "alpha")] = 16,
    dropout: Annotated[float, opt(TrainRefConfig, "dropout")] = 0.0,
    target_modules: Annotated[str, opt(TrainRefConfig, "target_modules")] = "q_proj,v_proj",
    learning_rate: Annotated[float, opt(TrainRefConfig, "learning_rate")] = 1e-5,
    epochs: Annotated[float, opt(TrainRefConfig, "epochs")] = 2.0,
    batch_size: Annotated[int, opt(TrainRefConfig, "batch_size")] = 64,
    micro_batch_size: Annotated[int, opt(TrainRefConfig, "micro_batch_size")] = 4,
    seed: Annotated[int, opt(TrainRefConfig, "seed")] = 42,
    init_adapter: Annotated[Optional[str], opt(TrainRefConfig, "init_adapter")] = None,
    trust_remote_code: RemoteCode = False, quiet: Quiet = False, log_every: LogEvery = 30.0, verbose: Verbose = False,
    config: ConfigFile = None,
) -> None:
    """Train a reference: LoRA SFT on DATA's response tokens, tokenized exactly as `filter` does. Defaults are the
    paper's recipe. Train the safety-degraded reference on harmful compliant Q&A and the utility-oriented one on
    benign task data (docs/references.md)."""
    from toss_filter.train import train_reference

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
        _pushed(result)


def _pushed(result: dict[str, Any]) -> None:
    typer.echo(f"pushed:   {result['rows']} rows to {result['url']} ({result['revision']})")


@app.command("inspect")
def inspect_command(
    input: Input, template: Template = "chat",
    rows: Annotated[int, typer.Option("--rows", min=1, help="How many rows to show, from the first.")] = 3,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="The model or adapter directory (or Hub name) whose tokenizer and chat template to use: the one you will pass as --safety-model.")] = EMBEDDED_MODEL_ID,
    base_model: BaseModel = None, max_length: MaxLength = None, split: Split = None, columns: Column = None,
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
        return render(inspect_rows(input, encode, rows, split, _columns(columns), name), loaded)

    shown = _run(action)
    if not quiet:  # with --quiet, only the exit code says whether the rows tokenize
        Console().print(shown)


@app.command("estimate")
def estimate_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel, base_model: BaseModel = None,
    template: Template = "chat", max_length: MaxLength = None, score_reasoning: ScoreReasoning = True,
    limit: Limit = None, split: Split = None, columns: Column = None, name: DatasetName = None, dtype: Dtype = "auto",
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
    result = _run(lambda: estimate_run(_config(EstimateConfig, params), rate, show_progress=not quiet))
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
    inputs: Annotated[list[str], typer.Argument(help=_field(EvalRefsConfig, "inputs").metadata["help"])],
    safety_model: SafetyModel, utility_model: UtilityModel,
    output: Annotated[Path, opt(EvalRefsConfig, "output", "--output", "-o")],
    base_model: BaseModel = None, ratio: Annotated[float, opt(EvalRefsConfig, "ratio")] = 0.2,
    label_column: Annotated[str, opt(EvalRefsConfig, "label_column")] = "label",
    positive: Annotated[str, opt(EvalRefsConfig, "positive")] = "harmful",
    source_column: Annotated[str, opt(EvalRefsConfig, "source_column")] = "source",
    template: Template = "chat", max_length: MaxLength = None, dtype: Dtype = "auto", device: Device = "auto",
    max_batch_tokens: BatchTokens = None, trust_remote_code: RemoteCode = False,
    allow_pickle_weights: AllowPickle = False,
    rounds: Rounds = 1, refine_epochs: RefineEpochs = 1.0, refine_learning_rate: RefineRate = 1e-4,
    refine_batch_size: RefineBatch = 16, refine_micro_batch_size: RefineMicroBatch = 4, refine_seed: RefineSeed = 42,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Measure how well two references separate a positive group (harmful) from every other group of labelled
    rows, through the real pipeline at --ratio: masked share per group, AUROC of the per-row masked share and
    mean score, and the share of rows losing more than half their response tokens."""
    from toss_filter.eval_refs import evaluate_references, source_table, summary_table

    params = dict(locals())
    result = _run(lambda: evaluate_references(_config(EvalRefsConfig, params), show_progress=not quiet,
                                              refine=_config(RefineConfig, params, prefix="refine_")))
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
