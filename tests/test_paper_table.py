"""Pooled folds, whitening on training pools, the compact descriptor copies and the paper-table assembly."""
import json

import numpy as np
import pandas as pd
import pytest

from csa.descriptors.compact import load_compact, save_compact
from csa.data.layout import save_gnd, save_test_features
from csa.evaluate import evaluate_revisited
from csa.search import first_stage
from csa.experiments.landmark_pool import City, PoolPart, choose_whitening, city_pool, fit_whitening, select_whitening
from csa.experiments.paper_table import paper_comparisons, paper_table
from csa.experiments.pooled import pooled_folds
from csa.validation import CSAInputError


def _city(seed, name, n_landmarks=6, per=5, loners=10, dim=260):
    """A synthetic city: landmark photos near their landmark's centre, loners anywhere; LOO ground truth."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_landmarks, dim))
    lm = np.concatenate([np.repeat(np.arange(n_landmarks), per), -np.ones(loners, dtype=int)])
    x = np.where(lm[:, None] >= 0, centres[np.maximum(lm, 0)], 0) + rng.normal(size=(len(lm), dim)) * 0.6
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
    (out / "paper_aps.fingerprint.json").write_text(json.dumps({"fingerprint": pt.results_fingerprint(tmp_path, settings),
                                                                "parts": ["p"], "missing": []}))
    aps, _, info = pt.run_or_load(tmp_path, out, settings)
    assert not info["recomputed"] and info["parts"] == ["p"] and len(aps) == len(_aps_frame())
    # other settings: the cache is stale; with one pooled fold and run_missing=False nothing runs
    aps, _, info = pt.run_or_load(tmp_path, out, {**settings, "seed": 1, "pooled_folds": 1}, run_missing=False)
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


@pytest.mark.slow
def test_the_untrained_l_chosen_now_is_the_one_the_committed_results_record():
    """pick_untrained_l on a pooled fold's training pool (the PCA-whitened variant, where raw L = 64 won) and on a
    cross-city pool gives the L that data/demo/results/paper_aps.csv records for those runs."""
    from conftest import REPO_ROOT
    from csa.experiments.landmark_pool import load_city
    from csa.experiments.paper_table import DEFAULT_SETTINGS
    from csa.experiments.pooled import BACKBONE_FEATURES, _pool_loo, pick_untrained_l

    root = REPO_ROOT / "data" / "demo"
    results = root / "results" / "paper_aps.csv"
    if not results.is_file():
        pytest.skip("no committed paper-table results")
    aps = pd.read_csv(results)
    cities = {d: load_city(root, d, DEFAULT_SETTINGS["features"]) for d in ("roxford5k-mini", "rparis6k-mini")}
    both = list(cities.values())
    held = pooled_folds(both, DEFAULT_SETTINGS["pooled_folds"])[0]
    runs = {("pooled", 0, "pcaw"): [city_pool(city, [lm for c, lm in held if c == i]) for i, city in enumerate(both)],
            ("cross-city", -1, "pcaw"): [city_pool(cities["roxford5k-mini"])]}
    for (protocol, fold, variant), pool in runs.items():
        recorded = aps[(aps["protocol"] == protocol) & (aps["fold"] == fold) & (aps["whitening"] == variant)]
        if protocol == "cross-city":
            recorded = recorded[recorded["trained_on"] == "roxford5k-mini"]
        whitening = fit_whitening(pool, BACKBONE_FEATURES[0], variant)
        chosen = pick_untrained_l(_pool_loo(pool, BACKBONE_FEATURES[0], whitening))
        assert recorded["untrained_l"].unique().tolist() == [f"raw {chosen['raw']}, centred {chosen['centred']}"]
