"""Tests for csa.compare.tuning (untrained re-rankers' parameters chosen on the training city) and the
landmark-level intervals of csa.compare.runner."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from csa.compare.expansion import alpha_qe
from csa.compare.published import FIRST_STAGE
from csa.compare.runner import QUERY_COLUMNS, gain_between, query_landmarks, run_comparison, summary_table
from csa.compare.tuning import (GRIDS, select_setting, select_setting_pooled, select_untrained, training_benchmark,
                               tuned_methods)
from csa.evaluate import evaluate_revisited
from csa.stats import paired_bootstrap_gain
from csa.validation import CSAInputError


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# One query, four database images.  Candidate 1 ranks 0, 1, 2, 3; candidate 2 the reverse.
# Training city: the only positive is image 3 -> revisitop AP (0/3 + 1/4) / 2 = 1/8 for candidate 1 (4th
# place, trapezoid rule), 1 for candidate 2.
# Test city: the only positive is image 0 -> AP 1 for candidate 1, 1/8 for candidate 2.
FORWARD = np.array([[0, 1, 2, 3]]).T
BACKWARD = np.array([[3, 2, 1, 0]]).T
TRAIN_GND = [{"easy": [3], "hard": [], "junk": []}]
TEST_GND = [{"easy": [0], "hard": [], "junk": []}]


def _fixed(ranks):
    return lambda q, db, r: ranks


def test_select_setting_picks_what_wins_on_the_benchmark_it_is_given():
    rng = np.random.default_rng(0)
    q, db = unit_rows(rng, 1, 4), unit_rows(rng, 4, 4)
    candidates = {1: _fixed(FORWARD), 2: _fixed(BACKWARD)}
    value, table = select_setting(candidates, q, db, TRAIN_GND)
    assert value == 2                                         # the training city's winner ...
    assert table["medium_map"].tolist() == pytest.approx([12.5, 100.0])
    assert table["chosen"].tolist() == [False, True]
    assert select_setting(candidates, q, db, TEST_GND)[0] == 1   # ... though the test city would pick 1


def test_select_setting_breaks_ties_towards_the_first_candidate():
    rng = np.random.default_rng(0)
    q, db = unit_rows(rng, 1, 4), unit_rows(rng, 4, 4)
    candidates = {5: _fixed(FORWARD), 2: _fixed(FORWARD), 9: _fixed(BACKWARD)}
    value, table = select_setting(candidates, q, db, TEST_GND)
    assert value == 5 and table["chosen"].tolist() == [True, False, False]


def test_select_setting_refuses_empty_grid_and_unknown_protocol():
    rng = np.random.default_rng(0)
    q, db = unit_rows(rng, 1, 4), unit_rows(rng, 4, 4)
    with pytest.raises(CSAInputError, match="candidates is empty"):
        select_setting({}, q, db, TEST_GND)
    with pytest.raises(CSAInputError, match="protocol must be one of"):
        select_setting({1: _fixed(FORWARD)}, q, db, TEST_GND, protocol="Medium")


def _order(order):
    """A ranker that gives every query the database order ``order``."""
    return lambda q, db, r: np.tile(np.asarray(order)[:, None], (1, q.shape[0]))


def test_select_setting_pooled_weighs_benchmarks_by_their_queries():
    # benchmark A: 1 query whose positive is image 3; benchmark B: 3 queries whose positive is image 0.
    # forward order: AP 1/8 on A, 1 on B; backward: 1 on A, 1/8 on B (see FORWARD / BACKWARD above).
    rng = np.random.default_rng(1)
    db = unit_rows(rng, 4, 4)
    small = (unit_rows(rng, 1, 4), db, TRAIN_GND)
    large = (unit_rows(rng, 3, 4), db, TEST_GND * 3)
    candidates = {"backward": _order([3, 2, 1, 0]), "forward": _order([0, 1, 2, 3])}
    value, table = select_setting_pooled(candidates, [small, large])
    # per query: forward (12.5 + 3 * 100) / 4, backward (100 + 3 * 12.5) / 4; the mean of the two benchmarks'
    # mAPs would tie at 56.25 and keep the first candidate, backward
    assert value == "forward"
    assert table["medium_map"].tolist() == pytest.approx([34.375, 78.125])
    assert table["chosen"].tolist() == [False, True]
    # one benchmark: the same choice and mAPs as select_setting
    for bench in (small, large):
        alone, alone_table = select_setting_pooled(candidates, [bench])
        assert alone == select_setting(candidates, *bench)[0]
        assert alone_table.equals(select_setting(candidates, *bench)[1])


def test_select_setting_pooled_ties_go_to_the_first_candidate_and_empty_input_is_refused():
    rng = np.random.default_rng(2)
    db = unit_rows(rng, 4, 4)
    bench = (unit_rows(rng, 2, 4), db, TEST_GND * 2)
    candidates = {32: _order([0, 1, 2, 3]), 64: _order([0, 2, 1, 3]), 128: _order([3, 2, 1, 0])}
    value, table = select_setting_pooled(candidates, [bench, bench])
    assert value == 32 and table["chosen"].tolist() == [True, False, False]
    with pytest.raises(CSAInputError, match="benchmarks is empty"):
        select_setting_pooled(candidates, [])


def test_training_benchmark_is_the_other_citys_leave_one_out_queries():
    assert training_benchmark("roxford5k-mini") == "rparis6k-mini-loo"
    assert training_benchmark("roxford5k-mini-loo") == "rparis6k-mini-loo"
    assert training_benchmark("rparis6k-mini") == "roxford5k-mini-loo"
    assert training_benchmark("rparis6k-mini-loo") == "roxford5k-mini-loo"
    with pytest.raises(CSAInputError, match="not a demo benchmark"):
        training_benchmark("roxford5k")


def _clustered_benchmark(seed=0, n_landmarks=4, per=6, d=16):
    """Images around ``n_landmarks`` centres; every image of a landmark queries the others (half easy, half hard)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_landmarks, d))
    x = np.repeat(centres, per, axis=0) + 0.9 * rng.standard_normal((n_landmarks * per, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    label = np.repeat(np.arange(n_landmarks), per)
    others = [[int(j) for j in np.flatnonzero(label == label[i]) if j != i] for i in range(len(x))]
    gnd = [{"easy": o[: len(o) // 2], "hard": o[len(o) // 2:], "junk": [i]} for i, o in enumerate(others)]
    return x, x, gnd, label


def test_select_untrained_scores_every_grid_value_and_keeps_the_best():
    q, db, gnd, _ = _clustered_benchmark()
    chosen, table = select_untrained(["αQE"], q, db, gnd, topk=8)
    parameter, values = GRIDS["αQE"]
    assert table["value"].tolist() == list(values) and set(table["parameter"]) == {parameter}
    expected = [evaluate_revisited(alpha_qe(q, db, np.argsort(-(db @ q.T), axis=0, kind="stable"),
                                            n=min(v, len(db)), alpha=3.0), gnd)["medium"]["map"] for v in values]
    assert table["medium_map"].tolist() == pytest.approx(expected)
    first_best = values[int(np.argmax(expected))]            # np.argmax returns the first maximum
    assert chosen == {"αQE": first_best}
    assert table.loc[table["chosen"], "value"].tolist() == [first_best]
    methods, settings = tuned_methods(chosen, topk=8, n_db=len(db))
    assert settings == {"αQE": {"n": first_best}} and methods["αQE"].keywords["n"] == first_best
    with pytest.raises(CSAInputError, match="no selection grid"):
        select_untrained(["CSA"], q, db, gnd, topk=8)


def test_query_landmarks_groups_queries_that_share_their_positives():
    gnd = {"gnd": [{"easy": [0, 1], "hard": [2], "junk": []},    # landmark 0
                   {"easy": [5], "hard": [6], "junk": []},       # landmark 1
                   {"easy": [0, 2], "hard": [1], "junk": [9]},   # same positives as query 0
                   {"easy": [5, 6], "hard": [], "junk": []}]}    # same positives as query 1
    assert query_landmarks(gnd).tolist() == [0, 1, 0, 1]
    assert query_landmarks(gnd["gnd"]).tolist() == [0, 1, 0, 1]
    with pytest.raises(CSAInputError, match="no queries"):
        query_landmarks([])


def _comparison(groups):
    q, db, gnd, label = _clustered_benchmark(seed=1)
    methods = {"αQE": partial(alpha_qe, n=3, alpha=3.0), "reversed": lambda qq, dd, rr: rr[::-1].copy()}
    return run_comparison(q, db, gnd, methods, n_boot=300, progress=False,
                          groups=None if groups is None else groups(label)), label


def test_landmark_intervals_resample_whole_landmarks():
    by_query, label = _comparison(None)
    by_landmark, _ = _comparison(lambda label: label)
    assert list(by_landmark.columns[-len(QUERY_COLUMNS):]) == QUERY_COLUMNS
    row = by_landmark.set_index("method").loc["αQE"]
    assert row["landmarks"] == 4
    aps = by_landmark.attrs["aps"]
    expected = paired_bootstrap_gain(aps["αQE"]["medium"], aps[FIRST_STAGE]["medium"], n_boot=300, groups=label)
    assert (row["medium_gain"], row["medium_gain_low"], row["medium_gain_high"]) == pytest.approx(expected)
    plain = by_query.set_index("method").loc["αQE"]        # the per-query interval kept as a second column
    assert (row["medium_gain_query_low"], row["medium_gain_query_high"]) == pytest.approx(
        (plain["medium_gain_low"], plain["medium_gain_high"]))
    assert gain_between(by_landmark, "αQE", "reversed") == pytest.approx(paired_bootstrap_gain(
        aps["αQE"]["medium"], aps["reversed"]["medium"], n_boot=10000, groups=label))
    assert gain_between(by_landmark, "αQE", "reversed", unit="queries") == pytest.approx(paired_bootstrap_gain(
        aps["αQE"]["medium"], aps["reversed"]["medium"], n_boot=10000))
    with pytest.raises(CSAInputError, match="no landmark ids"):
        gain_between(by_query, "αQE", "reversed", unit="landmarks")
    view = summary_table(by_landmark)
    assert {"landmarks", "M gain [95% CI, landmarks]", "M gain [95% CI, queries]"} <= set(view.columns)


def test_one_landmark_per_query_gives_the_per_query_interval_and_one_landmark_a_point():
    by_query, label = _comparison(None)
    singletons, _ = _comparison(lambda label: np.arange(len(label)))
    cols = ["medium_gain", "medium_gain_low", "medium_gain_high"]
    assert singletons[cols].to_numpy() == pytest.approx(by_query[cols].to_numpy())
    one, _ = _comparison(lambda label: np.zeros(len(label)))   # every resample draws the same landmark
    row = one.set_index("method").loc["αQE"]
    assert row["medium_gain_low"] == pytest.approx(row["medium_gain"]) == pytest.approx(row["medium_gain_high"])


def test_groups_of_the_wrong_length_are_refused():
    q, db, gnd, _ = _clustered_benchmark()
    with pytest.raises(CSAInputError, match="groups has 3 entries"):
        run_comparison(q, db, gnd, {"αQE": partial(alpha_qe, n=3)}, progress=False, groups=[0, 1, 2])
