"""first_stage: exact cosine ranking vs a float64 brute force, chunked top-k, ties, kinds."""
import numpy as np
import pytest
import torch

from csa.search import first_stage, merge_topk, resort_topk, stable_topk
from csa.validation import CSAInputError


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(q, db):
    s = db.astype(np.float64) @ q.astype(np.float64).T
    return np.stack([sorted(range(len(db)), key=lambda i: (-s[i, j], i)) for j in range(len(q))], axis=1)


def test_full_ranking_matches_brute_force():
    q, db = unit(5, 16, 0), unit(200, 16, 1)
    r = first_stage(q, db)
    assert isinstance(r, np.ndarray) and r.shape == (200, 5) and r.dtype == np.int64
    np.testing.assert_array_equal(r, brute(q, db))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_topk_chunked_equals_full_prefix(chunk):
    q, db = unit(4, 8, 2), unit(150, 8, 3)
    full = first_stage(q, db)
    np.testing.assert_array_equal(first_stage(q, db, topk=20, chunk_size=chunk), full[:20])


def test_ties_broken_by_lower_index():
    db = unit(10, 4, 4)
    db = np.concatenate([db, db[[3, 3, 7]], db])     # duplicates: 3==10==11==16, 7==12==20
    q = np.concatenate([db[3:4], db[7:8]])
    expected = brute(q, db)
    assert list(expected[:4, 0]) == [3, 10, 11, 16] and list(expected[:3, 1]) == [7, 12, 20]
    np.testing.assert_array_equal(first_stage(q, db), expected)
    for chunk in (1, 3, 5):
        np.testing.assert_array_equal(first_stage(q, db, topk=6, chunk_size=chunk), expected[:6])


def test_torch_in_torch_out_and_validation():
    q, db = unit(3, 8, 5), unit(30, 8, 6)
    r = first_stage(torch.from_numpy(q), torch.from_numpy(db), topk=5)
    assert isinstance(r, torch.Tensor) and r.dtype == torch.int64 and r.shape == (5, 3)
    np.testing.assert_array_equal(r.numpy(), brute(q, db)[:5])
    with pytest.raises(CSAInputError, match="topk=31 is larger"):
        first_stage(q, db, topk=31)
    with pytest.raises(CSAInputError, match="dimensions differ"):
        first_stage(q, db[:, :4])
    with pytest.warns(UserWarning, match="not L2-normalized"):
        r2 = first_stage(q * 2, db)
    np.testing.assert_array_equal(r2, brute(q, db))


@pytest.mark.parametrize("dim", [0, 1])
def test_stable_topk_equals_a_stable_sort_under_heavy_ties(dim):
    scores = torch.from_numpy(np.random.default_rng(7).integers(0, 4, size=(60, 45)).astype(np.float32))
    for k in (1, 5, 17):
        vals, idx = stable_topk(scores, k, dim=dim)
        ref = torch.sort(scores, dim=dim, descending=True, stable=True)
        assert torch.equal(idx, ref.indices.narrow(dim, 0, k)) and torch.equal(vals, ref.values.narrow(dim, 0, k))


def test_merge_topk_keeps_lower_indices_first_among_ties():
    vals, idx = torch.tensor([[3.0], [1.0]]), torch.tensor([[0], [1]])
    new_vals, new_idx = torch.tensor([[3.0], [2.0]]), torch.tensor([[5], [6]])
    v, i = merge_topk(vals, idx, new_vals, new_idx, 3)
    assert i[:, 0].tolist() == [0, 5, 6] and v[:, 0].tolist() == [3.0, 3.0, 2.0]


def test_resort_topk_sorts_the_prefix_stably_and_keeps_the_tail():
    ranks = np.array([[4, 2, 7, 1, 0], [3, 1, 0, 2, 9]]).T.astype(np.int32)       # (5, 2)
    scores = np.array([[0.1, 0.9, 0.1], [0.5, 0.5, 0.7]])                        # (Q, K=3)
    out = resort_topk(ranks, scores, 3)
    assert out.dtype == np.int32 and out[:, 0].tolist() == [2, 4, 7, 1, 0]       # tie 4 / 7 keeps 4 first
    assert out[:, 1].tolist() == [0, 3, 1, 2, 9]
    t = resort_topk(torch.from_numpy(ranks), torch.from_numpy(scores), 3)
    assert isinstance(t, torch.Tensor) and t.numpy().tolist() == out.tolist()
