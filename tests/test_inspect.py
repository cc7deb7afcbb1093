"""`toss-filter inspect`: the first rows as `filter` tokenizes them, response tokens styled and counted, with only a
tokenizer on disk (no weights)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import chat, user, write_jsonl
from toss_filter.cli import app
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.inspect import STYLES, inspect_rows, render, row_text, row_counts, token_pieces

ROWS = [chat("What is 2 + 2?", "It is 4.\nFour."), chat("Name a colour.", "Blue, like the sky.", "Be brief."),
        chat("Third?", "Third answer.")]


@pytest.fixture
def encode(tokenizer) -> ConversationTokenizer:
    return ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"))


def test_inspect_rows_reads_only_the_first_rows_and_counts_their_labels(tmp_path, encode):
    inspected = inspect_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), encode, rows=2)
    assert [row for row, _ in inspected] == [0, 1]
    for _, tokens in inspected:
        response = int((np.asarray(tokens.labels) != -100).sum())
        assert row_counts(tokens) == {"tokens": len(tokens.input_ids), "response": response, "scored": response}
        assert 0 < response < len(tokens.input_ids)


def test_the_scored_style_covers_exactly_the_response_tokens(tmp_path, tokenizer, encode):
    [(_, tokens)] = inspect_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS[:1])), encode, rows=5)
    text = row_text(tokenizer, tokens)
    decoded = tokenizer.decode(tokens.input_ids, skip_special_tokens=False)
    assert text.plain.replace("↵", "") == decoded  # every character once, in order
    styled = "".join(text.plain[span.start:span.end] for span in text.spans if span.style == STYLES["scored"])
    response = [i for i, label in zip(tokens.input_ids, tokens.labels) if label != -100]
    assert styled.replace("↵", "") == tokenizer.decode(response, skip_special_tokens=False)
    assert styled == "It is 4.↵\nFour.<|im_end|>"


def test_reasoning_under_no_score_reasoning_is_trained_but_not_scored(tmp_path, tokenizer):
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"), score_reasoning=False)
    row = chat("Hi?", "<think>Let me think.</think>Hello there.")
    [(_, tokens)] = inspect_rows(str(write_jsonl(tmp_path / "d.jsonl", [row])), encode, rows=1)
    text = row_text(tokenizer, tokens)
    trained = "".join(text.plain[span.start:span.end] for span in text.spans if span.style == STYLES["trained"])
    assert trained == "<think>Let me think.</think>"  # the whole block, tags included
    counts = row_counts(tokens)
    assert counts["response"] - counts["scored"] == len(tokens.unscored) > 0


def test_token_pieces_keep_multibyte_characters_whole(tokenizer):
    ids = tokenizer("naïve 日本語 🙂 done")["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert "".join(text for text, _ in pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in text for text, _ in pieces)
    assert [i for _, positions in pieces for i in positions] == list(range(len(ids)))


def test_render_prints_a_header_per_row_and_the_totals(tmp_path, tokenizer, encode):
    from rich.console import Console

    inspected = inspect_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), encode, rows=3)
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render(inspected, tokenizer))
    shown = console.export_text()
    total = sum(len(tokens.input_ids) for _, tokens in inspected)
    assert f"row 2: {len(inspected[2][1].input_ids)} tokens" in shown
    assert f"3 rows: {total} tokens" in shown and "Blue, like the sky." in shown


@pytest.fixture
def tokenizer_only(tmp_path, tokenizer, tiny_models) -> Path:
    """A model directory with a config and a tokenizer but no weights: inspect must not need any."""
    directory = tmp_path / "tokenizer-only"
    tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text((tiny_models["base"] / "config.json").read_text())
    return directory


def test_cli_inspect_needs_no_weights(tmp_path, tokenizer_only):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = CliRunner().invoke(app, ["inspect", str(data), "--tokenizer", str(tokenizer_only), "--rows", "2"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "row 0:" in result.stdout and "row 1:" in result.stdout and "row 2:" not in result.stdout
    assert "2 rows:" in result.stdout


def test_cli_inspect_a_bad_row_is_one_line_and_exit_2(tmp_path, tokenizer_only):
    data = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"messages": [user("no answer")]}])
    result = CliRunner().invoke(app, ["inspect", str(data), "--tokenizer", str(tokenizer_only)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"toss-filter: error: {data}: row 1")
    assert result.stderr.count("\n") == 1
