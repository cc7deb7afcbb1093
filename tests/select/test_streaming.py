import pickle
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toss_filter.select import rules, streaming
from toss_filter.select.streaming import Decision, ResponseShard, Rule, decide, local_map

NAN, INF = np.nan, np.inf

RULES = [Rule("toss"), Rule("toss", scope="per-sample"), Rule("toss", threshold=0.0), Rule("sample"),
         Rule("first-k"), Rule("random", seed=0), Rule("random", seed=12345)]


@dataclass
class Load:
    """A picklable `load`, as a Ray executor needs it."""
    shards: list

    def __call__(self, shard: int) -> ResponseShard:
        return self.shards[shard]


def split(scores, lengths, cuts, row_ids=None):
    """The shards of a flat dataset, cut before the rows in `cuts` (sorted, repeats make empty shards)."""
    lengths = np.asarray(lengths, np.int64)
    row_ids = np.arange(len(lengths), dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
    starts = np.r_[0, np.cumsum(lengths)]
    bounds = [0, *cuts, len(lengths)]
    return [ResponseShard(scores[starts[a]:starts[b]], lengths[a:b], row_ids[a:b]) for a, b in zip(bounds, bounds[1:])]


def streamed(rule, shards, map_shards=local_map):
    decision = decide(rule, len(shards), Load(shards), map_shards)
    masks = [decision.unsafe(s, data) for s, data in enumerate(shards)]
    return decision, np.concatenate(masks) if masks else np.zeros(0, bool)


def oracle(rule, scores, lengths, row_ids=None):
    return rules.choose_unsafe(scores, np.asarray(lengths, np.int64), rule.ratio, rule.strategy, rule.scope,
                               rule.threshold, rule.seed, row_ids)


def check_all(scores, lengths, cuts, ratio, row_ids=None):
    scores = np.asarray(scores, np.float32)
    shards = split(scores, lengths, cuts, row_ids)
    scored = int((~np.isnan(scores)).sum())
    for base in RULES:
        rule = Rule(base.strategy, ratio, base.scope, base.threshold, base.seed)
        decision, mask = streamed(rule, shards)
        expected = oracle(rule, scores, lengths, row_ids)
        np.testing.assert_array_equal(mask, expected, err_msg=f"{rule} cuts={cuts}")
        assert decision.scored_tokens == scored
        if decision.k is not None:
            assert decision.k == rules.budget_of(ratio, scored) == mask.sum()
        if rule.kind == "global" and decision.k:
            assert decision.cutoff == scores[expected].min()


VALUES = [0.0, -0.0, 1.0, -1.0, 2.5, INF, -INF, NAN, 1e-30, -1e-30, 3.4e38]


@st.composite
def datasets(draw):
    lengths = draw(st.lists(st.integers(0, 9), min_size=0, max_size=25))
    n = sum(lengths)
    if draw(st.booleans()):  # adversarial: few distinct values, so ties, ±0.0, ±inf and NaN everywhere
        pool = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=4))
        scores = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    else:
        scores = draw(st.lists(st.one_of(st.floats(width=32, allow_nan=True), st.sampled_from(VALUES)),
                               min_size=n, max_size=n))
    cuts = sorted(draw(st.lists(st.integers(0, len(lengths)), max_size=6)))
    ratio = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.29, 0.5, 1 / max(n, 1), min(1.0, 1.5 / max(n, 1))]),
                           st.floats(0, 1)))
    first_id = draw(st.integers(0, 2**40))
    return np.array(scores, np.float32), lengths, cuts, ratio, first_id + np.arange(len(lengths))


@settings(max_examples=60, deadline=None)
@given(datasets())
def test_every_rule_streams_exactly_the_oracle_mask(data):
    scores, lengths, cuts, ratio, row_ids = data
    check_all(scores, lengths, cuts, ratio, row_ids)


def test_random_data_over_one_to_seven_shards_with_and_without_collecting(monkeypatch):
    rng = np.random.default_rng(0)
    for trial in range(6):
        lengths = rng.integers(0, 60, 80)
        lengths[rng.integers(0, 80, 5)] = 0
        scores = rng.standard_normal(lengths.sum()).astype(np.float32)
        if trial % 2:
            scores = np.round(scores * 2) / 2  # heavy ties
        scores[rng.random(len(scores)) < 0.05] = NAN
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        scores[starts[lengths > 0][:10]] = NAN  # whole unscored rows' first tokens
        cuts = sorted(rng.integers(0, 81, trial).tolist())
        for ratio in (0.2, 0.29, 1.0):
            check_all(scores, lengths, cuts, ratio)
    # COLLECT_LIMIT = 0 forces the histogram of every 16-bit digit (4 passes for 64-bit keys).
    monkeypatch.setattr(streaming, "COLLECT_LIMIT", 0)
    lengths = rng.integers(0, 60, 80)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    check_all(scores, lengths, [10, 10, 40, 79], 0.3)
    assert decide(Rule("random"), 1, Load(split(scores, lengths, []))).passes == 4
    assert decide(Rule("sample"), 1, Load(split(scores, lengths, []))).passes == 4


def test_adversarial_layouts():
    # all ties, spread over shards: the quotas go to the earliest shards
    check_all(np.ones(40), [10, 10, 10, 10], [1, 1, 2, 3], 0.55)
    # ±0.0 mixes are ties
    check_all([0.0, -0.0, -0.0, 0.0, 1.0, -0.0], [2, 2, 2], [1, 2], 0.5)
    # ±inf, NaN, all-NaN rows, empty rows and rows with no response token
    check_all([INF, NAN, -INF, NAN, NAN, 1.0, INF, -INF, 0.0], [3, 0, 2, 0, 4], [1, 3, 3], 0.5)
    check_all([NAN, NAN, NAN], [1, 2], [1], 1.0)  # nothing scored
    check_all(np.zeros(0), [0, 0], [1], 0.5)  # no response tokens at all
    # many ties at the cut-off of every rule
    rng = np.random.default_rng(4)
    lengths = rng.integers(0, 8, 50)
    check_all(rng.integers(0, 3, lengths.sum()).astype(np.float32), lengths, [5, 20, 20, 33], 0.37)


def test_budget_of_0_29_over_100_tokens_is_29_and_k_in_0_1_n():
    scores = np.random.default_rng(5).standard_normal(100).astype(np.float32)
    for ratio, k in ((0.29, 29), (0.0, 0), (0.01, 1), (0.015, 1), (1.0, 100)):
        for base in (Rule("toss"), Rule("sample"), Rule("first-k"), Rule("random")):
            decision, mask = streamed(Rule(base.strategy, ratio), split(scores, [30, 30, 40], [1, 2]))
            assert decision.k == mask.sum() == k
        check_all(scores, [30, 30, 40], [1, 2], ratio)


def test_passes():
    scores = np.random.default_rng(6).standard_normal(500).astype(np.float32)
    shards = split(scores, [100] * 5, [1, 2, 3, 4])
    passes = {rule.kind: decide(rule, 5, Load(shards)).passes for rule in RULES}
    assert passes == {"global": 2, "per-sample": 1, "threshold": 1, "sample": 2, "first-k": 1, "random": 2}
    assert decide(Rule(ratio=0.001), 5, Load(shards)).passes == 1  # k = 0: the counting pass is all


def test_random_keys_do_not_depend_on_the_shard_layout_and_change_with_the_seed():
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 30, 60)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    row_ids = np.arange(1000, 1060)
    _, one = streamed(Rule("random", 0.3, seed=3), split(scores, lengths, [], row_ids))
    _, five = streamed(Rule("random", 0.3, seed=3), split(scores, lengths, [7, 20, 20, 41], row_ids))
    np.testing.assert_array_equal(one, five)
    _, other_seed = streamed(Rule("random", 0.3, seed=4), split(scores, lengths, [7, 20, 20, 41], row_ids))
    assert not np.array_equal(one, other_seed) and other_seed.sum() == one.sum()


def test_tasks_and_decision_pickle():
    sent = []

    def pickling_map(fn, shards):
        blob = pickle.dumps(fn)
        sent.append(len(blob))
        task = pickle.loads(blob)
        return [pickle.loads(pickle.dumps(task(s))) for s in shards]

    rng = np.random.default_rng(8)
    lengths = rng.integers(0, 30, 40)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    shards = split(scores, lengths, [3, 10, 30])
    for rule in RULES:
        decision = decide(rule, len(shards), Load(shards), pickling_map)
        decision = pickle.loads(pickle.dumps(decision))
        assert isinstance(decision, Decision)
        mask = np.concatenate([decision.unsafe(s, data) for s, data in enumerate(shards)])
        np.testing.assert_array_equal(mask, oracle(rule, scores, lengths))
    assert len(sent) == sum(decide(rule, len(shards), Load(shards)).passes for rule in RULES)


def test_rule_rejects_unknown_names_and_bad_ratios():
    for bad in (dict(strategy="nope"), dict(scope="row"), dict(ratio=1.5), dict(ratio=float("nan"))):
        with pytest.raises(ValueError):
            Rule(**bad)
    with pytest.raises(TypeError):
        streaming.score_keys(np.zeros(3))


def test_score_keys_and_mean_keys_preserve_order():
    values = np.array([-INF, -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3.4e38, INF], np.float32)
    keys = streaming.score_keys(values)
    assert np.all(np.diff(keys.astype(np.int64)) >= 0) and keys[4] == keys[5]
    assert np.count_nonzero(np.diff(keys.astype(np.int64))) == len(values) - 2
    means = np.array([NAN, -INF, -1e300, -0.0, 0.0, 5e-324, 1.0, INF])
    mkeys = streaming.mean_keys(means)
    assert mkeys[0] == 0 and np.all(mkeys[1:-1] <= mkeys[2:]) and mkeys[3] == mkeys[4]


def test_summaries_stay_small_on_larger_shards():
    # ~10^5 tokens per shard: the hash digit's histogram goes dense (one byte per bin), a score digit sparse.
    rng = np.random.default_rng(9)
    lengths = rng.integers(100, 300, 1500)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    shards = split(scores, lengths, [500, 1000])
    largest = []

    def measuring_map(fn, ids):
        out = [fn(s) for s in ids]
        largest.append(max(len(pickle.dumps(o)) for o in out))
        return out

    for rule in (Rule("toss", 0.2), Rule("random", 0.2, seed=1), Rule("sample", 0.2)):
        decision, mask = streamed(rule, shards, measuring_map)
        np.testing.assert_array_equal(mask, oracle(rule, scores, lengths))
        assert decision.passes == 2
    assert max(largest) < 70_000, largest
