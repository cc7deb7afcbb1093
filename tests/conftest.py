"""Shared fixtures: a real tokenizer (SmolLM2's, from the embedded default) and a tiny random Llama with two
LoRA adapters on it. Everything is built locally; nothing touches the network."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from real_tokenizers import FAMILIES, load_real_tokenizer
from toss_filter.default_model import embedded_model_dir

REPO = Path(__file__).resolve().parent.parent
OFFLINE_DATA = REPO.parent / "shared" / "data"


def offline_data() -> Path:
    """The offline data folder beside the clone. CI always has it, so there its absence fails the test; elsewhere
    (a clone on its own) the test is skipped and the summary says why."""
    if OFFLINE_DATA.is_dir():
        return OFFLINE_DATA
    if os.environ.get("CI"):
        pytest.fail(f"CI=true but the offline data folder {OFFLINE_DATA} is missing")
    pytest.skip(f"the offline data folder {OFFLINE_DATA} is not beside this clone")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(*paths: Path) -> list[dict]:
    """The rows of JSON-lines files, one after the other."""
    return [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


def run_nll(run_dir: Path, score_key: str | None = None) -> dict[str, np.ndarray]:
    """Every shard's per-token NLL of a run under each reference role, concatenated in shard order (the score key
    of run.json unless another is named)."""
    from toss_filter.run import RunDir, ShardFiles

    run = RunDir(run_dir)
    state = run.read_json("run.json")
    files = ShardFiles(str(run.path), state["tokens_key"], score_key or state["score_key"])
    shards = [files.scored(shard) for shard in range(state["shards"])]
    return {"safety": np.concatenate([s.nll_safety for s in shards]),
            "utility": np.concatenate([s.nll_utility for s in shards])}


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


def chat(user_text: str, assistant_text: str, system_text: str | None = None) -> dict:
    messages = [system(system_text)] if system_text else []
    return {"messages": messages + [user(user_text), assistant(assistant_text)]}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{"base", "safety", "utility", "other_base"}: a tiny Llama, two distinct random LoRA adapters (q/v) on it,
    and a second full model of another width (an adapter of the first does not fit it)."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {name: root / name for name in ("base", "safety", "utility", "other_base")}
    _tiny_llama(len(tokenizer), seed=0).save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for seed, role in enumerate(("safety", "utility"), start=1):
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(paths["base"])
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapter = get_peft_model(base, lora)
        adapter.peft_config["default"].base_model_name_or_path = str(paths["base"])
        adapter.save_pretrained(paths[role])
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    ))
    other.save_pretrained(paths["other_base"])
    tokenizer.save_pretrained(paths["other_base"])
    return paths


@pytest.fixture(scope="session")
def real_tokenizer() -> Callable[[str], PreTrainedTokenizerFast]:
    """Factory: real_tokenizer("qwen3") -> that family's real tokenizer (tests/real_tokenizers.py), loaded once per
    session (some take seconds)."""
    cache: dict[str, PreTrainedTokenizerFast] = {}

    def get(family: str) -> PreTrainedTokenizerFast:
        if family not in cache:
            cache[family] = load_real_tokenizer(family)
        return cache[family]

    return get


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test taking `real_family` runs once per family of the manifest, so a new family is covered everywhere.
    if "real_family" in metafunc.fixturenames:
        metafunc.parametrize("real_family", FAMILIES)
