"""Post-hoc whitening (csa.descriptors.whiten) against float64 re-derivations of what it must satisfy."""
import numpy as np
import pytest

from csa.descriptors.whiten import (LearnedWhitening, learn_lw, learn_pcaw, learn_whitening, matching_pairs,
                                    whitened_name)
from csa.validation import CSAInputError


def _landmark_data(seed=0, n_landmarks=12, per=8, dim=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_landmarks, dim)) * 3
    spread = rng.normal(size=(dim, dim)) * 0.5
    x = np.repeat(centres, per, axis=0) + rng.normal(size=(n_landmarks * per, dim)) @ spread
    return x, np.repeat(np.arange(n_landmarks), per)


def test_matching_pairs_lists_every_same_cluster_pair_once():
    pairs = matching_pairs([5, 1, 5, 2, 5, 1])
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (0, 4), (1, 5), (2, 4)]
    with pytest.raises(CSAInputError, match="matching pairs"):
        matching_pairs([0, 1, 2])


def test_lw_whitens_pair_differences_and_diagonalises_the_data():
    x, clusters = _landmark_data()
    pairs = matching_pairs(clusters)
    w = learn_lw(x, pairs)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    S = diff.T @ diff / len(diff)
    # pair differences mapped by P have identity covariance; P^T P is the inverse of S
    np.testing.assert_allclose(w.P @ S @ w.P.T, np.eye(x.shape[1]), atol=1e-9)
    np.testing.assert_allclose(w.P.T @ w.P, np.linalg.inv(S), rtol=1e-8, atol=1e-10)
    # the data, centred on the pair images' mean, is decorrelated with decreasing variance
    m = x[pairs.ravel()].mean(axis=0)
    np.testing.assert_allclose(w.m, m)
    y = (x - m) @ w.P.T
    cov = y.T @ y / len(y)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-8)
    assert np.all(np.diff(np.diag(cov)) <= 1e-9)


def test_pcaw_gives_identity_covariance_and_keeps_leading_dimensions():
    x, _ = _landmark_data(seed=1)
    w = learn_pcaw(x)
    xc = x - x.mean(axis=0)
    C = xc.T @ xc / len(x)
    np.testing.assert_allclose(w.P @ C @ w.P.T, np.eye(x.shape[1]), atol=1e-9)
    top = learn_pcaw(x, dimensions=2)
    values, vectors = np.linalg.eigh(C)
    for k in range(2):   # rows are the two largest principal axes divided by their standard deviation
        ref = vectors[:, -1 - k] / np.sqrt(values[-1 - k])
        np.testing.assert_allclose(np.abs(top.P[k] @ ref) / (ref @ ref), 1, rtol=1e-8)


def test_shrinkage_blends_towards_scaled_identity():
    x, _ = _landmark_data(seed=2)
    s = 0.3
    w = learn_pcaw(x, shrinkage=s)
    xc = x - x.mean(axis=0)
    C = xc.T @ xc / len(x)
    target = (1 - s) * C + s * np.trace(C) / C.shape[0] * np.eye(C.shape[0])
    np.testing.assert_allclose(w.P @ target @ w.P.T, np.eye(C.shape[0]), atol=1e-9)


def test_apply_is_l2_normalized_projection_in_float32():
    x, clusters = _landmark_data(seed=3)
    w = learn_whitening("lw", x, clusters, dimensions=4)
    out = w.apply(x.astype(np.float32))
    ref = (x - w.m) @ w.P.T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6
    assert out.dtype == np.float32 and out.shape == (len(x), 4)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_lw_on_rank_deficient_pairs_adds_the_smallest_ridge():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 10))        # 3 pairs cannot span 10 dimensions
    w = learn_lw(x, matching_pairs([0, 0, 1, 1, 2, 2]))
    assert np.isfinite(w.P).all() and w.P.shape == (10, 10)


def test_bad_settings_and_names():
    x, clusters = _landmark_data()
    with pytest.raises(CSAInputError, match="shrinkage"):
        learn_pcaw(x, shrinkage=1.5)
    with pytest.raises(CSAInputError, match="dimensions"):
        learn_pcaw(x, dimensions=99)
    with pytest.raises(CSAInputError, match="fewer than"):
        learn_pcaw(x[:3])
    with pytest.raises(CSAInputError, match="clusters"):
        learn_whitening("lw", x)
    with pytest.raises(CSAInputError, match="unknown whitening"):
        learn_whitening("zca", x)
    with pytest.raises(CSAInputError, match="cannot map"):
        LearnedWhitening("pcaw", np.zeros(3), np.eye(3)).apply(x)
    assert whitened_name("lite0-gem", "lw") == "lite0-gem-w"
    assert whitened_name("lite1-gem", "pcaw") == "lite1-gem-pcaw"
    assert whitened_name("lite2-gem", None) == "lite2-gem"
