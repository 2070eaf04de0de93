"""Tests of csa.data.layout: ground truth, descriptor and trainset files, cirtorch orientation."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from csa.data.layout import (load_clusters, load_gnd, load_test_features, load_train_features, save_clusters,
                             save_gnd, save_test_features, save_train_features)
from csa.validation import CSAInputError
from _arrays import unit_rows


# ---------------------------------------------------------------- layouts
def test_gnd_round_trip_and_missing_file(tmp_path):
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": [0, 0, 1, 1]}]}
    path = save_gnd(tmp_path, "toy5k", gnd)
    assert path == tmp_path / "annotations" / "toy5k" / "gnd_toy5k.pkl"
    assert load_gnd(tmp_path, "toy5k") == gnd
    with pytest.raises(CSAInputError, match=r"gnd_other\.pkl.*csa demo build"):
        load_gnd(tmp_path, "other")
    (tmp_path / "annotations" / "bad").mkdir()
    with open(tmp_path / "annotations" / "bad" / "gnd_bad.pkl", "wb") as f:
        pickle.dump({"imlist": []}, f)
    with pytest.raises(CSAInputError, match="qimlist"):
        load_gnd(tmp_path, "bad")


def test_test_features_round_trip_and_cirtorch_transpose(tmp_path):
    db, q = unit_rows(40, 8, 0), unit_rows(5, 8, 1)
    path = save_test_features(tmp_path, "toy5k", "net", query=q, db=db)
    assert path == tmp_path / "test" / "toy5k" / "net.pkl"
    got = load_test_features(tmp_path, "toy5k", "net")
    np.testing.assert_array_equal(got.db, db)
    np.testing.assert_array_equal(got.query, q)
    qq, dd = got  # unpacks as (query, db)
    assert qq.shape == (5, 8) and dd.shape == (40, 8) and dd.dtype == np.float32
    # cirtorch layout: D x N columns (written by hand, float64) -> transposed on load
    with open(path, "wb") as f:
        pickle.dump({"db": db.T.astype(np.float64), "query": q.T.astype(np.float64)}, f)
    got = load_test_features(tmp_path, "toy5k", "net")
    np.testing.assert_allclose(got.db, db)
    np.testing.assert_allclose(got.query, q)
    # square, not normalized either way and equal shapes: refused
    with open(path, "wb") as f:
        pickle.dump({"db": np.ones((6, 6)), "query": np.ones((6, 6))}, f)
    with pytest.raises(CSAInputError, match="orientation"):
        load_test_features(tmp_path, "toy5k", "net")
    with pytest.raises(CSAInputError, match=r"test[/\\]toy5k[/\\]missing\.pkl"):
        load_test_features(tmp_path, "toy5k", "missing")


def test_test_features_row_counts_come_from_a_given_ground_truth(tmp_path):
    db, q = unit_rows(40, 8, 0), unit_rows(5, 8, 1)
    save_test_features(tmp_path, "toy5k", "net", query=q, db=db)
    gnd = {"imlist": [f"d{i}" for i in range(40)], "qimlist": [f"q{i}" for i in range(5)],
           "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}] * 5}
    got = load_test_features(tmp_path, "toy5k", "net", gnd=gnd)   # no gnd file needed
    np.testing.assert_array_equal(got.db, db)
    np.testing.assert_array_equal(got.query, q)
    with pytest.raises(CSAInputError, match=r"net\.pkl.*40 rows but 39"):
        load_test_features(tmp_path, "toy5k", "net", gnd={**gnd, "imlist": gnd["imlist"][:39]})
    with pytest.raises(CSAInputError, match=r"net\.pkl.*5 rows but 6"):
        load_test_features(tmp_path, "toy5k", "net", gnd={**gnd, "qimlist": gnd["qimlist"] + ["q5"]})
    # the given ground truth is used, not the file's
    save_gnd(tmp_path, "toy5k", {**gnd, "imlist": gnd["imlist"][:39]})
    assert load_test_features(tmp_path, "toy5k", "net", gnd=gnd).db.shape == (40, 8)
    with pytest.raises(CSAInputError, match="40 rows but 39"):
        load_test_features(tmp_path, "toy5k", "net")


def test_train_features_round_trip_flat_reference_layout_and_transpose(tmp_path):
    tr, va = unit_rows(30, 8, 2), unit_rows(7, 8, 3)
    path = save_train_features(tmp_path, "toyset", "net", train=tr, val=va)
    assert path == tmp_path / "train" / "toyset" / "net.pkl"
    np.testing.assert_array_equal(load_train_features(tmp_path, "toyset", "net", "train"), tr)
    np.testing.assert_array_equal(load_train_features(tmp_path, "toyset", "net", "val"), va)
    with pytest.raises(CSAInputError, match="no split 'test'"):
        load_train_features(tmp_path, "toyset", "net", "test")
    # the official flat layout train/<name>.pkl, D x N, for retrieval-SfM-120k
    flat = tmp_path / "train" / "gl18-net.pkl"
    with open(flat, "wb") as f:
        pickle.dump({"train": tr.T, "val": va.T}, f)
    np.testing.assert_array_equal(load_train_features(tmp_path, "retrieval-SfM-120k", "gl18-net", "train", n_rows=30), tr)
    with pytest.raises(CSAInputError, match="40 were expected"):
        load_train_features(tmp_path, "retrieval-SfM-120k", "gl18-net", "train", n_rows=40)
    with pytest.raises(CSAInputError, match=r"toyset[/\\]gl18-net\.pkl"):  # flat layout only for the reference trainset
        load_train_features(tmp_path, "toyset", "gl18-net")


def test_clusters_round_trip(tmp_path):
    save_clusters(tmp_path, "toyset", {"train": {"cluster": [3, 3, 1, 0]}, "val": {"cluster": [2]}})
    got = load_clusters(tmp_path, "toyset", "train")
    assert got.dtype == np.int64 and got.tolist() == [3, 3, 1, 0]
    assert load_clusters(tmp_path, "toyset", "val").tolist() == [2]
    with pytest.raises(CSAInputError, match="'cluster'"):
        load_clusters(tmp_path, "toyset", "test")
    with pytest.raises(CSAInputError, match=r"annotations[/\\]nothere\.pkl"):
        load_clusters(tmp_path, "nothere")


# ---------------------------------------------------------------- neighbours
