"""The selection rules of `rules` over a sharded run: exactly the same masks, without ever gathering the scores.

Data contract
-------------
The dataset's response tokens are split into `shards` contiguous shards of whole rows, numbered 0, 1, ... in row
order. `load(s)` returns shard s as a `ResponseShard`:

- `scores`: float32 [n_s], one per response token of the shard in (row, position) order, NaN = unscored;
- `response_per_row`: int64 [rows of the shard], the response tokens of each row (sums to n_s; 0 is allowed);
- `row_ids`: int64 [rows of the shard], the input row ids, increasing, global across shards.

Concatenating the shards in order gives the flat arrays of `rules` (`scores`, `row_lengths` = the
`response_per_row`, `row_ids`), and for every `Rule`

    concat(decision.unsafe(s, load(s)) for s in range(shards))
        == rules.choose_unsafe(scores, row_lengths, rule.ratio, rule.strategy, rule.scope, rule.threshold,
                               rule.seed, row_ids)

bit for bit: the same budget k = floor(ratio × N) (`rules.budget_of`), the same ties (to the earliest
(row, position), -0.0 == +0.0), NaN never selected.

Passes
------
`decide` reads the shards in passes. A pass is one `map_shards(task, range(shards))` call; each task loads one
shard and returns a small summary, and the driver merges the summaries. It never holds anything proportional to the
number of tokens: in a histogram pass a shard's summary has at most 65,536 bins (sent dense or sparse, whichever is
smaller, with the narrowest count type: a uniform hash digit over a shard of up to ~10^7 tokens is 64 KiB, a score
digit typically a few thousand sparse bins), merged into one histogram; a collecting pass returns at most
`COLLECT_LIMIT` keys over all shards together; a Decision keeps one int per shard. Tasks are `functools.partial`s
of module-level functions over the `Rule` and `load`, so they pickle when `load` does (a Ray executor ships them
to other processes).

The ranked rules are one radix selection: every unit (a scored token, or for `sample` a row with scored tokens)
has an order-preserving unsigned key and a weight (1, or the row's scored tokens). Pass 1 histograms the top 16
bits of the keys (its total weight is N, hence k) and picks the bucket holding the k-th largest weight. Each
further pass looks only at keys in that bucket: it histograms the next 16 bits or, once the bucket holds at most
`COLLECT_LIMIT` units, returns their exact keys, which ends the search. The result is the cut-off key c, with
G = weight of the keys above c < k <= G + weight at c. The k - G tokens needed at c go to the earliest: shard s
takes quota_s = min(its weight at c, what is still needed), in shard order (the per-shard weights at c come with
the last pass). `Decision.unsafe(s)` is then every scored token whose key ranks before c (a larger key; for
first-k a smaller position), plus the first quota_s scored tokens whose key is c, in (row, position) order.

| rule                          | key of a unit                                  | passes                  |
|-------------------------------|------------------------------------------------|-------------------------|
| toss, scope global            | its score as uint32 (`score_keys`), 2 digits   | 2                       |
| random                        | `rules.random_keys`, uint64, 4 digits          | 2 (up to 4)             |
| sample                        | its row's mean (`mean_keys`), weight n_i       | 2 to 4                  |
| first-k                       | its response position, the smallest first      | 1                       |
| toss, per-sample or threshold | none: each shard decides alone                 | 1 (counts N, for stats) |

k = 0 stops after pass 1. random takes 2 passes while its top-16-bit bucket holds at most `COLLECT_LIMIT` keys
(uniform keys: up to about 4 × 10^9 tokens); sample takes 2 when at most `COLLECT_LIMIT` rows share the top 16
bits of the cut-off mean (sign, exponent, 4 mantissa bits), else 3 or 4. first-k needs no digits: its keys are
response positions, so one per-shard bincount (as long as the longest row) is the whole histogram, and the
quotas go to the rows at the cut-off position P in row order. Writing the shards with `Decision.unsafe` is one more
read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from toss_filter.select import rules

SCOPES = ("global", "per-sample")

# A bucket with at most this many units is finished by shipping its exact keys (24 bytes each) instead of more
# histogram passes: one pass instead of up to three, and still a bounded summary.
COLLECT_LIMIT = 65_536

_DIGIT_BITS = 16


@dataclass
class ResponseShard:
    """The response tokens of one shard, what every rule needs.
    scores: float32 [n], one per response token of the shard in (row, position) order, NaN = unscored;
    response_per_row: int64 [rows of the shard], sums to n;
    row_ids: int64 [rows of the shard], the input row ids (increasing; global across shards)."""

    scores: np.ndarray
    response_per_row: np.ndarray
    row_ids: np.ndarray


@dataclass(frozen=True)
class Rule:
    """One selection rule, as `rules.choose_unsafe` reads its arguments: `scope` and `threshold` refine `toss`
    only; `seed` is read by `random` only."""

    strategy: str = "toss"  # toss | sample | first-k | random
    ratio: float = 0.2
    scope: str = "global"  # global | per-sample (toss only)
    threshold: float | None = None  # toss only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in rules.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {rules.STRATEGIES}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; expected one of {SCOPES}")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio!r}")

    @property
    def kind(self) -> str:
        """What is computed: `global` (toss top-k), `per-sample`, `threshold`, `sample`, `first-k` or `random`,
        in the precedence of `rules.choose_unsafe`."""
        if self.strategy != "toss":
            return self.strategy
        if self.threshold is not None:
            return "threshold"
        return self.scope


MapShards = Callable[[Callable[[int], Any], Sequence[int]], list[Any]]


def local_map(fn: Callable[[int], Any], shards: Sequence[int]) -> list[Any]:
    """The in-process `MapShards`: results in the order of `shards`, as every `MapShards` must return them."""
    return [fn(s) for s in shards]


@dataclass(frozen=True)
class Decision:
    """What `decide` found, small and picklable: it travels to the tasks that write each shard.

    k: the budget floor(ratio × N) (None for threshold and per-sample, which have no global budget);
    scored_tokens: N, the scored tokens over all shards;
    cutoff: for toss/global with k > 0, the score of the k-th highest token (else None);
    passes: the reads of every shard `decide` made.
    cutoff_key, quotas (internal): units whose key ranks before `cutoff_key` are all selected, and shard s also
    takes its first `quotas[s]` scored tokens whose key equals it."""

    rule: Rule
    scored_tokens: int
    k: int | None
    cutoff: float | None
    passes: int
    cutoff_key: int | None = None
    quotas: tuple[int, ...] = ()

    def unsafe(self, shard: int, data: ResponseShard) -> np.ndarray:
        """bool [len(data.scores)]: the oracle's mask restricted to shard `shard`, whose data is `data`."""
        if int(np.sum(data.response_per_row)) != len(data.scores):
            raise ValueError(f"shard {shard}: response_per_row sums to {int(np.sum(data.response_per_row))}, "
                             f"but it has {len(data.scores)} scores")
        kind = self.rule.kind
        if kind == "threshold":
            return rules.above_threshold(data.scores, self.rule.threshold)
        if kind == "per-sample":
            return rules.per_sample_top_k(data.scores, np.asarray(data.response_per_row), self.rule.ratio)
        if not self.k:
            return np.zeros(len(data.scores), dtype=bool)
        keys, valid = _token_keys(self.rule, data)
        cut = keys.dtype.type(self.cutoff_key)
        selected = valid & ((keys < cut) if kind == "first-k" else (keys > cut))
        quota = self.quotas[shard]
        if quota:
            selected[np.flatnonzero(valid & (keys == cut))[:quota]] = True
        return selected


def decide(rule: Rule, shards: int, load: Callable[[int], ResponseShard], map_shards: MapShards = local_map
           ) -> Decision:
    """Reads the shards through `load` (possibly several passes; each pass is one `map_shards(task, range(shards))`
    call whose tasks return small summaries) and returns a Decision."""
    kind = rule.kind
    if kind in ("threshold", "per-sample"):
        scored = sum(map_shards(partial(_count_task, load), range(shards)))
        return Decision(rule, int(scored), None, None, passes=1)
    if kind == "first-k":
        summaries = map_shards(partial(_position_task, load), range(shards))
        scored = sum(int(weights.sum()) for _, weights, _ in summaries)
        k = rules.budget_of(rule.ratio, scored)
        if k == 0:
            return Decision(rule, scored, 0, None, passes=1)
        position, before, _, at = _locate(summaries, k, descending=False)
        return Decision(rule, scored, k, None, 1, position, _quotas(at, k - before))
    return _radix_select(rule, shards, load, map_shards)


def _radix_select(rule: Rule, shards: int, load: Callable[[int], ResponseShard], map_shards: MapShards
                  ) -> Decision:
    bits = 32 if rule.kind == "global" else 64
    prefix, prefix_bits, bucket_units, passes = 0, 0, None, 0
    while prefix_bits < bits:
        remaining = bits - prefix_bits
        # The first pass cannot collect: it does not know how many units the bucket (everything) holds.
        digit_bits = remaining if bucket_units is not None and bucket_units <= COLLECT_LIMIT else min(
            _DIGIT_BITS, remaining)
        summaries = map_shards(partial(_digit_task, rule, load, bits, prefix_bits, prefix, digit_bits),
                               range(shards))
        passes += 1
        if prefix_bits == 0:
            scored = sum(int(weights.sum()) for _, weights, _ in summaries)
            k = need = rules.budget_of(rule.ratio, scored)
            if k == 0:
                return Decision(rule, scored, 0, None, passes)
        digit, before, bucket_units, at = _locate(summaries, need, descending=True)
        del summaries
        need -= before
        prefix, prefix_bits = (prefix << digit_bits) | digit, prefix_bits + digit_bits
    cutoff = _score_of_key(prefix) if rule.kind == "global" else None
    return Decision(rule, scored, k, cutoff, passes, prefix, _quotas(at, need))


# A summary, per shard: (values, weights, units). `values` are sorted and distinct, or None for a dense histogram
# (weights[i] is the weight of value i); `units` is None when every unit weighs 1 (then it equals `weights`).
Summary = tuple[np.ndarray | None, np.ndarray, np.ndarray | None]


def _locate(summaries: list[Summary], need: int, descending: bool) -> tuple[int, int, int, list[int]]:
    """The value v holding the `need`-th weight in value order (largest first if `descending`), the weight ranked
    before v, the units at v, and each shard's weight at v. Requires 1 <= need <= total weight."""
    values, weights, units = _merge(summaries)
    if descending:
        values, weights, units = values[::-1], weights[::-1], units[::-1]
    reach = np.cumsum(weights)
    i = int(np.searchsorted(reach, need))  # the first value whose cumulative weight reaches `need`
    value = int(values[i])
    return value, int(reach[i] - weights[i]), int(units[i]), [_weight_at(summary, value) for summary in summaries]


def _weight_at(summary: Summary, value: int) -> int:
    values, weights, _ = summary
    if values is None:
        return int(weights[value]) if value < len(weights) else 0
    j = int(np.searchsorted(values, value))
    return int(weights[j]) if j < len(values) and int(values[j]) == value else 0


def _merge(summaries: list[Summary]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The summaries summed: (sorted distinct values, weights, units), int64."""
    top = max((len(w) - 1 if v is None else int(v[-1]) for v, w, _ in summaries if len(w)), default=-1)
    if top < 1 << 20:  # digits and positions: a dense accumulator, no sort of the shards' entries
        weights, units = np.zeros(top + 1, np.int64), np.zeros(top + 1, np.int64)
        for shard_values, shard_weights, shard_units in summaries:
            where = slice(0, len(shard_weights)) if shard_values is None else shard_values  # distinct values
            weights[where] += shard_weights
            units[where] += shard_weights if shard_units is None else shard_units
        values = np.flatnonzero(units)
        return values, weights[values], units[values]
    # Collected keys: at most COLLECT_LIMIT entries over all shards, always sparse.
    values, inverse = np.unique(np.concatenate([v for v, _, _ in summaries]), return_inverse=True)
    weights, units = np.zeros(len(values), np.int64), np.zeros(len(values), np.int64)
    np.add.at(weights, inverse.reshape(-1), np.concatenate([w for _, w, _ in summaries]).astype(np.int64))
    np.add.at(units, inverse.reshape(-1),
              np.concatenate([w if u is None else u for _, w, u in summaries]).astype(np.int64))
    return values, weights, units


def _quotas(at: list[int], need: int) -> tuple[int, ...]:
    quotas = []
    for available in at:  # shard order is (row, position) order: the earliest ties first
        quotas.append(min(available, need))
        need -= quotas[-1]
    assert need == 0, "the cut-off bucket holds fewer ties than needed"
    return tuple(quotas)


# --- tasks: module-level, so that partial(task, ...) pickles ---


def _count_task(load: Callable[[int], ResponseShard], shard: int) -> int:
    return int((~np.isnan(load(shard).scores)).sum())


def _position_task(load: Callable[[int], ResponseShard], shard: int) -> Summary:
    data = load(shard)
    positions = rules.positions_in_rows(np.asarray(data.response_per_row, np.int64))
    return _histogram(positions[~np.isnan(data.scores)], None)


def _digit_task(rule: Rule, load: Callable[[int], ResponseShard], bits: int, prefix_bits: int, prefix: int,
                digit_bits: int, shard: int) -> Summary:
    """The histogram of the `digit_bits` bits below the top `prefix_bits` of the keys whose top bits are
    `prefix`."""
    keys, weights = _units(rule, load(shard))
    if prefix_bits:
        inside = (keys >> np.uint64(bits - prefix_bits)) == np.uint64(prefix)
        keys, weights = keys[inside], None if weights is None else weights[inside]
    digits = (keys >> np.uint64(bits - prefix_bits - digit_bits)) & np.uint64((1 << digit_bits) - 1)
    if digit_bits <= _DIGIT_BITS:
        return _histogram(digits.astype(np.intp), weights)
    values, inverse = np.unique(digits, return_inverse=True)  # collecting: the bucket's exact keys
    inverse = inverse.reshape(-1)
    units = np.bincount(inverse, minlength=len(values)).astype(np.int64)
    if weights is None:
        return values, units, None
    return values, np.bincount(inverse, weights=weights, minlength=len(values)).astype(np.int64), units


def _histogram(bins: np.ndarray, weights: np.ndarray | None) -> Summary:
    """A shard's histogram in its smaller form, dense or sparse, with the narrowest counts that hold it: it is
    what the driver holds per shard while it merges a pass (a uniform 16-bit digit is dense, a score digit
    sparse)."""
    units = np.bincount(bins)
    # float64 bincount weights are exact integers up to 2^53 tokens
    weighed = None if weights is None else np.bincount(bins, weights=weights).astype(np.int64)
    top = int((units if weighed is None else weighed).max()) if len(units) else 0
    count_type = next(t for t in (np.uint8, np.uint16, np.uint32, np.int64) if top <= np.iinfo(t).max)
    index_type = np.uint16 if len(units) <= 1 << 16 else np.int64
    arrays = 1 if weighed is None else 2
    nonzero = np.flatnonzero(units)
    dense = len(units) * arrays * np.dtype(count_type).itemsize
    sparse = len(nonzero) * (np.dtype(index_type).itemsize + arrays * np.dtype(count_type).itemsize)
    if dense <= sparse:
        values = None
    else:
        values, units = nonzero.astype(index_type), units[nonzero]
        weighed = None if weighed is None else weighed[nonzero]
    if weighed is None:
        return values, units.astype(count_type), None
    return values, weighed.astype(count_type), units.astype(count_type)


# --- keys ---


def score_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 [n], order-preserving: for non-NaN float32 a, b, key(a) < key(b) iff a < b, and -0.0 shares +0.0's
    key (NumPy compares them equal). The key of a NaN is meaningless; callers mask NaN out."""
    if scores.dtype != np.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    bits = (scores + np.float32(0)).view(np.uint32)  # -0.0 + 0.0 = +0.0
    return np.where(bits >> np.uint32(31) != 0, ~bits, bits | np.uint32(0x80000000))


def mean_keys(means: np.ndarray) -> np.ndarray:
    """uint64 [rows], order-preserving for float64 (±0.0 equal, ±inf at the ends), NaN = 0, below everything,
    where `rules.sample_level`'s stable sort of -means puts it."""
    bits = (means.astype(np.float64) + 0.0).view(np.uint64)
    keys = np.where(bits >> np.uint64(63) != 0, ~bits, bits | np.uint64(1 << 63))
    keys[np.isnan(means)] = 0
    return keys


def _score_of_key(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _row_means(data: ResponseShard) -> tuple[np.ndarray, np.ndarray]:
    """Each row's mean score and scored tokens, computed as `rules.sample_level` does (same float64 sums in the
    same order, so the same bits)."""
    lengths = np.asarray(data.response_per_row, np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    valid = ~np.isnan(data.scores)
    counts = np.bincount(rows[valid], minlength=len(lengths))
    sums = np.bincount(rows[valid], weights=data.scores[valid], minlength=len(lengths))
    return np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf), counts


def _token_keys(rule: Rule, data: ResponseShard) -> tuple[np.ndarray, np.ndarray]:
    """Every response token's key under `rule` (uint64; first-k: its position, int64) and whether it is scored."""
    valid = ~np.isnan(data.scores)
    lengths = np.asarray(data.response_per_row, np.int64)
    if rule.kind == "global":
        return score_keys(data.scores).astype(np.uint64), valid
    if rule.kind == "random":
        return rules.random_keys(lengths, rule.seed, data.row_ids), valid
    if rule.kind == "sample":
        means, _ = _row_means(data)
        return np.repeat(mean_keys(means), lengths), valid
    return rules.positions_in_rows(lengths), valid  # first-k


def _units(rule: Rule, data: ResponseShard) -> tuple[np.ndarray, np.ndarray | None]:
    """The ranked units of a shard: their keys, and their weights (None = 1 each)."""
    if rule.kind == "sample":
        means, counts = _row_means(data)
        has_tokens = counts > 0  # a row without scored tokens can take none
        return mean_keys(means)[has_tokens], counts[has_tokens]
    keys, valid = _token_keys(rule, data)
    return keys[valid], None
