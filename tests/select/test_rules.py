import numpy as np

from toss_filter.select.rules import (above_threshold, budget, budget_of, budgets_of, choose_unsafe, first_k,
                                      global_top_k, per_sample_top_k, random_k, random_keys, sample_level)

NAN = np.nan


def test_global_top_k_takes_floor_of_ratio_times_scored_tokens():
    scores = np.array([0.5, 2.0, NAN, -1.0, 3.0, 1.0, 0.0, 2.5], dtype=np.float32)  # 7 scored
    assert global_top_k(scores, 0.2).sum() == 1  # floor(1.4)
    np.testing.assert_array_equal(np.flatnonzero(global_top_k(scores, 0.5)), [1, 4, 7])  # floor(3.5) = 3 highest
    assert not global_top_k(scores, 0.0).any()
    np.testing.assert_array_equal(global_top_k(scores, 1.0), ~np.isnan(scores))


def test_the_budget_is_exact_on_the_decimal_the_user_wrote():
    assert 0.29 * 100 < 29  # float arithmetic would lose a token
    assert budget_of(0.29, 100) == 29
    assert budget_of(0.2, 10**8) == 2 * 10**7 and budget_of(1.0, 7) == 7 and budget_of(0.0, 7) == 0
    assert budget_of(0.1234567890123456, 10**6) == 123456
    scores = np.arange(100, dtype=np.float32)
    assert budget(scores, 0.29) == 29 and global_top_k(scores, 0.29).sum() == 29
    assert per_sample_top_k(scores, np.array([100]), 0.29).sum() == 29
    for mask in (sample_level(scores, np.array([100]), 0.29), first_k(scores, np.array([100]), 0.29),
                 random_k(scores, np.array([100]), 0.29)):
        assert mask.sum() == 29
    counts = np.array([0, 1, 7, 100, 12345])
    for ratio in (0.29, 0.1234567890123456, 0.7, 1.0):  # the int64 route and the Python-int route
        np.testing.assert_array_equal(budgets_of(ratio, counts), [budget_of(ratio, int(n)) for n in counts])


def test_ties_at_the_cutoff_go_to_the_earliest_row_and_position():
    scores = np.array([1.0, 5.0, 1.0, 1.0, 0.0, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(np.flatnonzero(global_top_k(scores, 0.5)), [0, 1, 2])


def test_global_top_k_matches_a_stable_sort_on_random_data_with_many_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(-5, 5, size=10_000).astype(np.float32)
    scores[rng.integers(0, len(scores), 300)] = NAN
    valid = np.flatnonzero(~np.isnan(scores))
    k = budget_of(0.3, len(valid))
    expected = valid[np.argsort(-scores[valid], kind="stable")[:k]]
    np.testing.assert_array_equal(np.flatnonzero(global_top_k(scores, 0.3)), np.sort(expected))


def test_per_sample_top_k_masks_floor_of_ratio_in_each_row():
    scores = np.array([3, 1, 2, 9, 9, NAN, 0, 1, 1, 1], dtype=np.float32)
    lengths = np.array([3, 4, 3])  # row 1 has 3 scored tokens, row 2 three tied ones
    mask = per_sample_top_k(scores, lengths, 0.5)
    np.testing.assert_array_equal(np.flatnonzero(mask), [0, 3, 7])
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 40, 200)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    mask = per_sample_top_k(scores, lengths, 0.25)
    counts = np.add.reduceat(mask, np.r_[0, np.cumsum(lengths)[:-1]]) * (lengths > 0)
    np.testing.assert_array_equal(counts, [budget_of(0.25, int(n)) for n in lengths])


def test_threshold_is_strict_and_ignores_nan():
    scores = np.array([0.1, 0.2, NAN, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(above_threshold(scores, 0.2), [False, False, False, True])


def test_every_strategy_masks_exactly_the_budget_and_never_an_unscored_token():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 30, 50)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    scores[np.r_[0, np.cumsum(lengths)[:-1]]] = NAN  # position 0 of each row has no score
    k = budget(scores, 0.2)
    assert k == budget_of(0.2, int((~np.isnan(scores)).sum())) > 0
    for mask in (global_top_k(scores, 0.2), sample_level(scores, lengths, 0.2), first_k(scores, lengths, 0.2),
                 random_k(scores, lengths, 0.2, seed=1)):
        assert mask.sum() == k
        assert not mask[np.isnan(scores)].any()


def test_sample_level_masks_whole_rows_by_mean_score_and_first_k_masks_early_positions():
    scores = np.array([NAN, 9, 9, NAN, 0, 0, 0, NAN, 5, 5], dtype=np.float32)
    lengths = np.array([3, 4, 3])  # scored: 2 + 3 + 2 = 7; ratio 0.6 -> budget floor(4.2) = 4
    np.testing.assert_array_equal(np.flatnonzero(sample_level(scores, lengths, 0.6)), [1, 2, 8, 9])
    # Position 1 of every row first (row order), then position 2 of row 0.
    np.testing.assert_array_equal(np.flatnonzero(first_k(scores, lengths, 0.6)), [1, 2, 4, 8])


MASK = 2**64 - 1


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_random_keys_are_the_documented_splitmix64_hash_of_seed_row_id_and_position():
    gamma = 0x9E3779B97F4A7C15
    lengths, row_ids = np.array([3, 0, 2]), np.array([10, 11, 2**40])
    for seed in (0, 7, -1):
        expected = [_mix(_mix(_mix((seed + gamma) & MASK) ^ ((row + gamma) & MASK)) ^ (pos + gamma))
                    for row, n in zip(row_ids.tolist(), lengths.tolist()) for pos in range(n)]
        np.testing.assert_array_equal(random_keys(lengths, seed, row_ids), np.array(expected, dtype=np.uint64))
    np.testing.assert_array_equal(random_keys(lengths), random_keys(lengths, 0, np.arange(3)))


def test_random_k_takes_the_largest_keys_and_depends_on_seed_and_row_ids_only():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 20, 300)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    scores[rng.random(len(scores)) < 0.1] = NAN
    mask = random_k(scores, lengths, 0.3, seed=5)
    keys, valid = random_keys(lengths, 5), ~np.isnan(scores)
    assert mask.sum() == budget(scores, 0.3)
    assert keys[mask].min() > keys[valid & ~mask].max()
    assert not np.array_equal(mask, random_k(scores, lengths, 0.3, seed=6))
    # A token's fate depends on its own (row id, position), not on which other rows are present.
    tail = slice(int(lengths[:100].sum()), None)
    np.testing.assert_array_equal(random_keys(lengths[100:], 5, np.arange(100, 300)), keys[tail])
    np.testing.assert_array_equal(choose_unsafe(scores, lengths, 0.3, "random", seed=5, row_ids=np.arange(300)),
                                  mask)
    # Roughly uniform: every position band of the rows gets about its share.
    positions = np.arange(len(scores)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    early = valid & (positions < 5)
    assert abs(mask[early].mean() - 0.3) < 0.05 and abs(mask[valid & ~early].mean() - 0.3) < 0.05
