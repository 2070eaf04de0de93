"""Input checks: each bad input raises CSAInputError naming the problem."""
import warnings

import numpy as np
import pytest
import torch

from csa.arrays import as_cpu_tensor, as_numpy
from csa.validation import CSAInputError, check_descriptors, check_gnd, check_ranks, check_topk


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_error_is_value_error():
    assert issubclass(CSAInputError, ValueError)


def test_good_descriptors_pass_through_unchanged():
    q, db = unit(3, 8), unit(10, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q2, db2 = check_descriptors(q, db)
    assert q2 is q and db2 is db
    tq, tdb = check_descriptors(torch.from_numpy(q), torch.from_numpy(db))
    assert isinstance(tq, torch.Tensor) and isinstance(tdb, torch.Tensor)


@pytest.mark.parametrize("q, db, match", [
    (unit(3, 8), unit(10, 7), "dimensions differ"),
    (unit(3, 8)[0], unit(10, 8), "2-D"),
    (unit(3, 8).astype(np.int64), unit(10, 8), "floating-point"),
    ([[1.0]], unit(10, 8), "numpy array or a torch tensor"),
    (np.zeros((0, 8), np.float32), unit(10, 8), "empty"),
])
def test_bad_descriptors(q, db, match):
    with pytest.raises(CSAInputError, match=match):
        check_descriptors(q, db)


def test_nan_and_zero_rows():
    db = unit(10, 8)
    db[4, 2] = np.nan
    with pytest.raises(CSAInputError, match="1 row.*NaN"):
        check_descriptors(unit(2, 8), db)
    db = unit(10, 8)
    db[3] = 0
    with pytest.raises(CSAInputError, match="all-zero"):
        check_descriptors(unit(2, 8), db, normalize="silent")


def test_unnormalized_warn_error_silent():
    q = unit(3, 8) * 3
    db = unit(10, 8)
    with pytest.warns(UserWarning, match="qvecs: 3 of 3 rows are not L2-normalized"):
        q2, db2 = check_descriptors(q, db)
    np.testing.assert_allclose(np.linalg.norm(q2, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(q2, q / 3, atol=1e-6)
    assert db2 is db
    with pytest.raises(CSAInputError, match="not L2-normalized"):
        check_descriptors(q, db, normalize="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tq, _ = check_descriptors(torch.from_numpy(q), torch.from_numpy(db), normalize="silent")
    assert isinstance(tq, torch.Tensor)
    torch.testing.assert_close(tq.norm(dim=1), torch.ones(3))
    with pytest.raises(CSAInputError, match="normalize must be"):
        check_descriptors(q, db, normalize="yes")


def test_ranks_checks():
    r = np.argsort(-np.random.default_rng(0).random((10, 3)), axis=0)
    assert check_ranks(r, 10, 3) is r
    check_ranks(torch.from_numpy(r[:4]), 10, 3)
    with pytest.raises(CSAInputError, match="integer"):
        check_ranks(r.astype(float), 10, 3)
    with pytest.raises(CSAInputError, match="use ranks.T"):
        check_ranks(r.T.copy(), 10, 3)
    with pytest.raises(CSAInputError, match="2-D"):
        check_ranks(r[:, 0], 10, 3)
    with pytest.raises(CSAInputError, match="outside the database range"):
        check_ranks(r + 1, 10, 3)
    with pytest.raises(CSAInputError, match="5 are needed"):
        check_ranks(r[:4], 10, 3, min_rows=5)
    with pytest.raises(CSAInputError, match="only 8 images"):
        check_ranks(r, 8, 3)


def test_topk_checks():
    check_topk(10, 11, 10)
    with pytest.raises(CSAInputError, match="topk=11 is larger"):
        check_topk(11, 4, 10)
    with pytest.raises(CSAInputError, match="anchor_len=12"):
        check_topk(4, 12, 10)
    with pytest.raises(CSAInputError, match="positive integer"):
        check_topk(0, 4, 10)
    with pytest.raises(CSAInputError, match="positive integer"):
        check_topk(4, 2.5, 10)


def test_gnd_checks():
    raw = [{"easy": [1], "hard": [2], "junk": []}]
    assert check_gnd(raw, n_db=5) is raw
    check_gnd([{"ok": np.array([1, 2])}])
    with pytest.raises(CSAInputError, match=r"missing key\(s\) \['hard', 'junk'\]"):
        check_gnd([{"easy": [1]}])
    assert check_gnd({"gnd": raw, "imlist": []}) is raw          # the whole revisitop dict is accepted
    with pytest.raises(CSAInputError, match="'gnd' list"):
        check_gnd({"imlist": [], "qimlist": []})
    with pytest.raises(CSAInputError, match="outside"):
        check_gnd(raw, n_db=2)


def test_as_numpy_and_as_cpu_tensor_convert_without_copying_what_they_can_share(tmp_path):
    x = unit(4, 3)
    assert as_numpy(x) is x
    assert np.array_equal(as_numpy([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    t = torch.from_numpy(x).requires_grad_(True)
    assert isinstance(as_numpy(t), np.ndarray) and np.array_equal(as_numpy(t), x)
    shared = as_cpu_tensor(x)
    assert shared.dtype == torch.float32 and shared.data_ptr() == x.ctypes.data          # no copy
    half = as_cpu_tensor(x.astype(np.float16))
    assert half.dtype == torch.float16                                                   # dtype kept
    assert torch.equal(as_cpu_tensor(x[::-1]), torch.from_numpy(x[::-1].copy()))        # reversed: copied
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(as_cpu_tensor(mm), torch.from_numpy(x))                       # read-only: no warning
    assert not as_cpu_tensor(t).requires_grad


def test_gnd_query_count_is_checked():
    gnd = [{"ok": [0]}, {"ok": [1]}]
    assert check_gnd(gnd, n_q=2) is gnd
    with pytest.raises(CSAInputError, match="gnd has 2 queries but there are 3 queries"):
        check_gnd(gnd, n_q=3)
