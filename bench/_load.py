"""Model/tokenizer loading shared by the benchmark scripts (bench/ only, not part of the package).

A path is either a full Hugging Face model directory or a PEFT LoRA adapter directory (it holds
``adapter_config.json``). For an adapter we load a fresh, full copy of the base model (``base`` or the
adapter's ``base_model_name_or_path``) and wrap it with ``PeftModel.from_pretrained``; nothing is shared
between two calls, exactly as when the authors run one scoring process per reference model.
"""
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_adapter(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def base_of(path, base=None):
    """The base-model path of an adapter dir (``base`` wins); ``path`` itself for a full model dir."""
    if not is_adapter(path):
        return path
    if base:
        return base
    from peft import PeftConfig
    return PeftConfig.from_pretrained(path).base_model_name_or_path


def load_model(path, base=None, dtype=torch.float32):
    """Full model or base + LoRA adapter, on CPU, in ``dtype``, in eval mode (adapter not merged)."""
    model = AutoModelForCausalLM.from_pretrained(base_of(path, base), dtype=dtype)
    if is_adapter(path):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, path)
    return model.eval()


def load_tokenizer(path, base=None):
    """The tokenizer saved next to the model/adapter if there is one, else the base model's."""
    has_own = any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(path if has_own else base_of(path, base))
