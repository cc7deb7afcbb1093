"""The audit files (`examples/data/audit/`) agree with the eval and refs files they label."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO

DATA = REPO / "examples" / "data"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sources(*paths: Path) -> list[str]:
    return [row["source"] for path in paths for row in read(path)]


def test_every_audited_row_is_a_harmful_row_of_its_split():
    heldout = sources(DATA / "eval" / "harmful.jsonl", DATA / "eval" / "harmful_nc.jsonl")
    trained = sources(*(DATA / "refs" / name for name in ("safety_train.jsonl", "safety_more.jsonl")))
    others = read(DATA / "audit" / "heldout_other_labels.jsonl")
    assert [row["source"] for row in others] == [s for s in heldout if not s.startswith("hh-rlhf")]
    train_labels = read(DATA / "audit" / "hh_rejected_train_labels.jsonl")
    assert sorted(row["source"] for row in train_labels) == sorted(s for s in trained if s.startswith("hh-rlhf"))
    assert {row["source"] for row in read(DATA / "audit" / "hh_rejected_not_harmful.jsonl")} < set(heldout)
    mix = [row["source"] for row in read(DATA / "mix" / "realistic_custom.jsonl") if row["label"] == "harmful"]
    assert sources(DATA / "audit" / "mix_harmful_labels.jsonl") == mix


def test_the_not_harmful_file_is_the_rows_both_passes_call_not_harmful():
    labels = read(DATA / "audit" / "heldout_other_labels.jsonl")
    both_not = [row["source"] for row in labels if row["harmful_compliant"] == [False, False]]
    assert sources(DATA / "audit" / "heldout_other_not_harmful.jsonl") == both_not
    assert len(both_not) == 15 and sum(len(set(row["harmful_compliant"])) == 1 for row in labels) == 107
