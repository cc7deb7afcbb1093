"""Steps 4 and 5 over the shard plan: decide which response tokens are unsafe, then write every shard's output.

    select_step(config, executor, show_progress) -> stats (also RUN_DIR/stats.json)

1. `select.streaming.decide` reads the scores shard by shard in a few passes of small per-shard summaries
   (histograms, counts) and returns a `Decision`: the exact rule of `select.rules`, never gathering the scores.
2. Each shard is then written, independently (by the executor): its training rows, its rejected rows and its
   per-token sidecar, into `RUN_DIR/select/<select_key>/`, as shard files that exist only complete. A re-run
   writes only the missing ones.
3. The three datasets are finished (moved into place, or streamed into one file for --format parquet/jsonl/
   torchtune) and the per-shard counts add up to stats.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from toss_filter.arrow import list_array
from toss_filter.config import SelectConfig, as_dict
from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.data.write import (ShardedDataset, check_output, check_output_dir, export, rejected_path,
                                    training_schema, training_table, with_assistant_masks)
from toss_filter.fingerprint import content_key, package_versions
from toss_filter.run import REJECTED_SCHEMA, SIDECAR_SCHEMA, RunDir, ScoredShard, ShardFiles, commit_output_set
from toss_filter.select.rules import positions_in_rows
from toss_filter.select.streaming import Decision, ResponseShard, Rule, decide
from toss_filter.steps.score import check_scored
from toss_filter.steps.tokenize import invalid_reason

log = logging.getLogger(__name__)

POSITIONS_REPORTED = 32


def response_shard(data: ScoredShard) -> ResponseShard:
    """The scores of a shard's response tokens, and how many each row has: what the selection passes read."""
    response = np.flatnonzero(data.labels != IGNORE_INDEX)
    per_row = np.bincount(data.token_row[response], minlength=len(data.row_ids)).astype(np.int64)
    return ResponseShard(data.score[response], per_row, data.row_ids)


@dataclass(frozen=True)
class ResponseScores:
    """`response_shard` of each shard of a run, read on demand (picklable: the executors send it to workers)."""

    files: ShardFiles

    def __call__(self, shard: int) -> ResponseShard:
        return response_shard(self.files.scored(shard))


def _rejection_reason(truncated: bool, response_tokens: int) -> str:
    if response_tokens:
        return "all_masked"  # every response token was selected as unsafe
    return "truncated" if truncated else "no_response"  # --max-length cut the response off; or it was only a token


def write_shard(files: ShardFiles, decision: Decision, staging: str, shards: int, keep_empty: bool,
                assistant_masks: bool, shard: int) -> dict[str, Any]:
    """Mask shard `shard` by `decision` and write its three shard files (unless complete); return its counts."""
    data = files.scored(shard)
    response, token_row, responses = np.flatnonzero(data.labels != IGNORE_INDEX), data.token_row, response_shard(data)
    response_per_row = responses.response_per_row
    unsafe = decision.unsafe(shard, responses)
    new_labels = data.labels.astype(np.int64)
    new_labels[response[unsafe]] = IGNORE_INDEX
    position = positions_in_rows(np.diff(data.offsets))

    def trainable_per_row() -> np.ndarray:
        # A label at position 0 never reaches the loss (nothing predicts it), so it does not count as trainable.
        return np.bincount(token_row[(new_labels != IGNORE_INDEX) & (position > 0)], minlength=len(data.row_ids))

    scored_left = trainable_per_row()
    # --no-score-reasoning: the reasoning was kept out of the scores, not out of training, so it keeps its labels.
    # A row whose every scored token was masked is rejected all the same: its reasoning led to an unsafe answer.
    new_labels[data.unscored] = data.input_ids[data.unscored]
    trainable = trainable_per_row()
    empty = (trainable == 0) | ((response_per_row > 0) & (scored_left == 0))
    kept = np.arange(len(data.row_ids)) if keep_empty else np.flatnonzero(~empty)
    dropped = np.zeros(0, dtype=np.int64) if keep_empty else np.flatnonzero(empty)

    invalid = data.invalid  # --skip-invalid: the rows that could not be loaded or tokenized (no tokens)

    outputs = _datasets(Path(staging), shards, assistant_masks)
    if not all(dataset.done(shard) for dataset in outputs.values()):
        table = training_table(data.input_ids, new_labels, data.offsets, kept)
        outputs["output"].write(shard, with_assistant_masks(table) if assistant_masks else table)
        rejected = training_table(data.input_ids, new_labels, data.offsets, dropped)
        rejected = (rejected.append_column("row", pa.array(data.row_ids[dropped], pa.int64()))
                    .append_column("reason", pa.array([_rejection_reason(data.truncated[i], response_per_row[i])
                                                       for i in dropped], pa.string())))
        if invalid.num_rows:  # empty token lists, merged into input order
            no_tokens = training_table(np.zeros(0, np.int32), np.zeros(0, np.int64),
                                       np.zeros(invalid.num_rows + 1, np.int64), np.arange(invalid.num_rows))
            reasons = [invalid_reason(f, p) for f, p in zip(invalid.column("field").to_pylist(),
                                                            invalid.column("problem").to_pylist())]
            no_tokens = (no_tokens.append_column("row", invalid.column("row"))
                         .append_column("reason", pa.array(reasons, pa.string())))
            rejected = pa.concat_tables([rejected, no_tokens]).sort_by("row")
        outputs["rejected"].write(shard, rejected)
        unsafe_flat = np.zeros(len(data.input_ids), dtype=bool)
        unsafe_flat[response[unsafe]] = True
        outputs["token_scores"].write(shard, pa.table({
            "row": pa.array(data.row_ids, pa.int64()),
            "score": list_array(np.where(data.labels != IGNORE_INDEX, data.score, np.nan), data.offsets, pa.float32()),
            "unsafe": list_array(unsafe_flat, data.offsets, pa.bool_()),
        }, schema=SIDECAR_SCHEMA))

    response_scores = data.score[response]
    response_position = positions_in_rows(response_per_row)
    early = response_position < POSITIONS_REPORTED
    return {
        "rows_in": len(data.row_ids) + invalid.num_rows, "rows_out": len(kept),
        "rows_rejected": len(dropped) + invalid.num_rows, "rows_invalid": invalid.num_rows,
        "rows_truncated": int(data.truncated.sum()), "rows_without_trainable_token": int(empty.sum()),
        "response_tokens": len(response), "scored_tokens": int((~np.isnan(response_scores)).sum()),
        "masked_tokens": int(unsafe.sum()),
        "by_position_total": np.bincount(response_position[early], minlength=POSITIONS_REPORTED),
        "by_position_masked": np.bincount(response_position[early], weights=unsafe[early],
                                          minlength=POSITIONS_REPORTED).astype(np.int64),
        "min_unsafe_score": float(response_scores[unsafe].min()) if unsafe.any() else None,
    }


def _datasets(staging: Path, shards: int, assistant_masks: bool) -> dict[str, ShardedDataset]:
    return {"output": ShardedDataset(staging / "output", shards, training_schema(assistant_masks)),
            "rejected": ShardedDataset(staging / "rejected", shards, REJECTED_SCHEMA),
            "token_scores": ShardedDataset(staging / "token_scores", shards, SIDECAR_SCHEMA)}


def select_step(config: SelectConfig, executor: Any, show_progress: bool = True) -> dict[str, Any]:
    """Mask the unsafe tokens chosen from the run directory's scores and write the output (see
    `toss_filter.data.write` for its contract), the rejected rows, the sidecar and stats.json."""
    started = time.perf_counter()
    run = RunDir(config.run_dir)
    state = run.read_json("run.json")
    plan = check_scored(run, state)
    if "rounds" in state and state["refine"]["flagged_with"] != config.flagging():
        log.warning("these scores come from TOSS-Pro rounds that flagged tokens with %s, not with this selection's "
                    "%s; re-run `filter --rounds` to refine θs for these settings", state["refine"]["flagged_with"],
                    config.flagging())
    files = ShardFiles(str(run.path), state["tokens_key"], state["score_key"])
    rule = Rule(config.strategy, config.ratio, config.scope, config.threshold, config.seed)
    decision = decide(rule, plan.shards, ResponseScores(files),
                      partial(executor.map_shards, description="select", show_progress=show_progress))
    select_s = time.perf_counter() - started

    write_started = time.perf_counter()
    masks = config.emit_assistant_masks and config.format == "arrow"
    key = content_key({"layout": "select-v2", "score_key": state["score_key"], "rule": config.rule(),
                       "assistant_masks": masks})
    staging = run.path / "select" / key
    counts = executor.map_shards(partial(write_shard, files, decision, str(staging), plan.shards, config.keep_empty,
                                         masks), range(plan.shards), description="write", show_progress=show_progress)
    outputs = _datasets(staging, plan.shards, masks)
    output = Path(config.output)
    # Both targets are checked before either moves, so a refusal never leaves one in place without the other.
    check_output(output, config.format, config.emit_assistant_masks)
    check_output_dir(rejected_path(output), "the rejected rows' directory")

    stats = _stats(config, state, counts, decision)
    manifest = run.tokens_manifest(state["tokens_key"]) or {}
    stats |= {name: manifest.get(name, 0) for name in ("unscored_tokens", "reasoning_dropped_turns")}
    stats["output"], stats["rejected_output"] = str(output), str(rejected_path(output))
    commit_output_set(run, key, [
        ("rejected", lambda: outputs["rejected"].finish(rejected_path(output))),
        ("sidecar", lambda: outputs["token_scores"].finish(run.path / "token_scores")),
        ("output", lambda: export(outputs["output"], output, config.format, config.emit_assistant_masks)),
        ("staging removed", staging.rmdir),  # its three datasets have moved into place
    ], lambda: stats | {"timings": state["timings"] | {"select_s": round(select_s, 3),
                                                       "write_s": round(time.perf_counter() - write_started, 3)}})
    stats = run.read_json("stats.json")
    run.write_json("config.json", {"command": "select", "score": state["score_config"], "select": as_dict(config),
                                   "refine": state.get("refine"), "versions": package_versions()})
    return stats


def _stats(config: SelectConfig, state: dict[str, Any], counts: list[dict[str, Any]],
           decision: Decision) -> dict[str, Any]:
    total = {name: sum(c[name] for c in counts) for name in (
        "rows_in", "rows_out", "rows_rejected", "rows_invalid", "rows_truncated", "rows_without_trainable_token",
        "response_tokens", "scored_tokens", "masked_tokens")}
    by_total = sum((c["by_position_total"] for c in counts), np.zeros(POSITIONS_REPORTED, np.int64))
    by_masked = sum((c["by_position_masked"] for c in counts), np.zeros(POSITIONS_REPORTED, np.int64))
    cutoff = min((c["min_unsafe_score"] for c in counts if c["min_unsafe_score"] is not None), default=None)
    return {
        **total,
        "masked_share": float(total["masked_tokens"] / max(total["scored_tokens"], 1)),
        "masked_share_by_response_position": [
            round(float(m / t), 4) if t else None for m, t in zip(by_masked, by_total)
        ],
        "score_cutoff": cutoff,
        "selection": {"strategy": config.strategy, "ratio": config.ratio, "scope": config.scope,
                      "threshold": config.threshold, "seed": config.seed, "keep_empty": config.keep_empty,
                      "budget": decision.k, "selection_passes": decision.passes},
        "output_format": config.format, "assistant_masks": config.emit_assistant_masks,
        "input": state["input"], "template": state["template"], "models": state["models"],
        "device": state["device"], "dtype": state["dtype"], "verify": state.get("verify"),
        "shards": state["shards"],
        **({"rounds": state["rounds"], "refine": state["refine"]} if "rounds" in state else {}),
    }
