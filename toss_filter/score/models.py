"""Load the two reference models: full HF model directories or PEFT LoRA adapters on a base.

When both references are adapters of one base, the base is loaded once and both adapters are attached to it
(peft `load_adapter`). Either way, the two tokenizers must be identical, because one tokenisation is scored under
both models.

In float32, plain LoRA adapters (Linear layers only: no DoRA, LoRA bias or `modules_to_save`, no tied layer) are
merged into the weights, because the unmerged LoRA branch cost ~10% of the forward time on CPU. With a shared base
the merge is in place (peft `merge_adapter`), so it costs no memory, and each role is merged into freshly loaded
weights: switching roles reloads them, because a merge followed by an unmerge does not give the float weights back.
So a role's weights depend on its own adapter and base alone, never on the other reference or on what was scored
before: a resumed run is bit-identical, and a run that changes one reference can reuse the other's scores
(steps/score.py). `one_model_at_a_time` tells the scorer to finish one role over all shards before the next, so a
run reloads at most once. In bfloat16/float16 the adapters stay unmerged (peft `set_adapter`): rounding W + ΔW
to 8 mantissa bits would lose most of a LoRA delta.

Weights load from safetensors only: a model, adapter or base directory that has only pickle weights
(`pytorch_model.bin`, `*.pt`, `adapter_model.bin`, no `.safetensors`) is refused before anything loads, because
unpickling a file can run any code in it, unless the user opts in (`allow_pickle_weights`, --allow-pickle-weights).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from toss_filter.default_model import resolve_model_path
from toss_filter.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle files
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One reference as given on the command line: a full model, or an adapter plus the base it needs."""

    role: str
    path: str
    base: str | None = None  # set for adapters only
    adapter_config: dict[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False  # the user opted in to pickle weights (--allow-pickle-weights)

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def option(self) -> str:
        """The command-line option that named it, for errors."""
        return option_of(self.role)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"path": self.path, "kind": "lora-adapter" if self.is_adapter else "full-model"}
        if self.is_adapter:
            info |= {"base": self.base, "r": self.adapter_config.get("r"),
                     "target_modules": self.adapter_config.get("target_modules")}
        return info


def check_weights(directory: str | Path, what: str, allow_pickle: bool = False) -> None:
    """Refuse (ConfigError) a local model or adapter `directory` whose only weights are pickle files, unless
    `allow_pickle`. A directory with any `.safetensors` file passes: weights then load from safetensors only. A Hub
    name (not a local directory) passes too: it is loaded with `use_safetensors=True`."""
    root = Path(directory)
    if allow_pickle or not root.is_dir():
        return
    names = sorted(entry.name for entry in root.iterdir() if entry.is_file())
    if any(name.endswith(".safetensors") for name in names):
        return
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ConfigError(f"{what}: {root / pickles[0]} is a pickle weights file and {root} has no .safetensors: "
                          "loading pickle can run arbitrary code; convert it to safetensors, or pass "
                          "--allow-pickle-weights if you trust its source")


def option_of(role: str) -> str:
    """`--safety-model`, `--utility-model`; `inspect` and `estimate` name a bare tokenizer `--tokenizer`."""
    return "--tokenizer" if role == "tokenizer" else f"--{role}-model"


def resolve_spec(role: str, path: str, base_model: str | None, allow_pickle: bool = False) -> ModelSpec:
    """Check that `path` exists and say whether it is an adapter; an adapter's base comes from `base_model` or
    from its own `adapter_config.json`. Refuses a model, adapter or base of only pickle weights (`check_weights`)
    unless `allow_pickle`."""
    option, local = option_of(role), Path(path).expanduser()
    if not local.exists():
        if path.startswith((".", "/", "~")) or len(Path(path).parts) != 2:
            raise ConfigError(f"{option}: no such model directory: {path}")
        resolved = resolve_model_path(path)
        check_weights(resolved, f"{option} {path}", allow_pickle)
        return ModelSpec(role, resolved, allow_pickle=allow_pickle)
    if not (local / "adapter_config.json").exists():
        if not (local / "config.json").exists():
            raise ConfigError(f"{option}: {path} holds neither config.json (a model) nor adapter_config.json (a LoRA adapter)")
        check_weights(local, f"{option} {path}", allow_pickle)
        return ModelSpec(role, str(local), allow_pickle=allow_pickle)
    check_weights(local, f"{option} {path} (a LoRA adapter)", allow_pickle)
    adapter_config = read_adapter_config(local, option)
    recorded = adapter_config.get("base_model_name_or_path")
    base = base_model or recorded
    if not base:
        raise ConfigError(f"{option} {path} is a LoRA adapter: name its base model with --base-model")
    if base_model and recorded and not _same_model(base_model, recorded):
        log.warning("%s adapter %s was trained on %s but --base-model is %s", role, path, recorded, base_model)
    resolved = resolve_model_path(base)
    check_weights(resolved, f"{option} {path}: its base model {base}", allow_pickle)
    return ModelSpec(role, str(local), resolved, adapter_config, allow_pickle)


def read_adapter_config(directory: Path, option: str) -> dict[str, Any]:
    """`directory`'s adapter_config.json; a file that is not one JSON object is a ConfigError naming it."""
    path = directory / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # broken JSON, or not UTF-8
        raise ConfigError(f"{option}: {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{option}: {path} is not a JSON object")
    return config


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    # float32 on CPU: on AVX2 machines without bf16 units, bfloat16 is 5-6x slower.
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def _same_model(a: str, b: str) -> bool:
    return a == b or Path(resolve_model_path(a)).resolve() == Path(resolve_model_path(b)).resolve()


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model or adapter, else the base model's."""
    own = any((Path(spec.path) / name).exists() for name in TOKENIZER_FILES)
    source = spec.path if own or not spec.is_adapter else spec.base
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{spec.option}: cannot load a tokenizer from {source}: {err}") from err


def check_same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> None:
    """Refuse a pair whose tokenizers would split or render text differently."""
    differences = []
    if first.get_vocab() != second.get_vocab():
        differences.append("vocabularies")
    for attribute in ("bos_token", "eos_token", "chat_template"):
        if getattr(first, attribute) != getattr(second, attribute):
            differences.append(attribute)
    if differences:
        raise ConfigError(
            f"the safety and utility models have different tokenizers ({', '.join(differences)} differ): "
            "TOSS compares per-token losses, so both references must share one tokenizer"
        )


class ReferenceModels:
    """The two references, ready to score. `model_for(role)` returns the causal LM with that role's weights active."""

    def __init__(self, safety: ModelSpec, utility: ModelSpec, dtype: torch.dtype, device: str,
                 trust_remote_code: bool = False):
        self.specs = {"safety": safety, "utility": utility}
        self.tokenizer = load_tokenizer(safety, trust_remote_code)
        check_same_tokenizer(self.tokenizer, load_tokenizer(utility, trust_remote_code))
        self.dtype, self.device, self.trust_remote_code = dtype, device, trust_remote_code
        self.allow_pickle = safety.allow_pickle and utility.allow_pickle
        self.shared_base = safety.is_adapter and utility.is_adapter and _same_model(safety.base, utility.base)
        self._models: dict[str, torch.nn.Module] = {}
        self.one_model_at_a_time = False  # set on loading (see the module docstring)
        self._merged: str | None = None

    def load(self) -> None:
        """Load the weights, once. `model_for` calls it, so a fully resumed run never loads them."""
        if self._models:
            return
        safety, utility = self.specs["safety"], self.specs["utility"]
        if not self.shared_base:
            for role, spec in self.specs.items():
                model = self._load_full(spec.base or spec.path, role)
                if spec.is_adapter:
                    model = self._load_adapter(spec, model, "default")
                    model = model.merge_and_unload() if mergeable(model, self.dtype) else model
                self._models[role] = model
            return
        shared = self._load_adapter(safety, self._load_full(safety.base, "base"), adapter_name="safety")
        self._load_adapter(utility, shared, adapter_name="utility")
        self.one_model_at_a_time = mergeable(shared, self.dtype)
        self._models, self._merged = {"safety": shared, "utility": shared}, None

    def _load_full(self, path: str, role: str) -> torch.nn.Module:
        try:
            # safetensors only unless opted in: a Hub model too (a local one was checked by `check_weights`)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                                         use_safetensors=None if self.allow_pickle else True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the {role} model from {path}: {err}") from err
        return model.to(self.device).eval()

    def _load_adapter(self, spec: ModelSpec, model: torch.nn.Module, adapter_name: str) -> torch.nn.Module:
        from peft import PeftModel

        try:
            if isinstance(model, PeftModel):
                model.load_adapter(spec.path, adapter_name=adapter_name)
                return model
            return PeftModel.from_pretrained(model, spec.path, adapter_name=adapter_name).eval()
        except (RuntimeError, ValueError, KeyError) as err:  # size mismatch / missing target modules
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            detail = next((line for line in lines if "mismatch" in line or "not found" in line), lines[0] if lines else "")
            raise ConfigError(f"{spec.option} {spec.path} does not fit the base model {spec.base}: {detail[:300]}") from err

    def model_for(self, role: str) -> torch.nn.Module:
        """The causal LM (not the peft wrapper) with `role`'s weights active."""
        self.load()
        model = self._models[role]
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            return model
        if self.one_model_at_a_time:
            return self._merge_in_place(role).get_base_model()
        model.set_adapter(role if self.shared_base else "default")
        return model.get_base_model()

    def _merge_in_place(self, role: str) -> Any:
        """The shared peft model with only `role` merged, into freshly loaded weights (the module docstring)."""
        if self._merged not in (None, role):
            self._models, self._merged = {}, None
            self.load()
        model = self._models[role]
        if self._merged is None:
            model.merge_adapter([role])
            self._merged = role
        return model

    def describe(self) -> dict[str, Any]:
        return {role: spec.describe() for role, spec in self.specs.items()} | {"shared_base": self.shared_base}


def mergeable(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether a peft model's adapters are merged for scoring (see the module docstring): float32, plain LoRA on
    Linear layers, none of them tied to the input embeddings."""
    from peft.tuners.lora import LoraLayer

    plain = all(not c.modules_to_save and not c.use_dora and c.bias == "none" and not getattr(c, "lora_bias", False)
                for c in model.peft_config.values())
    tied = {id(model.get_input_embeddings().weight)}
    layers = [m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)]
    return (dtype == torch.float32 and plain
            and all(isinstance(layer, torch.nn.Linear) and id(layer.weight) not in tied for layer in layers))
