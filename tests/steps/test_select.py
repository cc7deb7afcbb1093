"""The masking step itself, at array level: `write_shard` over hand-built token and score shards equals a direct
computation with the oracle `select.rules.choose_unsafe` (labels, kept and rejected rows, the sidecar)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import load_from_disk

from toss_filter.arrow import list_array
from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.plan import write_table
from toss_filter.run import INVALID_SCHEMA, SCORES_SCHEMA, TOKENS_SCHEMA, RunDir, ShardFiles, invalid_path
from toss_filter.select.rules import choose_unsafe
from toss_filter.select.streaming import Rule, decide
from toss_filter.steps.select import ResponseScores, _datasets, write_shard

# Per row: input ids, which positions are scored response tokens, and S = nll_u - nll_s per token.
ROWS = [
    ([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], [0.0, 0.0, 0.9, 0.1, 0.8]),
    ([5, 6, 7], [0, 1, 1], [0.0, 0.95, 0.99]),  # every scored token masked at this ratio: rejected
    ([5, 6, 7, 8], [0, 0, 0, 0], [0.0, 0.0, 0.0, 0.0]),  # no response token: rejected as no_response
    ([5, 6, 7, 8, 9, 10], [0, 1, 1, 1, 1, 1], [0.0, -0.5, 0.2, 0.3, -0.1, 0.4]),
]
ROW_IDS = [0, 2, 3, 5]  # rows 1 and 4 were invalid (--skip-invalid)


def flat(column: list[list]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([np.array(c) for c in column]), np.cumsum([0] + [len(c) for c in column])


@pytest.fixture
def scored_run(tmp_path: Path) -> ShardFiles:
    run = RunDir(tmp_path / "run")
    ids, offsets = flat([r[0] for r in ROWS])
    labels = np.where(flat([r[1] for r in ROWS])[0] == 1, ids, IGNORE_INDEX)
    score = flat([r[2] for r in ROWS])[0].astype(np.float32)
    write_table(invalid_path(run.token_shard("t", 0)), pa.table(
        {"row": [1, 4], "field": ["messages", None], "problem": ["not a list", "broken"]}, schema=INVALID_SCHEMA))
    write_table(run.token_shard("t", 0), pa.table(
        [pa.array(ROW_IDS, pa.int64()), list_array(ids, offsets, pa.int32()), list_array(labels, offsets, pa.int32()),
         pa.array([False, False, True, False])], schema=TOKENS_SCHEMA))
    nll_safety = np.where(labels != IGNORE_INDEX, 1.0, np.nan).astype(np.float32)
    for role, nll in (("safety", nll_safety), ("utility", nll_safety + score)):
        write_table(run.score_shard("s", role, 0), pa.table(
            [pa.array(ROW_IDS, pa.int64()), list_array(nll, offsets, pa.float32())], schema=SCORES_SCHEMA))
    return ShardFiles(str(run.path), "t", "s")


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_write_shard_masks_exactly_the_oracle_tokens(scored_run, tmp_path, ratio):
    decision = decide(Rule("toss", ratio), 1, ResponseScores(scored_run))
    counts = write_shard(scored_run, decision, str(tmp_path / "staging"), 1, False, False, 0)

    data = scored_run.scored(0)
    response = data.labels != IGNORE_INDEX
    per_row = np.bincount(data.token_row[response], minlength=len(ROWS))
    unsafe = np.zeros(len(data.input_ids), bool)
    unsafe[np.flatnonzero(response)[choose_unsafe(data.score[response], per_row, ratio)]] = True
    expected = np.where(unsafe, IGNORE_INDEX, data.labels)
    trainable = [bool(((expected[a:b] != IGNORE_INDEX) & (np.arange(b - a) > 0)).any())
                 for a, b in zip(data.offsets, data.offsets[1:])]

    outputs = {name: dataset for name, dataset in _datasets(tmp_path / "staging", 1, False).items()}
    for name, dataset in outputs.items():
        dataset.finish(tmp_path / name)
    out, rejected, sidecar = (load_from_disk(str(tmp_path / name)) for name in ("output", "rejected", "token_scores"))
    kept = [i for i in range(len(ROWS)) if trainable[i]]
    assert out["input_ids"] == [ROWS[i][0] for i in kept]
    assert out["labels"] == [expected[data.offsets[i]:data.offsets[i + 1]].tolist() for i in kept]
    assert all(mask == [1] * len(ids) for mask, ids in zip(out["attention_mask"], out["input_ids"]))
    reasons = {1: "invalid: field 'messages': not a list", 4: "invalid: broken"}
    for i in range(len(ROWS)):
        if not trainable[i]:
            reasons[ROW_IDS[i]] = "truncated" if ROW_IDS[i] == 3 else "all_masked"
    assert dict(zip(rejected["row"], rejected["reason"])) == reasons
    assert rejected["row"] == sorted(reasons)  # in input order
    assert sidecar["row"] == ROW_IDS
    assert [bool(u) for row in sidecar["unsafe"] for u in row] == unsafe.tolist()
    scores = np.array([s if s is not None else np.nan for row in sidecar["score"] for s in row], np.float32)
    np.testing.assert_array_equal(np.isnan(scores), ~response)
    np.testing.assert_array_equal(scores[response], data.score[response])
    assert counts["masked_tokens"] == int(unsafe.sum()) and counts["rows_invalid"] == 2
    assert counts["rows_in"] == len(ROWS) + 2 and counts["rows_out"] == len(kept)
