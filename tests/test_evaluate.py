"""Revisited evaluation: hand-computed cases, and a brute-force re-derivation from the definition
(junk removed from the list, trapezoids under the precision-recall curve) on random rankings."""
from pathlib import Path

import numpy as np
import pytest

from csa.evaluate import compute_ap, compute_map, evaluate_revisited, format_revisited, print_revisited, protocol_gnd
from csa.fileio import load_pickle
from csa.validation import CSAInputError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def definition_ap_and_pk(ranking, ok, junk, kappas):
    """AP = sum over positives of (1/|ok|) * mean of the precision just before and at its rank,
    on the list with junk removed; P@k measured at min(k, rank of last retrieved positive)."""
    ok, junk = set(int(x) for x in ok), set(int(x) for x in junk)
    kept = [x for x in ranking if int(x) not in junk or int(x) in ok]
    hits, ap, last = 0, 0.0, 0
    precision = [1.0]
    for r, x in enumerate(kept, start=1):
        is_pos = int(x) in ok
        prev = precision[-1] if r > 1 else 1.0
        if is_pos:
            hits += 1
            last = r
        precision.append(hits / r)
        if is_pos:
            ap += (prev + hits / r) / 2 / len(ok)
    pk = []
    for k in kappas:
        kq = min(last, k)
        pk.append(sum(int(x) in ok for x in kept[:kq]) / kq if kq else 0.0)
    return ap, pk


def test_hand_computed_with_junk():
    ranks = np.array([[3, 0, 4, 1, 5, 2]]).T
    m, aps, pr, prs = compute_map(ranks, [{"ok": np.array([0, 1]), "junk": np.array([4])}], kappas=[1, 5])
    # positives at 0-based positions 1 and 3; junk at 2 shifts the second to 2.
    # AP = 1/2 * [(0 + 1/2)/2 + (1/2 + 2/3)/2] = 5/12 ; P@1 = 0 ; P@5 -> kq = 3 -> 2/3
    assert m == pytest.approx(5 / 12) and aps[0] == pytest.approx(5 / 12)
    np.testing.assert_allclose(prs[0], [0, 2 / 3])
    assert compute_ap([1, 2], 2) == pytest.approx(5 / 12)
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)


def test_query_without_positives_and_truncated_ranking():
    ranks = np.array([[0, 5], [7, 0]]).T          # 2 rows only (truncated), 2 queries
    gnd = [{"ok": np.array([0, 1, 2]), "junk": np.array([])}, {"ok": np.array([], dtype=int)}]
    m, aps, pr, prs = compute_map(ranks, gnd, kappas=[1, 5])
    # query 0: one of three positives found at position 0 -> AP = (1 + 1)/2 / 3 ; mP@5 quirk: kq = 1
    assert aps[0] == pytest.approx(1 / 3) and np.isnan(aps[1])
    assert m == pytest.approx(1 / 3)                  # nan query excluded from the mean
    np.testing.assert_allclose(pr, [1.0, 1.0])
    assert np.isnan(prs[1]).all()
    # no positive in the truncated list at all: AP 0, P@k 0 (revisitop would crash here)
    m, aps, pr, _ = compute_map(np.array([[5, 6]]).T, [{"ok": [0]}], kappas=[1])
    assert m == 0 and pr[0] == 0


def test_random_rankings_match_definition():
    rng = np.random.default_rng(0)
    n, q = 60, 25
    ranks = np.stack([rng.permutation(n) for _ in range(q)], axis=1)
    gnd = []
    for i in range(q):
        perm = rng.permutation(n)
        n_ok, n_junk = rng.integers(0, 8), rng.integers(0, 8)
        gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok:n_ok + n_junk]})
    for rows in (n, 15):   # full and truncated rankings
        m, aps, pr, prs = compute_map(ranks[:rows], gnd, kappas=[1, 5, 10])
        ref = [definition_ap_and_pk(ranks[:rows, i], g["ok"], g["junk"], [1, 5, 10]) if len(g["ok"]) else None
               for i, g in enumerate(gnd)]
        valid = [i for i, r in enumerate(ref) if r is not None]
        assert len(valid) < q  # the sample contains queries without positives
        for i in valid:
            assert aps[i] == pytest.approx(ref[i][0], abs=1e-12)
            np.testing.assert_allclose(prs[i], ref[i][1], atol=1e-12)
        assert m == pytest.approx(np.mean([ref[i][0] for i in valid]), abs=1e-12)
        np.testing.assert_allclose(pr, np.mean([ref[i][1] for i in valid], axis=0), atol=1e-12)


def test_protocols_from_raw_gnd():
    raw = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranks = np.array([[2, 1, 0, 3]]).T
    e, m, h = (protocol_gnd(raw, p)[0] for p in ("easy", "medium", "hard"))
    assert sorted(e["ok"]) == [0] and sorted(e["junk"]) == [1, 2]
    assert sorted(m["ok"]) == [0, 1] and sorted(m["junk"]) == [2]
    assert sorted(h["ok"]) == [1] and sorted(h["junk"]) == [0, 2]
    res = evaluate_revisited(ranks, raw, kappas=(1, 5))
    assert res["easy"]["map"] == pytest.approx(100.0)       # 2 and 1 are junk, 0 first
    assert res["medium"]["map"] == pytest.approx(100.0)     # 2 junk, then 1, 0
    assert res["hard"]["map"] == pytest.approx(100.0)
    assert res["medium"]["mp@k"] == {1: pytest.approx(100.0), 5: pytest.approx(100.0)}
    ranks2 = np.array([[3, 0, 1, 2]]).T
    res2 = evaluate_revisited(ranks2, raw)
    assert res2["easy"]["map"] == pytest.approx(100 * (0 + 1 / 2) / 2)   # easy positive at position 1
    assert res2["hard"]["aps"][0] == pytest.approx(100 * (0 + 1 / 2) / 2)  # 0 is junk for hard
    text = format_revisited("toy", res2, method="csa")
    assert text.splitlines()[0] == ">> toy (csa): mAP E: 25.0, M: 41.7, H: 25.0"  # M: positives at 1, 2 -> 5/12
    assert text.splitlines()[1].startswith(">> toy (csa): mP@k[1, 5, 10] E: [0.0, 50.0, 50.0]")
    with pytest.raises(CSAInputError, match="raw revisitop"):
        evaluate_revisited(ranks, [{"ok": [0]}])
    with pytest.raises(CSAInputError, match="transposed"):
        evaluate_revisited(ranks, raw * 4)  # (4, 1) given, 4 queries


@pytest.mark.skipif(not (DATA / "revisitop" / "gnd_roxford5k.pkl").exists(), reason="offline data missing")
def test_real_roxford_ground_truth(capsys):
    cfg = load_pickle(DATA / "revisitop" / "gnd_roxford5k.pkl")
    gnd, n = cfg["gnd"], len(cfg["imlist"])
    perfect = []
    rng = np.random.default_rng(1)
    for g in gnd:   # medium positives first, then junk, then the rest
        first = list(g["easy"]) + list(g["hard"])
        rest = [i for i in rng.permutation(n) if i not in set(first) | set(g["junk"])]
        perfect.append(first + list(g["junk"]) + rest)
    res = evaluate_revisited(np.array(perfect).T, gnd)
    assert res["medium"]["map"] == pytest.approx(100.0)
    assert res["easy"]["aps"].shape == (70,)
    random_ranks = np.stack([rng.permutation(n) for _ in gnd], axis=1)
    r = evaluate_revisited(random_ranks, cfg)
    assert r["medium"]["map"] < 10
    ok = protocol_gnd(gnd, "medium")
    i = 5
    ref_ap, _ = definition_ap_and_pk(random_ranks[:, i], ok[i]["ok"], ok[i]["junk"], [])
    assert r["medium"]["aps"][i] == pytest.approx(100 * ref_ap, abs=1e-9)
    print_revisited("roxford5k", r)
    assert capsys.readouterr().out.startswith(">> roxford5k: mAP E: ")
