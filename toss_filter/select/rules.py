"""Step 4, select: decide which response tokens are unsafe, from their scores alone.

Contract: every function takes `scores`, a flat float array holding one entry per response token of the dataset in
(row, position) order, with NaN for a response token that has no score (position 0). It returns a boolean array of
the same length, True = unsafe (its label becomes -100). A NaN score is never selected. Scores compare as NumPy
compares them: -0.0 == +0.0, and ±inf are ordinary extreme values.

The budget is k = floor(ratio × N), N = number of scored tokens, computed on the decimal the user wrote
(`budget_of`): ratio 0.29 over 100 tokens is 29 tokens, where float arithmetic (0.29 * 100 = 28.999999999999996)
would give 28.

- `global_top_k`: the paper's rule. The k highest scores over the whole dataset. Ties at the cut-off go to the
  earliest (row, position), as a stable sort would do.
- `per_sample_top_k`: floor(ratio × n_i) highest in each row (n_i = its scored tokens), with the same tie rule.
- `above_threshold`: every score strictly above an absolute threshold.

The baselines the paper argues against spend the same budget k as `global_top_k`, so they compare fairly:
- `sample_level`: whole rows, highest mean score first (a SEAL-style sample filter), until k tokens are masked;
  the last row taken is masked only up to the budget, from its first scored token on. A row's mean is the float64
  mean of its scored tokens (accumulated in position order); a row with none has mean -inf; a NaN mean (+inf and
  -inf in one row) ranks below every other. Rows tied on the mean go in row order.
- `first_k`: the earliest response positions of every row (the paper's positional diagnosis): the scored tokens at
  position 0 of every row in row order, then position 1, ..., until k tokens are masked.
- `random_k`: the k scored tokens with the largest `random_keys`, a seeded 64-bit hash of (seed, input row id,
  position in the row): a uniformly random k-subset for practical purposes, and one that a token keeps however
  the dataset is split into shards.

`choose_unsafe` dispatches on the strategy name (`toss`, `sample`, `first-k`, `random`) as the CLI gives it.

All are O(N) or O(N log N) NumPy passes over one in-memory array: 10^8 scores take seconds and about 1 GB, where
the authors' Python list of (score, row, position) tuples would take tens of GB. `streaming` computes the same
masks over a sharded run without gathering the scores; these functions are its definitions and test oracle.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal
from fractions import Fraction

import numpy as np


def _ratio_fraction(ratio: float) -> Fraction:
    # A float's repr is the shortest decimal that reads back as the same float, i.e. what the user typed on the
    # command line (0.29 -> 29/100), not the binary value 0.28999999999999998002...
    if isinstance(ratio, (numbers.Rational, Decimal)):
        return Fraction(ratio)
    return Fraction(repr(float(ratio)))


def budget_of(ratio: float, scored: int) -> int:
    """floor(ratio × scored), exactly, with `ratio` read as the decimal its repr shows."""
    return math.floor(_ratio_fraction(ratio) * int(scored))


def budgets_of(ratio: float, scored: np.ndarray) -> np.ndarray:
    """`budget_of` for each entry of an integer array (int64 result)."""
    scored = np.asarray(scored, dtype=np.int64)
    fraction = _ratio_fraction(ratio)
    num, den = fraction.numerator, fraction.denominator
    top = int(scored.max()) if len(scored) else 0
    if abs(num) * top < 2**63 and den < 2**63:
        return (scored * np.int64(num)) // np.int64(den)
    # Long decimals (many significant digits) would overflow int64: go through Python ints, once per distinct count.
    distinct, inverse = np.unique(scored, return_inverse=True)
    return np.array([budget_of(fraction, int(n)) for n in distinct], dtype=np.int64)[inverse.reshape(-1)]


def global_top_k(scores: np.ndarray, ratio: float) -> np.ndarray:
    valid = ~np.isnan(scores)
    scored = int(valid.sum())
    k = budget_of(ratio, scored)
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
    per_row_k = budgets_of(ratio, np.bincount(rows[valid], minlength=len(row_lengths)))
    # Sort by row, then score descending (NaN last), then position: the first k of each row are selected.
    order = np.lexsort((positions, -np.where(valid, scores, -np.inf), rows))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = positions  # `order` keeps rows contiguous and in order, so slot i within its row is rank i
    return valid & (rank < per_row_k[rows])


def above_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return scores > threshold


def budget(scores: np.ndarray, ratio: float) -> int:
    """The number of tokens every strategy masks: floor(ratio × scored tokens), exactly (`budget_of`)."""
    return budget_of(ratio, int((~np.isnan(scores)).sum()))


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


_MASK64 = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 with full avalanche (multiplications wrap mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_keys(row_lengths: np.ndarray, seed: int = 0, row_ids: np.ndarray | None = None) -> np.ndarray:
    """uint64 [sum(row_lengths)]: the key of each entry of a flat array made of rows of `row_lengths` entries,

        key = mix(mix(mix(seed + γ) ^ (row_id + γ)) ^ (position + γ))      (all mod 2^64)

    with `mix` splitmix64's finaliser, γ = 0x9E3779B97F4A7C15, `row_id` the entry's input row id (`row_ids[i]`
    for row i, default i) and `position` its index within its row. It depends on nothing else, so a shard
    computes the keys of its own tokens."""
    row_lengths = np.asarray(row_lengths, dtype=np.int64)
    row_ids = np.arange(len(row_lengths), dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
    gamma = np.uint64(_GAMMA)
    with np.errstate(over="ignore"):  # wrapping is the point; NumPy only warns on scalars, silence it anyway
        seeded = _mix(np.array([(int(seed) + _GAMMA) & _MASK64], dtype=np.uint64))
        per_row = _mix(seeded ^ (row_ids.astype(np.uint64) + gamma))
        positions = positions_in_rows(row_lengths).astype(np.uint64)
        return _mix(np.repeat(per_row, row_lengths) ^ (positions + gamma))


def random_k(scores: np.ndarray, row_lengths: np.ndarray, ratio: float, seed: int = 0,
             row_ids: np.ndarray | None = None) -> np.ndarray:
    """The k scored tokens with the largest `random_keys(row_lengths, seed, row_ids)`. Equal keys (some pair
    among N tokens collides with probability about N^2 / 2^65) go to the earliest (row, position)."""
    scored = np.flatnonzero(~np.isnan(scores))
    k = budget_of(ratio, len(scored))
    selected = np.zeros(len(scores), dtype=bool)
    if k == 0:
        return selected
    keys = random_keys(row_lengths, seed, row_ids)[scored]
    cutoff = np.partition(keys, len(keys) - k)[len(keys) - k]
    chosen = keys > cutoff
    chosen[np.flatnonzero(keys == cutoff)[: k - int(chosen.sum())]] = True
    selected[scored[chosen]] = True
    return selected


STRATEGIES = ("toss", "sample", "first-k", "random")


def choose_unsafe(scores: np.ndarray, row_lengths: np.ndarray, ratio: float, strategy: str = "toss",
                  scope: str = "global", threshold: float | None = None, seed: int = 0,
                  row_ids: np.ndarray | None = None) -> np.ndarray:
    """The unsafe mask of one selection rule. `scope` and `threshold` refine `toss` only (the baselines spend the
    global budget floor(ratio × N)). `row_ids` (int64, one per row, default 0, 1, ...) are the input row ids,
    which only `random` reads."""
    if strategy == "sample":
        return sample_level(scores, row_lengths, ratio)
    if strategy == "first-k":
        return first_k(scores, row_lengths, ratio)
    if strategy == "random":
        return random_k(scores, row_lengths, ratio, seed, row_ids)
    if threshold is not None:
        return above_threshold(scores, threshold)
    if scope == "per-sample":
        return per_sample_top_k(scores, row_lengths, ratio)
    return global_top_k(scores, ratio)
