"""The Python API: `score` (load → tokenize → score), `select` (select → write) and `filter_dataset` (both).

Each step's I/O goes through the run directory (see `toss_filter.run`), so the steps can run separately.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from toss_filter.config import RefineConfig, ScoreConfig, SelectConfig, as_dict
from toss_filter.data.load import load_conversations
from toss_filter.data.tokenize import IGNORE_INDEX, ConversationTokenizer, resolve_format, tokenize_rows
from toss_filter.data.write import list_array, rejected_path, save_dataset, save_output, training_table
from toss_filter.errors import ConfigError
from toss_filter.refine import check_refinable, flagging, refine_rounds
from toss_filter.run import RunDir, list_column, model_fingerprint, package_versions, score_key, tokens_digest
from toss_filter.score.base import Scorer, TokenRow, scored_positions
from toss_filter.score.models import ROLES, ReferenceModels, resolve_spec
from toss_filter.score.torch_backend import TorchScorer
from toss_filter.score.vllm_backend import VllmScorer, agreement, require_agreement
from toss_filter.select import choose_unsafe, positions_in_rows

log = logging.getLogger(__name__)

POSITIONS_REPORTED = 32
VERIFY_SEED = 0
console = Console(stderr=True)
# toss-filter draws its own progress bars; the libraries' per-step bars would only interleave with them.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()


def _progress(enabled: bool) -> Progress | nullcontext:
    """Rich progress bars on stderr, only where it is a terminal: in a log or a pipe, the last frame of a bar
    would land between the lines a script reads (an error must stay the only line on stderr)."""
    if not enabled or not console.is_terminal:
        return nullcontext()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console,
    )


def _counted(items: Iterable[Any], description: str, enabled: bool) -> Iterator[Any]:
    """`items`, with a progress bar counting them (their number is not known in advance: input is streamed)."""
    with _progress(enabled) as progress:
        if progress is None:
            yield from items
            return
        task = progress.add_task(description, total=None, rate="")
        for item in items:
            yield item
            progress.advance(task)


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    # float32 on CPU: on AVX2 machines without bf16 units, bfloat16 is 5-6x slower.
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def token_rows(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, indices: Iterable[int]) -> list[TokenRow]:
    return [(ids[offsets[i]:offsets[i + 1]], labels[offsets[i]:offsets[i + 1]]) for i in indices]


@dataclass
class ScoredRun:
    """A run directory's tokens and current scores as flat arrays (row i is `[offsets[i]:offsets[i + 1]]`), and
    where its response tokens are: `response` indexes the flat arrays, `response_per_row` counts them per row."""

    state: dict[str, Any]
    tokens: pa.Table
    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    nll_safety: np.ndarray
    nll_utility: np.ndarray
    token_row: np.ndarray
    response: np.ndarray
    response_per_row: np.ndarray


def load_scored_run(run: RunDir) -> ScoredRun:
    """What `select` and TOSS-Pro read from a run directory that `score` has filled."""
    state = run.read_json("run.json")
    tokens = run.read_tokens()
    scores = run.read_scores(state["score_key"], state["shards"])
    if not np.array_equal(scores.column("row").to_numpy(), tokens.column("row").to_numpy()):
        raise ConfigError(f"{run.path}: score shards do not match tokens.arrow; re-run `toss-filter score`")
    input_ids, offsets = list_column(tokens, "input_ids")
    labels, _ = list_column(tokens, "labels")
    token_row = np.repeat(np.arange(tokens.num_rows), np.diff(offsets))
    response = np.flatnonzero(labels != IGNORE_INDEX)
    return ScoredRun(state, tokens, input_ids, labels, offsets, list_column(scores, "nll_safety")[0],
                     list_column(scores, "nll_utility")[0], token_row, response,
                     np.bincount(token_row[response], minlength=tokens.num_rows))


def score(config: ScoreConfig, show_progress: bool = True) -> dict[str, Any]:
    """Tokenize `config.input` and write per-token NLLs under both references into `config.run_dir`, resuming
    from any complete shards of the same configuration. Returns the run summary (also saved as run.json)."""
    run = RunDir(config.run_dir)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    specs = {role: resolve_spec(role, getattr(config, f"{role}_model"), config.base_model) for role in ROLES}
    references = ReferenceModels(specs["safety"], specs["utility"], dtype, device, config.trust_remote_code)

    started = time.perf_counter()
    chat_format = resolve_format(references.tokenizer, config.template)
    encode = ConversationTokenizer(references.tokenizer, chat_format, config.max_length)
    conversations = load_conversations(config.input, config.split, config.columns)
    tokens = tokenize_rows(_counted(conversations, "tokenize", show_progress), encode, config.input)
    tokenize_s = time.perf_counter() - started
    scoring = {
        "models": {role: model_fingerprint(spec.path) for role, spec in specs.items()},
        "bases": {role: spec.base and model_fingerprint(spec.base) for role, spec in specs.items()},
        "backend": config.backend, "dtype": str(dtype), "shard_rows": config.shard_rows,
    }
    key = score_key(tokens_digest(tokens), scoring)
    run.write_tokens(tokens)
    run.write_json("config.json", {"command": "score", "score": as_dict(config), "versions": package_versions()})

    shards = math.ceil(tokens.num_rows / config.shard_rows)
    todo = [s for s in range(shards) if not run.shard_path(key, s).exists()]
    ids_flat, offsets = list_column(tokens, "input_ids")
    labels_flat, _ = list_column(tokens, "labels")
    load_started = time.perf_counter()
    if todo and config.backend == "torch":  # timed apart from scoring; vLLM engines report their own set-up
        references.load()
    load_s = time.perf_counter() - load_started if config.backend == "torch" else None
    score_s = 0.0

    def shard_span(shard: int) -> range:
        return range(shard * config.shard_rows, min((shard + 1) * config.shard_rows, tokens.num_rows))

    with make_scorer(config, references, device, run) as scorer, _progress(show_progress) as progress:
        tasks, done = {}, {role: 0 for role in ROLES}
        if progress:
            todo_rows = sum(len(shard_span(s)) for s in todo)
            tasks = {role: progress.add_task(f"score ({role})", total=todo_rows, rate="") for role in ROLES}

        scoring_started = time.perf_counter()

        def reporter(role: str) -> Any:
            def report(batch_rows: int, batch_tokens: int) -> None:
                done[role] += batch_tokens
                if progress:  # the rate of both references together: where they share batches, no other is known
                    rate = sum(done.values()) / max(time.perf_counter() - scoring_started, 1e-9)
                    progress.update(tasks[role], advance=batch_rows, rate=f"{rate:,.0f} model-tok/s")
            return report

        def score_shard(roles: tuple[str, ...], shard: int) -> dict[str, pa.Array]:
            nonlocal score_s
            span = shard_span(shard)
            started = time.perf_counter()
            nll = scorer.nll_roles(roles, token_rows(ids_flat, labels_flat, offsets, span),
                                   {role: reporter(role) for role in roles})
            score_s += time.perf_counter() - started
            shard_offsets = offsets[span.start:span.stop + 1] - offsets[span.start]
            return {f"nll_{role}": list_array(np.concatenate(nll[role]) if nll[role] else np.zeros(0, np.float32),
                                              shard_offsets, pa.float32()) for role in roles}

        def write_shard(shard: int, columns: dict[str, Any]) -> None:
            span = shard_span(shard)
            run.write_shard(key, shard, pa.table({"row": tokens.column("row").slice(span.start, len(span)), **columns}))

        if todo and scorer.one_model_at_a_time:
            # Switching models costs an engine start, so one role goes over every shard before the other. Each
            # role's column is kept as a resumable part (scores/<key>/<role>/) until the shard is assembled.
            for role in ROLES:
                for shard in todo:
                    if not run.shard_path(f"{key}/{role}", shard).exists():
                        run.write_shard(f"{key}/{role}", shard, pa.table(score_shard((role,), shard)))
            for shard in todo:
                write_shard(shard, {f"nll_{role}": pq.read_table(run.shard_path(f"{key}/{role}", shard)).column(0)
                                    for role in ROLES})
            for role in ROLES:
                shutil.rmtree(run.scores_dir(f"{key}/{role}"), ignore_errors=True)
        else:
            for shard in todo:
                write_shard(shard, score_shard(ROLES, shard))
        scorer_info = scorer.describe()
    scored_tokens = sum(int(offsets[span.stop] - offsets[span.start]) for span in map(shard_span, todo))

    summary = {
        "score_key": key, "shards": shards, "rows": tokens.num_rows, "resumed_shards": shards - len(todo),
        "input": config.input, "template": chat_format.name, "models": references.describe(),
        "score_config": as_dict(config), "device": device, "dtype": str(dtype), "scorer": scorer_info,
        "timings": {
            "tokenize_s": round(tokenize_s, 3),
            "load_models_s": None if load_s is None else round(load_s, 3),
            "score_s": round(score_s, 3),  # both references; scored together where the backend can
            "tokens_scored_this_run": scored_tokens,
            "model_tokens_per_s": round(2 * scored_tokens / max(score_s, 1e-9), 1) if todo else None,
        },
    }
    if config.verify:
        summary["verify"] = verify_against_torch(run, key, shards, tokens, references, config)
    run.write_json("run.json", summary)
    if config.verify:
        require_agreement(summary["verify"])
    return summary


@contextmanager
def make_scorer(config: ScoreConfig, references: ReferenceModels, device: str, run: RunDir) -> Iterator[Scorer]:
    """The scorer of `config.backend`. A vLLM scorer's engine is shut down on exit, so that the memory is free
    for --verify's torch models."""
    if config.backend != "vllm":
        yield TorchScorer(references, device, config.max_batch_tokens)
        return
    scorer = VllmScorer(references, run.path / "merged", config.merge_adapters, config.gpu_memory_utilization,
                        config.tensor_parallel_size, config.vllm_args)
    try:
        yield scorer
    finally:
        scorer.close()


def verify_against_torch(run: RunDir, key: str, shards: int, tokens: pa.Table, references: ReferenceModels,
                         config: ScoreConfig) -> dict[str, Any]:
    """Re-score `config.verify` random rows (seeded, among rows with a scored token) with the torch backend and
    compare them with the stored scores of both roles: `{"rows", "seed", **agreement(...)}`."""
    ids_flat, offsets = list_column(tokens, "input_ids")
    labels_flat, _ = list_column(tokens, "labels")
    candidates = [i for i in range(tokens.num_rows) if scored_positions(labels_flat[offsets[i]:offsets[i + 1]]).any()]
    rng = np.random.default_rng(VERIFY_SEED)
    chosen = np.sort(rng.choice(candidates, min(config.verify, len(candidates)), replace=False))
    rows = token_rows(ids_flat, labels_flat, offsets, chosen)
    stored = run.read_scores(key, shards)
    torch_scorer = TorchScorer(references, resolve_device(config.device), config.max_batch_tokens)
    theirs, ours = [], []
    for role in ROLES:
        values, _ = list_column(stored, f"nll_{role}")
        theirs += [values[offsets[i]:offsets[i + 1]] for i in chosen]
        ours += torch_scorer.nll(role, rows)
    empty = np.zeros(0, np.float32)
    return {"rows": len(chosen), "seed": VERIFY_SEED,
            **agreement(np.concatenate(theirs or [empty]), np.concatenate(ours or [empty]), references.dtype)}


def select(config: SelectConfig, show_progress: bool = True) -> dict[str, Any]:
    """Mask the unsafe tokens chosen from the run directory's scores and write the output (see
    `toss_filter.data.write` for its contract), the rejected rows, the sidecar and stats.json."""
    started = time.perf_counter()
    run = RunDir(config.run_dir)
    scored = load_scored_run(run)
    state, tokens, input_ids, labels, offsets = scored.state, scored.tokens, scored.input_ids, scored.labels, scored.offsets
    token_row, response, response_per_row = scored.token_row, scored.response, scored.response_per_row
    if "rounds" in state and state["refine"]["flagged_with"] != flagging(config):
        log.warning("these scores come from TOSS-Pro rounds that flagged tokens with %s, not with this selection's "
                    "%s; re-run `filter --rounds` to refine θs for these settings", state["refine"]["flagged_with"],
                    flagging(config))
    n_rows = tokens.num_rows
    position = positions_in_rows(np.diff(offsets))
    # S(t) = nll_u(t) - nll_s(t); NaN if unscored
    token_score = (scored.nll_utility - scored.nll_safety).astype(np.float32)
    response_scores = token_score[response]
    unsafe = choose_unsafe(response_scores, response_per_row, config.ratio, config.strategy, config.scope,
                           config.threshold, config.seed)

    new_labels = labels.astype(np.int64)
    new_labels[response[unsafe]] = IGNORE_INDEX
    # A label at position 0 never reaches the loss (nothing predicts it), so it does not count as trainable.
    trainable_per_row = np.bincount(token_row[(new_labels != IGNORE_INDEX) & (position > 0)], minlength=n_rows)
    empty = trainable_per_row == 0
    kept = np.arange(n_rows) if config.keep_empty else np.flatnonzero(~empty)
    dropped = np.array([], dtype=np.int64) if config.keep_empty else np.flatnonzero(empty)
    select_s = time.perf_counter() - started

    write_start = time.perf_counter()
    output = Path(config.output)
    truncated = tokens.column("truncated").to_numpy(zero_copy_only=False)
    row_ids = tokens.column("row").to_numpy()
    rejected = training_table(input_ids, new_labels, offsets, dropped).append_column(
        "row", pa.array(row_ids[dropped], pa.int64())
    ).append_column("reason", pa.array(
        [_rejection_reason(truncated[i], response_per_row[i]) for i in dropped], pa.string()
    ))
    unsafe_flat = np.zeros(len(input_ids), dtype=bool)
    unsafe_flat[response[unsafe]] = True
    sidecar = pa.table({
        "row": pa.array(row_ids, pa.int64()),
        "score": list_array(np.where(labels != IGNORE_INDEX, token_score, np.nan), offsets, pa.float32()),
        "unsafe": list_array(unsafe_flat, offsets, pa.bool_()),
    })
    writes = [
        lambda: save_output(training_table(input_ids, new_labels, offsets, kept), output, config.format,
                            config.emit_assistant_masks),
        lambda: save_dataset(rejected, rejected_path(output)),
        lambda: save_dataset(sidecar, run.path / "token_scores"),
    ]
    with _progress(show_progress) as progress:
        task = progress.add_task("write", total=len(writes), rate="") if progress else None
        for write in writes:
            write()
            if progress:
                progress.advance(task)
    write_s = time.perf_counter() - write_start

    stats = _stats(config, state, response_scores, unsafe, response_per_row, truncated, empty, kept, dropped)
    stats["timings"] = state["timings"] | {"select_s": round(select_s, 3), "write_s": round(write_s, 3)}
    stats["output"], stats["rejected_output"] = str(output), str(rejected_path(output))
    run.write_json("stats.json", stats)
    run.write_json("config.json", {"command": "select", "score": state["score_config"], "select": as_dict(config),
                                   "refine": state.get("refine"), "versions": package_versions()})
    return stats


def _rejection_reason(truncated: bool, response_tokens: int) -> str:
    if response_tokens:
        return "all_masked"  # every response token was selected as unsafe
    return "truncated" if truncated else "no_response"  # --max-length cut the response off; or it was only a token


def _stats(config: SelectConfig, state: dict[str, Any], response_scores: np.ndarray, unsafe: np.ndarray,
           response_per_row: np.ndarray, truncated: np.ndarray, empty: np.ndarray, kept: np.ndarray,
           dropped: np.ndarray) -> dict[str, Any]:
    response_position = positions_in_rows(response_per_row)
    early = response_position < POSITIONS_REPORTED
    by_position_total = np.bincount(response_position[early], minlength=POSITIONS_REPORTED)
    by_position_masked = np.bincount(response_position[early], weights=unsafe[early], minlength=POSITIONS_REPORTED)
    scored = ~np.isnan(response_scores)
    return {
        "rows_in": int(len(response_per_row)), "rows_out": int(len(kept)), "rows_rejected": int(len(dropped)),
        "rows_truncated": int(truncated.sum()), "rows_without_trainable_token": int(empty.sum()),
        "response_tokens": int(len(response_scores)), "scored_tokens": int(scored.sum()),
        "masked_tokens": int(unsafe.sum()),
        "masked_share": float(unsafe.sum() / max(int(scored.sum()), 1)),
        "masked_share_by_response_position": [
            round(float(m / t), 4) if t else None for m, t in zip(by_position_masked, by_position_total)
        ],
        "score_cutoff": float(response_scores[unsafe].min()) if unsafe.any() else None,
        "selection": {"strategy": config.strategy, "ratio": config.ratio, "scope": config.scope,
                      "threshold": config.threshold, "seed": config.seed, "keep_empty": config.keep_empty},
        "output_format": config.format, "assistant_masks": config.emit_assistant_masks,
        "input": state["input"], "template": state["template"], "models": state["models"],
        "device": state["device"], "dtype": state["dtype"], "verify": state.get("verify"),
        **({"rounds": state["rounds"], "refine": state["refine"]} if "rounds" in state else {}),
    }


def filter_dataset(score_config: ScoreConfig, select_config: SelectConfig, show_progress: bool = True,
                   refine: RefineConfig | None = None) -> dict[str, Any]:
    """`score`, then TOSS-Pro's rounds if `refine.rounds > 1` (`toss_filter.refine`), then `select`, over the same
    run directory; returns the stats (also in RUN_DIR/stats.json)."""
    if refine and refine.rounds > 1:
        check_refinable(score_config, select_config)
    score(score_config, show_progress)
    if refine and refine.rounds > 1:
        refine_rounds(score_config, select_config, refine, show_progress)
    return select(select_config, show_progress)
