"""Tests of csa.training.sampler: neighbour table, training samples, global batch order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from csa.training.sampler import (GlobalBatchSampler, NeighbourTable, TrainingSet, compute_neighbours,
                                  neighbour_cache_path, sample_permutation)
from csa.validation import CSAInputError
from _arrays import brute_force_neighbours, unit_rows


# ---------------------------------------------------------------- layouts
def test_neighbours_match_float64_brute_force_and_are_chunk_invariant():
    x = unit_rows(150, 12, 4)
    want = brute_force_neighbours(x, 20)
    for chunk in (7, 64, 1000):
        got = compute_neighbours(x, 20, chunk_size=chunk, progress=False)
        assert got.dtype == np.int32 and got.shape == (150, 20)
        np.testing.assert_array_equal(got, want)


def test_self_comes_first_with_duplicate_descriptors():
    x = unit_rows(30, 6, 5)
    x[9] = x[5]
    x[17] = x[5]
    got = compute_neighbours(x, 4, chunk_size=8, progress=False)
    assert (got[:, 0] == np.arange(30)).all()
    assert got[5, 1:3].tolist() == [9, 17] and got[9, 1:3].tolist() == [5, 17] and got[17, 1:3].tolist() == [5, 9]
    with pytest.raises(CSAInputError, match="neighbours among 30"):
        compute_neighbours(x, 31, progress=False)


def test_neighbour_table_width_and_augmentation_offsets():
    a, b = unit_rows(25, 8, 6), unit_rows(40, 8, 7)
    table = NeighbourTable([a, b], topk=6, anchor_len=9, chunk_size=10, progress=False)
    assert table.width == 9 and len(table) == 65 and table.computed
    np.testing.assert_array_equal(table.indices[:25], brute_force_neighbours(a, 9))
    np.testing.assert_array_equal(table.indices[25:], brute_force_neighbours(b, 9) + 25)  # within set b, offset
    assert table.tokens(30).tolist() == table.indices[30, :7].tolist()  # self + K
    assert table.anchors(30).tolist() == table.indices[30, :9].tolist()  # L
    assert NeighbourTable([a], topk=8, anchor_len=4, progress=False).width == 9  # max(K + 1, L)


def test_neighbour_cache_reused_and_named_by_settings(tmp_path):
    x = unit_rows(50, 8, 8)
    path = neighbour_cache_path(tmp_path, "toyset", "train", 5, 7, ["net-a"])
    t1 = NeighbourTable([x], 5, 7, cache_path=path, progress=False)
    assert t1.computed and path.is_file()
    mtime = path.stat().st_mtime_ns
    t2 = NeighbourTable([x], 5, 7, cache_path=path, progress=False)
    assert not t2.computed and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(t1.indices, t2.indices)
    names = {neighbour_cache_path(tmp_path, "toyset", "train", 5, 7, ["net-a"]),
             neighbour_cache_path(tmp_path, "toyset", "train", 6, 7, ["net-a"]),
             neighbour_cache_path(tmp_path, "toyset", "train", 5, 8, ["net-a"]),
             neighbour_cache_path(tmp_path, "toyset", "val", 5, 7, ["net-a"]),
             neighbour_cache_path(tmp_path, "other", "train", 5, 7, ["net-a"]),
             neighbour_cache_path(tmp_path, "toyset", "train", 5, 7, ["net-a", "net-b"])}
    assert len(names) == 6
    # other features under the same name: detected, recomputed, rewritten
    y = unit_rows(50, 8, 9)
    with pytest.warns(UserWarning, match="other features"):
        t3 = NeighbourTable([y], 5, 7, cache_path=path, progress=False)
    assert t3.computed
    np.testing.assert_array_equal(t3.indices, brute_force_neighbours(y, 7))  # max(K + 1, L) = 7


# ---------------------------------------------------------------- samples
def _toy_training_set(seed: int = 0, permute: bool = True) -> tuple[TrainingSet, np.ndarray]:
    x = unit_rows(60, 8, 10)
    clusters = np.random.default_rng(11).integers(0, 5, size=60)
    table = NeighbourTable([x], topk=10, anchor_len=6, progress=False)
    return TrainingSet(table, clusters, seed=seed, permute=permute), clusters


def test_targets_match_a_direct_loop():
    ds, clusters = _toy_training_set(permute=False)
    for i in (0, 17, 59):
        item = ds[i]
        tokens = item["tokens"].numpy()
        assert tokens.tolist() == ds.table.indices[i, :11].tolist()
        want = [1.0 if clusters[t] == clusters[i] else 0.0 for t in tokens]
        assert item["targets"].tolist() == want and item["targets"][0] == 1.0
        assert item["anchors"].tolist() == ds.table.indices[i, :6].tolist()
        assert int(item["index"]) == i


def test_row_permutation_keeps_row_zero_and_is_deterministic():
    ds, clusters = _toy_training_set(seed=3)
    plain = ds.table.indices[:, :11]
    ds.set_epoch(0)
    items = [ds[i] for i in range(60)]
    for i, item in enumerate(items):
        tokens = item["tokens"].numpy()
        assert tokens[0] == i
        assert sorted(tokens[1:].tolist()) == sorted(plain[i, 1:].tolist())  # a permutation of rows 1..K
        assert item["targets"].tolist() == [float(clusters[t] == clusters[i]) for t in tokens]
        assert item["anchors"].tolist() == ds.table.indices[i, :6].tolist()  # anchors keep their order
    assert any(not np.array_equal(it["tokens"].numpy(), plain[i]) for i, it in enumerate(items))
    # same (seed, epoch, index) -> same rows, whatever the access order or dataset instance
    ds2, _ = _toy_training_set(seed=3)
    ds2.set_epoch(0)
    for i in (59, 0, 31):
        assert torch.equal(ds2[i]["tokens"], items[i]["tokens"])
    ds.set_epoch(1)
    assert sum(not torch.equal(ds[i]["tokens"], items[i]["tokens"]) for i in range(60)) >= 55
    p = sample_permutation(3, 0, 7, 10)
    assert p[0] == 0 and sorted(p.tolist()) == list(range(11))
    assert np.array_equal(p, sample_permutation(3, 0, 7, 10))
    assert not np.array_equal(p, sample_permutation(4, 0, 7, 10))


def test_training_set_rejects_wrong_cluster_count():
    x = unit_rows(20, 4, 12)
    table = NeighbourTable([x, x], topk=3, anchor_len=3, progress=False)
    with pytest.raises(CSAInputError, match="repeated once per set"):
        TrainingSet(table, np.zeros(20))


# ---------------------------------------------------------------- batch order
def test_global_batch_sampler_union_over_ranks_equals_single_process():
    single = GlobalBatchSampler(103, 12, seed=5)
    single.set_epoch(2)
    batches = list(single)
    assert len(batches) == 8 and all(len(b) == 12 for b in batches)  # last partial batch dropped
    assert len(set(sum(batches, []))) == 96
    for world in (2, 3, 4):
        ranks = [GlobalBatchSampler(103, 12, rank=r, world_size=world, seed=5) for r in range(world)]
        for s in ranks:
            s.set_epoch(2)
        per_rank = [list(s) for s in ranks]
        for b in range(8):
            assert sum((per_rank[r][b] for r in range(world)), []) == batches[b]
    single.set_epoch(3)
    assert list(single) != batches
    with pytest.raises(CSAInputError, match="multiple of the number of processes"):
        GlobalBatchSampler(103, 12, rank=0, world_size=5)


def test_stacked_sets_keep_lone_images_out_of_with_positives_queries():
    """Three stacked feature sets of 5 images (clusters 0,0,1,2,2: image 2 is alone): 4 queries per set, not 5."""
    from csa.training.sampler import NeighbourTable, TrainingSet, stacked_clusters

    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
    clusters = np.array([0, 0, 1, 2, 2])
    stacked = stacked_clusters(clusters, 3)
    assert stacked.tolist() == [0, 0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8]
    table = NeighbourTable(feats, topk=2, anchor_len=2, progress=False)
    ds = TrainingSet(table, stacked, samples="with-positives")
    assert ds.queries.tolist() == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14]
    # a token's target is 1 exactly for the query's landmark-mates within its own set
    item = ds[0]
    assert item["tokens"][0] == 0
    assert all(bool(t) == (int(k) in (0, 1)) for k, t in zip(item["tokens"], item["targets"]))
