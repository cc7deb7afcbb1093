"""Reference-model training: LoRA SFT on response tokens only, with the same tokenization that `filter` scores.

`train_reference(TrainRefConfig(...))` builds a safety-degraded reference (train it on harmful compliant Q&A) or a
utility-oriented one (train it on benign task data). Its defaults are the paper's recipe: r=16, alpha=16,
q_proj/v_proj, lr 1e-5 constant, 2 epochs, global batch 64 through gradient accumulation, max length 2048. At
small scale that recipe barely moves a model; `--target-modules all-linear --learning-rate 1e-3` moves it far more
(see examples/reference-adapters/README.md).

`init_adapter` continues training an existing adapter of the same base instead of a fresh one (its rank, alpha and
targets then apply, not `rank`/`alpha`/`target_modules`). The broad recipe (`make references`) trains θu first and
θs from θu, so that the two references differ by what the harmful rows teach, not by what any assistant answer
teaches (docs/references.md).

Output: a standard PEFT adapter directory plus `training.json`: a hash of the tokenized data, row and token
counts, first and final loss, the settings and a hash of the trained weights (so a rebuild can be checked to be
exact). The directory is written to a temporary sibling and renamed into
place when training has finished.

`fit_adapter` is the training step on its own (a peft model and `input_ids`/`labels` rows in, losses out); the
TOSS-Pro refinement reuses it on labels restricted to the flagged tokens.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, PreTrainedTokenizerBase
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from toss_filter.config import TrainRefConfig
from toss_filter.data.load import load_conversations
from toss_filter.data.provenance import UNKNOWN, data_families
from toss_filter.data.tokenize import IGNORE_INDEX, ConversationTokenizer, resolve_format
from toss_filter.default_model import resolve_model_path
from toss_filter.errors import ConfigError, TossError
from toss_filter.files import replace_dir, staging_dir
from toss_filter.fingerprint import package_versions, tokens_digest
from toss_filter.progress import Progress
from toss_filter.score.models import read_adapter_config
from toss_filter.steps.tokenize import tokenize_rows


class _StepProgress(TrainerCallback):
    """Optimiser steps on toss-filter's progress display (a bar on a terminal, a plain line now and then in a log):
    a reference takes most of an hour on a CPU, and the Trainer's own bar is off (it prints every logged step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress = Progress("train", state.max_steps, "steps", self.enabled).__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.advance(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress.__exit__(None, None, None)


def fit_adapter(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Dataset, *, learning_rate: float,
                epochs: float, batch_size: int, micro_batch_size: int, seed: int, device: str = "auto",
                show_progress: bool = False) -> list[float]:
    """Train the trainable (LoRA) weights of `model` on `rows` (`input_ids`, `labels`; loss on labels != -100 only)
    with a constant learning rate, on `device` ("auto": a GPU if there is one). Returns the logged loss of every
    optimiser step."""
    on_gpu = torch.cuda.is_available() and device != "cpu"
    if tokenizer.pad_token is None:  # Llama/Mistral: padded positions carry label -100, so the id does not matter
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    if on_gpu and device.startswith("cuda:"):
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory(prefix="toss-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, learning_rate=learning_rate, lr_scheduler_type="constant",
            per_device_train_batch_size=micro_batch_size, gradient_accumulation_steps=batch_size // micro_batch_size,
            logging_steps=1, save_strategy="no", report_to=[], seed=seed, use_cpu=not on_gpu,
            # Batches of similar length: in a mixed batch every row is padded to the longest, wasted work on a CPU.
            train_sampling_strategy="group_by_length",
            bf16=on_gpu and torch.cuda.is_bf16_supported(), disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                          callbacks=[_StepProgress(show_progress)])
        trainer.remove_callback(PrinterCallback)  # it prints every logged step to stdout; the losses are returned
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def trainable_rows(tokens: pa.Table) -> Dataset:
    """The rows of a `tokenize_rows` table that have a label to learn (position 0 never reaches the loss)."""
    labels = tokens.column("labels").to_pylist()
    keep = [i for i, row_labels in enumerate(labels) if any(label != IGNORE_INDEX for label in row_labels[1:])]
    return Dataset.from_dict({
        "input_ids": [tokens.column("input_ids")[i].as_py() for i in keep],
        "labels": [labels[i] for i in keep],
    })


def _sources(config: TrainRefConfig) -> list[str]:
    return [config.data] if isinstance(config.data, str) else list(config.data)


def training_tokens(config: TrainRefConfig, tokenizer: PreTrainedTokenizerBase) -> pa.Table:
    """CONFIG's data (its first `max_rows` rows over all inputs, in order), tokenized exactly as `filter` does: the
    table whose `tokens_digest` is training.json's `data_sha256`."""
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, config.template), config.max_length)
    tables, left = [], config.max_rows
    for source in _sources(config):
        conversations = itertools.islice(load_conversations(source, config.split, config.columns), left)
        tables.append(tokenize_rows(conversations, encode, source))
        left = None if left is None else left - tables[-1].num_rows
        if left == 0:
            break
    return pa.concat_tables(tables)


def train_reference(config: TrainRefConfig, show_progress: bool = False) -> dict[str, Any]:
    """Train one reference adapter; returns what is written to OUTPUT/training.json."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.init_adapter is not None:
        _check_init_adapter(config)
    base_path = resolve_model_path(config.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                     trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--base-model: cannot load {config.base_model}: {err}") from err
    tokens = training_tokens(config, tokenizer)
    rows = trainable_rows(tokens)
    if len(rows) == 0:
        raise ConfigError(f"{', '.join(_sources(config))}: no row has a response token to train on")

    torch.manual_seed(config.seed)
    if config.init_adapter is not None:
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
    else:
        targets: str | list[str] = "all-linear" if config.target_modules == ["all-linear"] else config.target_modules
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    wall, cpu = time.perf_counter(), time.process_time()
    losses = fit_adapter(model, tokenizer, rows, learning_rate=config.learning_rate, epochs=config.epochs,
                         batch_size=config.batch_size, micro_batch_size=config.micro_batch_size, seed=config.seed,
                         show_progress=show_progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # Record the name the user gave (a Hub id stays portable), not a local cache path.
    model.peft_config["default"].base_model_name_or_path = config.base_model

    label_counts = np.array([sum(label != IGNORE_INDEX for label in row) for row in rows["labels"]])
    record = {
        "data": config.data, "data_sha256": tokens_digest(tokens),
        "families": data_families(_sources(config), config.split, config.max_rows),
        "init_adapter_families": _init_adapter_families(config), "rows_in": tokens.num_rows, "rows_trained": len(rows),
        "rows_without_response_token": tokens.num_rows - len(rows),
        "rows_truncated": int(sum(tokens.column("truncated").to_pylist())),
        "response_tokens": int(label_counts.sum()), "optimizer_steps": len(losses),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "train_seconds": {"wall": round(wall, 1), "cpu": round(cpu, 1)},
        "settings": {key: value for key, value in vars(config).items() if key not in ("data", "output")},
        "lora": _lora_settings(model), "weights_sha256": weights_digest(model),
        "versions": package_versions(),
    }
    save_adapter(model, Path(config.output), {"training.json": json.dumps(record, indent=2) + "\n"})
    return record


def _init_adapter_families(config: TrainRefConfig) -> dict[str, int] | None:
    """Every family the init adapter's own lineage trained on, from its training.json; None without an init adapter,
    and {UNKNOWN: 0} when that lineage is not recorded (an adapter trained elsewhere)."""
    if config.init_adapter is None:
        return None
    return trained_families(Path(config.init_adapter))


def trained_families(adapter: Path) -> dict[str, int]:
    """Rows per family that went into an adapter, its init adapter's lineage included, from its training.json;
    {UNKNOWN: 0} when that is not known (no training.json, or one from before families were recorded whose data
    files are not where it says)."""
    try:
        record = json.loads((adapter / "training.json").read_text(encoding="utf-8"))
        families = record.get("families")
        if families is None:  # recorded before families were: read them from the recorded data
            families = data_families(record["data"] if isinstance(record["data"], list) else [record["data"]],
                                     record["settings"].get("split"), record["settings"].get("max_rows"))
            init = record["settings"].get("init_adapter")
            lineage = trained_families(Path(init)) if init else None
        else:
            lineage = record.get("init_adapter_families")
    except (OSError, ValueError, KeyError, TossError):
        return {UNKNOWN: 0}
    counts = Counter(families)
    counts.update(lineage or {})
    return dict(sorted(counts.items()))


def _check_init_adapter(config: TrainRefConfig) -> None:
    """Refuse an `init_adapter` trained on another base before anything loads (its rows would be scored against
    weights it never saw)."""
    from peft import PeftConfig

    adapter = Path(config.init_adapter)
    if (adapter / "adapter_config.json").is_file():
        read_adapter_config(adapter, "--init-adapter")  # named as a broken file, not as peft's bare parse error
    try:
        adapter_base = PeftConfig.from_pretrained(config.init_adapter).base_model_name_or_path
    except (OSError, ValueError) as err:
        raise ConfigError(f"--init-adapter: {config.init_adapter} is not a PEFT adapter directory: {err}") from err
    if adapter_base != config.base_model:
        raise ConfigError(f"--init-adapter: {config.init_adapter} was trained on {adapter_base}, not on --base-model "
                          f"{config.base_model}")


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the trainable (LoRA) weights, names and values: two runs of one recipe built the same adapter iff
    their digests agree."""
    digest = hashlib.sha256()
    for name, weight in sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda x: x[0]):
        digest.update(name.encode())
        digest.update(weight.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def _lora_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The LoRA shape actually trained (from `init_adapter` when continuing one)."""
    lora = model.peft_config["default"]
    targets = lora.target_modules
    return {"rank": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets}


def save_adapter(model: torch.nn.Module, target: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Save a peft model's adapter (and `extra_files`, name -> text) to a staging directory, then rename it to
    `target`, so a directory at `target` is always complete."""
    staging = staging_dir(target)
    # LoRA leaves the embeddings alone; peft's "auto" would look the base model up online to check that
    model.save_pretrained(staging, save_embedding_layers=False)
    (staging / "README.md").unlink(missing_ok=True)  # peft's placeholder card says nothing true about this adapter
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    replace_dir(staging, target)
    return target
