"""`toss-filter estimate`: what a `filter` run would cost, before it runs. Reads and tokenizes the rows it would
read (`limit` included), and loads the references' weights only to measure the scoring rate.

    estimate_run(config, rate=None, show_progress=True) -> dict

The result (counts over the rows `filter` would read):

    {"rows", "tokens", "response_tokens", "scored_tokens", "longest_row",
     "context": the references' context (smallest max_position_embeddings of their configs), None if unknown,
     "device", "dtype", "batch_tokens": the torch scorer's padded token budget per forward pass,
     "rate": model tokens/s (one token under one reference), "rate_source": how it was found,
     "tokenize_s": measured here over all rows, "load_s": measured loading the weights (None with a given rate),
     "score_s": tokens × 2 references / rate, "total_s": their sum,
     "weights_bytes": parameters of every loaded model and adapter × the dtype's bytes (None if unknown),
     "activation_bytes": one forward pass at the token budget (see `activation_bytes`),
     "measured_peak_bytes": the peak memory of this process while it measured the rate (loading the weights and
                            whole batches at the budget): on CPU its peak RSS (Python, torch and the weights' file
                            mapping included), on CUDA torch's peak allocation; None with a given rate}

Time is an estimate at a rate: measured on this machine when `rate` is None, by a calibration of a few seconds (the
first reference on batches drawn from a seeded sample of the real rows, packed as the scorer packs them, after
one warm-up row), else the rate given. Selecting and writing the output are not counted.

How close the estimate comes to real runs is measured in bench/results/estimate_accuracy.md.
"""

from __future__ import annotations

import math
import random
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from toss_filter.config import ScoreConfig
from toss_filter.data.load import load_conversations
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.score.base import TokenRow
from toss_filter.score.base import REFERENCE_ROLES
from toss_filter.score.models import ReferenceModels
from toss_filter.progress import Progress
from toss_filter.steps.score import CONTEXT_FIELDS, build_references
from toss_filter.steps.tokenize import rows_to_read

SAMPLE_ROWS = 256  # rows kept (a seeded reservoir sample) to calibrate on
CALIBRATE_S = 3.0  # seconds of measured forward passes
LOGITS_CHUNK = 256  # the torch scorer's rows of float32 logits at a time (score/torch_backend.py)


def estimate_run(config: ScoreConfig, rate: float | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Count, measure and estimate a run of `config` (see the module docstring); `rate`: model tokens/s to use
    instead of measuring (no weights are loaded then)."""
    from toss_filter.score.torch_backend import default_batch_tokens

    references = build_references(config)  # tokenizers only: weights load on first use
    counts, sample = count_tokens(config, references, show_progress)
    batch_tokens = config.max_batch_tokens or default_batch_tokens(references.device)
    load_s = None
    if rate is None:
        started = time.perf_counter()
        model = references.model_for(REFERENCE_ROLES[0])  # loads the weights, and merges a LoRA as scoring does
        load_s = time.perf_counter() - started
        rate, measured_tokens = measure_rate(references, model, sample, batch_tokens)
        rate_source = f"measured here on {measured_tokens:,} tokens of the input"
        peak_bytes = peak_memory(references.device)
    else:
        rate_source, peak_bytes = "given (--rate)", None
    score_s = counts["tokens"] * len(REFERENCE_ROLES) / rate
    model_config = text_config(references, REFERENCE_ROLES[0])
    return counts | {
        "context": context(references), "device": references.device, "dtype": str(references.dtype).removeprefix("torch."),
        "batch_tokens": batch_tokens, "rate": rate, "rate_source": rate_source, "load_s": load_s,
        "score_s": score_s, "total_s": counts["tokenize_s"] + (load_s or 0.0) + score_s,
        "weights_bytes": weights_bytes(references), "measured_peak_bytes": peak_bytes,
        "activation_bytes": activation_bytes(model_config, max(batch_tokens, counts["longest_row"]),
                                             counts["longest_row"], references.dtype.itemsize),
    }


def count_tokens(config: ScoreConfig, references: ReferenceModels,
                 show_progress: bool = True) -> tuple[dict[str, Any], list[TokenRow]]:
    """Tokenize the rows `filter` would read, as it does; returns the counts (`rows`, `tokens`, `response_tokens`,
    `scored_tokens`, `longest_row`, `tokenize_s`) and a seeded sample of up to `SAMPLE_ROWS` rows as the scorer gets them, `(input_ids, labels of the scored
    tokens)`."""
    started = time.perf_counter()
    encode = ConversationTokenizer(references.tokenizer, resolve_format(references.tokenizer, config.template),
                                   config.max_length, config.score_reasoning)
    counts = {"rows": 0, "tokens": 0, "response_tokens": 0, "scored_tokens": 0, "longest_row": 0}
    sample: list[TokenRow] = []
    draw = random.Random(0)
    conversations = islice(load_conversations(config.input, config.split, config.columns, config.name), config.limit)
    with Progress("tokenize", rows_to_read(config), "rows", show_progress) as progress:
        for row, conversation in conversations:
            tokens = encode(conversation, config.input, row)
            ids, labels, scored = np.asarray(tokens.input_ids), np.asarray(tokens.labels), np.asarray(tokens.scored)
            counts["rows"] += 1
            counts["tokens"] += len(ids)
            counts["response_tokens"] += int((labels != -100).sum())
            counts["scored_tokens"] += int(scored.sum())
            counts["longest_row"] = max(counts["longest_row"], len(ids))
            slot = len(sample) if len(sample) < SAMPLE_ROWS else draw.randrange(counts["rows"])
            if slot < SAMPLE_ROWS:  # reservoir sampling: every row equally likely, whatever the input's length
                sample[slot:slot + 1] = [(ids, np.where(scored, ids, -100))]  # the labels the scorer gets
            progress.advance(1)
    return counts | {"tokenize_s": time.perf_counter() - started}, sample


def measure_rate(references: ReferenceModels, model: Any, sample: list[TokenRow], batch_tokens: int,
                 seconds: float = CALIBRATE_S) -> tuple[float, int]:
    """Model tokens/s of the torch scorer running `model` on `sample`, and the tokens it was measured on: the
    sample packed into batches as the scorer packs rows, then batches in a seeded random order until `seconds`
    have passed (at least one whole batch: a smaller one would run at another rate). The shortest row goes first,
    unmeasured, to pay the first call's checks."""
    from toss_filter.score.torch_backend import TorchScorer, length_sorted_batches

    scorer = TorchScorer(references, references.device, batch_tokens)
    batches = length_sorted_batches([len(ids) for ids, _ in sample], batch_tokens)
    scorer.model_nll(model, [sample[batches[-1][-1]]])
    random.Random(0).shuffle(batches)
    tokens, elapsed = 0, 0.0
    for batch in batches:
        rows = [sample[i] for i in batch]
        started = time.perf_counter()
        scorer.model_nll(model, rows)
        elapsed += time.perf_counter() - started
        tokens += sum(len(ids) for ids, _ in rows)
        if elapsed >= seconds:
            break
    return tokens / elapsed, tokens


def peak_memory(device: str) -> int:
    """Peak bytes so far: torch's peak allocation on CUDA, else this process's peak resident set."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def text_config(references: ReferenceModels, role: str) -> Any:
    """The model config of `role`'s reference (of its base, for an adapter), its text part for a multimodal one;
    read from config.json, no weights."""
    from transformers import AutoConfig

    spec = references.specs[role]
    loaded = AutoConfig.from_pretrained(spec.base or spec.path, trust_remote_code=references.trust_remote_code)
    return getattr(loaded, "text_config", None) or loaded


def context(references: ReferenceModels) -> int | None:
    """The references' context in tokens (the smaller of the two), as `steps.score.check_context` reads it."""
    limits = []
    for role in REFERENCE_ROLES:
        model_config = text_config(references, role)
        limits += [getattr(model_config, name) for name in CONTEXT_FIELDS if getattr(model_config, name, None)][:1]
    return min(limits, default=None)


def parameter_count(directory: str) -> int | None:
    """Parameters in a model or adapter directory's safetensors files, from their headers; None if it has none
    here (a Hub name)."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def weights_bytes(references: ReferenceModels) -> int | None:
    """Bytes of the weights the references hold at their dtype: one base for two adapters of it, else each
    reference's own model, plus every adapter (peft keeps an adapter's weights, merged or not)."""
    specs = references.specs.values()
    models = {spec.base or spec.path for spec in specs} if references.shared_base else [spec.base or spec.path for spec in specs]
    counts = [parameter_count(path) for path in [*models, *(spec.path for spec in specs if spec.is_adapter)]]
    if None in counts:
        return None
    return sum(counts) * references.dtype.itemsize


def activation_bytes(model_config: Any, batch_tokens: int, longest_row: int, dtype_bytes: int) -> int:
    """Peak activations of one forward pass of `batch_tokens` tokens, layer by layer (inference keeps one layer's
    tensors at a time): the residual stream and attention projections (4 × hidden), the MLP (3 × intermediate),
    and the attention scores of rows up to `longest_row` long (heads × row length per token: an upper bound, as
    fused attention kernels never hold them whole); plus the scorer's float32 logits of `LOGITS_CHUNK` positions
    and the log-softmax temporaries (3 × vocab each)."""
    hidden, intermediate = model_config.hidden_size, getattr(model_config, "intermediate_size", 4 * model_config.hidden_size)
    per_token = 4 * hidden + 3 * intermediate + model_config.num_attention_heads * min(longest_row, batch_tokens)
    return batch_tokens * per_token * dtype_bytes + 3 * LOGITS_CHUNK * model_config.vocab_size * 4


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _gib(size: int | None) -> str:
    return "unknown (weights not local)" if size is None else f"{size / 2**30:.2f} GiB"


def describe(result: dict[str, Any]) -> list[str]:
    """The estimate as the lines `toss-filter estimate` prints."""
    fits = ("" if result["context"] is None else
            f", context {result['context']:,} ({'fits' if result['longest_row'] <= result['context'] else 'TOO LONG: use --max-length'})")
    load = f" + {_duration(result['load_s'])} loading" if result["load_s"] is not None else ""
    memory = ("unknown" if result["weights_bytes"] is None else
              _gib(result["weights_bytes"] + result["activation_bytes"]))
    return [
        f"rows:         {result['rows']:,}",
        f"tokens:       {result['tokens']:,} ({result['response_tokens']:,} response, {result['scored_tokens']:,} scored)",
        f"longest row:  {result['longest_row']:,} tokens{fits}",
        f"time:         about {_duration(result['total_s'])} (an estimate): {result['tokens']:,} tokens × 2 references "
        f"at {result['rate']:,.0f} model tokens/s ({result['rate_source']}; {result['device']}, {result['dtype']}) "
        f"= {_duration(result['score_s'])} scoring{load} + {_duration(result['tokenize_s'])} tokenizing",
        f"memory:       about {memory} (an estimate): weights {_gib(result['weights_bytes'])} + activations "
        f"{_gib(result['activation_bytes'])} at {result['batch_tokens']:,} tokens per forward pass (Python and "
        "torch themselves not counted)"
        + (f"; peak measured while measuring the rate: {_gib(result['measured_peak_bytes'])}"
           if result["measured_peak_bytes"] is not None else ""),
    ]
