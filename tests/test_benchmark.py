"""The benchmark object: one load of the ground truth, the same numbers in memory and streamed (+R1M), and the
per-benchmark comparison tables against a float64 re-derivation of the first stage and the revisited APs."""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from _arrays import unit_quarter_rows
from csa.compare.affinity_baseline import affinity_cosine
from csa.compare.runner import COLUMNS, query_landmarks, run_comparison
from csa.compare.suite import MethodPlan, compare_on_benchmarks
from csa.data import layout
from csa.data.benchmark import Benchmark
from csa.data.layout import save_gnd, save_test_features
from csa.data.r1m import save_distractors
from csa.model import RerankTransformer
from csa.validation import CSAInputError

PROTOCOL_LISTS = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                  "hard": (("hard",), ("junk", "easy"))}


def make_dataset(root, name, seed, n_db=120, n_q=6):
    """Quarter-valued unit rows (every score exact in float16/32/64, many ties) and a raw revisitop gnd."""
    rng = np.random.default_rng(seed)
    db = unit_quarter_rows(rng, n_db, 32)
    q = db[:n_q].copy()
    q = np.where(rng.random(q.shape) < 0.15, -q, q).astype(np.float32)  # near, not on, a database row
    gnd = [{"easy": [int(x) for x in rng.choice(np.arange(n_q, n_db), 4, replace=False)],
            "hard": [i, int(n_db - 1 - i)], "junk": [int(n_q + 10 * i)], "bbx": [0, 0, 1, 1]} for i in range(n_q)]
    for g in gnd:
        g["easy"] = [x for x in g["easy"] if x not in g["hard"] + g["junk"]]
    gt = {"imlist": [f"{name}{i}" for i in range(n_db)], "qimlist": [f"{name}q{i}" for i in range(n_q)], "gnd": gnd}
    save_gnd(root, name, gt)
    save_test_features(root, name, "f", query=q, db=db)
    return q, db, gnd


def reference_order(q, db):
    """float64 first stage: every database index by decreasing inner product, ties by the lower index."""
    scores = db.astype(np.float64) @ q.astype(np.float64).T
    return np.stack([np.lexsort((np.arange(len(db)), -scores[:, j])) for j in range(q.shape[0])], axis=1)


def reference_ap(order, ok, junk):
    """revisitop's AP written out: junk skipped, trapezoid between the precision before and at each positive."""
    kept = [i for i in order if i not in junk]
    total, found = 0.0, 0
    for position, image in enumerate(kept):
        if image in ok:
            before = found / position if position else 1.0
            found += 1
            total += (before + found / (position + 1)) / 2
    return total / len(ok)


def reference_map(ranks, gnd, protocol):
    ok_keys, junk_keys = PROTOCOL_LISTS[protocol]
    aps = []
    for j, g in enumerate(gnd):
        ok = {i for k in ok_keys for i in g[k]}
        if ok:
            aps.append(reference_ap(ranks[:, j].tolist(), ok, {i for k in junk_keys for i in g[k]}))
    return 100.0 * float(np.mean(aps))


def reverse_top3(qvecs, dbvecs, ranks):
    """A re-ranker computed by hand: the first three of every list in reverse order."""
    out = np.array(ranks, copy=True)
    out[:3] = out[2::-1]
    return out


@pytest.fixture
def root(tmp_path):
    make_dataset(tmp_path, "a", seed=1)
    make_dataset(tmp_path, "b", seed=2, n_db=90, n_q=5)
    return tmp_path


def test_the_ground_truth_is_read_once(root, monkeypatch):
    reads = []
    original = layout._load

    def counting(path, what):
        reads.append(path.name)
        return original(path, what)

    monkeypatch.setattr(layout, "_load", counting)
    bench = Benchmark.load(root, "a", "f")
    assert sorted(reads) == ["f.pkl", "gnd_a.pkl"]
    assert bench.n_queries == 6 and bench.n_db == 120 and not bench.streamed


def test_streamed_benchmark_gives_the_in_memory_numbers(root):
    """+R1M stand-in: float16 memory-mapped distractors appended; first stage, a baseline and CSA, same APs."""
    q, db, gnd = make_dataset(root, "a", seed=1)
    dis = unit_quarter_rows(np.random.default_rng(5), 700, 32)
    path = save_distractors(dis, root / "dis.npy", dtype="float16")
    memory = Benchmark.from_arrays(q, np.concatenate([db, dis]), gnd)
    streamed = Benchmark.load(root, "a", "f", r1m=path)
    assert streamed.streamed and streamed.n_db == memory.n_db == 820
    torch.manual_seed(0)
    model = RerankTransformer(anchor_len=8, embed_dim=16, num_heads=2).eval()
    baseline = partial(affinity_cosine, topk=20, anchor_len=8)
    full, short = memory.first_stage(), streamed.first_stage(depth=20, chunk_size=64)
    assert np.array_equal(short.ranks, reference_order(q, np.concatenate([db, dis]))[:20])
    pairs = [(full.evaluate(), short.evaluate()),
             (full.evaluate(memory.rerank(baseline, full)), short.evaluate(streamed.rerank(baseline, short, 2))),
             (full.evaluate(memory.rerank_csa(model, full, 20, batch_size=2, progress=False)),
              short.evaluate(streamed.rerank_csa(model, short, 20, batch_size=2, progress=False)))]
    for expected, got in pairs:
        for protocol in PROTOCOL_LISTS:
            assert np.array_equal(expected[protocol]["aps"], got[protocol]["aps"], equal_nan=True)
    top = streamed.rerank_csa(model, short, 20, batch_size=2, progress=False)
    assert np.array_equal(streamed.evaluate(top)["medium"]["aps"], pairs[2][0]["medium"]["aps"], equal_nan=True)
    assert streamed.evaluate()["hard"]["map"] == pytest.approx(reference_map(reference_order(q, memory.dbvecs), gnd,
                                                                             "hard"), abs=1e-9)
    with pytest.raises(CSAInputError, match="depth"):
        streamed.first_stage()
    with pytest.raises(CSAInputError, match="streamed"):
        streamed.first_stage_from(short.ranks)


def test_compare_on_benchmarks_matches_a_float64_rederivation_and_the_per_benchmark_loop(root):
    plan = lambda bench: MethodPlan({"reverse top 3": reverse_top3}, {"reverse top 3": {"K": 3}})  # noqa: E731
    tables = compare_on_benchmarks(root, "f", ["a", "b"], plan, n_boot=200, count_queries=True)
    numbers = [c for c in COLUMNS if c not in ("ms_per_query", "offline_s")]
    for table, (name, seed, n_db, n_q) in zip(tables, [("a", 1, 120, 6), ("b", 2, 90, 5)]):
        q, db, gnd = make_dataset(root, name, seed, n_db, n_q)
        assert list(table.columns[:4]) == ["dataset", "method", "queries", "K"]
        assert table["dataset"].tolist() == [name] * 2 and table["queries"].tolist() == [n_q] * 2
        first = reference_order(q, db)
        reranked = reverse_top3(None, None, first)
        for protocol in PROTOCOL_LISTS:
            assert table[f"{protocol}_map"].tolist() == pytest.approx(
                [reference_map(first, gnd, protocol), reference_map(reranked, gnd, protocol)], abs=1e-9)
        loop = run_comparison(q, db, gnd, {"reverse top 3": reverse_top3}, n_boot=200, progress=False,
                              settings={"reverse top 3": {"K": 3}}, groups=query_landmarks(gnd))
        pd.testing.assert_frame_equal(table.drop(columns=["dataset", "queries"])[numbers + ["K"]],
                                      loop[numbers + ["K"]], check_exact=True)
        assert table.attrs["aps"] == loop.attrs["aps"]
    with pytest.raises(CSAInputError, match="MethodPlan"):
        compare_on_benchmarks(root, "f", ["a"], lambda bench: {"x": reverse_top3})


def test_csa_rerank_scans_the_descriptors_once(tmp_path, monkeypatch, capsys):
    """From loading to the re-ranked evaluation, each descriptor array gets one full check (no second pass)."""
    from _toy_data import write_toy_root
    from csa import validation
    from csa.cli import main

    root = write_toy_root(tmp_path)
    scanned = []
    original = validation._row_stats
    monkeypatch.setattr(validation, "_row_stats", lambda t, *args: scanned.append(t.shape[0]) or original(t, *args))
    assert main(["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat", "--checkpoint",
                 str(root / "model.pth"), "--topk", "10", "--device", "cpu"]) == 0
    assert sorted(scanned) == [2, 40]  # the 2 queries and the 40 database rows, once each
    assert "CSA top-10" in capsys.readouterr().out
