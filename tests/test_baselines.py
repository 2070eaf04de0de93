"""Tests for the baselines of csa.compare: hand-built cases with known answers and naive float64 references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from csa.compare.affinity_baseline import affinity_cosine
from csa.compare.chain import compose
from csa.compare.diffusion import _conjugate_gradient, diffusion
from csa.compare.expansion import AugmentDatabase, alpha_dba, alpha_qe, aqe, augment_database, dba
from csa.compare.k_reciprocal import _k_reciprocal_distance, k_reciprocal
from csa.validation import CSAInputError


# ---------------------------------------------------------------------------------------------
# fixtures / naive references
# ---------------------------------------------------------------------------------------------
def unit(angles_deg) -> np.ndarray:
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def naive_ranks(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Float64 cosine ranking, ties by index, (N, Q)."""
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    return np.stack([np.argsort(-s, kind="stable") for s in sims], axis=1)


def random_unit(rng, n, d) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def angular_order(direction_deg: float, angles_deg) -> np.ndarray:
    """Order of 2-D unit vectors by angular distance to a direction (geometry, no dot products)."""
    diff = np.abs((np.asarray(angles_deg, dtype=np.float64) - direction_deg + 180.0) % 360.0 - 180.0)
    return np.argsort(diff, kind="stable")


def naive_augment(db: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Loop over database images: itself + its n nearest others weighted by sim^alpha, float64."""
    x = db.astype(np.float64)
    out = np.empty_like(x)
    for j in range(len(x)):
        sims = x @ x[j]
        others = [i for i in np.argsort(-sims, kind="stable") if i != j][:n]
        v = x[j].copy()
        for i in others:
            v += max(sims[i], 0.0) ** alpha * x[i]
        out[j] = v / np.linalg.norm(v)
    return out


def naive_k_reciprocal(x: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Set-based transcription of Zhong et al. (CVPR 2017), item 0 = the query; float64 loops."""
    x = x.astype(np.float64)
    m = len(x)
    d = np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0)
    d = d / d.max(axis=1, keepdims=True)
    rank = np.argsort(d, axis=1, kind="stable")

    def r_set(i, k):
        fwd = rank[i, :k + 1]
        return {int(j) for j in fwd if i in rank[j, :k + 1]}

    half = int(round(k1 / 2))
    v = np.zeros((m, m))
    for i in range(m):
        ri = r_set(i, k1)
        expanded = set(ri)
        for j in ri:
            rj = r_set(j, half)
            if len(rj & ri) > 2.0 / 3.0 * len(rj):
                expanded |= rj
        idx = sorted(expanded)
        w = np.exp(-d[i, idx])
        v[i, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(m)])
    out = np.empty(m - 1)
    for t in range(1, m):
        inter = np.minimum(v[0], v[t]).sum()
        union = np.maximum(v[0], v[t]).sum()
        out[t - 1] = (1 - lam) * (1 - inter / union) + lam * d[0, t]
    return out


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    db = random_unit(rng, 40, 8)
    q = random_unit(rng, 3, 8)
    return q, db, naive_ranks(q, db)


# ---------------------------------------------------------------------------------------------
# query expansion
# ---------------------------------------------------------------------------------------------
DB_ANGLES = [10, -40, 45, -50, 120, 180]


def test_first_stage_of_hand_example_is_angular_order():
    ranks = naive_ranks(unit([0]), unit(DB_ANGLES))
    assert ranks[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_aqe_hand_computed_2d():
    q, db = unit([0]), unit(DB_ANGLES)
    ranks = naive_ranks(q, db)
    # new query = q + d0 + d1 -> direction atan2(sin10 - sin40, 1 + cos10 + cos40) = -9.7 degrees
    direction = math.degrees(math.atan2(math.sin(math.radians(10)) - math.sin(math.radians(40)),
                                        1 + math.cos(math.radians(10)) + math.cos(math.radians(40))))
    assert direction == pytest.approx(-9.68, abs=0.01)
    out = aqe(q, db, ranks, n=2)
    assert out[:, 0].tolist() == angular_order(direction, DB_ANGLES).tolist() == [0, 1, 3, 2, 4, 5]


def test_alpha_qe_hand_computed_weights_2d():
    q, db = unit([0]), unit(DB_ANGLES)
    ranks = naive_ranks(q, db)
    c10, c40 = math.cos(math.radians(10)), math.cos(math.radians(40))
    x = 1 + c10 ** 3 * c10 + c40 ** 3 * c40
    y = c10 ** 3 * math.sin(math.radians(10)) - c40 ** 3 * math.sin(math.radians(40))
    direction = math.degrees(math.atan2(y, x))
    out = alpha_qe(q, db, ranks, n=2, alpha=3)
    assert out[:, 0].tolist() == angular_order(direction, DB_ANGLES).tolist()


def test_alpha_qe_n0_is_unchanged_and_kind_preserved(toy):
    q, db, ranks = toy
    scrambled = np.stack([np.random.default_rng(1).permutation(40) for _ in range(3)], axis=1).astype(np.int32)
    out = alpha_qe(q, db, scrambled, n=0)
    assert isinstance(out, np.ndarray) and out.dtype == np.int32 and np.array_equal(out, scrambled)
    out_t = aqe(torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ranks), n=3)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int64 and out_t.shape == (40, 3)


def test_alpha_qe_matches_float64_reference_and_keeps_depth(toy):
    q, db, ranks = toy
    n, alpha = 4, 2.5
    x = db.astype(np.float64)
    expected = []
    for qi in range(3):
        nb = ranks[:n, qi]
        w = np.maximum(x[nb] @ q[qi], 0) ** alpha
        new = q[qi] + (w[:, None] * x[nb]).sum(0)
        expected.append(np.argsort(-(x @ (new / np.linalg.norm(new))), kind="stable"))
    expected = np.stack(expected, axis=1)
    assert np.array_equal(alpha_qe(q, db, ranks, n=n, alpha=alpha), expected)
    top = alpha_qe(q, db, ranks[:10], n=n, alpha=alpha)              # re-queries the whole database
    assert top.shape == (10, 3) and np.array_equal(top, expected[:10])


# ---------------------------------------------------------------------------------------------
# database-side augmentation
# ---------------------------------------------------------------------------------------------
def test_dba_duplicates_get_identical_vectors_and_adjacent_ranks(toy):
    q, db, _ = toy
    db = np.concatenate([db, db[7:8]])                                 # image 40 duplicates image 7
    aug = augment_database(db, n=3, alpha=0, chunk_size=5)
    np.testing.assert_allclose(aug[7], aug[40], atol=1e-6)
    out = dba(q, db, naive_ranks(q, db), n=3)
    for qi in range(3):
        pos = {int(v): i for i, v in enumerate(out[:, qi])}
        assert abs(pos[7] - pos[40]) == 1


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_augment_database_matches_naive_loop(toy, alpha):
    _, db, _ = toy
    got = augment_database(db, n=2, alpha=alpha, chunk_size=7)        # chunk does not divide N
    np.testing.assert_allclose(got, naive_augment(db, 2, alpha), atol=1e-5)


def test_alpha_dba_alpha0_is_equal_weight_sum_of_self_and_neighbours():
    db = unit([0, 20, 30, 100])
    aug = augment_database(db, n=1, alpha=0)
    # nearest other of 0 deg is 20 deg, of 20 is 30, of 30 is 20, of 100 is 30: equal weights -> bisectors
    np.testing.assert_allclose(aug, unit([10, 25, 25, 65]), atol=1e-6)


def test_alpha_dba_ranks_augmented_database(toy):
    q, db, ranks = toy
    aug = naive_augment(db, 3, 3.0)
    expected = naive_ranks(q, aug)
    assert np.array_equal(alpha_dba(q, db, ranks, n=3, alpha=3.0), expected)
    assert np.array_equal(augment_database(db, n=0), db)


# ---------------------------------------------------------------------------------------------
# diffusion
# ---------------------------------------------------------------------------------------------
def test_conjugate_gradient_solves_spd_system():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((12, 12))
    a = a @ a.T + 12 * np.eye(12)
    b = rng.standard_normal(12)
    np.testing.assert_allclose(_conjugate_gradient(lambda v: a @ v, b, 50, tol=1e-12), np.linalg.solve(a, b),
                               atol=1e-8)
    # the default tolerance is relative to ||b||, as the authors' pcg(tol=1e-6)
    x = _conjugate_gradient(lambda v: a @ v, b, 50)
    assert np.linalg.norm(a @ x - b) <= 1e-6 * np.linalg.norm(b)


def two_component_scene():
    """A chain of 13 points on an arc (0..120 deg in the xy-plane) and a tight cluster of 5 points near
    -60 deg lifted out of the plane; the query sits at -5 deg next to the chain's start."""
    chain = np.array([[math.cos(math.radians(a)), math.sin(math.radians(a)), 0.0] for a in range(0, 121, 10)])
    rng = np.random.default_rng(0)
    centre = np.array([math.cos(math.radians(-60)), math.sin(math.radians(-60)), 0.5])
    cluster = centre + 0.02 * rng.standard_normal((5, 3))
    db = np.concatenate([chain, cluster])
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = np.array([[math.cos(math.radians(-5)), math.sin(math.radians(-5)), 0.0]], dtype=np.float32)
    return q, db


def test_diffusion_ranks_the_query_component_first():
    q, db = two_component_scene()
    ranks = naive_ranks(q, db)
    first = ranks[:13, 0].tolist()
    assert not set(first) <= set(range(13)), "the scene must interleave the two components in the first stage"
    out = diffusion(q, db, ranks, k=3, truncation=18, query_k=1, iterations=20)   # k=3: self + 2 others
    assert sorted(out[:13, 0].tolist()) == list(range(13))
    # the unreached cluster keeps its first-stage order after the chain
    assert out[13:, 0].tolist() == [i for i in ranks[:, 0].tolist() if i >= 13]


def naive_diffusion_scores(q, db, k, alpha, gamma, query_k, sub=None):
    """Dense float64 reference of the authors' conventions, by loops: the database's mutual kNN graph (k
    counts the node itself), optionally restricted to ``sub`` and re-normalized, exact solve."""
    x = db.astype(np.float64)
    n = len(x)
    sims = x @ x.T
    knn = []
    for i in range(n):
        others = [j for j in np.lexsort((np.arange(n), -sims[i])) if j != i]
        knn.append({i, *others[:k - 1]})
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j and j in knn[i] and i in knn[j]:
                a[i, j] = max(sims[i, j], 0.0) ** gamma
    nodes = np.arange(n) if sub is None else np.asarray(sub)
    a = a[np.ix_(nodes, nodes)]
    deg = a.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0)
    s = inv[:, None] * a * inv[None, :]
    qs = x[nodes] @ q.astype(np.float64)
    y = np.zeros(len(nodes))
    top = np.lexsort((np.arange(len(nodes)), -qs))[:query_k]
    y[top] = np.maximum(qs[top], 0) ** gamma
    return np.linalg.solve(np.eye(len(nodes)) - alpha * s, y)


def test_diffusion_truncated_subgraph_matches_exact_solve(toy):
    q, db, ranks = toy
    out = diffusion(q, db, ranks, k=5, truncation=25, alpha=0.9, gamma=3, iterations=200, tol=0, query_k=3)
    for qi in range(3):
        f = naive_diffusion_scores(q[qi], db, 5, 0.9, 3, 3, sub=ranks[:25, qi])
        assert np.array_equal(out[:25, qi], ranks[:25, qi][np.argsort(-f, kind="stable")])
    assert np.array_equal(out[25:], ranks[25:])


def test_diffusion_without_truncation_ranks_the_whole_database(toy):
    q, db, ranks = toy
    out = diffusion(q, db, ranks[:10], k=5, alpha=0.9, iterations=200, tol=0, query_k=3)
    assert out.shape == (10, 3)
    for qi in range(3):
        f = naive_diffusion_scores(q[qi], db, 5, 0.9, 3, 3)
        assert np.array_equal(out[:, qi], np.lexsort((np.arange(len(f)), -f))[:10])


def test_diffusion_k_counts_the_node_itself(toy):
    """k = 1 keeps only the node itself: no edge at all, so f = y and only the query's top images move."""
    q, db, ranks = toy
    from csa.compare.diffusion import mutual_knn_graph

    assert mutual_knn_graph(torch.from_numpy(db), 1, 3.0).nnz == 0
    graph = mutual_knn_graph(torch.from_numpy(db), 2, 3.0)
    assert (graph.getnnz(axis=1) <= 1).all() and graph.nnz > 0   # k = 2: at most one other neighbour each


def test_diffusion_keeps_rows_past_truncation(toy):
    q, db, ranks = toy
    out = diffusion(q, db, ranks, k=3, truncation=20, query_k=2)
    assert np.array_equal(out[20:], ranks[20:])
    for qi in range(3):
        assert sorted(out[:20, qi]) == sorted(ranks[:20, qi])


# ---------------------------------------------------------------------------------------------
# k-reciprocal
# ---------------------------------------------------------------------------------------------
def test_k_reciprocal_distance_matches_set_based_reference():
    rng = np.random.default_rng(5)
    centres = random_unit(rng, 4, 6)
    x = centres[rng.integers(0, 4, 30)] + 0.3 * rng.standard_normal((30, 6))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for k1, k2, lam in [(6, 3, 0.3), (4, 1, 0.0), (7, 2, 1.0)]:
        got = _k_reciprocal_distance(torch.from_numpy(x), k1, k2, lam)
        np.testing.assert_allclose(got, naive_k_reciprocal(x, k1, k2, lam), atol=1e-6)


def test_k_reciprocal_two_clusters_within_cluster_first():
    rng = np.random.default_rng(2)
    a = np.eye(16)[0] + 0.05 * rng.standard_normal((10, 16))
    b = np.eye(16)[1] + 0.05 * rng.standard_normal((10, 16))
    db = np.concatenate([a, b])
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = np.eye(16, dtype=np.float32)[:1] + 0.0
    scrambled = rng.permutation(20)[:, None]                           # a ranking that ignores the clusters
    out = k_reciprocal(q, db, scrambled, k1=5, k2=2, lambda_value=0.3, topk=20)
    assert set(out[:10, 0].tolist()) == set(range(10))
    # only the top-K is re-ranked
    out = k_reciprocal(q, db, scrambled, k1=3, k2=2, topk=12)
    assert np.array_equal(out[12:], scrambled[12:]) and set(out[:12, 0]) == set(scrambled[:12, 0])


# ---------------------------------------------------------------------------------------------
# untrained affinity baseline
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("centred", [False, True])
def test_affinity_cosine_matches_naive_loop(toy, centred):
    q, db, ranks = toy
    K, L = 12, 6
    x = db.astype(np.float64)
    expected = ranks.copy()
    for qi in range(3):
        tokens = np.concatenate([q[qi:qi + 1].astype(np.float64), x[ranks[:K, qi]]])
        anchors = np.concatenate([q[qi:qi + 1].astype(np.float64), x[ranks[:L - 1, qi]]])
        aff = tokens @ anchors.T
        if centred:
            aff = aff - aff.mean(axis=1, keepdims=True)
        scores = [aff[0] @ aff[i] / (np.linalg.norm(aff[0]) * np.linalg.norm(aff[i])) for i in range(1, K + 1)]
        expected[:K, qi] = ranks[:K, qi][np.argsort(-np.array(scores), kind="stable")]
    got = affinity_cosine(q, db, ranks, topk=K, anchor_len=L, centred=centred, query_batch=2)
    assert np.array_equal(got, expected)
    old_keyword = affinity_cosine(q, db, ranks, topk=K, anchor_len=L, centred=centred, chunk_size=2)
    assert np.array_equal(old_keyword, expected)
    with pytest.raises(CSAInputError, match="pass only query_batch"):
        affinity_cosine(q, db, ranks, topk=K, anchor_len=L, query_batch=3, chunk_size=2)
    got_t = affinity_cosine(torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ranks), topk=K,
                            anchor_len=L, centred=centred)
    assert isinstance(got_t, torch.Tensor) and np.array_equal(got_t.numpy(), expected)


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------
def test_compose_dba_then_qe_uses_augmented_database(toy):
    q, db, ranks = toy
    chained = compose(AugmentDatabase(n=2, alpha=0.0), lambda qq, dd, rr: aqe(qq, dd, rr, n=2))
    aug = augment_database(db, n=2, alpha=0.0)
    expected = aqe(q, aug, naive_ranks(q, aug), n=2)
    assert np.array_equal(chained(q, db, ranks), expected)
    assert np.array_equal(compose(AugmentDatabase(n=2, alpha=0.0))(q, db, ranks), dba(q, db, ranks, n=2))


def test_compose_applies_steps_in_order(toy):
    q, db, ranks = toy
    calls = []

    def step(name):
        def f(qq, dd, rr):
            calls.append(name)
            return rr[::-1].copy()
        return f

    out = compose(step("a"), step("b"), step("c"))(q, db, ranks)
    assert calls == ["a", "b", "c"] and np.array_equal(out, ranks[::-1])
    with pytest.raises(CSAInputError):
        compose()


# ---------------------------------------------------------------------------------------------
# parameter validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda q, d, r: alpha_qe(q, d, r, n=-1), "n must be >= 0"),
    (lambda q, d, r: alpha_qe(q, d, r[:5], n=6), "n=6 is too large"),
    (lambda q, d, r: alpha_qe(q, d, r, n=2.5), "n must be an integer"),
    (lambda q, d, r: alpha_qe(q, d, r, n=2, alpha=-1), "alpha must be >= 0"),
    (lambda q, d, r: alpha_qe(q, d, r, n=2, alpha=float("nan")), "alpha must be finite"),
    (lambda q, d, r: dba(q, d, r, n=40), "n=40 is too large"),
    (lambda q, d, r: alpha_dba(q, d, r, n=2, alpha=-0.5), "alpha must be >= 0"),
    (lambda q, d, r: diffusion(q, d, r, k=41), "k=41 is too large"),
    (lambda q, d, r: diffusion(q, d, r, k=5, truncation=41), "truncation=41 is too large"),
    (lambda q, d, r: diffusion(q, d, r, k=3, truncation=10, alpha=1.0), "alpha must be < 1.0"),
    (lambda q, d, r: diffusion(q, d, r, k=3, truncation=10, iterations=0), "iterations must be >= 1"),
    (lambda q, d, r: k_reciprocal(q, d, r, topk=10, k1=11), "k1=11 is too large"),
    (lambda q, d, r: k_reciprocal(q, d, r, topk=10, k1=5, lambda_value=1.5), "lambda_value must be <= 1.0"),
    (lambda q, d, r: k_reciprocal(q, d, r, topk=50), "topk=50 is too large"),
    (lambda q, d, r: affinity_cosine(q, d, r, topk=10, anchor_len=5, centred="yes"), "centred"),
    (lambda q, d, r: affinity_cosine(q, d, r, topk=0, anchor_len=5), "topk must be >= 1"),
    (lambda q, d, r: alpha_qe(q, d, r.T.copy()), "transposed"),
    (lambda q, d, r: alpha_qe(q, d[:, :4].copy(), r), "dimensions differ"),
])
def test_parameter_validation(toy, call, match):
    q, db, ranks = toy
    with pytest.raises(CSAInputError, match=match):
        call(q, db, ranks)


# ---------------------------------------------------------------------------------------------
# properties shared by all methods
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_qe_with_one_neighbour_keeps_the_top1(toy, alpha):
    """With n=1 the new query is q + w d1 (w >= 0): (q + w d1)·d1 = s1 + w >= q·dj + w d1·dj for every j,
    so the first result cannot change."""
    q, db, ranks = toy
    out = alpha_qe(q, db, ranks, n=1, alpha=alpha)
    assert np.array_equal(out[0], ranks[0])


ALL_METHODS = {
    "aqe": lambda q, d, r: aqe(q, d, r, n=3),
    "alpha_qe": lambda q, d, r: alpha_qe(q, d, r, n=3),
    "dba": lambda q, d, r: dba(q, d, r, n=2),
    "alpha_dba": lambda q, d, r: alpha_dba(q, d, r, n=3),
    "diffusion": lambda q, d, r: diffusion(q, d, r, k=4, truncation=30, query_k=3),
    "k_reciprocal": lambda q, d, r: k_reciprocal(q, d, r, k1=5, k2=3, topk=30),
    "affinity_cosine": lambda q, d, r: affinity_cosine(q, d, r, topk=30, anchor_len=8),
}


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_every_method_returns_a_permutation_of_the_same_kind(toy, name, kind):
    q, db, ranks = toy
    ranks = ranks.astype(np.int32)
    if kind == "torch":
        q, db, ranks = torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ranks)
    before = ranks.clone() if kind == "torch" else ranks.copy()
    out = ALL_METHODS[name](q, db, ranks)
    assert type(out) is type(ranks) and out.dtype == ranks.dtype and tuple(out.shape) == (40, 3)
    out_np = out.numpy() if kind == "torch" else out
    assert all(sorted(out_np[:, i].tolist()) == list(range(40)) for i in range(3))
    assert (before == ranks).all()                                      # the input is not modified


def test_alpha_qe_gives_negative_similarities_zero_weight():
    """q=0 deg, database at 100, -105, 180 deg: the only neighbour (100 deg) has cosine -0.17.
    Clipped, its weight is 0 and nothing moves; an unclipped weight -0.17 would push the query to
    -9.4 deg and put -105 deg first."""
    q, db = unit([0]), unit([100, -105, 180])
    ranks = naive_ranks(q, db)
    assert ranks[:, 0].tolist() == [0, 1, 2]
    assert alpha_qe(q, db, ranks, n=1, alpha=1.0)[:, 0].tolist() == [0, 1, 2]
    # AQE (alpha = 0) weighs every neighbour 1 whatever its sign: q + d(100) points to 50 deg (the bisector)
    assert aqe(q, db, ranks, n=1)[:, 0].tolist() == angular_order(50.0, [100, -105, 180]).tolist() == [0, 2, 1]
