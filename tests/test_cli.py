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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_ref_command_writes_an_adapter_with_training_record(tmp_path, data, tiny_models):
    result = CliRunner().invoke(app, [str(a) for a in (
        "train-ref", data, "--base-model", tiny_models["base"], "--output", tmp_path / "adapter",
        "--target-modules", "q_proj,v_proj", "--rank", "4", "--learning-rate", "1e-3", "--epochs", "1",
        "--batch-size", "2", "--micro-batch-size", "2", "--max-rows", "4", "--log-every", "1e-9")])
    assert result.exit_code == 0, (result.stderr, result.exception)
    stdout = result.stdout
    assert "toss-filter: train: 2/2 steps" in result.stderr  # progress in a log: a line per step at this interval
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


@pytest.mark.slow
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


@pytest.fixture
def root_level():
    """The root logger's level, restored after the test (`-v` lowers it for the whole process)."""
    import logging

    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.WARNING)
    yield root
    root.setLevel(saved)


@pytest.mark.parametrize("order", ["before", "after"])
def test_verbose_works_before_and_after_the_command(tmp_path, data, tiny_models, root_level, order):
    """`toss-filter -v filter ...` and `toss-filter filter ... -v`: the same effect (the root logger at INFO, which
    the executors and backends read); SIGTERM's handler is the caller's again afterwards."""
    import logging
    import signal

    before = signal.getsignal(signal.SIGTERM)
    command = [*filter_args(data, tiny_models, tmp_path / "out"), "--quiet", "--no-report"]
    invoke(*(["-v", *command] if order == "before" else [*command, "-v"]))
    assert root_level.level == logging.INFO
    assert (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_command_takes_verbose_and_quiet_after_it(tmp_path, root_level):
    import logging

    import typer

    for name, command in typer.main.get_command(app).commands.items():
        options = {opt for param in command.params for opt in param.opts}
        assert {"-v", "--verbose", "-q", "--quiet"} <= options, name
    for flag in ("-v", "--verbose"):  # parsed (and applied) even when the command then fails
        root_level.setLevel(logging.WARNING)
        result = CliRunner().invoke(app, ["report", str(tmp_path / "missing"), flag])
        assert result.exit_code == 2 and root_level.level == logging.INFO, result.stderr
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing"), "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr


LOG_LINE = (r"toss-filter: (tokenize|score|select|write): [\d,]+/[\d,]+ (rows|shard-roles|shards)"
            r"(, [\d,.]+ (tok|rows|shard-roles|shards)/s)?"
            r"(, (eta|done in) \d+:\d\d:\d\d)?")


@pytest.mark.slow
def test_log_lines_when_stderr_is_not_a_terminal(tmp_path, data, tiny_models, monkeypatch):
    """Under a scheduler (stderr a file): plain lines every --log-every seconds; none in a run shorter than the
    default interval, none with --quiet or --log-every 0."""
    import re

    from toss_filter import progress

    monkeypatch.setattr(progress, "LOG_EVERY", progress.LOG_EVERY)  # restored: the CLI sets it for the process
    result = CliRunner().invoke(app, [str(a) for a in filter_args(data, tiny_models, tmp_path / "a")]
                                + ["--no-report", "--log-every", "1e-9"])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(re.fullmatch(LOG_LINE, line) for line in lines), lines
    score = [line for line in lines if line.startswith("toss-filter: score: ")]
    assert any(" tok/s, eta " in line for line in score), score
    assert re.match(r"toss-filter: score: (\d+)/\1 shard-roles, .*, done in ", score[-1]), score
    assert any(line.startswith("toss-filter: tokenize: ") for line in lines), lines
    result = CliRunner().invoke(app, [str(a) for a in filter_args(data, tiny_models, tmp_path / "b")]
                                + ["--no-report"])
    assert result.exit_code == 0 and result.stderr == "", result.stderr  # default 30 s: a short run prints none
    result = CliRunner().invoke(app, [str(a) for a in filter_args(data, tiny_models, tmp_path / "c")]
                                + ["--log-every", "-1"])
    assert result.exit_code == 2 and "--log-every" in result.stderr


def test_progress_line_format_rate_eta_and_what_silences_it(monkeypatch, capsys):
    from toss_filter import progress

    now = [100.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    monkeypatch.setattr(progress, "LOG_EVERY", 30.0)
    with progress.Progress("score", 40, "shard-roles") as bar:
        now[0] = 120.0
        bar.advance(3, tokens=20_000)  # 20 s: within the interval, no line
        assert capsys.readouterr().err == ""
        now[0] = 160.0
        bar.advance(9, tokens=184_720)  # 60 s, 12/40 done
        assert capsys.readouterr().err == "toss-filter: score: 12/40 shard-roles, 3,412 tok/s, eta 0:02:20\n"
        now[0] = 170.0
        bar.advance(28)  # 10 s after the last line: none
        assert capsys.readouterr().err == ""
        now[0] = 175.0
    assert capsys.readouterr().err == "toss-filter: score: 40/40 shard-roles, 2,730 tok/s, done in 0:01:15\n"
    with progress.Progress("tokenize", None, "rows") as bar:  # no total: no eta; no tokens: rows/s
        now[0] = 220.0
        bar.advance(1_500)
    assert capsys.readouterr().err.splitlines()[0] == "toss-filter: tokenize: 1,500 rows, 33.3 rows/s"
    for enabled, every in ((False, 30.0), (True, 0.0)):  # show_progress=False (--quiet), or --log-every 0
        monkeypatch.setattr(progress, "LOG_EVERY", every)
        with progress.Progress("score", 4, "shard-roles", enabled) as bar:
            now[0] += 1_000
            bar.advance(4, tokens=10)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_limit_reads_tokenizes_and_scores_only_the_first_rows(tmp_path, data, tiny_models):
    from toss_filter.config import ScoreConfig
    from toss_filter.steps.tokenize import rows_to_read

    run_dir = tmp_path / "run"
    invoke(*filter_args(data, tiny_models, tmp_path / "out"), "--run-dir", run_dir, "--limit", "2", "--no-report")
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rows_in"] == 2 and len(load_from_disk(str(tmp_path / "out"))) == 2
    assert rows_to_read(ScoreConfig(str(data), "s", "u", str(run_dir), limit=2)) == 2  # progress says 2, not 6
    # the limit is part of the tokens key: the same run directory without it tokenizes every row anew
    stdout = invoke("score", data, "--safety-model", tiny_models["safety"], "--utility-model", tiny_models["utility"],
                    "--run-dir", run_dir, "--device", "cpu")
    assert f"scored {len(ROWS)} rows" in stdout
    assert len(list((run_dir / "tokens").iterdir())) == 2


def _makefile_recipe() -> list[str]:
    """The REF_RECIPE flags of `make references`, as the Makefile writes them."""
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("REF_RECIPE"))
    return line.split("?=", 1)[1].split()


@pytest.mark.slow
def test_the_make_references_recipe_builds_a_pair_that_filter_uses(tmp_path, data, tiny_models):
    recipe = _makefile_recipe()
    assert "--init-adapter" not in recipe and "--learning-rate" in recipe
    utility, safety = tmp_path / "refs" / "utility", tmp_path / "refs" / "safety"
    invoke("train-ref", data, "--base-model", tiny_models["base"], "--output", utility, *recipe, "--quiet")
    invoke("train-ref", data, "--base-model", tiny_models["base"], "--init-adapter", utility, "--output", safety,
           *recipe, "--quiet")
    record = json.loads((safety / "training.json").read_text())
    assert record["settings"]["init_adapter"] == str(utility) and record["lora"]["rank"] == 8
    invoke("filter", data, "--safety-model", safety, "--utility-model", utility, "--output", tmp_path / "out",
           "--device", "cpu", "--quiet", "--no-report")
    assert load_from_disk(str(tmp_path / "out")).num_rows == len(ROWS)
