"""The score step over the shard plan: slices, resume identity, and what select refuses."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import load_from_disk

from conftest import REPO, chat, run_nll, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset, score_dataset, select_dataset
from toss_filter.errors import ConfigError
from toss_filter.run import RunDir
from toss_filter.fingerprint import model_fingerprint

ROWS = [chat(f"Question {i}: " + "why? " * (i % 5), f"Answer {i}. " + "because " * (i % 9 + 1)) for i in range(23)]


def file_digests(root: Path, *parts: str) -> dict[str, str]:
    """sha256 of every shard file under root/parts, by relative path."""
    base = root.joinpath(*parts)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def output_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def score_config(data, tiny_models, run_dir, **options):
    return ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), str(run_dir),
                       shard_rows=4, device="cpu", **options)


@pytest.mark.slow
def test_slices_then_select_equal_one_run(tmp_path, data, tiny_models):
    whole = tmp_path / "whole"
    filter_dataset(score_config(data, tiny_models, whole), SelectConfig(str(whole), str(tmp_path / "whole-out")),
                   show_progress=False)
    sliced = tmp_path / "sliced"
    first = score_dataset(score_config(data, tiny_models, sliced, shard_slice="0/2"), show_progress=False)
    assert first["provenance"]["shard_slice"] == "0/2"
    with pytest.raises(ConfigError, match="incomplete.*shards 1, 3, 5"):
        select_dataset(SelectConfig(str(sliced), str(tmp_path / "sliced-out")), show_progress=False)
    second = score_dataset(score_config(data, tiny_models, sliced, shard_slice="1/2"), show_progress=False)
    assert first["score_key"] == second["score_key"]  # a slice is provenance, never part of the key
    select_dataset(SelectConfig(str(sliced), str(tmp_path / "sliced-out")), show_progress=False)
    assert file_digests(sliced, "scores") == file_digests(whole, "scores")
    assert file_digests(sliced, "tokens") == file_digests(whole, "tokens")
    assert output_bytes(tmp_path / "sliced-out") == output_bytes(tmp_path / "whole-out")


@pytest.mark.slow
def test_tokenizer_processes_give_the_same_shards(tmp_path, data, tiny_models):
    one = score_dataset(score_config(data, tiny_models, tmp_path / "one"), show_progress=False)
    two = score_dataset(score_config(data, tiny_models, tmp_path / "two", num_proc=2), show_progress=False)
    assert one["tokens_key"] == two["tokens_key"] and one["score_key"] == two["score_key"]
    assert file_digests(tmp_path / "one", "tokens") == file_digests(tmp_path / "two", "tokens")
    assert file_digests(tmp_path / "one", "scores") == file_digests(tmp_path / "two", "scores")


@pytest.mark.slow
def test_select_refuses_scores_of_other_tokens(tmp_path, data, tiny_models):
    run_dir = tmp_path / "run"
    state = score_dataset(score_config(data, tiny_models, run_dir), show_progress=False)
    key_file = RunDir(run_dir).scores_dir(state["score_key"]) / "key.json"
    key = json.loads(key_file.read_text())
    key_file.write_text(json.dumps(key | {"tokens_digest": "0" * 64}))
    with pytest.raises(ConfigError, match="other tokens"):
        select_dataset(SelectConfig(str(run_dir), str(tmp_path / "out")), show_progress=False)


def test_weights_that_change_but_keep_their_size_are_another_model(tmp_path, tiny_models):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    before = model_fingerprint(str(model))
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of the last tensor; same size, same header
    weights.write_bytes(bytes(blob))
    assert model_fingerprint(str(model)) != before


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_driver_killed_with_sigkill_resumes_to_the_same_output(tmp_path, data, tiny_models):
    """A real process, killed at a real moment (after its first score file exists), then the same command again."""
    clean = tmp_path / "clean"
    filter_dataset(score_config(data, tiny_models, clean), SelectConfig(str(clean), str(tmp_path / "clean-out")),
                   show_progress=False)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    command = [sys.executable, "-m", "toss_filter.cli", "filter", str(data), "--safety-model",
               str(tiny_models["safety"]), "--utility-model", str(tiny_models["utility"]), "-o", str(out),
               "--run-dir", str(run_dir), "--shard-rows", "4", "--device", "cpu", "--no-report", "-q"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((run_dir / "scores").rglob("shard-*.arrow")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run leaves no output that looks finished"
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert output_bytes(out) == output_bytes(tmp_path / "clean-out")
    assert file_digests(run_dir, "scores") == file_digests(clean, "scores")
    assert not [p for p in run_dir.rglob(".*") if p.is_file()], "no temporary file is left"
    assert load_from_disk(str(out)).num_rows == json.loads((run_dir / "stats.json").read_text())["rows_out"]


@pytest.mark.slow
def test_one_shard_and_many_shards_give_the_same_scores_and_output(tmp_path, data, tiny_models):
    runs = {}
    for name, shard_rows in (("one", 1000), ("many", 3)):
        run_dir = tmp_path / name
        config = ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), str(run_dir),
                             shard_rows=shard_rows, device="cpu")
        runs[name] = filter_dataset(config, SelectConfig(str(run_dir), str(tmp_path / f"{name}-out")),
                                    show_progress=False)
        assert runs[name]["shards"] == -(-len(ROWS) // shard_rows)
    scores = {name: run_nll(tmp_path / name) for name in runs}
    for role in ("safety", "utility"):  # bit for bit, NaN where unscored
        assert scores["one"][role].tobytes() == scores["many"][role].tobytes(), role
    for suffix in ("-out", "-out-rejected"):
        one, many = (load_from_disk(str(tmp_path / f"{name}{suffix}")).data.table for name in ("one", "many"))
        assert one.equals(many), suffix
    one, many = (load_from_disk(str(tmp_path / name / "token_scores")).data.table for name in ("one", "many"))
    assert one.column("unsafe").equals(many.column("unsafe"))
    assert one.column("score").combine_chunks().values.to_numpy().tobytes() == \
        many.column("score").combine_chunks().values.to_numpy().tobytes()


@pytest.mark.slow
def test_a_row_longer_than_the_context_is_refused_before_scoring(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "long.jsonl", [chat("short", "fine"), chat("long " * 600, "answer " * 600)])
    with pytest.raises(ConfigError, match=r"long.jsonl: row 1 has \d+ tokens, more than the references' context "
                                          r"of 1024: truncate with --max-length 1024"):
        score_dataset(score_config(data, tiny_models, tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run" / "scores").exists() or not list((tmp_path / "run" / "scores").rglob("shard-*"))
    score_dataset(score_config(data, tiny_models, tmp_path / "run", max_length=1024), show_progress=False)


@pytest.mark.slow
def test_changing_one_reference_rescores_only_that_one(tmp_path, data, tiny_models):
    run_dir = tmp_path / "run"
    first = score_dataset(score_config(data, tiny_models, run_dir), show_progress=False)
    assert first["reused_shard_roles"] == 0
    other_safety = ScoreConfig(str(data), str(tiny_models["utility"]), str(tiny_models["utility"]), str(run_dir),
                               shard_rows=4, device="cpu")
    second = score_dataset(other_safety, show_progress=False)
    assert second["score_key"] != first["score_key"]
    assert second["reused_shard_roles"] == first["shards"]  # every utility shard, no safety shard
    assert second["timings"]["model_tokens_scored_this_run"] == first["tokens"]  # one role only
    run = RunDir(run_dir)
    for shard in range(first["shards"]):
        reused = run.score_shard(second["score_key"], "utility", shard)
        assert reused.stat().st_ino == run.score_shard(first["score_key"], "utility", shard).stat().st_ino
    fresh = score_dataset(replace(other_safety, run_dir=str(tmp_path / "fresh")), show_progress=False)
    assert (file_digests(run_dir, "scores", second["score_key"])
            == file_digests(tmp_path / "fresh", "scores", fresh["score_key"]))


@pytest.mark.slow
def test_scores_under_a_key_that_is_not_its_own_are_never_reused(tmp_path, data, tiny_models):
    """A key.json that does not hash to its folder's name (edited, or renamed) cannot vouch for its scores."""
    import shutil

    run_dir = tmp_path / "run"
    first = score_dataset(score_config(data, tiny_models, run_dir), show_progress=False)
    scores = RunDir(run_dir).scores_dir(first["score_key"])
    shutil.move(scores, scores.with_name("f" * 16))
    again = score_dataset(score_config(data, tiny_models, run_dir), show_progress=False)
    assert again["reused_shard_roles"] == 0
    assert again["timings"]["model_tokens_scored_this_run"] == 2 * first["tokens"]
