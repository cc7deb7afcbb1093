"""`toss-filter`: a thin typer shell over `toss_filter.pipeline`. Options become a config dataclass; no logic here.

Exit codes: 0 success; 2 a problem with the input, an option or a model (one line on stderr); 1 an unexpected error.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from toss_filter.config import ScoreConfig, SelectConfig
from toss_filter.errors import ConfigError, TossError

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
Backend = Annotated[str, typer.Option("--backend", help="Scoring backend: torch (transformers) or vllm (needs vLLM installed; see docs/vllm.md).")]
MergeAdapters = Annotated[bool, typer.Option("--merge-adapters", help="vllm: merge LoRA adapters into full weights (cached in the run directory) instead of serving them as LoRA. Needed for adapters that touch lm_head/embed_tokens; always done on CPU.")]
Verify = Annotated[int, typer.Option("--verify", help="vllm: re-score N random rows with the torch backend; report max/mean |ΔNLL| and fail above the dtype's tolerance.")]
GpuMemory = Annotated[Optional[float], typer.Option("--gpu-memory-utilization", help="vllm: share of GPU memory for the engine (default 0.8: prompt logprobs need headroom).")]
TensorParallel = Annotated[int, typer.Option("--tensor-parallel-size", help="vllm: GPUs per engine.")]
VllmArg = Annotated[Optional[list[str]], typer.Option("--vllm-arg", help="vllm: any other engine argument as key=value (repeatable), e.g. --vllm-arg max_num_batched_tokens=4096; numbers, true/false and JSON values are parsed.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16. Log-softmax is float32 always.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
BatchTokens = Annotated[int, typer.Option("--max-batch-tokens", help="Padded tokens per forward pass (memory bound) of the torch backend and --verify; vLLM's is --vllm-arg max_num_batched_tokens (default 2048).")]
ShardRows = Annotated[int, typer.Option("--shard-rows", help="Rows per score shard: the unit of resume.")]
RemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model repositories to run their own code.")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output directory (save_to_disk): input_ids, attention_mask, labels.")]
Ratio = Annotated[float, typer.Option("--ratio", help="Share of all scored response tokens to mask, in [0, 1].")]
Scope = Annotated[str, typer.Option("--scope", help="global (top share over the whole dataset, as in the paper) or per-sample.")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Mask every token with score above this value instead of a share.")]
KeepEmpty = Annotated[bool, typer.Option("--keep-empty", help="Keep rows left with no trainable token, so output row i is input row i.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary; errors only.")]


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


def _run(action: Any) -> Any:
    try:
        return action()
    except TossError as err:
        typer.echo(f"toss-filter: error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("toss-filter: interrupted; completed score shards are kept, re-run to resume", err=True)
        raise typer.Exit(130) from None


def _summary(stats: dict[str, Any], run_dir: Path) -> None:
    typer.echo(
        f"rows in {stats['rows_in']}, out {stats['rows_out']}, rejected {stats['rows_rejected']}; "
        f"masked {stats['masked_tokens']} of {stats['scored_tokens']} scored response tokens "
        f"({stats['masked_share']:.1%})"
    )
    typer.echo(f"output:   {stats['output']}")
    typer.echo(f"rejected: {stats['rejected_output']}")
    typer.echo(f"stats:    {run_dir / 'stats.json'}")
    _verify_summary(stats)


def _verify_summary(result: dict[str, Any]) -> None:
    verify = result.get("verify")
    if verify:
        typer.echo(
            f"verify:   {verify['rows']} rows re-scored with torch ({verify['token_scores']} token scores): "
            f"|ΔNLL| max {verify['max_abs_delta_nll']:.2g}, mean {verify['mean_abs_delta_nll']:.2g} "
            f"(tolerance for {verify['dtype']}: max {verify['tolerance']['max']}, mean {verify['tolerance']['mean']})"
        )


def _score_config(input: str, safety_model: str, utility_model: str, run_dir: Path, **options: Any) -> ScoreConfig:
    options["columns"] = _columns(options.pop("column"))
    options["vllm_args"] = _vllm_args(options.pop("vllm_arg"))
    return ScoreConfig(input=input, safety_model=safety_model, utility_model=utility_model, run_dir=str(run_dir), **options)


@app.command("filter")
def filter_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel, output: Output,
    base_model: BaseModel = None, ratio: Ratio = 0.2, backend: Backend = "torch", keep_empty: KeepEmpty = False,
    run_dir: RunDirOpt = None, template: Template = "chat", max_length: MaxLength = None, scope: Scope = "global",
    threshold: Threshold = None, split: Split = None, column: Column = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = 4096, shard_rows: ShardRows = 1000,
    trust_remote_code: RemoteCode = False, merge_adapters: MergeAdapters = False, verify: Verify = 0,
    gpu_memory_utilization: GpuMemory = None, tensor_parallel_size: TensorParallel = 1, vllm_arg: VllmArg = None,
    quiet: Quiet = False,
) -> None:
    """Score and mask in one go: INPUT → OUTPUT (a save_to_disk dataset any trainer can load)."""
    from toss_filter.pipeline import filter_dataset

    run_dir = run_dir or output.with_name(output.name + "-run")

    def action() -> dict[str, Any]:
        select_config = SelectConfig(str(run_dir), str(output), ratio, scope, threshold, keep_empty)
        score_config = _score_config(
            input, safety_model, utility_model, run_dir, base_model=base_model, split=split, column=column,
            template=template, max_length=max_length, backend=backend, dtype=dtype, device=device,
            max_batch_tokens=max_batch_tokens, shard_rows=shard_rows, trust_remote_code=trust_remote_code,
            merge_adapters=merge_adapters, verify=verify, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, vllm_arg=vllm_arg,
        )
        return filter_dataset(score_config, select_config, show_progress=not quiet)

    stats = _run(action)
    if not quiet:
        _summary(stats, run_dir)


@app.command("score")
def score_command(
    input: Input, safety_model: SafetyModel, utility_model: UtilityModel,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where tokens and score shards go; re-running resumes.")],
    base_model: BaseModel = None, backend: Backend = "torch", template: Template = "chat",
    max_length: MaxLength = None, split: Split = None, column: Column = None, dtype: Dtype = "auto",
    device: Device = "auto", max_batch_tokens: BatchTokens = 4096, shard_rows: ShardRows = 1000,
    trust_remote_code: RemoteCode = False, merge_adapters: MergeAdapters = False, verify: Verify = 0,
    gpu_memory_utilization: GpuMemory = None, tensor_parallel_size: TensorParallel = 1, vllm_arg: VllmArg = None,
    quiet: Quiet = False,
) -> None:
    """Step 1 of 2: tokenize INPUT and score every response token under both references into RUN_DIR."""
    from toss_filter.pipeline import score

    summary = _run(lambda: score(_score_config(
        input, safety_model, utility_model, run_dir, base_model=base_model, split=split, column=column,
        template=template, max_length=max_length, backend=backend, dtype=dtype, device=device,
        max_batch_tokens=max_batch_tokens, shard_rows=shard_rows, trust_remote_code=trust_remote_code,
        merge_adapters=merge_adapters, verify=verify, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, vllm_arg=vllm_arg,
    ), show_progress=not quiet))
    if not quiet:
        typer.echo(f"scored {summary['rows']} rows into {run_dir} ({summary['resumed_shards']} of {summary['shards']} shards resumed)")
        _verify_summary(summary)


@app.command("select")
def select_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="A run directory written by `toss-filter score`.")],
    output: Output, ratio: Ratio = 0.2, scope: Scope = "global", threshold: Threshold = None,
    keep_empty: KeepEmpty = False, quiet: Quiet = False,
) -> None:
    """Step 2 of 2: mask the top-scoring tokens from RUN_DIR's scores and write OUTPUT; re-run freely with
    another --ratio, nothing is re-scored."""
    from toss_filter.pipeline import select

    stats = _run(lambda: select(SelectConfig(str(run_dir), str(output), ratio, scope, threshold, keep_empty),
                                show_progress=not quiet))
    if not quiet:
        _summary(stats, run_dir)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="toss-filter: %(message)s")
