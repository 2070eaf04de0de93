"""csa.largescale: exact positions and Revisited mAPs without the full argsort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _arrays import unit_quarter_rows
from csa.largescale import evaluate_large, iter_chunk_scores, rank_positions, topk_and_positions
from csa.data.r1m import StackedDescriptors
from csa.validation import CSAInputError


def _quantized(rng, n, d):
    """Entries in {-2..2}/4: every inner product is exact in float32, so any summation order agrees
    and equal scores (many here) are truly tied."""
    return (rng.integers(-2, 3, (n, d)) / 4).astype(np.float32)


def _reference_ranks(q, db):
    """Full ranking by float64 scores, ties by lower index (np.lexsort: last key is primary)."""
    s = db.astype(np.float64) @ q.astype(np.float64).T
    return np.stack([np.lexsort((np.arange(len(db)), -s[:, i])) for i in range(len(q))], axis=1)


def _reference_revisited(ranks, gnd, kappas):
    """Revisited protocol written out from its definition, one query and one rank at a time."""
    groups = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
              "hard": (["hard"], ["junk", "easy"])}
    out = {}
    for proto, (okk, junkk) in groups.items():
        aps, prs = [], []
        for i, g in enumerate(gnd):
            ok = set(int(x) for k in okk for x in g[k])
            junk = set(int(x) for k in junkk for x in g[k])
            nres = sum(len(g[k]) for k in okk)
            if nres == 0:
                aps.append(np.nan)
                prs.append([np.nan] * len(kappas))
                continue
            pos, seen_junk = [], 0
            for r, idx in enumerate(ranks[:, i]):
                if idx in ok:
                    pos.append(r - seen_junk)
                if idx in junk:
                    seen_junk += 1
            ap = 0.0
            for j, r in enumerate(pos):
                p0 = 1.0 if r == 0 else j / r
                ap += (p0 + (j + 1) / (r + 1)) / 2.0 / nres
            aps.append(ap)
            pos1 = np.array(pos) + 1
            prs.append([np.sum(pos1 <= min(pos1.max(), k)) / min(pos1.max(), k) for k in kappas])
        aps, prs = np.array(aps), np.array(prs)
        keep = ~np.isnan(aps)
        out[proto] = {"map": 100 * aps[keep].mean(), "mp@k": dict(zip(kappas, 100 * prs[keep].mean(0))),
                      "aps": 100 * aps}
    return out


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    n, d, nq = 600, 6, 7
    db, q = _quantized(rng, n, d), _quantized(rng, nq, d)
    q[0] = 0.25  # some rows give exactly equal scores
    gnd = []
    for i in range(nq):
        idx = rng.permutation(n)
        ne, nh, nj = [(5, 8, 6), (0, 4, 3), (6, 0, 9), (3, 3, 0), (12, 20, 15), (1, 1, 1), (4, 2, 2)][i]
        gnd.append({"easy": idx[:ne].tolist(), "hard": idx[ne:ne + nh].tolist(),
                    "junk": idx[ne + nh:ne + nh + nj].tolist(), "bbx": [0, 0, 1, 1]})
    return q, db, gnd


def test_positions_and_topk_equal_full_argsort_with_ties(problem):
    q, db, gnd = problem
    ref = _reference_ranks(q, db)
    ties = sum(len(np.unique(db @ q[i])) < len(db) for i in range(len(q)))
    assert ties == len(q)  # the fixture does exercise tie-breaking
    rng = np.random.default_rng(1)
    targets = [rng.choice(len(db), 50, replace=True) for _ in range(len(q))]
    for chunk in (3, 7, 64, 600, 5000):
        top, pos = topk_and_positions(q, db, targets, topk=40, chunk_size=chunk, progress=False)
        np.testing.assert_array_equal(top, ref[:40])
        for i in range(len(q)):
            inverse = np.argsort(ref[:, i])
            np.testing.assert_array_equal(pos[i], inverse[targets[i]])


def test_evaluate_large_equals_definition_and_evaluate_revisited(problem):
    q, db, gnd = problem
    ref = _reference_ranks(q, db)
    kappas = (1, 5, 10)
    res, top = evaluate_large(q, db, gnd, kappas=kappas, topk=25, chunk_size=97, progress=False)
    np.testing.assert_array_equal(top, ref[:25])
    expected = _reference_revisited(ref, gnd, kappas)
    from csa.evaluate import evaluate_revisited
    full = evaluate_revisited(ref, gnd, kappas=kappas)
    for proto in ("easy", "medium", "hard"):
        np.testing.assert_allclose(res[proto]["aps"], expected[proto]["aps"], rtol=0, atol=1e-9)
        assert res[proto]["map"] == pytest.approx(expected[proto]["map"], abs=1e-9)
        for k in kappas:
            assert res[proto]["mp@k"][k] == pytest.approx(expected[proto]["mp@k"][k], abs=1e-9)
        # bit-identical to the argsort path of the package
        np.testing.assert_array_equal(res[proto]["aps"], full[proto]["aps"])
        assert res[proto]["map"] == full[proto]["map"]
        assert res[proto]["mp@k"] == full[proto]["mp@k"]
    assert np.isnan(res["easy"]["aps"][1]) and np.isnan(res["hard"]["aps"][2])


def test_float16_memmap_and_stacked_database(problem, tmp_path):
    q, db, gnd = problem
    ref_res, ref_top = evaluate_large(q, db, gnd, topk=30, chunk_size=128, progress=False)
    path = tmp_path / "db16.npy"
    np.save(path, db.astype(np.float16))  # multiples of 1/4 are exact in float16
    mm = np.load(path, mmap_mode="r")
    res16, top16 = evaluate_large(torch.from_numpy(q), mm, gnd, topk=30, chunk_size=128, progress=False)
    stacked = StackedDescriptors([db[:250], mm[250:]], dtype="float16")
    res_st, top_st = evaluate_large(q, stacked, gnd, topk=30, chunk_size=100, progress=False)
    for res, top in ((res16, top16), (res_st, top_st)):
        np.testing.assert_array_equal(top, ref_top)
        for proto in ref_res:
            np.testing.assert_array_equal(res[proto]["aps"], ref_res[proto]["aps"])


def test_iter_chunk_scores_float16_reused_buffer_and_out(problem):
    q, db, _ = problem
    expected = db.astype(np.float64) @ q.astype(np.float64).T  # exact: entries are quarter integers
    db16 = torch.from_numpy(db.astype(np.float16))
    out = torch.full((len(db), len(q)), np.nan)
    spans = []
    for start, stop, s in iter_chunk_scores(q, db16, chunk_size=128, out=out):
        assert s.data_ptr() == out[start:stop].data_ptr()  # written in place
        spans.append((start, stop))
    assert spans == [(a, min(a + 128, len(db))) for a in range(0, len(db), 128)]
    np.testing.assert_array_equal(out.numpy(), expected)
    # Without out every yielded chunk is its own tensor: the reused float16 -> float32 input buffer
    # must not leak into the results (collected without copying).
    chunks = [s for _, _, s in iter_chunk_scores(q, db16, chunk_size=128)]
    np.testing.assert_array_equal(torch.cat(chunks).numpy(), expected)
    with pytest.raises(CSAInputError, match="out must be"):
        next(iter_chunk_scores(q, db16, chunk_size=128, out=torch.empty(len(db), len(q) + 1)))
    with pytest.raises(CSAInputError, match="chunk_size"):
        next(iter_chunk_scores(q, db16, chunk_size=0))


def test_topk_matches_first_stage():
    from csa.search import first_stage
    # unit rows (first_stage checks normalization) with many exactly tied scores
    dbn = np.zeros((64, 4), np.float32)
    rng = np.random.default_rng(3)
    dbn[np.arange(64), rng.integers(0, 4, 64)] = rng.choice([-1.0, 1.0], 64)  # many exact ties
    qs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    top, _ = topk_and_positions(qs, dbn, [[]] * 5, topk=20, chunk_size=9, progress=False)
    np.testing.assert_array_equal(top, first_stage(qs, dbn, topk=20))


def test_rank_positions_is_exact_on_a_hand_case():
    db = np.array([[1.0, 0], [0, 1], [1, 0], [0.5, 0.5], [-1, 0]], np.float32)
    q = np.array([[1.0, 0]], np.float32)
    # scores 1, 0, 1, .5, -1 -> order 0, 2, 3, 1, 4
    assert rank_positions(q, db, [[4, 2, 0, 1, 3]], chunk_size=2, progress=False)[0].tolist() == [4, 1, 0, 3, 2]


def test_bad_inputs_raise_clear_errors(problem):
    q, db, gnd = problem
    with pytest.raises(CSAInputError, match="outside"):
        evaluate_large(q, db[:100], gnd, progress=False)
    with pytest.raises(CSAInputError, match="dimensions differ"):
        evaluate_large(q[:, :4], db, gnd, progress=False)
    with pytest.raises(CSAInputError, match="raw revisitop"):
        evaluate_large(q, db, [{"ok": [1], "junk": []}] * len(q), progress=False)
    with pytest.raises(CSAInputError, match="queries"):
        evaluate_large(q[:3], db, gnd, progress=False)
    for kappas in ([0, 5], [1.5], [True]):   # checked before the search, as evaluate_revisited checks them
        with pytest.raises(CSAInputError, match="kappas"):
            evaluate_large(q, "not a database", gnd, kappas=kappas, progress=False)
    bad = db.copy()
    bad[5, 0] = np.nan
    with pytest.raises(CSAInputError, match="non-finite"):
        evaluate_large(q, bad, gnd, progress=False)


# --------------------------------------------------------------------------------------------
# +R1M re-ranking from the short lists: equal to the in-memory path, reads bounded
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r1m_problem(tmp_path_factory):
    """A 300-row test database, 3,000 float16 memory-mapped distractors, 6 queries, a small random CSA model."""
    from csa.data.r1m import append_distractors, save_distractors
    from csa.model import RerankTransformer

    rng = np.random.default_rng(5)
    db, dis = unit_quarter_rows(rng, 300), unit_quarter_rows(rng, 3000)
    q = db[rng.choice(300, 6, replace=False)].copy()
    for row in q:  # close to a database row, not equal: two of its entries flip sign (still exact, unit)
        row[rng.choice(np.flatnonzero(row), 2, replace=False)] *= -1
    gnd = []
    for i in range(6):
        idx = rng.permutation(300)
        ne, nh, nj = [(4, 6, 3), (8, 0, 2), (0, 5, 5), (3, 3, 0), (10, 10, 10), (2, 1, 1)][i]
        gnd.append({"easy": idx[:ne].tolist(), "hard": idx[ne:ne + nh].tolist(), "junk": idx[ne + nh:ne + nh + nj].tolist()})
    path = save_distractors(dis, tmp_path_factory.mktemp("r1m") / "dis.npy", dtype="float16")
    torch.manual_seed(0)
    model = RerankTransformer(anchor_len=16, embed_dim=32, depth=2, num_heads=4).eval()
    return q, db, dis, append_distractors(db, path), gnd, model


def _assert_same_results(a, b):
    for proto in ("easy", "medium", "hard"):
        np.testing.assert_array_equal(a[proto]["aps"], b[proto]["aps"])
        assert a[proto]["map"] == b[proto]["map"] and a[proto]["mp@k"] == b[proto]["mp@k"]


def test_rerank_from_memory_mapped_short_lists_equals_the_in_memory_path(r1m_problem):
    from functools import partial

    from csa.evaluate import evaluate_revisited
    from csa.largescale import first_stage_large, rerank_large
    from csa.rerank import rerank
    from csa.search import first_stage

    q, db, dis, view, gnd, model = r1m_problem
    K, L, B = 40, 16, 4
    full = np.concatenate([db, dis])                          # the in-memory path: everything as float32
    ranks = first_stage(q, full)
    reranked_full = rerank(model, q, full, ranks, topk=K, anchor_len=L, batch_size=B, progress=False)
    assert not np.array_equal(reranked_full[:K], ranks[:K])  # the model does re-order

    shortlist = first_stage_large(q, view, gnd, depth=K, chunk_size=500, progress=False)
    np.testing.assert_array_equal(shortlist.ranks, ranks[:K])
    assert any((p >= K).any() for p in shortlist.positions)  # positives below the short list count too
    _assert_same_results(shortlist.evaluate(), evaluate_revisited(ranks, gnd))

    run = partial(rerank, model, topk=K, anchor_len=L, batch_size=B, progress=False)
    reranked = rerank_large(run, q, view, shortlist.ranks, batch_size=B, progress=False)
    np.testing.assert_array_equal(reranked, reranked_full[:K])
    result = shortlist.evaluate(reranked)
    _assert_same_results(result, evaluate_revisited(reranked_full, gnd))
    expected = _reference_revisited(reranked_full, gnd, (1, 5, 10))   # the protocol written out
    for proto in expected:
        np.testing.assert_allclose(result[proto]["aps"], expected[proto]["aps"], rtol=0, atol=1e-9)


class _RecordedRows:
    """A database that records how many rows every read asks for (slices and integer indices)."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.shape, self.reads = rows, rows.shape, []

    def __getitem__(self, item):
        out = self.rows[item]
        self.reads.append(len(out))
        return out


def test_large_path_reads_one_chunk_or_one_block_of_short_lists_at_a_time(r1m_problem):
    from csa.largescale import first_stage_large, rerank_large

    q, db, dis, _, gnd, _ = r1m_problem
    recorded = _RecordedRows(np.concatenate([db, dis]).astype(np.float16))
    shortlist = first_stage_large(q, recorded, gnd, depth=30, chunk_size=256, progress=False)
    assert max(recorded.reads) == 256 and sum(recorded.reads) < 2 * len(recorded.rows)
    recorded.reads.clear()
    seen = []
    out = rerank_large(lambda qq, rows, r: (seen.append(rows.shape), r[::-1])[1], q, recorded, shortlist.ranks,
                       batch_size=4, progress=False)
    assert recorded.reads == [shape[0] for shape in seen] and len(seen) == 2  # blocks of 4 + 2 queries
    assert all(n <= 4 * 30 and d == 32 for n, d in seen)
    np.testing.assert_array_equal(out, shortlist.ranks[::-1])
    for bad, fact in ((0, "batch_size must be >= 1"), (True, "batch_size must be an integer"), (2.0, "integer")):
        with pytest.raises(CSAInputError, match=fact):
            rerank_large(lambda qq, rows, r: r, q, recorded, shortlist.ranks, batch_size=bad, progress=False)


def test_short_list_evaluation_refuses_rankings_that_bring_in_other_images(r1m_problem):
    from csa.largescale import first_stage_large

    q, db, _, view, gnd, _ = r1m_problem
    shortlist = first_stage_large(q, view, gnd, depth=20, chunk_size=1000, progress=False)
    _assert_same_results(shortlist.evaluate(shortlist.ranks[:10]), shortlist.evaluate())
    other = shortlist.ranks.copy()
    other[0, 0] = shortlist.ranks[-1, 0] + 1 if shortlist.ranks[-1, 0] + 1 not in shortlist.ranks[:, 0] else 3299
    with pytest.raises(CSAInputError, match="re-order the first-stage top-20"):
        shortlist.evaluate(other)
    with pytest.raises(CSAInputError, match="rows"):
        shortlist.evaluate(np.vstack([shortlist.ranks, shortlist.ranks]))
