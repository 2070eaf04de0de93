"""Bootstrap intervals: determinism, nan handling, degenerate and Gaussian-approximation checks."""
import numpy as np
import pytest

from csa.stats import bootstrap_map_ci, count_groups, paired_bootstrap_gain
from csa.validation import CSAInputError


def test_deterministic_and_nan_excluded():
    aps = np.array([10.0, 50.0, np.nan, 30.0, 80.0, 20.0])
    a = bootstrap_map_ci(aps, n_boot=2000, seed=3)
    assert a == bootstrap_map_ci(aps, n_boot=2000, seed=3)
    assert a != bootstrap_map_ci(aps, n_boot=2000, seed=4)
    assert a[0] == pytest.approx(38.0)                 # nanmean over the 5 finite queries
    assert 10 <= a[1] < a[0] < a[2] <= 80


def test_constant_aps_give_zero_width():
    assert bootstrap_map_ci([42.0] * 7, n_boot=500) == (42.0, 42.0, 42.0)
    base = np.linspace(0, 90, 12)
    gain = paired_bootstrap_gain(base + 3.0, base, n_boot=500)
    assert gain == pytest.approx((3.0, 3.0, 3.0))


def test_interval_matches_normal_approximation():
    rng = np.random.default_rng(0)
    aps = rng.normal(50, 10, size=400)
    mean, lo, hi = bootstrap_map_ci(aps, n_boot=4000, seed=1)
    half = 1.96 * aps.std() / np.sqrt(aps.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.2 * half)
    m90 = bootstrap_map_ci(aps, n_boot=4000, seed=1, level=0.90)
    assert m90[2] - m90[1] < hi - lo


def test_paired_is_tighter_than_unpaired_and_drops_nan_pairs():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 100, 30)
    new = base + rng.normal(2, 1, 30)
    base[4] = np.nan
    g, lo, hi = paired_bootstrap_gain(new, base, n_boot=3000)
    keep = ~np.isnan(base)
    assert g == pytest.approx(np.mean(new[keep] - base[keep]))
    assert 0 < lo < g < hi
    _, blo, bhi = bootstrap_map_ci(base, n_boot=3000)
    assert hi - lo < (bhi - blo) / 5                   # per-query pairing removes the query difficulty


def test_errors():
    with pytest.raises(CSAInputError, match="same queries"):
        paired_bootstrap_gain([1, 2], [1, 2, 3])
    with pytest.raises(CSAInputError, match="all nan"):
        bootstrap_map_ci([np.nan, np.nan])
    with pytest.raises(CSAInputError, match="level"):
        bootstrap_map_ci([1, 2], level=95)


def _loop_cluster_bootstrap(values, groups, n_boot, seed, level):
    """Independent re-derivation: draw landmarks one resample at a time, pool their queries' values."""
    rng = np.random.default_rng(seed)
    labels = sorted(set(groups.tolist()))
    members = {lab: values[groups == lab] for lab in labels}
    means = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(labels), size=len(labels))
        pooled = np.concatenate([members[labels[i]] for i in drawn])
        means.append(pooled.mean())
    a = (1 - level) / 2
    lo, hi = np.quantile(np.array(means), [a, 1 - a])
    return values.mean(), lo, hi


def test_landmark_bootstrap_matches_a_loop_over_landmarks():
    rng = np.random.default_rng(3)
    groups = np.repeat([4, 1, 7, 2, 9], [6, 2, 9, 1, 4])      # unsorted, uneven landmark sizes
    gain = rng.normal(2.0, 3.0, groups.size) + np.repeat(rng.normal(0, 4, 5), [6, 2, 9, 1, 4])
    got = paired_bootstrap_gain(gain + 10, np.full(groups.size, 10.0), n_boot=500, seed=11, groups=groups)
    want = _loop_cluster_bootstrap(gain, groups, 500, 11, 0.95)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert count_groups(groups) == 5


def test_landmark_interval_is_wider_when_queries_of_a_landmark_move_together():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 30)
    aps = 50 + np.repeat(rng.normal(0, 10, 10), 30) + rng.normal(0, 1, groups.size)
    _, lo_q, hi_q = bootstrap_map_ci(aps, n_boot=2000)
    _, lo_l, hi_l = bootstrap_map_ci(aps, n_boot=2000, groups=groups)
    assert hi_l - lo_l > 3 * (hi_q - lo_q)


def test_landmark_bootstrap_drops_nan_queries_with_their_labels_and_checks_length():
    aps = np.array([10.0, np.nan, 30.0, 50.0])
    groups = np.array([0, 0, 1, 1])
    mean, lo, hi = bootstrap_map_ci(aps, n_boot=200, groups=groups)
    assert mean == 30.0 and 10.0 <= lo <= hi <= 40.0
    with pytest.raises(CSAInputError, match="one landmark id per query"):
        bootstrap_map_ci(aps, groups=[0, 1])
