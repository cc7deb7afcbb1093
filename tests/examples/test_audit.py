"""The audit files (`examples/data/audit/`) agree with the eval and refs files they label."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, read_jsonl

DATA = REPO / "examples" / "data"


def sources(*paths: Path) -> list[str]:
    return [row["source"] for row in read_jsonl(*paths)]


def test_every_audited_row_is_a_harmful_row_of_its_split():
    heldout = sources(DATA / "eval" / "harmful.jsonl", DATA / "eval" / "harmful_nc.jsonl")
    trained = sources(*(DATA / "refs" / name for name in ("safety_train.jsonl", "safety_more.jsonl")))
    others = read_jsonl(DATA / "audit" / "heldout_other_labels.jsonl")
    assert [row["source"] for row in others] == [s for s in heldout if not s.startswith("hh-rlhf")]
    train_labels = read_jsonl(DATA / "audit" / "hh_rejected_train_labels.jsonl")
    assert sorted(row["source"] for row in train_labels) == sorted(s for s in trained if s.startswith("hh-rlhf"))
    assert set(sources(DATA / "audit" / "hh_rejected_not_harmful.jsonl")) < set(heldout)
    mix = [row["source"] for row in read_jsonl(DATA / "mix" / "realistic_custom.jsonl") if row["label"] == "harmful"]
    assert sources(DATA / "audit" / "mix_harmful_labels.jsonl") == mix


def test_the_not_harmful_file_is_the_rows_both_passes_call_not_harmful():
    labels = read_jsonl(DATA / "audit" / "heldout_other_labels.jsonl")
    both_not = [row["source"] for row in labels if row["harmful_compliant"] == [False, False]]
    assert sources(DATA / "audit" / "heldout_other_not_harmful.jsonl") == both_not
    assert len(both_not) == 15 and sum(len(set(row["harmful_compliant"])) == 1 for row in labels) == 107
