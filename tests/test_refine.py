"""TOSS-Pro (`--rounds`): refinement of the safety adapter on each round's flagged tokens, on the tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from datasets import load_from_disk
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import chat, run_nll, write_jsonl
from toss_filter import RefineConfig, ScoreConfig, SelectConfig, filter_dataset, score_dataset
from toss_filter.errors import ConfigError
from toss_filter.refine import round_stats
from toss_filter.plan import read_table
from toss_filter.run import RunDir
from toss_filter.fingerprint import content_key, model_fingerprint
from toss_filter.arrow import list_column
from toss_filter.score.torch_backend import TorchScorer

ROWS = [chat(f"Question {i}?", f"Answer {i}: here is a response with several tokens to flag.") for i in range(8)]


def run_rounds(tmp_path, tiny_models, rounds: int, safety: str | None = None) -> dict:
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    score_config = ScoreConfig(str(data), safety or str(tiny_models["safety"]), str(tiny_models["utility"]),
                               str(tmp_path / "run"), device="cpu")
    select_config = SelectConfig(str(tmp_path / "run"), str(tmp_path / "out"), ratio=0.3, keep_empty=True)
    refine = RefineConfig(rounds=rounds, epochs=2, learning_rate=5e-2, batch_size=4, micro_batch_size=2)
    return filter_dataset(score_config, select_config, show_progress=False, refine=refine)


@pytest.mark.slow
def test_three_rounds_refine_safety_keep_utility_and_record_each_round(tmp_path, tiny_models):
    stats = run_rounds(tmp_path, tiny_models, rounds=3)
    run = RunDir(tmp_path / "run")
    state = run.read_json("run.json")
    assert [entry["round"] for entry in stats["rounds"]] == [1, 2, 3]
    assert stats["rounds"][0]["overlap_with_previous"] is None
    for entry in stats["rounds"]:
        assert entry["masked_share"] == pytest.approx(stats["masked_share"], abs=1e-9)
        assert entry["mean_score_flagged"] > entry["mean_score_unflagged"]
    for entry in stats["rounds"][1:]:
        assert 0.0 <= entry["overlap_with_previous"] <= 1.0
    assert stats["rounds"][0]["refine_rows"] > 0 and stats["rounds"][0]["refine_final_loss"] is not None

    first = run_nll(run.path, state["first_round_score_key"])
    final = run_nll(run.path)
    for role, should_change in (("utility", False), ("safety", True)):
        before, after = first[role], final[role]
        changed = np.nanmax(np.abs(before - after)) > 1e-4
        assert changed == should_change, role

    # The last refined adapter is a loadable PEFT adapter, and it is what scored the final round.
    adapter = tmp_path / "run" / "rounds" / "round-2" / "safety"
    assert (tmp_path / "run" / "rounds" / "round-1" / "safety" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    refined = PeftModel.from_pretrained(base, adapter).eval()
    ids, offsets = list_column(run.read_tokens(), "input_ids")
    labels, _ = list_column(run.read_tokens(), "labels")
    final_safety = final["safety"]
    row = slice(offsets[0], offsets[1])
    direct = TorchScorer().model_nll(refined.get_base_model(), [(ids[row], labels[row])])[0]
    np.testing.assert_allclose(final_safety[row], direct, atol=1e-4)


@pytest.mark.slow
def test_the_refined_key_describes_its_own_scores_and_lends_them(tmp_path, tiny_models):
    """The refined key.json names the last refined adapter, so scoring that adapter later reuses its scores."""
    run_rounds(tmp_path, tiny_models, rounds=3)
    run = RunDir(tmp_path / "run")
    state = run.read_json("run.json")
    first = json.loads((run.scores_dir(state["first_round_score_key"]) / "key.json").read_text())
    refined = json.loads((run.scores_dir(state["score_key"]) / "key.json").read_text())
    adapter = tmp_path / "run" / "rounds" / "round-2" / "safety"
    assert content_key(refined) == state["score_key"]
    assert refined["models"] == {"safety": model_fingerprint(str(adapter)), "utility": first["models"]["utility"]}
    assert refined["role_backends"] == {"safety": "torch"}
    assert refined["refined"]["first_round"] == state["first_round_score_key"]

    rescored = ScoreConfig(str(tmp_path / "data.jsonl"), str(adapter), str(tiny_models["utility"]),
                           str(tmp_path / "run"), device="cpu")
    again = score_dataset(rescored, show_progress=False)
    assert again["reused_shard_roles"] == 2 * again["shards"]
    fresh = score_dataset(replace(rescored, run_dir=str(tmp_path / "fresh")), show_progress=False)
    for role in ("safety", "utility"):
        np.testing.assert_array_equal(run_nll(run.path, again["score_key"])[role],
                                      run_nll(tmp_path / "fresh", fresh["score_key"])[role])


def test_one_round_is_plain_toss(tmp_path, tiny_models):
    stats = run_rounds(tmp_path, tiny_models, rounds=1)
    assert "rounds" not in stats and not (tmp_path / "run" / "rounds").exists()


def test_rounds_need_a_safety_adapter(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="adapter"):
        run_rounds(tmp_path, tiny_models, rounds=2, safety=str(tiny_models["base"]))
    assert not (tmp_path / "run" / "run.json").exists(), "refused before any scoring"


def test_round_stats_overlap_and_means():
    scores = np.array([3.0, 1.0, np.nan, 2.0, -1.0])
    flagged = np.array([True, False, False, True, False])
    entry = round_stats(2, scores, flagged, previous=np.array([True, True, False, False, False]))
    assert entry == {"round": 2, "masked_share": 0.5, "overlap_with_previous": 0.5, "mean_score_flagged": 2.5,
                     "mean_score_unflagged": 0.0}


@pytest.mark.slow
def test_a_run_killed_in_round_two_resumes_to_what_an_uninterrupted_run_gives(tmp_path, tiny_models, monkeypatch):
    import toss_filter.train

    fit, calls = toss_filter.train.fit_adapter, []

    def killed_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM would, during round 2's refinement
        return fit(*args, **kwargs)

    monkeypatch.setattr(toss_filter.train, "fit_adapter", killed_in_round_two)
    (tmp_path / "killed").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_rounds(tmp_path / "killed", tiny_models, rounds=3)
    resumed = run_rounds(tmp_path / "killed", tiny_models, rounds=3)
    assert len(calls) == 3  # round 1's refinement was kept, not redone
    monkeypatch.setattr(toss_filter.train, "fit_adapter", fit)
    (tmp_path / "whole").mkdir()
    whole = run_rounds(tmp_path / "whole", tiny_models, rounds=3)

    def without_timings(entries: list[dict]) -> list[dict]:
        return [{key: value for key, value in entry.items() if key != "refine_s"} for entry in entries]

    assert without_timings(resumed["rounds"]) == without_timings(whole["rounds"])
    final = {}
    for name in ("killed", "whole"):
        final[name] = run_nll(tmp_path / name / "run")["safety"]
        assert (tmp_path / name / "run" / "rounds" / "round-2" / "round.json").exists()
    np.testing.assert_array_equal(final["killed"], final["whole"])
    for column in ("input_ids", "labels"):
        assert load_from_disk(str(tmp_path / "killed" / "out"))[column] == load_from_disk(str(tmp_path / "whole" / "out"))[column]


@pytest.mark.slow
def test_more_rounds_after_fewer_refine_only_the_new_ones(tmp_path, tiny_models, monkeypatch):
    import toss_filter.train

    fit, calls = toss_filter.train.fit_adapter, []
    monkeypatch.setattr(toss_filter.train, "fit_adapter", lambda *a, **k: calls.append(1) or fit(*a, **k))
    run_rounds(tmp_path, tiny_models, rounds=2)
    stats = run_rounds(tmp_path, tiny_models, rounds=3)
    assert len(calls) == 2 and [entry["round"] for entry in stats["rounds"]] == [1, 2, 3]


@pytest.mark.slow
def test_rounds_with_skip_invalid_keep_every_shard_aligned(tmp_path, tiny_models):
    """Invalid rows are absent from the token shards, so a shard's tokens are not the plan's span of input rows: the
    refined scores must still land on their own shard's rows."""
    rows = [*ROWS[:2], {"messages": "not a list"}, *ROWS[2:5], {"oops": 1}, *ROWS[5:]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    score_config = ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]),
                               str(tmp_path / "run"), device="cpu", skip_invalid=True, shard_rows=3)
    select_config = SelectConfig(str(tmp_path / "run"), str(tmp_path / "out"), ratio=0.3, keep_empty=True)
    refine = RefineConfig(rounds=2, epochs=1, learning_rate=5e-2, batch_size=4, micro_batch_size=2)
    stats = filter_dataset(score_config, select_config, show_progress=False, refine=refine)
    assert stats["rows_invalid"] == 2 and stats["rows_out"] == len(ROWS)
    run = RunDir(tmp_path / "run")
    state = run.read_json("run.json")
    for shard in range(state["shards"]):
        tokens = run.read_token_shard(state["tokens_key"], shard)
        for role in ("safety", "utility"):
            scores = read_table(run.score_shard(state["score_key"], role, shard))
            assert scores.column("row").equals(tokens.column("row"))
            assert np.array_equal(list_column(scores, "nll")[1], list_column(tokens, "input_ids")[1])
