"""Tests of csa.notebook.method_views: every view against an independent float64 recomputation or a hand case."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from _arrays import unit_rows
from conftest import DEMO_ROOT
from csa.descriptors.whiten import learn_pcaw
from csa.model import RerankTransformer
from csa.notebook.method_views import (
    affinity_views,
    ap_gains,
    attention_maps,
    candidate_scores,
    pick_median_gain_query,
    pick_median_positives_sample,
    positive_rank_moves,
    score_separation,
    token_labels,
)
from csa.validation import CSAInputError


# --------------------------------------------------------------------------------------------
# attention: the weights of an independent float64 forward pass, from the state dict alone
# --------------------------------------------------------------------------------------------
def _layer_norm(x, sd, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _reference_attention(state_dict, affinity, heads):
    """float64 numpy forward of the pre-norm blocks: (list of (H, N, N) weights per block, output tokens)."""
    sd = {k: v.double().numpy() for k, v in state_dict.items()}
    x = _linear(affinity.astype(np.float64), sd, "topk_proj")
    n, c = x.shape
    d = c // heads
    maps, b = [], 0
    while f"blocks.{b}.norm1.weight" in sd:
        p = f"blocks.{b}"
        qkv = _linear(_layer_norm(x, sd, f"{p}.norm1"), sd, f"{p}.attn.qkv").reshape(n, 3, heads, d)
        q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))               # (H, N, d)
        logits = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        maps.append(w)
        x = x + _linear((w @ v).transpose(1, 0, 2).reshape(n, c), sd, f"{p}.attn.proj")
        h = _linear(_layer_norm(x, sd, f"{p}.norm2"), sd, f"{p}.mlp.fc1")
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))            # exact GELU
        x = x + _linear(h, sd, f"{p}.mlp.fc2")
        b += 1
    return maps, x


def test_attention_maps_equal_an_independent_float64_recomputation():
    torch.manual_seed(0)
    model = RerankTransformer(anchor_len=12, embed_dim=16, depth=2, num_heads=4)
    for p in model.parameters():                      # larger weights than the init, so attention is far from uniform
        p.data.normal_(0, 0.5)
    affinity = np.random.default_rng(1).standard_normal((9, 12)).astype(np.float32)
    maps = attention_maps(model, affinity)
    ref_maps, ref_tokens = _reference_attention(model.state_dict(), affinity, heads=4)
    assert len(maps) == 2
    for got, ref in zip(maps, ref_maps):
        assert got.shape == (1, 4, 9, 9)
        np.testing.assert_allclose(got[0].double().numpy(), ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-5)
        assert got.max() > 2.0 / 9                     # not the uniform map
    # the walk left the model as it was: training mode restored, its own tokens equal the reference
    assert model.training
    model.eval()
    with torch.no_grad():
        tokens = model.encode(torch.from_numpy(affinity)[None])[0].double().numpy()
    np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-4, atol=1e-5)


def test_attention_maps_of_the_released_model_reproduce_its_attention_output():
    """weights @ values through the block's output projection = the block's own attention output."""
    from csa import load_model

    path = DEMO_ROOT / "weights" / "roxford5k-mini-train.pth"
    if not path.is_file():
        pytest.skip("released demo weights not present")
    model = load_model(str(path))
    L = model.config["anchor_len"]
    affinity = torch.rand(2, 17, L, generator=torch.Generator().manual_seed(3)) * 0.6 + 0.4
    maps = attention_maps(model, affinity)
    with torch.no_grad():
        x = model.topk_proj(affinity)
        for blk, w in zip(model.blocks, maps):
            att = blk.attn
            h = blk.norm1(x)
            v = att.qkv(h).reshape(2, 17, 3, att.num_heads, att.head_dim)[:, :, 2].transpose(1, 2)
            mine = att.proj((w @ v).transpose(1, 2).reshape(2, 17, -1))
            torch.testing.assert_close(mine, att(h), rtol=1e-5, atol=1e-6)
            x = blk(x)


def test_attention_maps_reject_the_wrong_anchor_length():
    model = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(CSAInputError, match="anchor_len|\\(K\\+1, 8\\)"):
        attention_maps(model, np.zeros((5, 7), np.float32))


# --------------------------------------------------------------------------------------------
# affinity views and labels
# --------------------------------------------------------------------------------------------
def _ranking(q, db):
    return np.argsort(-(db.astype(np.float64) @ q.astype(np.float64).T), axis=0, kind="stable")


def test_affinity_views_equal_float64_dot_products_of_tokens_and_anchors():
    q, db = unit_rows(3, 10, 0), unit_rows(40, 10, 1)
    ranks = _ranking(q, db)
    K, L, j = 6, 4, 2
    views = affinity_views(q, db, ranks, j, K, L)
    tokens = np.vstack([q[j], db[ranks[:K, j]]]).astype(np.float64)
    anchors = np.vstack([q[j], db[ranks[:L - 1, j]]]).astype(np.float64)
    np.testing.assert_allclose(views["raw"], tokens @ anchors.T, atol=1e-6)
    centred = tokens @ anchors.T - (tokens @ anchors.T).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(views["centred"], centred, atol=1e-6)
    assert "whitened" not in views


def test_whitened_view_maps_the_same_images_through_the_whitening():
    q, db = unit_rows(2, 12, 4), unit_rows(50, 12, 5)
    ranks = _ranking(q, db)
    white = learn_pcaw(unit_rows(200, 12, 6).astype(np.float64), shrinkage=0.1, dimensions=8)
    K, L, j = 5, 6, 1
    views = affinity_views(q, db, ranks, j, K, L, whitening=white)

    def w(x):  # l2n((x - m) P^T) in float64
        y = (x.astype(np.float64) - white.m) @ white.P[:8].T
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    tokens = w(np.vstack([q[j], db[ranks[:K, j]]]))
    anchors = w(np.vstack([q[j], db[ranks[:L - 1, j]]]))
    np.testing.assert_allclose(views["whitened"], tokens @ anchors.T, atol=1e-5)
    assert views["whitened"].shape == views["raw"].shape == (K + 1, L)


def test_token_labels_mark_the_query_then_the_protocol_labels():
    ranks = np.array([[5], [0], [9], [7], [3]])
    gnd_entry = {"easy": [0, 3], "hard": [5], "junk": [7]}
    assert token_labels(ranks, gnd_entry, 0, 4) == ["query", "pos", "pos", "neg", "junk"]
    assert token_labels(ranks, gnd_entry, 0, 4, protocol="hard") == ["query", "pos", "junk", "neg", "junk"]
    with pytest.raises(CSAInputError, match="rows"):
        token_labels(ranks, gnd_entry, 0, 9)


# --------------------------------------------------------------------------------------------
# scores, rank moves, gains
# --------------------------------------------------------------------------------------------
def test_candidate_scores_list_each_candidate_with_its_cosine_and_label():
    q, db = unit_rows(2, 8, 7), unit_rows(12, 8, 8)
    ranks = _ranking(q, db)
    gnd = [{"easy": [int(ranks[1, 0])], "hard": [], "junk": [int(ranks[0, 0])]},
           {"easy": [], "hard": [int(ranks[2, 1])], "junk": []}]
    csa = np.arange(8, dtype=np.float32).reshape(2, 4)
    table = candidate_scores(q, db, ranks, csa, gnd)
    assert len(table) == 8 and list(table["position"][:4]) == [1, 2, 3, 4]
    for _, row in table.iterrows():
        j, p = int(row["query"]), int(row["position"])
        assert row["image"] == ranks[p - 1, j]
        assert row["first_stage"] == pytest.approx(float(np.dot(q[j].astype(np.float64), db[row["image"]])), abs=1e-6)
        assert row["csa"] == csa[j, p - 1]
    assert list(table["label"]) == ["junk", "pos", "neg", "neg", "neg", "neg", "pos", "neg"]


def test_score_separation_counts_ordered_pairs_ties_half():
    table = pd.DataFrame({"query": [0] * 5 + [1] * 2, "label": ["pos", "pos", "neg", "neg", "junk", "pos", "junk"],
                          "a": [0.9, 0.5, 0.7, 0.5, 99.0, 1.0, 0.0], "b": [0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0]})
    sep = score_separation(table, columns=("a", "b"))
    # query 0: a orders (0.9,0.7) (0.9,0.5) right, (0.5,0.7) wrong, (0.5,0.5) a tie -> 2.5/4; b none right.
    assert list(sep.index) == [0]                      # query 1 has no negative
    assert sep.loc[0, "a"] == pytest.approx(0.625) and sep.loc[0, "b"] == 0.0


def test_positive_rank_moves_equal_a_brute_force_recount():
    rng = np.random.default_rng(0)
    n, nq, K = 30, 4, 12
    before = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)
    after = before.copy()
    for j in range(nq):
        after[:K, j] = rng.permutation(before[:K, j])
    picks = [rng.choice(n, 8, replace=False) for _ in range(nq)]
    gnd = [{"easy": list(p[:4]), "hard": list(p[4:6]), "junk": list(p[6:])} for p in picks]
    moves = positive_rank_moves(before, after, gnd, K)
    expected = []
    for j, g in enumerate(gnd):
        positives = set(g["easy"]) | set(g["hard"])                         # Medium: positives = easy + hard
        for pos_before in range(K):
            image = before[pos_before, j]
            if image in positives:
                expected.append((j, image, pos_before + 1, int(np.flatnonzero(after[:, j] == image)[0]) + 1))
    got = sorted(map(tuple, moves[["query", "image", "rank_before", "rank_after"]].to_numpy().tolist()))
    assert got == sorted(expected) and len(got) > 0
    short = after[:K].copy()
    short[:, 0] = before[K:2 * K, 0]                  # query 0's list no longer holds its top-K
    with pytest.raises(CSAInputError, match="missing"):
        positive_rank_moves(before[:K], short, gnd, K)


def test_ap_gains_sort_and_classify_and_the_median_rule():
    before = [10.0, 50.0, np.nan, 30.0, 20.0, 40.0]
    after = [12.0, 50.0, 70.0, 29.0, 25.0, 40.0]
    table = ap_gains(before, after)
    assert list(table["query"]) == [3, 1, 5, 0, 4]                    # gains -1, 0, 0, 2, 5; NaN dropped
    assert list(table["outcome"]) == ["hurt", "unchanged", "unchanged", "helped", "helped"]
    # lower median of (-1, 0, 0, 2, 5) is 0, held by queries 1 and 5: the smaller index wins
    assert pick_median_gain_query(before, after) == 1
    with pytest.raises(CSAInputError, match="no query"):
        pick_median_gain_query([np.nan], [np.nan])


def test_median_positives_sample_recounts_the_targets_of_every_sample():
    from csa.training.sampler import NeighbourTable, TrainingSet

    rng = np.random.default_rng(2)
    features = unit_rows(60, 6, 9)
    clusters = rng.integers(0, 6, 60)
    ts = TrainingSet(NeighbourTable(features, topk=10, anchor_len=8, progress=False), clusters, samples="with-positives")
    counts = [int(ts[i]["targets"].sum().item()) - 1 for i in range(len(ts))]     # positives among the K tokens
    median = sorted(counts)[(len(counts) - 1) // 2]
    assert pick_median_positives_sample(ts) == counts.index(median)
