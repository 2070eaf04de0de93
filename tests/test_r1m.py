"""csa.data.r1m: simulated distractors, atomic .npy storage, appended (stacked) databases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from csa.data.r1m import StackedDescriptors, append_distractors, load_distractors, save_distractors, simulate_distractors
from csa.validation import CSAInputError


def test_simulate_is_unit_norm_deterministic_and_chunk_independent(tmp_path):
    a = simulate_distractors(9000, 16, seed=3, chunk=4096, progress=False)
    b = simulate_distractors(9000, 16, seed=3, chunk=100_000, progress=False)
    c = simulate_distractors(9000, 16, seed=4, progress=False)
    assert a.shape == (9000, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a.astype(np.float64), axis=1), 1.0, atol=1e-6)
    # directions are spread on the sphere: the mean row is close to the origin
    assert np.linalg.norm(a.mean(0)) < 0.05
    mm = simulate_distractors(9000, 16, seed=3, dtype="float16", path=tmp_path / "d.npy", chunk=4096,
                              progress=False)
    assert isinstance(mm, np.memmap) and mm.dtype == np.float16 and not mm.flags.writeable
    np.testing.assert_array_equal(mm, a.astype(np.float16))
    assert [p.name for p in tmp_path.iterdir()] == ["d.npy"]


def test_save_load_roundtrip_fp16_and_atomicity(tmp_path):
    x = simulate_distractors(1000, 8, seed=0, progress=False)
    path = save_distractors(torch.from_numpy(x), tmp_path / "r1m" / "feat.npy", dtype="float16", chunk=300)
    y = load_distractors(path)
    assert isinstance(y, np.memmap) and y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), x, atol=1e-3, rtol=0)
    assert isinstance(load_distractors(path, mmap=False), np.ndarray)
    with pytest.raises(CSAInputError, match="float16"):
        save_distractors(x, tmp_path / "bad.npy", dtype="int8")
    with pytest.raises(CSAInputError, match=".npy"):
        save_distractors(x, tmp_path / "bad.bin")
    # a failure while writing leaves neither the file nor a temporary
    class Exploding:
        shape = (1000, 8)

        def __getitem__(self, item):
            if item.start >= 300:
                raise RuntimeError("disk full")
            return x[item]
    with pytest.raises(RuntimeError):
        save_distractors(Exploding(), tmp_path / "boom.npy", chunk=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1m"]
    (tmp_path / "trunc.npy").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CSAInputError, match="truncated"):
        load_distractors(tmp_path / "trunc.npy")
    with pytest.raises(CSAInputError, match="does not exist"):
        load_distractors(tmp_path / "nope.npy")


def test_append_view_and_written_concatenation(tmp_path):
    db = np.arange(30, dtype=np.float32).reshape(10, 3)
    dis = -np.arange(21, dtype=np.float32).reshape(7, 3)
    np.save(tmp_path / "dis.npy", dis)
    view = append_distractors(db, tmp_path / "dis.npy")
    assert isinstance(view, StackedDescriptors) and view.shape == (17, 3) and len(view) == 17
    full = np.concatenate([db, dis])
    for a, b in [(0, 17), (0, 10), (8, 12), (10, 17), (3, 4), (16, 30), (5, 5)]:
        np.testing.assert_array_equal(view[a:b], full[a:b])
    assert view[2:4].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(view), full)  # materializes (what the CLI does)
    half = append_distractors(torch.from_numpy(db), dis, dtype="float16")
    assert half[0:17].dtype == np.float16
    out = append_distractors(db, dis, out=tmp_path / "all.npy")
    np.testing.assert_array_equal(out, full)
    with pytest.raises(CSAInputError, match="dimensions"):
        append_distractors(db, np.zeros((2, 4), np.float32))
    with pytest.raises(CSAInputError, match="slices"):
        view[3]
