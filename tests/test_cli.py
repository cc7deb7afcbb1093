"""The CLI's own features beyond bad-input handling: the default report, `report`, `--config`, `--strategy` and
`train-ref`, all run in-process through typer's runner on the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from typer.testing import CliRunner

from conftest import chat, write_jsonl
from toss_filter.cli import app

ROWS = [chat(f"Question {i}?", f"Answer number {i}, with a few more words to score.") for i in range(6)]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result.stdout


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def filter_args(data: Path, models: dict, output: Path) -> list[str]:
    return ["filter", data, "--safety-model", models["safety"], "--utility-model", models["utility"],
            "--output", output, "--device", "cpu"]


def test_filter_writes_the_report_into_the_run_dir_and_prints_its_path(tmp_path, data, tiny_models):
    stdout = invoke(*filter_args(data, tiny_models, tmp_path / "out"))
    report = tmp_path / "out-run" / "report.html"
    assert f"report:   {report}" in stdout
    assert report.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    other = invoke("report", tmp_path / "out-run", "-o", tmp_path / "again.html", "--rows", "2")
    assert f"report:   {tmp_path / 'again.html'}" in other and (tmp_path / "again.html").exists()


def test_no_report_skips_it(tmp_path, data, tiny_models):
    invoke(*filter_args(data, tiny_models, tmp_path / "out"), "--no-report", "--quiet")
    assert not (tmp_path / "out-run" / "report.html").exists()
    assert (tmp_path / "out").exists()


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path, data, tiny_models):
    config = tmp_path / "toss.yaml"
    config.write_text(
        f"input: {data}\nsafety-model: {tiny_models['safety']}\nutility_model: {tiny_models['utility']}\n"
        f"ratio: 0.5\nkeep-empty: true\ndevice: cpu\ncolumn: {{messages: messages}}\n"
    )
    invoke("filter", "--config", config, "--output", tmp_path / "a", "--quiet", "--no-report")
    stats = json.loads((tmp_path / "a-run" / "stats.json").read_text())
    assert stats["selection"]["ratio"] == 0.5 and stats["selection"]["keep_empty"] is True
    invoke("filter", "--config", config, "--output", tmp_path / "b", "--ratio", "0.1", "--quiet", "--no-report")
    stats = json.loads((tmp_path / "b-run" / "stats.json").read_text())
    assert stats["selection"]["ratio"] == 0.1
    resolved = json.loads((tmp_path / "b-run" / "config.json").read_text())
    assert resolved["select"]["ratio"] == 0.1 and resolved["versions"]["toss-filter"]


def test_config_file_with_an_unknown_option_is_refused(tmp_path, data):
    config = tmp_path / "toss.yaml"
    config.write_text("ratio: 0.5\nratoi: 0.1\n")
    result = CliRunner().invoke(app, ["filter", "--config", str(config), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown option 'ratoi'" in result.stderr


@pytest.mark.parametrize("strategy", ["sample", "first-k", "random"])
def test_baseline_strategies_mask_the_same_budget_as_toss(tmp_path, data, tiny_models, strategy):
    invoke(*filter_args(data, tiny_models, tmp_path / "toss"), "--quiet", "--no-report", "--keep-empty")
    run_dir = tmp_path / "toss-run"
    invoke("select", "--run-dir", run_dir, "--output", tmp_path / strategy, "--strategy", strategy, "--quiet",
           "--no-report", "--keep-empty")
    stats = json.loads((run_dir / "stats.json").read_text())
    toss = load_from_disk(str(tmp_path / "toss"))
    baseline = load_from_disk(str(tmp_path / strategy))
    masked = [sum(a != b for a, b in zip(x["labels"], y["labels"])) for x, y in zip(toss, baseline)]
    assert stats["selection"]["strategy"] == strategy
    assert stats["masked_tokens"] == int(0.2 * stats["scored_tokens"])
    assert sum(masked) > 0, "a baseline should mask other tokens than toss does"


def test_strategy_refuses_scope_and_threshold_options(tmp_path, data, tiny_models):
    result = CliRunner().invoke(app, [str(a) for a in filter_args(data, tiny_models, tmp_path / "o")]
                                + ["--strategy", "random", "--threshold", "1.0"])
    assert result.exit_code == 2 and "--strategy toss only" in result.stderr


def test_train_ref_command_writes_an_adapter_with_training_record(tmp_path, data, tiny_models):
    stdout = invoke("train-ref", data, "--base-model", tiny_models["base"], "--output", tmp_path / "adapter",
                    "--target-modules", "q_proj,v_proj", "--rank", "4", "--learning-rate", "1e-3",
                    "--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2", "--max-rows", "4")
    record = json.loads((tmp_path / "adapter" / "training.json").read_text())
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert record["rows_in"] == record["rows_trained"] == 4 < len(ROWS)  # --max-rows: the first 4 rows only
    assert record["optimizer_steps"] == 2 and record["settings"]["max_rows"] == 4
    assert record["settings"]["target_modules"] == ["q_proj", "v_proj"] and record["settings"]["rank"] == 4
    assert f"adapter:  {tmp_path / 'adapter'}" in stdout


def test_format_parquet_writes_one_file_that_loads_with_the_same_rows(tmp_path, data, tiny_models):
    invoke(*filter_args(data, tiny_models, tmp_path / "out.parquet"), "--format", "parquet", "--keep-empty",
           "--quiet", "--no-report")
    arrow_run = invoke("select", "--run-dir", tmp_path / "out.parquet-run", "--output", tmp_path / "arrow",
                       "--keep-empty", "--quiet", "--no-report")
    assert arrow_run == ""
    from datasets import load_dataset

    parquet = load_dataset("parquet", data_files=str(tmp_path / "out.parquet"), split="train")
    assert (tmp_path / "out.parquet").is_file()
    assert parquet.to_dict() == load_from_disk(str(tmp_path / "arrow")).to_dict()


def test_push_and_push_to_hub_hand_the_right_arguments_to_push_output(tmp_path, data, tiny_models, monkeypatch):
    import toss_filter.hub

    calls = []

    def fake_push(output, repo_id, run_dir, private=False, revision=None, token=None):
        calls.append((Path(output), repo_id, Path(run_dir), private, revision, token))
        return {"rows": 6, "url": f"https://huggingface.co/datasets/{repo_id}", "revision": revision or "main"}

    monkeypatch.setattr(toss_filter.hub, "push_output", fake_push)
    stdout = invoke(*filter_args(data, tiny_models, tmp_path / "out"), "--no-report", "--push-to-hub", "org/name",
                    "--hub-private")
    assert calls[-1] == (tmp_path / "out", "org/name", tmp_path / "out-run", True, None, None)
    assert "pushed:   6 rows to https://huggingface.co/datasets/org/name (main)" in stdout
    stdout = invoke("push", tmp_path / "out", "--repo-id", "org/other", "--revision", "v2", "--token", "hf_secret")
    assert calls[-1] == (tmp_path / "out", "org/other", tmp_path / "out-run", False, "v2", "hf_secret")
    assert "hf_secret" not in stdout


def test_push_to_hub_needs_the_arrow_format(tmp_path, data, tiny_models):
    result = CliRunner().invoke(app, [str(a) for a in filter_args(data, tiny_models, tmp_path / "o.jsonl")]
                                + ["--format", "jsonl", "--push-to-hub", "org/name"])
    assert result.exit_code == 2 and "leave --format at arrow" in result.stderr
    assert not (tmp_path / "o.jsonl-run" / "run.json").exists()


@pytest.mark.parametrize("options, message", [
    (["--hub-private"], "--hub-private only applies with --push-to-hub"),
    (["--push-to-hub", "not-a-repo-id"], "not-a-repo-id"),
])
def test_hub_options_are_checked_before_any_scoring(tmp_path, data, tiny_models, options, message):
    result = CliRunner().invoke(app, [str(a) for a in filter_args(data, tiny_models, tmp_path / "o")] + options)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "o-run" / "run.json").exists()


def test_config_file_accepts_a_single_value_for_a_repeatable_option(tmp_path, data, tiny_models):
    config = tmp_path / "toss.yaml"
    config.write_text(f"safety-model: {tiny_models['safety']}\nutility-model: {tiny_models['utility']}\n"
                      "column: messages=messages\ndevice: cpu\n")
    invoke("filter", data, "--config", config, "--output", tmp_path / "a", "--quiet", "--no-report")
    resolved = json.loads((tmp_path / "a-run" / "config.json").read_text())
    assert resolved["score"]["columns"] == {"messages": "messages"}
