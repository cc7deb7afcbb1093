"""TOSS-Pro: refine the safety-degraded reference on the tokens it flags, over several rounds, then select.

The paper does not publish its schedule; this is the reading implemented (docs/design.md, "TOSS-Pro"):
1. Round r scores every response token with θu and the current θs, and flags the tokens the selection rule picks
   (by default the global top ρ, as in the final selection).
2. Unless r is the last round, θs (a LoRA adapter) keeps training, on labels restricted to the flagged tokens
   (everything else -100), for `epochs`. Rows with no flagged token are left out of that training set.
3. The next round scores again, under the refined θs only: θu never changes, so its scores from round 1 are reused.
The final mask is the last round's. Round 1 is plain TOSS, so `rounds=1` changes nothing.

The rounds hold the run's tokens and scores in memory (TOSS-Pro retrains on the flagged rows, which is far
costlier than the arrays); selection and writing afterwards stream shard by shard as usual.

Resumable: each refinement leaves a checkpoint in `rounds/round-<r>/`: the refined adapter, `nll_safety.npy` (θs's
scores after it), `flagged.npy` (round r's flags) and, written last, `round.json` (the round's entry and the key of
the settings it was computed under: the first round's score key, the refinement and flagging settings, not the
number of rounds). A re-run takes every consecutive checkpoint from round 1 whose key matches and continues after
the last one, so a killed run redoes at most the round it was in, and `--rounds 3` after `--rounds 2` refines once
more. Training and scoring on CPU are deterministic, so a resumed run equals an uninterrupted one.

Written into the run directory: each refined adapter as `rounds/round-<r>/safety/` (PEFT format), the last
round's scores as a new score key, shard by shard (θu's files are linked from the first round's key), so `select`
and `report` work unchanged; its key.json is the first round's with the refined adapter as the safety model, the
torch backend for that role (`role_backends`) and the refinement under `refined`. Also written: in run.json a
`rounds` list of `{"round", "masked_share", "overlap_with_previous", "mean_score_flagged", "mean_score_unflagged",
"refine_rows", "refine_final_loss"}` that `select` copies into stats.json. Refinement re-scores with the torch
backend whatever `--backend` scored round 1; both backends agree to float tolerance (docs/vllm.md).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from toss_filter.config import RefineConfig, ScoreConfig, SelectConfig, as_dict
from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.arrow import list_array
from toss_filter.errors import ConfigError
from toss_filter.files import atomic_file, atomic_write_text, link_or_copy
from toss_filter.plan import write_table
from toss_filter.run import SCORES_SCHEMA, RunDir, ShardFiles
from toss_filter.fingerprint import content_key, model_fingerprint
from toss_filter.score.models import resolve_device, resolve_dtype, resolve_spec
from toss_filter.score.torch_backend import TorchScorer
from toss_filter.select.rules import choose_unsafe


def round_stats(round_number: int, scores: np.ndarray, flagged: np.ndarray, previous: np.ndarray | None) -> dict[str, Any]:
    """One round's entry: `scores` and `flagged` are over the response tokens (NaN = unscored)."""
    scored = ~np.isnan(scores)
    unflagged = scored & ~flagged
    return {
        "round": round_number,
        "masked_share": float(flagged.sum() / max(int(scored.sum()), 1)),
        "overlap_with_previous": None if previous is None else float((flagged & previous).sum() / max(int(flagged.sum()), 1)),
        "mean_score_flagged": float(scores[flagged].mean()) if flagged.any() else None,
        "mean_score_unflagged": float(scores[unflagged].mean()) if unflagged.any() else None,
    }


def flagged_rows(input_ids: np.ndarray, offsets: np.ndarray, flagged_flat: np.ndarray) -> Dataset:
    """Training rows for the refinement: every row with a flagged token, labels only on its flagged tokens."""
    rows = [i for i in range(len(offsets) - 1) if flagged_flat[offsets[i]:offsets[i + 1]].any()]
    ids = [input_ids[offsets[i]:offsets[i + 1]].tolist() for i in rows]
    labels = [np.where(flagged_flat[offsets[i]:offsets[i + 1]], input_ids[offsets[i]:offsets[i + 1]], IGNORE_INDEX).tolist()
              for i in rows]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def _checkpoint(directory: Path, key: str, entry: dict[str, Any], nll_safety: np.ndarray, flagged: np.ndarray) -> None:
    """Round `entry["round"]`'s checkpoint beside its adapter; round.json last, so it marks a complete one."""
    for name, array in (("nll_safety", nll_safety), ("flagged", flagged)):
        with atomic_file(directory / f"{name}.npy") as staging, open(staging, "wb") as file:
            np.save(file, array, allow_pickle=False)  # a handle: np.save would add .npy to the staging name
    atomic_write_text(directory / "round.json", json.dumps({"key": key, "entry": entry}, indent=1) + "\n")


def _resume(rounds_dir: Path, key: str, last: int) -> tuple[list[dict[str, Any]], str | None,
                                                              tuple[np.ndarray, np.ndarray] | None]:
    """(entries, adapter, (θs's scores, the last round's flags)) of the consecutive complete checkpoints from round 1
    made under `key`, up to round `last`; ([], None, None) when there is none."""
    entries: list[dict[str, Any]] = []
    for round_number in range(1, last + 1):
        directory = rounds_dir / f"round-{round_number}"
        try:
            record = json.loads((directory / "round.json").read_text())
        except (OSError, ValueError):
            break
        if record.get("key") != key or not (directory / "safety" / "adapter_config.json").exists():
            break
        entries.append(record["entry"])
    if not entries:
        return [], None, None
    directory = rounds_dir / f"round-{len(entries)}"
    arrays = tuple(np.load(directory / f"{name}.npy", allow_pickle=False) for name in ("nll_safety", "flagged"))
    return entries, str(directory / "safety"), arrays


def check_refinable(score_config: ScoreConfig, select_config: SelectConfig) -> None:
    """Refuse, before any scoring, what TOSS-Pro cannot refine."""
    spec = resolve_spec("safety", score_config.safety_model, score_config.base_model,
                        score_config.allow_pickle_weights)
    if not spec.is_adapter:
        raise ConfigError("--rounds refines the safety reference as a LoRA adapter: give --safety-model as an "
                          "adapter directory (train one with `toss-filter train-ref`)")
    if select_config.strategy != "toss":
        raise ConfigError("--rounds is TOSS-Pro: it flags tokens by score, so it needs --strategy toss")


def refine_rounds(score_config: ScoreConfig, select_config: SelectConfig, refine: RefineConfig,
                  show_progress: bool = True) -> list[dict[str, Any]]:
    """Run TOSS-Pro on a run directory that `score` has just filled, resuming after the last matching checkpoint;
    returns the per-round entries (see the module docstring)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toss_filter.score.models import load_tokenizer, mergeable
    from toss_filter.progress import console
    from toss_filter.steps.score import check_scored
    from toss_filter.train import fit_adapter, save_adapter

    check_refinable(score_config, select_config)
    spec = resolve_spec("safety", score_config.safety_model, score_config.base_model,
                        score_config.allow_pickle_weights)
    run = RunDir(score_config.run_dir)
    state = run.read_json("run.json")
    plan = check_scored(run, state)
    files = ShardFiles(str(run.path), state["tokens_key"], state["score_key"])
    shards = [files.scored(shard) for shard in range(plan.shards)]
    input_ids = np.concatenate([s.input_ids for s in shards])
    labels = np.concatenate([s.labels for s in shards])
    lengths = np.concatenate([np.diff(s.offsets) for s in shards])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    nll_safety = np.concatenate([s.nll_safety for s in shards])
    nll_utility = np.concatenate([s.nll_utility for s in shards])
    response = np.flatnonzero(labels != IGNORE_INDEX)
    response_per_row = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[response], minlength=len(lengths))
    device = resolve_device(score_config.device)
    dtype = resolve_dtype(score_config.dtype, device)  # θs is re-scored in the dtype θu was scored in
    tokenizer = load_tokenizer(spec, score_config.trust_remote_code)
    rows = [row for shard in shards for row in shard.rows(range(len(shard.row_ids)))]

    checkpoint_key = content_key({"first_round": state["score_key"], **as_dict(refine) | {"rounds": None},
                                  **select_config.flagging()})
    entries, adapter, resumed = _resume(run.path / "rounds", checkpoint_key, refine.rounds - 1)
    previous = None
    if resumed:
        nll_safety, previous = resumed
        if show_progress:
            console.print(f"TOSS-Pro: resuming after round {len(entries)} (its refined adapter and scores are kept)")
    adapter = adapter or spec.path
    for round_number in range(len(entries) + 1, refine.rounds + 1):
        response_scores = (nll_utility - nll_safety)[response]
        flagged = choose_unsafe(response_scores, response_per_row, select_config.ratio, "toss", select_config.scope,
                                select_config.threshold)
        entries.append(round_stats(round_number, response_scores, flagged, previous)
                       | {"refine_rows": None, "refine_final_loss": None, "refine_s": None})
        if round_number == refine.rounds:
            break
        started = time.perf_counter()
        flagged_flat = np.zeros(len(input_ids), dtype=bool)
        flagged_flat[response[flagged]] = True
        train_rows = flagged_rows(input_ids, offsets, flagged_flat)
        if show_progress:
            console.print(f"TOSS-Pro round {round_number}: refining the safety adapter on {len(train_rows)} rows "
                          f"({int(flagged.sum())} flagged tokens)")
        base = AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32,
                                                    trust_remote_code=score_config.trust_remote_code)
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        losses = fit_adapter(model, tokenizer, train_rows, learning_rate=refine.learning_rate, epochs=refine.epochs,
                             batch_size=refine.batch_size, micro_batch_size=refine.micro_batch_size,
                             seed=refine.seed, device=device) if len(train_rows) else []
        target = run.path / "rounds" / f"round-{round_number}" / "safety"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(model, target)
        adapter = str(target)
        # Scored as score/models.py would: merged in float32, unmerged (and cast) otherwise.
        scorer_model = model.merge_and_unload() if mergeable(model, dtype) else model.to(dtype).get_base_model()
        nll_safety = np.concatenate(TorchScorer(device=device, max_batch_tokens=score_config.max_batch_tokens)
                                    .model_nll(scorer_model.eval().to(device), rows)).astype(np.float32)
        del model, base, scorer_model
        gc.collect()
        entries[-1] |= {"refine_rows": len(train_rows), "refine_final_loss": losses[-1] if losses else None,
                        "refine_s": round(time.perf_counter() - started, 3)}
        previous = flagged
        _checkpoint(target.parent, checkpoint_key, entries[-1], nll_safety, flagged)

    if refine.rounds > 1:
        first_payload = json.loads((run.scores_dir(state["score_key"]) / "key.json").read_text())
        payload = first_payload | {
            "models": first_payload["models"] | {"safety": model_fingerprint(adapter)},
            "role_backends": {"safety": "torch"},
            "refined": {"first_round": state["score_key"], **as_dict(refine), **select_config.flagging()},
        }
        key = content_key(payload)
        start = 0  # the shards' tokens are concatenated in shard order; each keeps its own row offsets
        for shard, data in enumerate(shards):
            stop = start + int(data.offsets[-1])
            write_table(run.score_shard(key, "safety", shard), pa.table({
                "row": pa.array(data.row_ids, pa.int64()),
                "nll": list_array(nll_safety[start:stop], data.offsets, pa.float32())}, schema=SCORES_SCHEMA))
            link_or_copy(run.score_shard(state["score_key"], "utility", shard), run.score_shard(key, "utility", shard))
            start = stop
        atomic_write_text(run.scores_dir(key) / "key.json", json.dumps(payload, indent=1) + "\n")
        state |= {"first_round_score_key": state["score_key"], "score_key": key}
    run.write_json("run.json", state | {"rounds": entries, "refine": as_dict(refine) | {"flagged_with": select_config.flagging()}})
    return entries
