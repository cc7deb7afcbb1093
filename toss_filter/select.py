"""Step 4, select: decide which response tokens are unsafe, from their scores alone.

Contract: every function takes `scores`, a flat float array holding one entry per response token of the dataset in
(row, position) order, with NaN for a response token that has no score (position 0). It returns a boolean array of
the same length, True = unsafe (its label becomes -100). A NaN score is never selected.

- `global_top_k`: the paper's rule. The k = floor(ratio × N) highest scores over the whole dataset, N = number of
  scored tokens. Ties at the cut-off go to the earliest (row, position), as a stable sort would do.
- `per_sample_top_k`: floor(ratio × n_i) highest in each row, with the same tie rule.
- `above_threshold`: every score strictly above an absolute threshold.

The baselines the paper argues against spend the same budget k as `global_top_k`, so they compare fairly:
- `sample_level`: whole rows, highest mean score first (a SEAL-style sample filter), until k tokens are masked;
  the last row taken is masked only up to the budget, from its first response token on.
- `first_k`: the earliest response positions of every row (the paper's positional diagnosis): position 0 of every
  row, then position 1, ... in row order, until k tokens are masked.
- `random_k`: k scored tokens uniformly at random (seeded).

`choose_unsafe` dispatches on the strategy name (`toss`, `sample`, `first-k`, `random`) as the CLI gives it.

All are O(N) or O(N log N) NumPy passes over a float32 array: 10^8 scores take seconds and about 1 GB, where the
authors' Python list of (score, row, position) tuples would take tens of GB.
"""

from __future__ import annotations

import math

import numpy as np


def global_top_k(scores: np.ndarray, ratio: float) -> np.ndarray:
    valid = ~np.isnan(scores)
    scored = int(valid.sum())
    k = math.floor(ratio * scored)
    if k == 0:
        return np.zeros(len(scores), dtype=bool)
    # Only the k-th largest value is needed, so partition (O(N)) rather than sort; it works on one temporary
    # copy, and NaN-free input (the usual case) needs no compacted copy first.
    cutoff = np.partition(scores[valid] if scored < len(scores) else scores, scored - k)[scored - k]
    del valid
    selected = scores > cutoff  # NaN compares False
    missing = k - int(selected.sum())
    if missing:
        selected[np.flatnonzero(scores == cutoff)[:missing]] = True
    return selected


def per_sample_top_k(scores: np.ndarray, row_lengths: np.ndarray, ratio: float) -> np.ndarray:
    """`row_lengths[i]` is the number of entries of row i in `scores` (they sum to `len(scores)`)."""
    rows, positions, valid = _row_layout(scores, row_lengths)
    per_row_k = np.floor(ratio * np.bincount(rows[valid], minlength=len(row_lengths))).astype(np.int64)
    # Sort by row, then score descending (NaN last), then position: the first k of each row are selected.
    order = np.lexsort((positions, -np.where(valid, scores, -np.inf), rows))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = positions  # `order` keeps rows contiguous and in order, so slot i within its row is rank i
    return valid & (rank < per_row_k[rows])


def above_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return scores > threshold


def budget(scores: np.ndarray, ratio: float) -> int:
    """The number of tokens every strategy masks: floor(ratio × scored tokens)."""
    return math.floor(ratio * int((~np.isnan(scores)).sum()))


def positions_in_rows(row_lengths: np.ndarray) -> np.ndarray:
    """For a flat array made of rows of `row_lengths` entries, each entry's index within its row."""
    return np.arange(int(row_lengths.sum())) - np.repeat(np.cumsum(row_lengths) - row_lengths, row_lengths)


def _row_layout(scores: np.ndarray, row_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(len(row_lengths)), row_lengths)
    return rows, positions_in_rows(row_lengths), ~np.isnan(scores)


def sample_level(scores: np.ndarray, row_lengths: np.ndarray, ratio: float) -> np.ndarray:
    rows, positions, valid = _row_layout(scores, row_lengths)
    k = budget(scores, ratio)
    counts = np.bincount(rows[valid], minlength=len(row_lengths))
    sums = np.bincount(rows[valid], weights=scores[valid], minlength=len(row_lengths))
    means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
    order = np.argsort(-means, kind="stable")  # ties: earlier row first
    # The first rows of `order` whose tokens fit the budget are masked whole; the next one partly.
    rank_of_row = np.empty(len(order), dtype=np.int64)
    rank_of_row[order] = np.arange(len(order))
    token_order = np.lexsort((positions, rank_of_row[rows]))
    token_order = token_order[valid[token_order]]
    selected = np.zeros(len(scores), dtype=bool)
    selected[token_order[:k]] = True
    return selected


def first_k(scores: np.ndarray, row_lengths: np.ndarray, ratio: float) -> np.ndarray:
    rows, positions, valid = _row_layout(scores, row_lengths)
    valid_positions = np.where(valid, positions, np.iinfo(np.int64).max)
    token_order = np.lexsort((rows, valid_positions))[: budget(scores, ratio)]
    selected = np.zeros(len(scores), dtype=bool)
    selected[token_order] = True
    return selected


def random_k(scores: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    scored = np.flatnonzero(~np.isnan(scores))
    chosen = np.random.default_rng(seed).choice(scored, size=budget(scores, ratio), replace=False)
    selected = np.zeros(len(scores), dtype=bool)
    selected[chosen] = True
    return selected


STRATEGIES = ("toss", "sample", "first-k", "random")


def choose_unsafe(scores: np.ndarray, row_lengths: np.ndarray, ratio: float, strategy: str = "toss",
                  scope: str = "global", threshold: float | None = None, seed: int = 0) -> np.ndarray:
    """The unsafe mask of one selection rule. `scope` and `threshold` refine `toss` only (the baselines spend the
    global budget floor(ratio × N))."""
    if strategy == "sample":
        return sample_level(scores, row_lengths, ratio)
    if strategy == "first-k":
        return first_k(scores, row_lengths, ratio)
    if strategy == "random":
        return random_k(scores, ratio, seed)
    if threshold is not None:
        return above_threshold(scores, threshold)
    if scope == "per-sample":
        return per_sample_top_k(scores, row_lengths, ratio)
    return global_top_k(scores, ratio)
