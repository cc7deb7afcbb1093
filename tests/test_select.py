import numpy as np

from toss_filter.select import above_threshold, global_top_k, per_sample_top_k

NAN = np.nan


def test_global_top_k_takes_floor_of_ratio_times_scored_tokens():
    scores = np.array([0.5, 2.0, NAN, -1.0, 3.0, 1.0, 0.0, 2.5], dtype=np.float32)  # 7 scored
    assert global_top_k(scores, 0.2).sum() == 1  # floor(1.4)
    np.testing.assert_array_equal(np.flatnonzero(global_top_k(scores, 0.5)), [1, 4, 7])  # floor(3.5) = 3 highest
    assert not global_top_k(scores, 0.0).any()
    np.testing.assert_array_equal(global_top_k(scores, 1.0), ~np.isnan(scores))


def test_ties_at_the_cutoff_go_to_the_earliest_row_and_position():
    scores = np.array([1.0, 5.0, 1.0, 1.0, 0.0, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(np.flatnonzero(global_top_k(scores, 0.5)), [0, 1, 2])


def test_global_top_k_matches_a_stable_sort_on_random_data_with_many_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(-5, 5, size=10_000).astype(np.float32)
    scores[rng.integers(0, len(scores), 300)] = NAN
    valid = np.flatnonzero(~np.isnan(scores))
    k = int(0.3 * len(valid))
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
    np.testing.assert_array_equal(counts, np.floor(0.25 * lengths))


def test_threshold_is_strict_and_ignores_nan():
    scores = np.array([0.1, 0.2, NAN, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(above_threshold(scores, 0.2), [False, False, False, True])


def test_every_strategy_masks_exactly_the_budget_and_never_an_unscored_token():
    from toss_filter.select import budget, first_k, random_k, sample_level

    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 30, 50)
    scores = rng.standard_normal(lengths.sum()).astype(np.float32)
    scores[np.r_[0, np.cumsum(lengths)[:-1]]] = NAN  # position 0 of each row has no score
    k = budget(scores, 0.2)
    assert k == int(0.2 * (~np.isnan(scores)).sum()) > 0
    for mask in (global_top_k(scores, 0.2), sample_level(scores, lengths, 0.2), first_k(scores, lengths, 0.2),
                 random_k(scores, 0.2, seed=1)):
        assert mask.sum() == k
        assert not mask[np.isnan(scores)].any()


def test_sample_level_masks_whole_rows_by_mean_score_and_first_k_masks_early_positions():
    from toss_filter.select import first_k, sample_level

    scores = np.array([NAN, 9, 9, NAN, 0, 0, 0, NAN, 5, 5], dtype=np.float32)
    lengths = np.array([3, 4, 3])  # scored: 2 + 3 + 2 = 7; ratio 4/7 -> budget 4
    np.testing.assert_array_equal(np.flatnonzero(sample_level(scores, lengths, 4 / 7)), [1, 2, 8, 9])
    # Position 1 of every row first (row order), then position 2 of row 0.
    np.testing.assert_array_equal(np.flatnonzero(first_k(scores, lengths, 4 / 7)), [1, 2, 4, 8])
