import json

import numpy as np
import pytest
from datasets import load_from_disk

from conftest import chat, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset, score_dataset, select_dataset
from toss_filter.run import RunDir
from toss_filter.score.torch_backend import TorchScorer

ROWS = [
    chat("What is 2+2?", "Sure, 2+2 is 4."),
    chat("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    chat("Name a colour.", "Blue.", system_text="Be brief."),
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2, 3, 4, 5."}]},
    chat("Capital of France?", "Paris is the capital of France."),
    chat("Say yes.", "Yes."),
    chat("Explain rain briefly.", "Water vapour condenses into droplets that fall when heavy enough."),
]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def configs(tmp_path, data, tiny_models, **select_options):
    run_dir = str(tmp_path / "run")
    score_config = ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), run_dir, shard_rows=2)
    return score_config, SelectConfig(run_dir, str(tmp_path / "out"), **select_options)


@pytest.mark.slow
def test_output_is_a_three_column_dataset_with_masked_labels(tmp_path, data, tiny_models):
    stats = filter_dataset(*configs(tmp_path, data, tiny_models, ratio=0.2), show_progress=False)
    out = load_from_disk(str(tmp_path / "out"))
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    tokens = RunDir(tmp_path / "run").read_tokens().to_pylist()
    assert len(out) == stats["rows_out"] == len(ROWS) - stats["rows_rejected"]
    masked = 0
    for row, original in zip(out, tokens):  # nothing rejected at 20% here, so rows line up in input order
        assert row["input_ids"] == original["input_ids"]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        for label, before, token in zip(row["labels"], original["labels"], row["input_ids"]):
            assert label in (-100, token)
            assert before != -100 or label == -100  # prompt tokens stay masked
            masked += label == -100 and before != -100
    assert masked == stats["masked_tokens"] == int(0.2 * stats["scored_tokens"])
    assert stats["rows_in"] == len(ROWS) and stats["rows_rejected"] == 0


@pytest.mark.slow
def test_resume_after_an_interrupted_scoring_run_gives_an_identical_output(tmp_path, data, tiny_models, monkeypatch):
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    filter_dataset(*configs(clean_dir, data, tiny_models), show_progress=False)

    import toss_filter.steps.score as score_step
    calls = {"n": 0}
    original = score_step.write_table

    def interrupted(path, table):
        calls["n"] += 1
        if calls["n"] == 6:  # float32 LoRA scores one role at a time: 4 safety files and 1 utility file are written
            raise KeyboardInterrupt
        original(path, table)

    monkeypatch.setattr(score_step, "write_table", interrupted)
    score_config, select_config = configs(tmp_path, data, tiny_models)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(score_config, show_progress=False)
    monkeypatch.setattr(score_step, "write_table", original)
    scored, nll_roles = [], TorchScorer.nll_roles
    monkeypatch.setattr(TorchScorer, "nll_roles",
                        lambda self, roles, rows, cb=None: scored.extend(roles) or nll_roles(self, roles, rows, cb))
    summary = score_dataset(score_config, show_progress=False)
    assert summary["shards"] == 4 and scored == ["utility"] * 3  # only the files not yet written are scored
    # The utility weights were reached from a fresh load, yet the output is bit-identical to the clean run's.
    select_dataset(select_config, show_progress=False)
    resumed, clean = load_from_disk(str(tmp_path / "out")), load_from_disk(str(clean_dir / "out"))
    assert resumed.to_dict() == clean.to_dict()
    scores = [np.concatenate(load_from_disk(str(d / "run" / "token_scores"))["score"]) for d in (tmp_path, clean_dir)]
    np.testing.assert_array_equal(*scores)


@pytest.mark.slow
def test_select_reruns_with_another_ratio_without_rescoring(tmp_path, data, tiny_models):
    score_config, select_config = configs(tmp_path, data, tiny_models, ratio=0.1)
    filter_dataset(score_config, select_config, show_progress=False)
    shards = sorted((tmp_path / "run" / "scores").rglob("shard-*.arrow"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    stats = select_dataset(SelectConfig(str(tmp_path / "run"), str(tmp_path / "out"), ratio=0.5), show_progress=False)
    assert stats["masked_tokens"] == int(0.5 * stats["scored_tokens"])
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    summary = score_dataset(score_config, show_progress=False)  # same config again: everything resumes
    assert summary["resumed_shards"] == summary["shards"]


@pytest.mark.slow
def test_rows_without_a_trainable_token_go_to_rejected_unless_keep_empty(tmp_path, data, tiny_models):
    stats = filter_dataset(*configs(tmp_path, data, tiny_models, ratio=1.0), show_progress=False)
    assert stats["rows_out"] == 0 and stats["rows_rejected"] == len(ROWS)
    rejected = load_from_disk(str(tmp_path / "out-rejected"))
    assert rejected["row"] == list(range(len(ROWS)))
    assert set(rejected["reason"]) == {"all_masked"}
    kept = select_dataset(SelectConfig(str(tmp_path / "run"), str(tmp_path / "kept"), ratio=1.0, keep_empty=True),
                  show_progress=False)
    assert kept["rows_out"] == len(ROWS) and len(load_from_disk(str(tmp_path / "kept-rejected"))) == 0


@pytest.mark.slow
def test_truncation_is_counted_and_fully_truncated_rows_are_rejected(tmp_path, data, tiny_models):
    score_config, select_config = configs(tmp_path, data, tiny_models)
    score_config.max_length = 40  # the default system prompt alone is ~20 tokens
    stats = filter_dataset(score_config, select_config, show_progress=False)
    assert stats["rows_truncated"] > 0
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    reasons = load_from_disk(str(tmp_path / "out-rejected"))["reason"]
    assert all(reason in ("truncated", "all_masked") for reason in reasons)
    assert max(len(ids) for ids in load_from_disk(str(tmp_path / "out"))["input_ids"]) <= 40


@pytest.mark.slow
def test_stats_sidecar_and_config_are_written(tmp_path, data, tiny_models):
    filter_dataset(*configs(tmp_path, data, tiny_models), show_progress=False)
    run = tmp_path / "run"
    stats = json.loads((run / "stats.json").read_text())
    assert len(stats["masked_share_by_response_position"]) == 32
    assert stats["timings"]["score_s"] > 0 and stats["timings"]["load_models_s"] > 0 and stats["models"]["shared_base"] is True
    config = json.loads((run / "config.json").read_text())
    assert config["versions"]["torch"] and config["select"]["ratio"] == 0.2
    sidecar = load_from_disk(str(run / "token_scores"))
    assert sidecar.column_names == ["row", "score", "unsafe"]
    assert sum(sum(flags) for flags in sidecar["unsafe"]) == stats["masked_tokens"]
    tokens = RunDir(run).read_tokens().to_pylist()
    for scores, token_row in zip(sidecar["score"], tokens):
        response = np.array(token_row["labels"]) != -100
        assert not np.isnan(np.array(scores, dtype=float)[response][1:]).any()
        assert np.isnan(np.array(scores, dtype=float)[~response]).all()


@pytest.mark.slow
def test_outputs_get_ordinary_permissions_not_private_temp_ones(tmp_path, data, tiny_models):
    filter_dataset(*configs(tmp_path, data, tiny_models), show_progress=False)
    for path in (tmp_path / "out", tmp_path / "out-rejected", tmp_path / "run" / "stats.json",
                 *(tmp_path / "run" / "tokens").rglob("*")):
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others can read, as with a plain write
