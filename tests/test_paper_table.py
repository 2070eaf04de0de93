"""Pooled folds, whitening on training pools, the compact descriptor copies and the paper-table assembly."""
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from csa.descriptors.compact import load_compact, save_compact
from csa.data.layout import save_gnd, save_test_features
from csa.evaluate import evaluate_revisited
from csa.search import first_stage
from csa.experiments.landmark_pool import (City, PoolPart, choose_whitening, city_pool, fit_whitening, select_whitening,
                                           whiten_city)
from csa.experiments.paper_table import paper_comparisons, paper_table
from csa.experiments.pooled import pooled_folds
from csa.validation import CSAInputError

from _subprocess import run


def _city(seed, name, n_landmarks=6, per=5, loners=10, dim=260, noise=0.6):
    """A synthetic city: landmark photos near their landmark's centre, loners anywhere; LOO ground truth."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_landmarks, dim))
    lm = np.concatenate([np.repeat(np.arange(n_landmarks), per), -np.ones(loners, dtype=int)])
    x = np.where(lm[:, None] >= 0, centres[np.maximum(lm, 0)], 0) + rng.normal(size=(len(lm), dim)) * noise
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rows = np.flatnonzero(lm >= 0)
    gnd = [{"easy": [int(j) for j in np.flatnonzero(lm == lm[i]) if j != i], "hard": [], "junk": [int(i)]}
           for i in rows]
    feats = {"f": x, "g": np.roll(x, 1, axis=1)}
    return City(name, feats, {k: v[:2] for k, v in feats.items()}, gnd[:2], np.array([0, 0]), gnd, rows,
                lm[rows], lm, np.arange(len(lm)))


def test_pooled_folds_hold_out_every_landmark_of_both_cities_once():
    cities = [_city(0, "a", n_landmarks=9), _city(1, "b", n_landmarks=11)]
    folds = pooled_folds(cities, n_folds=3)
    held = [k for fold in folds for k in fold]
    assert sorted(held) == sorted([(0, i) for i in range(9)] + [(1, i) for i in range(11)])
    assert len(held) == len(set(held)) == 20
    sizes = [len(f) for f in folds]          # equal photo counts per landmark: equal landmark counts
    assert max(sizes) - min(sizes) <= 1


def test_city_pool_drops_held_out_landmarks_and_whitening_ignores_rows_outside_the_pool():
    city = _city(2, "a")
    pool = city_pool(city, exclude=[0, 3])
    assert not np.isin(city.image_landmark[pool.rows], [0, 3]).any()
    assert len(pool.rows) == len(city.image_landmark) - 10
    w1 = fit_whitening([pool], "f", "pcaw")
    changed = City(**{**city.__dict__, "db": {**city.db, "f": city.db["f"].copy()}})
    changed.db["f"][city.image_landmark == 0] = 1.0           # photos of a held-out landmark
    w2 = fit_whitening([city_pool(changed, exclude=[0, 3])], "f", "pcaw")
    np.testing.assert_array_equal(w1.P, w2.P)
    assert fit_whitening([pool], "f", "none") is None
    with pytest.raises(CSAInputError, match="unknown whitening candidate"):
        fit_whitening([pool], "f", "zca")


def test_select_whitening_scores_held_out_landmarks_only():
    city = _city(3, "a", n_landmarks=6)
    table = select_whitening([city_pool(city)], "f", candidates=["none", "lw"], n_folds=3)
    assert set(table["whitening"]) == {"none", "lw"} and set(table["inner_fold"]) == {0, 1, 2}
    # each fold's held-out LOO queries are scored once per candidate; together they are all LOO queries
    assert table[table["whitening"] == "none"]["queries"].sum() == len(city.loo_gnd)
    # the unwhitened score is the first-stage Medium mAP of those queries against the whole database
    row = table[(table["whitening"] == "none")].iloc[0]
    held = table[(table["whitening"] == "none")]
    total = sum(r.queries * r.first_medium for r in held.itertuples()) / held["queries"].sum()
    db = city.db["f"]
    ref = evaluate_revisited(first_stage(db[city.loo_rows], db), city.loo_gnd)["medium"]["map"]
    assert total == pytest.approx(ref, abs=1e-9)
    assert row["descriptors"] == "f"
    assert choose_whitening(table) in {"none", "lw"}


def _aps_frame():
    rows = []
    for method, shift in (("first stage", 0.0), ("CSA", 10.0), ("untrained raw", 5.0)):
        for q, (lm, ap) in enumerate([(0, 40.0), (0, 50.0), (1, 60.0), (2, 30.0)]):
            rows.append({"protocol": "cross-city", "benchmark": "x-loo", "whitening": "none", "descriptors": "f",
                         "fold": -1, "method": method, "query": q, "landmark": lm,
                         "medium_ap": ap + shift + (q if method == "CSA" else 0), "hard_ap": ap})
    return pd.DataFrame(rows)


def test_paper_table_gains_are_paired_means_over_landmark_units():
    aps = _aps_frame()
    table = paper_table(aps, n_boot=200).set_index("method")
    assert table.loc["first stage", "medium"] == pytest.approx(45.0)
    assert table.loc["CSA", "medium_gain"] == pytest.approx(10.0 + np.mean([0, 1, 2, 3]))
    assert table.loc["CSA", "landmarks"] == 3 and table.loc["CSA", "queries"] == 4
    assert table.loc["CSA", "medium_low"] >= 10.0 and table.loc["CSA", "medium_high"] <= 13.0
    assert table.loc["CSA", "hard_gain"] == pytest.approx(0.0)
    comp = paper_comparisons(aps, n_boot=200).set_index("comparison")
    assert comp.loc["CSA minus the best untrained (on this benchmark)", "medium_gain"] == pytest.approx(6.5)


def test_compact_copy_round_trips_and_refuses_a_changed_file(tmp_path):
    rng = np.random.default_rng(0)
    save_gnd(tmp_path, "d", {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [],
                                                                                 "junk": [], "bbx": [0, 0, 1, 1]}]})
    db = rng.normal(size=(3, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:1]
    save_test_features(tmp_path, "d", "f", query=q, db=db)
    path = save_compact(tmp_path, "f", ["d"], command="csa demo extract --backbone x")
    got_db, got_q = load_compact(tmp_path, "f", "d")
    assert got_db.dtype == np.float32 and got_db.shape == (3, 8)
    np.testing.assert_allclose(got_db, db, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got_db, axis=1), 1, atol=1e-5)
    manifest = json.loads((tmp_path / "descriptors" / "manifest.json").read_text())
    assert manifest["f.npz"]["command"] == "csa demo extract --backbone x"
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(CSAInputError, match="sha256"):
        load_compact(tmp_path, "f", "d")


def test_run_or_load_reads_a_cache_only_when_its_fingerprint_matches(tmp_path):
    from csa.experiments import paper_table as pt

    save_gnd(tmp_path, "d", {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [],
                                                                             "bbx": [0, 0, 1, 1]}]})
    db = np.eye(2, 4, dtype=np.float32)
    save_test_features(tmp_path, "d", "f", query=db[:1], db=db)
    save_compact(tmp_path, "f", ["d"], command="test")
    settings = {"features": ["f"], "cross_city": [], "pooled_recipe": "demo", "pooled_folds": 0, "seed": 0}
    out = tmp_path / "results"
    out.mkdir()
    _aps_frame().to_csv(out / "paper_aps.csv", index=False)
    pd.DataFrame({"whitening": ["none"]}).to_csv(out / "paper_whitening.csv", index=False)
    pd.DataFrame({"reranker": ["untrained raw"], "L": [32]}).to_csv(out / "paper_untrained_l.csv", index=False)
    (out / "paper_aps.fingerprint.json").write_text(json.dumps({"fingerprint": pt.results_fingerprint(tmp_path, settings),
                                                                "parts": ["p"], "missing": []}))
    aps, _, lengths, info = pt.run_or_load(tmp_path, out, settings)
    assert not info["recomputed"] and info["parts"] == ["p"] and len(aps) == len(_aps_frame())
    assert lengths["L"].tolist() == [32]
    # other settings: the cache is stale; with one pooled fold and run_missing=False nothing runs
    aps, _, _, info = pt.run_or_load(tmp_path, out, {**settings, "seed": 1, "pooled_folds": 1}, run_missing=False)
    assert info == {"recomputed": True, "parts": [], "missing": ["pooled-fold0"]} and aps.empty
    assert json.loads((out / "paper_aps.fingerprint.json").read_text())["missing"] == ["pooled-fold0"]


def test_committed_compact_sets_verify_and_match_the_demo_ground_truth():
    from conftest import REPO_ROOT
    from csa.data.layout import load_gnd
    from csa.experiments.paper_table import DEFAULT_SETTINGS

    root = REPO_ROOT / "data" / "demo"
    for name in DEFAULT_SETTINGS["features"]:
        for dataset in ("roxford5k-mini", "rparis6k-mini"):
            db, q = load_compact(root, name, dataset)
            gt = load_gnd(root, dataset)
            assert db.shape == (len(gt["imlist"]), 1280) and q.shape == (len(gt["qimlist"]), 1280)
            np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)


def test_pooled_rows_of_two_cities_are_paired_by_city_and_count_their_landmarks_apart():
    a = _aps_frame().assign(protocol="pooled", fold=0, benchmark="a-loo")
    b = _aps_frame().assign(protocol="pooled", fold=0, benchmark="b-loo")
    b.loc[b["method"] == "CSA", "medium_ap"] += 20.0          # city b gains 20 more on every query
    table = paper_table(pd.concat([a, b], ignore_index=True), n_boot=200).set_index("method")
    assert table.loc["CSA", "benchmark"] == "pooled LOO"
    assert table.loc["CSA", "landmarks"] == 6 and table.loc["CSA", "queries"] == 8
    assert table.loc["CSA", "medium_gain"] == pytest.approx(11.5 + 10.0)


def _held_out_reference(city, centred):
    """Float64 re-derivation of the held-out choice of L on a one-city pool of nine equal landmarks (0-8):
    folds by hand (equal sizes, dealt in id order), Lw learned on the other landmarks' photos only,
    query-weighted Medium mAP of the held-out landmarks' LOO queries over the three folds."""
    from csa.compare.affinity_baseline import affinity_cosine
    from csa.descriptors.whiten import learn_whitening

    folds = [{0, 3, 6}, {1, 4, 7}, {2, 5, 8}]
    x = city.db["f"].astype(np.float64)
    lm = city.image_landmark
    from csa.experiments.pooled import UNTRAINED_L

    totals, queries = {length: 0.0 for length in UNTRAINED_L}, 0
    for fold in folds:
        train = ~np.isin(lm, list(fold))
        clusters = np.where(lm >= 0, lm, 1000 + np.arange(len(lm)))[train]
        w = learn_whitening("lw", x[train], clusters)
        db = w.apply(x)
        keep = np.flatnonzero(np.isin(city.loo_landmark, list(fold)))
        q, gnd = db[city.loo_rows[keep]], [city.loo_gnd[i] for i in keep]
        ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
        for length in totals:
            reranked = affinity_cosine(q, db, ranks, topk=128, anchor_len=min(length, len(db)), centred=centred)
            totals[length] += evaluate_revisited(reranked, gnd)["medium"]["map"] * len(keep)
        queries += len(keep)
    scores = {length: total / queries for length, total in totals.items()}
    return max(scores, key=lambda length: (scores[length], -length)), scores


def test_untrained_l_is_chosen_on_held_out_landmarks_not_on_the_leaked_training_queries():
    """Lw learned on every training photo separates the training landmarks perfectly: every L scores 100% on
    their own LOO queries and the leaked choice falls to the smallest L; on held-out landmarks a longer L wins."""
    from csa.compare.tuning import select_setting
    from csa.experiments.pooled import _untrained, pick_untrained_l

    city = _city(0, "a", n_landmarks=9, per=8, loners=80, noise=2.0)
    pool = [city_pool(city)]
    chosen, table = pick_untrained_l(pool, "f", "lw")
    for name, centred in (("raw", False), ("centred", True)):
        best, scores = _held_out_reference(city, centred)
        rows = table[table["reranker"] == f"untrained {name}"].set_index("L")
        assert chosen[name] == best > 32
        for length, score in scores.items():
            assert rows.loc[length, "held_out_medium"] == pytest.approx(score, abs=1e-4)
        assert rows["chosen"].tolist() == [length == best for length in rows.index]
        assert rows["grid_top"].tolist() == [length == max(rows.index) for length in rows.index]
        assert set(rows["queries"]) == {len(city.loo_gnd)}
        db, _ = whiten_city(city, "f", fit_whitening(pool, "f", "lw"))   # the leaked protocol, for contrast
        leaked, leaked_table = select_setting({n: _untrained(centred, n) for n in (32, 64, 128)},
                                              db[city.loo_rows], db, city.loo_gnd)
        assert leaked == 32 and leaked_table["medium_map"].min() == pytest.approx(100.0)


def test_held_out_whitening_is_never_fitted_on_the_photos_that_score(monkeypatch):
    from csa.experiments import landmark_pool
    from csa.experiments.landmark_pool import held_out_benchmarks

    cities = [_city(4, "a", n_landmarks=5), _city(5, "b", n_landmarks=4)]
    pool = [city_pool(cities[0], exclude=[4]), city_pool(cities[1])]
    fitted = []
    real = landmark_pool.fit_whitening
    monkeypatch.setattr(landmark_pool, "fit_whitening",
                        lambda inner, feature, name: fitted.append({(p.city.dataset, int(r)) for p in inner for r in p.rows})
                        or real(inner, feature, name))
    benchmarks = held_out_benchmarks(pool, "f", "pcaw", n_folds=3)
    assert len(fitted) == 3
    scored = set()
    for b in benchmarks:
        city = next(c for c in cities if c.dataset == b.city)
        rows = {int(city.loo_rows[next(i for i, g in enumerate(city.loo_gnd) if g is q)]) for q in b.gnd}
        assert not rows & {r for c, r in fitted[b.inner_fold] if c == b.city}
        assert all(city.image_landmark[r] != 4 or city.dataset != "a" for r in rows)   # never a test landmark
        scored |= {(b.city, r) for r in rows}
    # every training landmark photo is held out once; the test landmark (a:4) never
    expected = {(c.dataset, int(r)) for c, part in zip(cities, pool) for r in part.rows if c.image_landmark[r] >= 0}
    assert scored == expected


def test_refreshing_untrained_rows_keeps_csa_rows_and_refuses_another_first_stage():
    from csa.experiments.paper_table import _replace_untrained

    old = _aps_frame().assign(untrained_l="raw 64, centred 128")
    new = old[old["method"].isin(["first stage", "untrained raw"])].copy()
    new.loc[new["method"] == "untrained raw", "medium_ap"] += 1.5
    new["untrained_l"] = "raw 128, centred 128"
    out = _replace_untrained(old, new)
    assert list(out.columns) == list(old.columns) and len(out) == len(old)
    np.testing.assert_array_equal(out[out["method"] == "CSA"]["medium_ap"], old[old["method"] == "CSA"]["medium_ap"])
    np.testing.assert_allclose(out[out["method"] == "untrained raw"]["medium_ap"],
                               old[old["method"] == "untrained raw"]["medium_ap"] + 1.5)
    assert set(out["untrained_l"]) == {"raw 128, centred 128"}
    new.loc[new["method"] == "first stage", "medium_ap"] += 0.1
    with pytest.raises(CSAInputError, match="first stage does not match"):
        _replace_untrained(old, new)


def test_committed_paper_results_match_the_settings_and_record_the_held_out_choice_of_l():
    """The main job reads the committed results without recomputing: their fingerprint is the settings' one;
    paper_untrained_l.csv holds, per case, the L each untrained re-ranker was given in paper_aps.csv."""
    from conftest import REPO_ROOT
    from csa.experiments.paper_table import DEFAULT_SETTINGS, results_fingerprint

    results = REPO_ROOT / "data" / "demo" / "results"
    stamp = json.loads((results / "paper_aps.fingerprint.json").read_text())
    assert stamp["fingerprint"] == results_fingerprint(REPO_ROOT / "data" / "demo", DEFAULT_SETTINGS)
    assert "held-out" in stamp["settings"]["untrained_l"]
    aps, lengths = pd.read_csv(results / "paper_aps.csv"), pd.read_csv(results / "paper_untrained_l.csv")
    case = ["protocol", "trained_on", "fold", "whitening"]
    chosen = lengths[lengths["chosen"]].pivot_table(index=case, columns="reranker", values="L")
    for key, rows in aps.groupby(case):
        assert rows["untrained_l"].unique().tolist() == [
            f"raw {int(chosen.loc[key, 'untrained raw'])}, centred {int(chosen.loc[key, 'untrained centred'])}"]
    assert (lengths.groupby(case + ["reranker"])["chosen"].sum() == 1).all()


@pytest.mark.slow
def test_the_untrained_l_chosen_now_is_the_one_the_committed_results_record():
    """pick_untrained_l on a pooled fold's training pool and on a cross-city pool (PCA-whitened) gives the L
    and the held-out scores that data/demo/results records for those runs."""
    from conftest import REPO_ROOT
    from csa.experiments.landmark_pool import load_city
    from csa.experiments.paper_table import DEFAULT_SETTINGS
    from csa.experiments.pooled import BACKBONE_FEATURES, pick_untrained_l

    root = REPO_ROOT / "data" / "demo"
    aps = pd.read_csv(root / "results" / "paper_aps.csv")
    lengths = pd.read_csv(root / "results" / "paper_untrained_l.csv")
    cities = {d: load_city(root, d, DEFAULT_SETTINGS["features"]) for d in ("roxford5k-mini", "rparis6k-mini")}
    both = list(cities.values())
    held = pooled_folds(both, DEFAULT_SETTINGS["pooled_folds"])[0]
    runs = {("pooled", 0, "pcaw"): [city_pool(city, [lm for c, lm in held if c == i]) for i, city in enumerate(both)],
            ("cross-city", -1, "pcaw"): [city_pool(cities["roxford5k-mini"])]}
    for (protocol, fold, variant), pool in runs.items():
        recorded = aps[(aps["protocol"] == protocol) & (aps["fold"] == fold) & (aps["whitening"] == variant)]
        table = lengths[(lengths["protocol"] == protocol) & (lengths["fold"] == fold) & (lengths["whitening"] == variant)]
        if protocol == "cross-city":
            recorded = recorded[recorded["trained_on"] == "roxford5k-mini"]
            table = table[table["trained_on"] == "roxford5k-mini"]
        chosen, now = pick_untrained_l(pool, BACKBONE_FEATURES[0], variant)
        assert recorded["untrained_l"].unique().tolist() == [f"raw {chosen['raw']}, centred {chosen['centred']}"]
        np.testing.assert_allclose(now["held_out_medium"], table["held_out_medium"], atol=1e-9)


@pytest.mark.slow
def test_refreshing_the_committed_results_reproduces_them_and_refuses_other_settings(tmp_path):
    """refresh_untrained on a copy of the committed results recomputes every untrained row from the first-stage
    lists with the held-out L and finds exactly the committed APs, CSA rows untouched; the files are rewritten
    so that run_or_load reads them; results made with other settings are refused."""
    import shutil

    from conftest import REPO_ROOT
    from csa.experiments.paper_table import DEFAULT_SETTINGS, refresh_untrained, run_or_load

    root = REPO_ROOT / "data" / "demo"
    out = tmp_path / "results"
    shutil.copytree(root / "results", out)
    committed = pd.read_csv(out / "paper_aps.csv")
    with pytest.raises(CSAInputError, match="not made with these settings"):
        refresh_untrained(root, out, {**DEFAULT_SETTINGS, "seed": 1})
    # The committed results were computed with one thread per process; another thread count rounds the
    # float32 first stage differently and may swap near-tied neighbours, so refresh the same way.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    code = ("import sys\nfrom csa.experiments.paper_table import DEFAULT_SETTINGS, refresh_untrained\n"
            "refresh_untrained(sys.argv[1], sys.argv[2], DEFAULT_SETTINGS)\n")
    proc = run([sys.executable, "-c", code, str(root), str(out)], env=env)
    assert proc.returncode == 0, proc.stderr
    aps, lengths = pd.read_csv(out / "paper_aps.csv"), pd.read_csv(out / "paper_untrained_l.csv")
    pd.testing.assert_frame_equal(aps, committed, check_exact=False, rtol=0, atol=1e-9)
    pd.testing.assert_frame_equal(lengths, pd.read_csv(root / "results" / "paper_untrained_l.csv"), atol=1e-9)
    read, _, _, info = run_or_load(root, out, DEFAULT_SETTINGS, run_missing=False)
    assert not info["recomputed"] and len(read) == len(committed)
