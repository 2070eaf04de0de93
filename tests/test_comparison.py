"""Tests for csa.compare on hand-built rankings with hand-computed revisited APs."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from csa.compare.methods import default_methods
from csa.compare.published import FIRST_STAGE, PUBLISHED
from csa.compare.runner import COLUMNS, run_comparison
from csa.validation import CSAInputError


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def hand_case():
    """Two queries, six database images, hand-built first stage.

    Query 0: easy [0], hard [1], junk [2]; first stage 0, 2, 3, 1, 4, 5.
      Medium (ok {0, 1}, junk {2}): positives at 1st and 3rd place after junk removal ->
      AP = 1/2 * (1 + 1)/2 + 1/2 * (1/2 + 2/3)/2 = 0.791666...; P@10 rule of revisitop: 2/3.
      Easy (ok {0}): AP 1.  Hard (ok {1}, junk {0, 2}): 2nd place -> AP = 1 * (0 + 1/2)/2 = 0.25.
    Query 1: easy [4], no hard, no junk; first stage 4, 0, 1, 2, 3, 5: Easy = Medium = 1, P@10 = 1;
      Hard has no positive, so it is excluded from the Hard mAP.
    """
    rng = np.random.default_rng(0)
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [4], "hard": [], "junk": []}]
    ranks = np.array([[0, 2, 3, 1, 4, 5], [4, 0, 1, 2, 3, 5]]).T
    return unit_rows(rng, 2, 4), unit_rows(rng, 6, 4), gnd, ranks


def test_run_comparison_hand_computed_values(hand_case):
    q, db, gnd, ranks = hand_case
    perfect = np.array([[0, 1, 2, 3, 4, 5], [4, 0, 1, 2, 3, 5]]).T

    def slow_identity(qq, dd, rr):
        time.sleep(0.02)
        return rr

    methods = {"identity": slow_identity, "perfect": lambda qq, dd, rr: perfect,
               "reversed": lambda qq, dd, rr: rr[::-1].copy()}
    df = run_comparison(q, db, gnd, methods, first_stage_ranks=ranks, n_boot=500, seed=0, progress=False)
    assert list(df.columns) == COLUMNS
    assert df["method"].tolist() == [FIRST_STAGE, "identity", "perfect", "reversed"]
    fs = df.iloc[0]
    medium_q0 = 0.5 * (1 + 1) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert fs["easy_map"] == pytest.approx(100.0)
    assert fs["medium_map"] == pytest.approx(100 * (medium_q0 + 1) / 2)
    assert fs["hard_map"] == pytest.approx(25.0)
    assert fs["medium_mp@10"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert np.isnan(fs["ms_per_query"])                                 # first stage given, not timed
    gains = ["medium_gain", "medium_gain_low", "medium_gain_high", "hard_gain", "hard_gain_low", "hard_gain_high"]
    assert (df.loc[df.method.isin([FIRST_STAGE, "identity"]), gains] == 0).all().all()
    assert df.set_index("method").loc["identity", "ms_per_query"] >= 10.0   # 20 ms over 2 queries
    best = df.set_index("method").loc["perfect"]
    assert best["medium_map"] == pytest.approx(100.0) and best["hard_map"] == pytest.approx(100.0)
    assert best["medium_gain"] == pytest.approx((100 - 100 * medium_q0) / 2)
    assert 0.0 <= best["medium_gain_low"] <= best["medium_gain"] <= best["medium_gain_high"] <= 100 - 100 * medium_q0
    assert best["hard_gain"] == best["hard_gain_low"] == best["hard_gain_high"] == pytest.approx(75.0)
    worst = df.set_index("method").loc["reversed"]
    assert worst["medium_gain"] < 0 and worst["medium_gain_high"] <= 0


def test_run_comparison_default_first_stage_is_timed_exact_search(hand_case):
    q, db, gnd, _ = hand_case
    df = run_comparison(q, db, gnd, {"same": lambda qq, dd, rr: rr}, n_boot=50, progress=False)
    assert df.iloc[0]["ms_per_query"] >= 0
    assert df.iloc[1]["medium_gain"] == 0 and df.iloc[1]["medium_map"] == df.iloc[0]["medium_map"]


def test_run_comparison_rejects_bad_input(hand_case):
    q, db, gnd, ranks = hand_case
    with pytest.raises(CSAInputError, match="gnd has 1 queries"):
        run_comparison(q, db, gnd[:1], {"x": lambda a, b, c: c}, first_stage_ranks=ranks)
    with pytest.raises(CSAInputError, match="reserved"):
        run_comparison(q, db, gnd, {FIRST_STAGE: lambda a, b, c: c}, first_stage_ranks=ranks)
    with pytest.raises(CSAInputError, match="non-empty"):
        run_comparison(q, db, gnd, {}, first_stage_ranks=ranks)
    with pytest.raises(CSAInputError, match="not callable"):
        run_comparison(q, db, gnd, {"x": 3}, first_stage_ranks=ranks)


def test_default_methods_run_on_a_small_synthetic_benchmark():
    """Every default method runs (depths capped to the database) and returns valid rankings."""
    rng = np.random.default_rng(1)
    centres = unit_rows(rng, 5, 16)
    labels = np.repeat(np.arange(5), 12)
    db = centres[labels] + 0.35 * rng.standard_normal((60, 16))
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = centres + 0.35 * rng.standard_normal((5, 16))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    gnd = []
    for c in range(5):
        members = np.flatnonzero(labels == c)
        gnd.append({"easy": members[:6].tolist(), "hard": members[6:10].tolist(), "junk": members[10:].tolist()})
    methods = default_methods(n_db=60, topk=40, anchor_len=16)
    assert set(methods) == {"AQE", "αQE", "αDBA", "αDBA+αQE", "diffusion", "k-reciprocal", "affinity cosine",
                            "affinity cosine (centred)"}
    df = run_comparison(q, db, gnd, methods, n_boot=100, progress=False)
    assert len(df) == 1 + len(methods)
    assert df[["easy_map", "medium_map", "hard_map"]].notna().all().all()
    assert ((df[["easy_map", "medium_map", "hard_map"]] >= 0) & (df[["easy_map", "medium_map", "hard_map"]] <= 100)).all().all()
    assert (df["medium_gain_low"] <= df["medium_gain"]).all() and (df["medium_gain"] <= df["medium_gain_high"]).all()


def test_default_methods_with_model_adds_csa_rows():
    torch = pytest.importorskip("torch")
    from csa.model import RerankTransformer

    torch.manual_seed(0)
    model = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2).eval()
    methods = default_methods(model, n_db=30, topk=20)
    assert {"CSA", "αQE+CSA", "diffusion+CSA"} <= set(methods)
    rng = np.random.default_rng(2)
    q, db = unit_rows(rng, 2, 8), unit_rows(rng, 30, 8)
    from csa.search import first_stage
    ranks = first_stage(q, db)
    out = methods["CSA"](q, db, ranks)
    assert out.shape == ranks.shape and np.array_equal(out[20:], ranks[20:])
    assert all(sorted(out[:, i]) == list(range(30)) for i in range(2))


def test_published_numbers_and_sources():
    pub = PUBLISHED.set_index(["method", "dataset", "source"])
    assert set(PUBLISHED["source"].str.contains("CSA repository|SSR paper")) == {True}
    row = PUBLISHED[(PUBLISHED.method == FIRST_STAGE) & (PUBLISHED.dataset == "roxford5k")].iloc[0]
    assert (row.medium_map, row.hard_map) == (67.3, 44.3)
    csa_par = PUBLISHED[(PUBLISHED.method == "CSA") & (PUBLISHED.dataset == "rparis6k+r1m")].iloc[0]
    assert (csa_par.medium_map, csa_par.hard_map) == (71.6, 51.0)
    ssr = PUBLISHED[(PUBLISHED.method == "SSR") & (PUBLISHED.dataset == "rparis6k")].iloc[0]
    assert (ssr.medium_map, ssr.hard_map) == (84.4, 67.8)
    assert {"αQE", "AQE", "k-reciprocal", "diffusion (regional)", "LAttQE", "affinity cosine (L = 512)"} <= set(PUBLISHED.method)
    assert pub.index.is_unique


def test_summary_table_marks_only_gains_whose_interval_excludes_zero():
    import pandas as pd

    from csa.compare.runner import COLUMNS, summary_table

    rows = [
        ["first stage", 30.0, 20.0, 10.0, 40.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, float("nan")],
        ["A", 32.04, 25.0, 9.0, 50.0, 3.0, 5.0, 1.0, 9.0, -1.0, -3.0, 0.5, 2.5],
        ["B", 28.0, 15.0, 8.0, 30.0, 2.0, -5.0, -9.0, -2.0, -2.0, -4.0, -0.5, float("nan")],
    ]
    view = summary_table(pd.DataFrame(rows, columns=COLUMNS))
    assert list(view.index) == ["first stage", "A", "B"]
    assert view.loc["first stage", "M gain [95% CI, queries]"] == ""
    assert view.loc["A", "M gain [95% CI, queries]"] == "+5.0 [+1.0, +9.0] *"
    assert view.loc["A", "H gain [95% CI, queries]"] == "-1.0 [-3.0, +0.5]"      # contains 0: no star
    assert view.loc["B", "M gain [95% CI, queries]"] == "-5.0 [-9.0, -2.0] *"    # significantly worse
    assert view.loc["A", "E"] == 32.0
    assert view.loc["A", "offline s"] == 2.5 and np.isnan(view.loc["B", "offline s"])


def test_alpha_dba_offline_augmentation_is_timed_apart_and_gives_the_same_ranking():
    from csa.compare.expansion import alpha_dba

    rng = np.random.default_rng(4)
    q, db = unit_rows(rng, 3, 8), unit_rows(rng, 60, 8)
    gnd = [{"easy": [i], "hard": [i + 5], "junk": []} for i in range(3)]
    methods = default_methods(None, n_db=60, sensitivity=True)
    assert {"αQE, n=2 (sensitivity)", "αDBA, n=10 (sensitivity)"} <= set(methods)
    table = run_comparison(q, db, gnd, {"αDBA": methods["αDBA"]}, n_boot=20, progress=False)
    assert table.loc[1, "offline_s"] > 0 and np.isnan(table.loc[0, "offline_s"])
    ranks = np.argsort(-(q @ db.T), axis=1, kind="stable").T
    np.testing.assert_array_equal(methods["αDBA"](q, db, ranks), alpha_dba(q, db, ranks, n=50, alpha=3.0))
    prepared = methods["αDBA"].offline(db)
    np.testing.assert_array_equal(prepared(q, db, ranks), alpha_dba(q, db, ranks, n=50, alpha=3.0))


def test_describe_names_every_parameter():
    from csa.compare.methods import describe

    methods = default_methods(None, n_db=60)
    assert describe(methods["αQE"]) == "alpha_qe(n=50, alpha=3.0)"
    assert describe(methods["αDBA+αQE"]) == "AugmentDatabase(n=50, alpha=3.0) + alpha_qe(n=50, alpha=3.0)"
    assert "truncation=None" in describe(methods["diffusion"])
    torch.manual_seed(0)
    from csa.model import RerankTransformer

    with_csa = default_methods(RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2), n_db=60,
                               topk=20, batch_size=4)
    assert describe(with_csa["CSA"]) == "CSA(topk=20, anchor_len=8)"
    assert describe(with_csa["αQE+CSA"]) == "alpha_qe(n=50, alpha=3.0) + CSA(topk=20, anchor_len=8)"


def test_chain_augments_the_checked_database():
    from csa.compare.chain import compose
    from csa.compare.expansion import AugmentDatabase, alpha_dba

    rng = np.random.default_rng(6)
    q, db = unit_rows(rng, 3, 8), unit_rows(rng, 40, 8)
    ranks = np.argsort(-(q @ db.T), axis=1, kind="stable").T
    chain = compose(AugmentDatabase(n=4, alpha=3.0))
    expected = chain(q, db, ranks)
    with pytest.warns(UserWarning, match="renormalizing"):   # rows of norm 3: renormalized, then augmented
        assert np.array_equal(chain(q, 3 * db, ranks), expected)
    with pytest.warns(UserWarning, match="renormalizing"):
        assert np.array_equal(chain.offline(3 * db)(q, db, ranks), expected)
    with pytest.warns(UserWarning, match="renormalizing"):
        assert np.array_equal(alpha_dba(q, 3 * db, ranks, n=4, alpha=3.0), expected)
    torch_out = chain(torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ranks))
    assert isinstance(torch_out, torch.Tensor) and np.array_equal(torch_out.numpy(), expected)


def test_published_table_has_one_row_per_method_and_the_csa_table_values():
    from csa.compare.published import published_table

    table = published_table(["first stage", "CSA"])
    assert list(table.index) == ["first stage", "CSA"]
    assert table.loc["CSA", "roxford5k (M / H)"] == "78.2 / 59.1"   # the table, not the README log
    assert table.loc["first stage", "rparis6k+r1m (M / H)"] == "57.3 / 29.8"


def test_run_comparison_settings_become_columns(hand_case):
    q, db, gnd, ranks = hand_case
    methods = {"A": lambda qv, dv, r: r, "B": lambda qv, dv, r: r}
    table = run_comparison(q, db, gnd, methods, first_stage_ranks=ranks, n_boot=50, progress=False,
                           settings={"A": {"K": 4, "L": 3}, "B": {"K": 5}})
    assert list(table.columns[:3]) == ["method", "K", "L"]
    assert table["K"].tolist()[1:] == [4, 5] and table["K"].isna().tolist()[0]
    assert table["L"].isna().tolist() == [True, False, True]


def test_run_comparison_large_equals_run_comparison_in_memory(tmp_path):
    """The +R1M table (memory-mapped float16 distractors, short lists) is the in-memory table, number for number."""
    from functools import partial

    from _arrays import unit_quarter_rows
    from csa.compare.affinity_baseline import affinity_cosine
    from csa.compare.runner import run_comparison_large
    from csa.data.r1m import append_distractors, save_distractors
    from csa.model import RerankTransformer
    from csa.rerank import rerank

    rng = np.random.default_rng(2)
    db, dis = unit_quarter_rows(rng, 200, 32), unit_quarter_rows(rng, 1500, 32)
    q = db[:5].copy()
    q[:, :] = np.where(rng.random(q.shape) < 0.1, -q, q)  # a few signs flipped: near, not on, a database row
    gnd = [{"easy": list(range(10 * i + 1, 10 * i + 5)), "hard": [10 * i + 5, 150 + i], "junk": [10 * i + 6]}
           for i in range(5)]
    torch.manual_seed(1)
    model = RerankTransformer(anchor_len=12, embed_dim=16, num_heads=2).eval()
    methods = {"affinity cosine": partial(affinity_cosine, topk=30, anchor_len=12),
               "CSA": partial(rerank, model, topk=30, anchor_len=12, batch_size=2, progress=False)}
    full = np.concatenate([db, dis])
    expected = run_comparison(q, full, gnd, methods, n_boot=200, progress=False)
    view = append_distractors(db, save_distractors(dis, tmp_path / "dis.npy", dtype="float16"))
    got = run_comparison_large(q, view, gnd, methods, depth=30, batch_size=2, n_boot=200, progress=False)
    numbers = [c for c in COLUMNS if c != "ms_per_query"]
    assert got[numbers].equals(expected[numbers]), (got[numbers], expected[numbers])
    assert got["medium_map"].nunique() > 1  # the methods do change the ranking
    with pytest.raises(CSAInputError, match="reserved"):
        run_comparison_large(q, view, gnd, {FIRST_STAGE: methods["CSA"]}, depth=30, progress=False)


def test_gain_between_two_methods_is_the_paired_mean_of_their_per_query_aps(hand_case):
    from csa.compare.runner import gain_between
    q, db, gnd, ranks = hand_case
    perfect = np.array([[0, 1, 2, 3, 4, 5], [4, 0, 1, 2, 3, 5]]).T
    methods = {"perfect": lambda qq, dd, rr: perfect, "reversed": lambda qq, dd, rr: rr[::-1].copy()}
    df = run_comparison(q, db, gnd, methods, first_stage_ranks=ranks, n_boot=200, progress=False)
    # over the first stage it is the table's own gain
    assert gain_between(df, "perfect", FIRST_STAGE, n_boot=200) == pytest.approx(
        tuple(df.set_index("method").loc["perfect", ["medium_gain", "medium_gain_low", "medium_gain_high"]]))
    # Hard: only query 0 has a positive (1). perfect ranks it 1st (AP 1); reversed ranks 5, 4, 1, 3, 2, 0, which
    # is 5, 4, 1, 3 once junk {0, 2} is dropped: 3rd place -> AP = (0/2 + 1/3) / 2 = 1/6. One query: no spread.
    gain, low, high = gain_between(df, "perfect", "reversed", protocol="hard", n_boot=200)
    assert gain == low == high == pytest.approx(100 * (1 - 1 / 6))
    assert gain_between(df, "reversed", "perfect", protocol="hard", n_boot=200)[0] == pytest.approx(-100 * 5 / 6)
    with pytest.raises(CSAInputError, match="no method 'CSA'"):
        gain_between(df, "CSA", FIRST_STAGE)
    with pytest.raises(CSAInputError, match="protocol"):
        gain_between(df, "perfect", FIRST_STAGE, protocol="Medium")
    stripped = df.copy()
    stripped.attrs = {}
    with pytest.raises(CSAInputError, match="per-query APs"):
        gain_between(stripped, "perfect", FIRST_STAGE)


def test_comparison_tables_of_different_benchmarks_still_concatenate(hand_case):
    import pandas as pd
    q, db, gnd, ranks = hand_case
    one = run_comparison(q, db, gnd, {"same": lambda qq, dd, rr: rr}, first_stage_ranks=ranks, n_boot=20, progress=False)
    two = run_comparison(q[:1], db, gnd[:1], {"same": lambda qq, dd, rr: rr}, first_stage_ranks=ranks[:, :1],
                         n_boot=20, progress=False)
    assert len(pd.concat([one, two], ignore_index=True)) == 4


def test_select_methods_keeps_the_given_order_and_refuses_unknown_names():
    from csa.compare.methods import select_methods
    methods = default_methods(topk=8, anchor_len=4, n_db=10)
    picked = select_methods(methods, ["diffusion", "AQE"])
    assert list(picked) == ["diffusion", "AQE"] and picked["AQE"] is methods["AQE"]
    with pytest.raises(CSAInputError, match=r"unknown method\(s\) \['CSA'\]: choose from"):
        select_methods(methods, ["AQE", "CSA"])
