"""`toss-filter estimate`: counts equal what `filter` tokenizes, the context and weights come from the files on
disk, and the time follows the rate (measured here, or given)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from conftest import chat, write_jsonl
from toss_filter.cli import app
from toss_filter.config import ScoreConfig
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.estimate import estimate_run
from toss_filter.inspect import inspect_rows

ROWS = [chat(f"Question {i}?", "An answer " + "with more words " * i) for i in range(8)]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def config(data, models, **options) -> ScoreConfig:
    return ScoreConfig(str(data), str(models["safety"]), str(models["utility"]), run_dir="", device="cpu", **options)


def test_counts_context_and_weights_at_a_given_rate(data, tiny_models, tokenizer):
    result = estimate_run(config(data, tiny_models), rate=1000.0, show_progress=False)
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"))
    tokenized = [tokens for _, tokens in inspect_rows(str(data), encode, rows=100)]
    assert result["rows"] == len(ROWS)
    assert result["tokens"] == sum(len(t.input_ids) for t in tokenized)
    assert result["response_tokens"] == sum(int((np.asarray(t.labels) != -100).sum()) for t in tokenized)
    assert result["scored_tokens"] == result["response_tokens"]  # reasoning scored (the default); no reasoning here
    assert result["longest_row"] == max(len(t.input_ids) for t in tokenized)
    assert result["context"] == 1024  # the tiny Llama's max_position_embeddings
    assert result["load_s"] is None and result["measured_peak_bytes"] is None  # a given rate loads no weights
    assert result["score_s"] == pytest.approx(result["tokens"] * 2 / 1000.0)
    # one shared base (tied embeddings counted once) and both adapters, in float32
    base = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(tiny_models["base"]).parameters())
    adapters = sum(t.numel() for role in ("safety", "utility")
                   for t in load_file(tiny_models[role] / "adapter_model.safetensors").values())
    assert result["weights_bytes"] == (base + adapters) * 4
    assert result["activation_bytes"] > 0


@pytest.mark.slow
def test_reasoning_left_unscored_is_counted_apart(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "think.jsonl", [chat("Hi?", "<think>Let me think it over.</think>Hello.")])
    scored = estimate_run(config(data, tiny_models), rate=1000.0, show_progress=False)
    unscored = estimate_run(config(data, tiny_models, score_reasoning=False), rate=1000.0, show_progress=False)
    assert scored["scored_tokens"] == scored["response_tokens"] == unscored["response_tokens"]
    assert unscored["scored_tokens"] < unscored["response_tokens"]


def test_limit_counts_only_the_first_rows(data, tiny_models):
    result = estimate_run(config(data, tiny_models, limit=3), rate=1000.0, show_progress=False)
    assert result["rows"] == 3


@pytest.mark.slow
def test_measured_rate_comes_from_real_forward_passes(data, tiny_models):
    result = estimate_run(config(data, tiny_models), show_progress=False)
    assert result["rate"] > 0 and result["load_s"] > 0
    assert result["rate_source"].startswith("measured here on ")
    assert result["total_s"] == pytest.approx(result["tokenize_s"] + result["load_s"] + result["score_s"])
    assert result["measured_peak_bytes"] > result["weights_bytes"]


def invoke(*args):
    return CliRunner().invoke(app, ["estimate", *map(str, args)])


def test_cli_prints_the_estimate_and_flags_rows_over_the_context(tmp_path, tiny_models):
    long_row = write_jsonl(tmp_path / "long.jsonl", [chat("Hi?", "word " * 1500)])
    result = invoke(long_row, "--safety-model", tiny_models["safety"], "--utility-model", tiny_models["utility"],
                    "--no-measure", "--rate", "500", "--device", "cpu")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "rows:         1" in result.stdout
    assert "context 1,024 (TOO LONG: use --max-length)" in result.stdout
    assert "at 500 model tokens/s (given (--rate)" in result.stdout and "(an estimate)" in result.stdout


def test_cli_rate_goes_with_no_measure_only(data, tiny_models):
    result = invoke(data, "--safety-model", tiny_models["safety"], "--utility-model", tiny_models["utility"],
                    "--rate", "500")
    assert result.exit_code == 2 and "--rate" in result.stderr
