"""Bootstrap intervals: determinism, nan handling, degenerate and Gaussian-approximation checks."""
import numpy as np
import pytest

from csa.stats import bootstrap_map_ci, paired_bootstrap_gain
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
