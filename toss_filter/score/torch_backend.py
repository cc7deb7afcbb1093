"""The transformers/torch scorer: exact per-token NLL of response tokens under one reference model.

Implements the `toss_filter.score.base.Scorer` contract; `model_nll(model, rows)` does the same for any causal LM.

Where the time goes, and why it is organised this way:
- Rows are sorted by length and packed into batches by a token budget (padded length × rows), so padding is
  small and the batch size adapts to the row length. The default budget depends on the device: on a CPU, batches
  beyond ~2k tokens spill the caches and run slower per token, so the CPU default is 2048 (bench/batch_budget.py
  measures it); accelerators want large batches.
- Batches are a function of the shard, so a shard's scores are repeatable, but a row's last bits depend on the rows
  batched beside it: the padded width changes the attention kernel's reduction order, and an LM-head chunk of
  fewer than ~12 rows takes another MKL kernel. 1 shard and 7-row shards of the same 80 rows differ by up to 3.3e-5
  (bundled SmolLM2 pair, CPU). `batch_invariant=True` runs each row alone, unpadded, with LM-head chunks of its own
  tokens: a row's scores are then a function of that row alone, the same bits for any shard layout (same torch
  thread count and software). It is off by default for its cost (bench/batch_invariance.py, on 2 shared cores):
  +1.4% at 1 thread, but 2.8-4.5x at 2 threads, where ten times as many small parallel ops each pay a thread
  barrier.
- The decoder runs once per batch; the LM head and the log-softmax run only on the hidden states that predict a
  response token (position j-1 for token j), in chunks of `logits_chunk` rows. Prompt positions never get logits,
  and no `[tokens, vocab]` tensor larger than one chunk ever exists.
- The log-softmax is computed in float32 whatever the model dtype. A chunk of 256 rows keeps the float32 logits at
  256 × vocab (50 MB for a 49k vocabulary); larger chunks ran no faster on CPU and only raised peak memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from toss_filter.errors import ConfigError
from toss_filter.score.base import ProgressCallback, TokenRow, scored_positions
from toss_filter.score.models import ReferenceModels


def length_sorted_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches whose padded size (rows × longest) stays within `max_batch_tokens`.

    Longest rows first, so a budget overrun (one row longer than the budget) shows up at the start.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def single_row_batches(lengths: Sequence[int]) -> list[list[int]]:
    """Each row a batch of its own, longest first: scores that do not depend on a row's neighbours."""
    return [[i] for i in sorted(range(len(lengths)), key=lambda i: -lengths[i])]


def _final_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head as the model's own forward applies it, for the architectures that post-process logits."""
    config = model.config
    logits = model.get_output_embeddings()(hidden).float()
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


CPU_BATCH_TOKENS = 2048
ACCELERATOR_BATCH_TOKENS = 8192


def default_batch_tokens(device: str) -> int:
    return CPU_BATCH_TOKENS if device == "cpu" else ACCELERATOR_BATCH_TOKENS


class TorchScorer:
    """`batch_invariant`: score each row alone, so its scores do not depend on the rows beside it or on the shard
    layout (`max_batch_tokens` then goes unused); off, length-sorted batches of `max_batch_tokens` padded tokens."""

    def __init__(self, references: ReferenceModels | None = None, device: str = "cpu",
                 max_batch_tokens: int | None = None, logits_chunk: int = 256, batch_invariant: bool = False):
        self.references, self.device = references, device
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(device)
        self.logits_chunk = logits_chunk
        self.batch_invariant = batch_invariant
        self._checked: set[int] = set()

    @property
    def one_model_at_a_time(self) -> bool:
        """True when the references merge LoRA weights in place (score/models.py): one role at a time is cheapest."""
        if self.references is None:
            return False
        self.references.load()
        return self.references.one_model_at_a_time

    def nll(self, role: str, rows: Sequence[TokenRow], on_batch: ProgressCallback | None = None) -> list[np.ndarray]:
        assert self.references is not None, "TorchScorer was built without references"
        return self.model_nll(self.references.model_for(role), rows, on_batch)

    def nll_roles(self, roles: Sequence[str], rows: Sequence[TokenRow],
                  on_batch: Mapping[str, ProgressCallback] | None = None) -> dict[str, list[np.ndarray]]:
        return {role: self.nll(role, rows, (on_batch or {}).get(role)) for role in roles}

    def describe(self) -> dict[str, Any]:
        return {"backend": "torch", "device": self.device, "batch_invariant": self.batch_invariant,
                "max_batch_tokens": None if self.batch_invariant else self.max_batch_tokens}

    @torch.inference_mode()
    def model_nll(self, model: torch.nn.Module, rows: Sequence[TokenRow],
                  on_batch: ProgressCallback | None = None) -> list[np.ndarray]:
        """Per-token NLL arrays for `rows` under `model`, as in the `Scorer` contract."""
        if id(model) not in self._checked and rows:
            self._check_head_matches_forward(model, rows[0])
            self._checked.add(id(model))
        results: list[np.ndarray] = [np.full(len(ids), np.nan, dtype=np.float32) for ids, _ in rows]
        lengths = [len(ids) for ids, _ in rows]
        batches = (single_row_batches(lengths) if self.batch_invariant
                   else length_sorted_batches(lengths, self.max_batch_tokens))
        for batch in batches:
            self._score_batch(model, [rows[i] for i in batch], [results[i] for i in batch])
            if on_batch:
                on_batch(len(batch), sum(len(rows[i][0]) for i in batch))
        return results

    def _score_batch(self, model: torch.nn.Module, rows: list[TokenRow], outputs: list[np.ndarray]) -> None:
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (ids, labels) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            scored[b, : len(ids)] = torch.from_numpy(scored_positions(labels))
        if not scored.any():
            return
        # No attention mask is needed: padding is on the right and attention is causal, so no real token can see a
        # pad token, and positions 0..n-1 are right for every row (tests/score: batched == one row at a time).
        input_ids = input_ids.to(self.device)
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        rows_idx, positions = scored.nonzero(as_tuple=True)  # token (b, j) is predicted from hidden (b, j-1)
        predictors = hidden[rows_idx.to(self.device), (positions - 1).to(self.device)]
        targets = input_ids[rows_idx.to(self.device), positions.to(self.device)]
        nll = torch.empty(len(targets), dtype=torch.float32, device=self.device)
        for start in range(0, len(targets), self.logits_chunk):
            chunk = slice(start, start + self.logits_chunk)
            logits = _final_logits(model, predictors[chunk])
            nll[chunk] = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[chunk, None]).squeeze(1)
        nll_host = nll.cpu().numpy()
        rows_np, positions_np = rows_idx.numpy(), positions.numpy()
        for b, out in enumerate(outputs):
            in_row = rows_np == b
            out[positions_np[in_row]] = nll_host[in_row]

    def _check_head_matches_forward(self, model: torch.nn.Module, row: TokenRow) -> None:
        """Guard against an architecture whose forward post-processes logits in a way `_final_logits` misses."""
        ids = torch.as_tensor(np.asarray(row[0][:64], dtype=np.int64), device=self.device)[None]
        reference = model(input_ids=ids).logits.float()[0]
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
        ours = _final_logits(model, hidden)
        gap = (torch.log_softmax(reference, -1) - torch.log_softmax(ours, -1)).abs().max().item()
        if gap > 1e-3:
            raise ConfigError(
                f"{type(model).__name__}: scoring from hidden states differs from the model's own logits by {gap:.3g}; "
                "this architecture post-processes logits in a way toss-filter does not know yet"
            )
