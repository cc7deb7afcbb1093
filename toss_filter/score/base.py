"""The contract every scoring backend implements; `select` never knows which backend produced the numbers.

    scorer.nll(role, rows, on_batch) -> list[np.ndarray]
    scorer.nll_roles(roles, rows, on_batch={role: callback}) -> {role: list[np.ndarray]}

- `role` is one of `REFERENCE_ROLES`: "safety" or "utility".
- `rows[i]` is `(input_ids, labels)`: two 1-D int arrays of one length, from `toss_filter.data.tokenize`.
- The result's i-th array is float32 with `len == len(input_ids)`: `-log p(input_ids[j] | input_ids[:j])` under
  that role's model where `labels[j] != -100` and `j > 0`, and NaN everywhere else.
- `nll_roles` scores the same rows under several roles at once, as the backend likes best (vLLM batches two LoRA
  adapters of one base together); it equals `{role: nll(role, rows) for role in roles}`.
- `on_batch(rows_done, tokens_done)` is called as work completes, for progress bars (`nll_roles` takes one per
  role).
- `one_model_at_a_time` is True for a scorer that can hold only one role's model at once (vLLM serving two full
  models); the pipeline then scores every shard under one role before the other, instead of shard by shard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

REFERENCE_ROLES = ("safety", "utility")
TokenRow = tuple[np.ndarray, np.ndarray]
ProgressCallback = Callable[[int, int], None]


class Scorer(Protocol):
    one_model_at_a_time: bool

    def nll(self, role: str, rows: Sequence[TokenRow], on_batch: ProgressCallback | None = None) -> list[np.ndarray]: ...

    def nll_roles(self, roles: Sequence[str], rows: Sequence[TokenRow],
                  on_batch: Mapping[str, ProgressCallback] | None = None) -> dict[str, list[np.ndarray]]: ...

    def describe(self) -> dict[str, Any]: ...


def scored_positions(labels: np.ndarray) -> np.ndarray:
    """Positions that get a score: response tokens with a prefix to predict them from."""
    mask = np.asarray(labels) != -100
    mask[:1] = False
    return mask
