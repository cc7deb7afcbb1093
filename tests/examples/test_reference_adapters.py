"""The shipped reference adapters (examples/reference-adapters) are what `make references` builds: each adapter's
training.json names the data, settings and initial adapter of the Makefile's command, and the bundled data tokenize
to the `data_sha256` it recorded (the weights themselves: tests/test_train.py shows a rebuild hashes the same)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import replace

import pytest
import typer
from transformers import AutoTokenizer

from conftest import REPO
from toss_filter.cli import _config, app
from toss_filter.default_model import resolve_model_path
from toss_filter.fingerprint import tokens_digest
from toss_filter.config import TrainRefConfig
from toss_filter.train import training_tokens


MAKE_VARIABLES = ("REF_BASE", "REFS", "UTILITY_DATA", "SAFETY_DATA", "REF_RECIPE")


def make_references_commands() -> list[dict]:
    """The parameters of each `toss-filter train-ref` that `make references` would run, parsed by the CLI itself."""
    environment = {key: value for key, value in os.environ.items() if key not in MAKE_VARIABLES}  # the defaults
    printed = subprocess.run(["make", "--dry-run", "--old-file=install", "references"], cwd=REPO, check=True,
                             capture_output=True, text=True, env=environment).stdout.replace("\\\n", " ")
    train_ref = typer.main.get_command(app).get_command(None, "train-ref")
    commands = []
    for line in printed.splitlines():
        words = shlex.split(line)
        if "train-ref" in words:
            arguments = words[words.index("train-ref") + 1:]
            commands.append(train_ref.make_context("train-ref", arguments).params)
    return commands


COMMANDS = make_references_commands()


def test_make_references_trains_utility_then_safety_from_it():
    assert [command["output"].name for command in COMMANDS] == ["utility", "safety"]
    assert COMMANDS[0]["init_adapter"] is None
    assert COMMANDS[1]["init_adapter"] == str(COMMANDS[0]["output"])


@pytest.mark.parametrize("params", COMMANDS, ids=[command["output"].name for command in COMMANDS])
def test_shipped_adapter_was_trained_by_the_makefile_command_on_the_bundled_data(params):
    recorded = json.loads((REPO / params["output"] / "training.json").read_text())
    modules = [name.strip() for name in params["target_modules"].split(",")]
    config = _config(TrainRefConfig, params, target_modules=modules)
    assert recorded["data"] == config.data
    expected = {key: value for key, value in vars(config).items() if key not in ("data", "output")}
    assert recorded["settings"] == json.loads(json.dumps(expected))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.base_model))
    tokens = training_tokens(replace(config, data=[str(REPO / path) for path in config.data]), tokenizer)
    assert tokens.num_rows == recorded["rows_in"]
    assert tokens_digest(tokens) == recorded["data_sha256"]
