"""Affinity features vs a naive per-query loop; chunking does not change results."""
import numpy as np
import pytest
import torch

from csa.affinity import build_affinity, iter_affinity
from csa.search import first_stage
from csa.validation import CSAInputError


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def naive(q, db, ranks, K, L):
    out = np.zeros((len(q), K + 1, L))
    for j in range(len(q)):
        tokens = [q[j]] + [db[ranks[i, j]] for i in range(K)]
        anchors = [q[j]] + [db[ranks[i, j]] for i in range(L - 1)]
        for a, t in enumerate(tokens):
            for b, c in enumerate(anchors):
                out[j, a, b] = float(np.dot(t.astype(np.float64), c.astype(np.float64)))
    return out


@pytest.mark.parametrize("K, L", [(12, 5), (4, 9), (8, 9)])
def test_matches_naive_loop(K, L):
    q, db = unit(5, 6, 0), unit(40, 6, 1)
    ranks = first_stage(q, db)
    got = build_affinity(q, db, ranks, K, L)
    assert got.shape == (5, K + 1, L) and got.dtype == np.float32
    np.testing.assert_allclose(got, naive(q, db, ranks, K, L), atol=1e-6)
    assert np.allclose(got[:, 0, 0], 1, atol=1e-6)  # query with itself


def test_chunking_and_kinds():
    q, db = unit(7, 6, 2), unit(30, 6, 3)
    ranks = np.random.default_rng(0).permuted(np.tile(np.arange(30)[:, None], (1, 7)), axis=0)
    whole = build_affinity(q, db, ranks[:10], 9, 8, batch_size=100)
    parts = list(iter_affinity(q, db, ranks, 9, 8, batch_size=3))
    assert [p[0] for p in parts] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole)
    t = build_affinity(torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ranks), 9, 8, batch_size=2)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), whole)


def test_bad_inputs():
    q, db = unit(3, 6, 4), unit(20, 6, 5)
    ranks = first_stage(q, db)
    with pytest.raises(CSAInputError, match="12 are needed"):
        build_affinity(q, db, ranks[:5], 12, 4)
    with pytest.raises(CSAInputError, match="anchor_len=30"):
        build_affinity(q, db, ranks, 5, 30)
    with pytest.raises(CSAInputError, match="columns"):
        build_affinity(q[:2], db, ranks, 5, 4)
