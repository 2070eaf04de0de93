"""Evaluation is a drop-in for revisitop's and is neither too lax nor too strict.

revisitop's example builds each protocol's ``ok`` / ``junk`` lists with ``np.concatenate`` over the raw
easy/hard/junk lists (float64 arrays when a list is empty) and passes them with an (N, Q) ``argsort``
ranking to ``compute_map``; that flow must run unchanged and match an independent re-derivation from
the protocol's definition.  The database size comes from the ground truth's ``imlist``: out-of-range
indices and partial rankings are refused unless the caller declares a short list.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csa.evaluate import compute_map, evaluate_revisited
from csa.fileio import load_pickle
from csa.validation import CSAInputError

GND = Path(__file__).resolve().parents[2] / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"
KAPPAS = [1, 5, 10]


def reference_scores(column: np.ndarray, ok: set[int], junk: set[int], kappas: list[int]) -> tuple[float, list]:
    """AP and P@k of one query, walked row by row from the definition (float64, no vectorisation).

    Junk images are skipped (they take no position); the AP is the trapezoid rule over recall, the
    precision just before and just at each positive averaged; P@k is measured at min(k, position of
    the last positive found) (1-based), as revisitop defines it.
    """
    if not ok:                                                  # no positive under this protocol: excluded
        return float("nan"), [float("nan")] * len(kappas)
    positions, position = [], 0
    for image in column.tolist():
        if image in junk:
            continue
        if image in ok:
            positions.append(position)
        position += 1
    ap = 0.0
    for found, pos in enumerate(positions):
        before = 1.0 if pos == 0 else found / pos
        at = (found + 1) / (pos + 1)
        ap += (before + at) / 2.0
    ap /= len(ok)
    prs = []
    for k in kappas:
        if not positions:
            prs.append(0.0)
            continue
        kq = min(positions[-1] + 1, k)
        prs.append(sum(1 for p in positions if p + 1 <= kq) / kq)
    return ap, prs


def revisitop_protocols(gnd: list[dict]) -> dict[str, list[dict]]:
    """Per-protocol ok/junk lists built the way revisitop's example builds them (np.concatenate of lists)."""
    lists = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
             "hard": (["hard"], ["junk", "easy"])}
    return {proto: [{"ok": np.concatenate([g[k] for k in ok]), "junk": np.concatenate([g[k] for k in junk])}
                    for g in gnd] for proto, (ok, junk) in lists.items()}


@pytest.fixture(scope="module")
def roxford() -> dict:
    if not GND.is_file():
        pytest.skip(f"offline ground truth not found at {GND}")
    return load_pickle(GND)


def rankings(cfg: dict) -> dict[str, np.ndarray]:
    """A random ranking and a good one (every query's easy+hard images first, then the rest at random)."""
    n_db, n_q = len(cfg["imlist"]), len(cfg["qimlist"])
    rng = np.random.default_rng(7)
    random = np.argsort(-rng.standard_normal((n_db, n_q)), axis=0)       # the example's argsort(-sim, axis=0)
    good = np.empty_like(random)
    for q, g in enumerate(cfg["gnd"]):
        first = rng.permutation(np.asarray(g["easy"] + g["hard"], dtype=np.int64))
        rest = rng.permutation(np.setdiff1d(np.arange(n_db), first))
        good[:, q] = np.concatenate([first, rest])
    return {"random": random, "good": good}


def test_revisitop_example_flow_runs_unchanged_and_matches_the_definition(roxford):
    protocols = revisitop_protocols(roxford["gnd"])
    assert any(g[key].dtype == np.float64 for gnd_t in protocols.values() for g in gnd_t
               for key in ("ok", "junk"))                         # what revisitop passes: floats from empty lists
    for name, ranks in rankings(roxford).items():
        for proto, gnd_t in protocols.items():
            mean_ap, aps, mean_pr, prs = compute_map(ranks, gnd_t, KAPPAS)
            assert np.isnan(aps[[i for i, g in enumerate(gnd_t) if not g["ok"].size]]).all()
            expected = [reference_scores(ranks[:, q], set(g["ok"].astype(int).tolist()),
                                         set(g["junk"].astype(int).tolist()), KAPPAS)
                        for q, g in enumerate(gnd_t)]
            with_positives = [i for i, g in enumerate(gnd_t) if g["ok"].size]
            np.testing.assert_allclose(aps[with_positives], [expected[i][0] for i in with_positives], rtol=1e-12)
            np.testing.assert_allclose(prs[with_positives], [expected[i][1] for i in with_positives], rtol=1e-12)
            assert mean_ap == pytest.approx(np.mean([expected[i][0] for i in with_positives]), rel=1e-12)
            full = evaluate_revisited(ranks, roxford, kappas=KAPPAS)[proto]   # n_db from imlist
            assert full["map"] == pytest.approx(100 * mean_ap, rel=1e-12), (name, proto)
        if name == "good":
            assert evaluate_revisited(ranks, roxford)["medium"]["map"] == pytest.approx(100.0)


def test_protocol_lists_with_fractional_indices_are_still_refused():
    gnd = [{"ok": np.array([1.5]), "junk": np.array([])}]
    with pytest.raises(CSAInputError, match="integer"):
        compute_map(np.arange(4)[:, None], gnd)


def test_the_database_size_comes_from_imlist(roxford):
    ranks = rankings(roxford)["random"]
    bad = ranks.copy()
    bad[0, 3] = len(roxford["imlist"])                          # one past the last image, in place of one
    bad[np.flatnonzero(ranks[:, 3] == len(roxford["imlist"]) - 1)[0], 3] = ranks[0, 3]
    with pytest.raises(CSAInputError, match="outside the database range"):
        evaluate_revisited(bad, roxford)


def test_partial_rankings_are_refused_unless_declared_a_short_list(roxford):
    ranks = rankings(roxford)["good"]
    top = ranks[:20]
    with pytest.raises(CSAInputError, match="20 rows but the database has 4993 images.*short_list=True"):
        evaluate_revisited(top, roxford)
    with pytest.raises(CSAInputError, match="partial ranking"):
        evaluate_revisited(top, roxford["gnd"], n_db=len(roxford["imlist"]))
    short = evaluate_revisited(top, roxford, kappas=KAPPAS, short_list=True)["medium"]
    protocols = revisitop_protocols(roxford["gnd"])["medium"]
    expected = [reference_scores(top[:, q], set(g["ok"].astype(int).tolist()), set(g["junk"].astype(int).tolist()),
                                 KAPPAS)[0] for q, g in enumerate(protocols)]
    assert short["map"] == pytest.approx(100 * np.nanmean(expected), rel=1e-12)   # positives below 20: never found
    assert short["map"] < evaluate_revisited(ranks, roxford)["medium"]["map"]


def test_a_database_extended_with_distractors_ranks_more_images_than_imlist(roxford):
    n_db = len(roxford["imlist"])
    ranks = rankings(roxford)["random"]
    extended = np.concatenate([ranks, np.tile(np.arange(n_db, n_db + 100)[:, None], (1, ranks.shape[1]))])
    plain = evaluate_revisited(ranks, roxford)
    # the 100 distractors ranked last change nothing: every positive keeps its position
    assert evaluate_revisited(extended, roxford)["medium"]["map"] == pytest.approx(plain["medium"]["map"], rel=1e-12)


def test_csa_evaluate_refuses_a_partial_or_out_of_range_ranking(tmp_path, capsys):
    from _toy_data import TOY_GND, write_toy_root
    from csa.cli import main as csa_main

    root = write_toy_root(tmp_path / "root")
    n_db = len(TOY_GND["imlist"])
    full = np.stack([np.random.default_rng(q).permutation(n_db) for q in range(len(TOY_GND["qimlist"]))], axis=1)
    args = ["evaluate", "--data-root", str(root), "--dataset", "toy", "--features", "feat", "--ranks"]
    np.save(tmp_path / "top.npy", full[:20])
    assert csa_main([*args, str(tmp_path / "top.npy")]) == 2
    assert "20 rows but the database has 40 images" in capsys.readouterr().err
    wrong = full.copy()
    wrong[wrong == n_db - 1] = n_db + 7                          # index 47 for 40 images
    np.save(tmp_path / "wrong.npy", wrong)
    assert csa_main([*args, str(tmp_path / "wrong.npy")]) == 2
    assert "outside the database range [0, 39]" in capsys.readouterr().err
    with pytest.raises(CSAInputError, match="outside the database range"):
        evaluate_revisited(wrong, TOY_GND)                       # n_db from imlist, also without the CLI
    np.save(tmp_path / "full.npy", full)
    assert csa_main([*args, str(tmp_path / "full.npy")]) == 0
