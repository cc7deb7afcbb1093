"""The reproduction's bookkeeping (examples/reproduce/run.py): the realistic mix, seed ranges and paired differences."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "reproduce"))
from run import MIXES, differences, read_jsonl, spread  # noqa: E402


def test_realistic_mix_is_benign_general_and_unsafe_sounding_with_a_harmful_minority():
    labels = [row["label"] for row in read_jsonl(MIXES["realistic"].custom)]
    assert set(labels) == {"benign_general", "benign_unsafe_sounding", "harmful"}
    assert 0.05 < labels.count("harmful") / len(labels) < 0.25


def test_realistic_measurements_share_no_text_with_the_custom_set():
    texts = {text for row in read_jsonl(MIXES["realistic"].custom) for text in (row["prompt"], row["completion"])}
    for _, load in MIXES["realistic"].nll_sets.values():
        rows = load(48)
        assert len(rows) == 48
        assert not {turn["content"] for messages in rows for turn in messages} & texts


def test_spread_is_the_seed_mean_with_the_range_covering_every_seed():
    assert spread([1.0, 2.0, 4.0], ".2f") == "2.33 [1.00, 4.00]"
    assert spread([0.5], ".1%") == "50.0%"


def _run(nll_by_row: list[float]) -> dict:
    return {"nll_rows": {key: {"sum": nll_by_row, "count": [1] * len(nll_by_row)}
                         for key in MIXES["realistic"].nll_sets}}


def test_differences_pair_each_seed_with_the_unfiltered_model_of_that_seed():
    results = {"base": [_run([3.0, 3.0])], "unfiltered": [_run([1.0, 1.0]), _run([2.0, 2.0])],
               "toss": [_run([1.5, 1.5]), _run([2.1, 2.1])]}
    rows = {line.split(" | ")[0].strip("| "): line for line in differences(results, MIXES["realistic"]).splitlines()}
    assert rows["toss"].split(" | ")[1] == "+0.300 [+0.100, +0.500]"  # per seed +0.5 and +0.1
    assert rows["base"].split(" | ")[1] == "+1.500 [+1.000, +2.000]"  # the one base model against each seed
