"""What CSA computes, gathered for the method pictures: affinity views, attention, scores and rank moves.

Every function takes arrays (descriptors, rankings, a model, ground truth) and returns arrays or a
:class:`pandas.DataFrame`; :mod:`csa.notebook.method_figures` draws them.  Nothing here changes the
model's numerics: :func:`attention_maps` walks the model's own blocks and only *adds* the softmax of
each block's query-key products, recomputed from the same layers.

Conventions: rankings are revisitop's (N, Q) database indices; positions and ranks are 1-based
(rank 1 = first result, junk images included, as listed); labels are ``'pos'``, ``'neg'``, ``'junk'``
under a Revisited protocol (:func:`csa.notebook.figures.label_ranked`), the query row ``'query'``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from csa.affinity import query_affinity
from csa.model import unwrap
from csa.notebook.figures import label_ranked
from csa.validation import CSAInputError

__all__ = ["AFFINITY_VIEWS", "affinity_views", "token_labels", "attention_maps", "candidate_scores",
           "score_separation", "positive_rank_moves", "ap_gains", "pick_median_gain_query",
           "pick_median_positives_sample"]

#: The affinity views :func:`affinity_views` returns, in display order.
AFFINITY_VIEWS = ("raw", "centred", "whitened")


def _column(ranks: Any, query: int, depth: int) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 2 or not 0 <= int(query) < r.shape[1]:
        raise CSAInputError(f"ranks must be (N, Q) with query in [0, Q); got shape {r.shape} and query={query}")
    if r.shape[0] < depth:
        raise CSAInputError(f"ranks has {r.shape[0]} rows but {depth} are needed (K and L - 1); pass a longer ranking")
    return r[:depth, int(query)].astype(np.int64)


def affinity_views(qvec: Any, dbvecs: Any, ranks: Any, query: int, topk: int, anchor_len: int,
                   whitening: Any = None) -> dict[str, np.ndarray]:
    """One query's (K+1, L) affinity matrix three ways: ``raw``, ``centred`` and ``whitened``.

    ``qvec`` (Q, D) and ``dbvecs`` (N, D) are the L2-normalized descriptors, ``ranks`` the first-stage
    (N, Q) ranking.  ``raw`` is what the model reads (:func:`csa.affinity.query_affinity`); ``centred``
    removes each row's mean (the untrained baseline's centring); ``whitened`` recomputes the same rows
    and anchors (same images, same order) from descriptors mapped by ``whitening.apply`` (a
    :class:`csa.descriptors.whiten.LearnedWhitening` learned on training data); omitted when None.
    """
    depth = max(int(topk), int(anchor_len) - 1)
    col = _column(ranks, query, depth)
    q = np.asarray(qvec, dtype=np.float32)[int(query)][None]
    db = np.asarray(dbvecs, dtype=np.float32)
    neighbours = torch.from_numpy(col)[None]
    raw = query_affinity(torch.from_numpy(q), torch.from_numpy(db), neighbours, int(topk), int(anchor_len))[0].numpy()
    views = {"raw": raw, "centred": raw - raw.mean(axis=1, keepdims=True)}
    if whitening is not None:
        wq = np.asarray(whitening.apply(q), dtype=np.float32)
        used = np.unique(col)
        wdb = np.zeros((db.shape[0], wq.shape[1]), dtype=np.float32)
        wdb[used] = whitening.apply(db[used])
        views["whitened"] = query_affinity(torch.from_numpy(wq), torch.from_numpy(wdb), neighbours, int(topk),
                                           int(anchor_len))[0].numpy()
    return views


def token_labels(ranks: Any, gnd_entry: Mapping[str, Any], query: int, topk: int,
                 protocol: str = "medium") -> list[str]:
    """Labels of the K+1 tokens of one query: ``'query'`` then the first-stage top-K's pos/neg/junk."""
    col = _column(ranks, query, int(topk))
    return ["query"] + label_ranked(col, gnd_entry, protocol)


@torch.no_grad()
def attention_maps(model: nn.Module, affinity: Any) -> list[torch.Tensor]:
    """Attention weights of every block: a list of (B, heads, K+1, K+1) tensors, rows summing to 1.

    The model runs in eval mode through its own layers (``topk_proj``, then each block as the model
    calls it), so the tokens are exactly :meth:`RerankTransformer.encode`'s; at each block the weights
    ``softmax(q k^T * scale)`` are recomputed from the block's ``norm1`` and ``attn.qkv`` on the block's
    input.  Row i says how much token i (0 = the query) draws from each token.
    """
    net = unwrap(model)
    a = torch.as_tensor(np.asarray(affinity) if not isinstance(affinity, torch.Tensor) else affinity)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[-1] != net.anchor_len:
        raise CSAInputError(f"affinity must be (K+1, {net.anchor_len}) or (B, K+1, {net.anchor_len}) for this model, "
                            f"got {tuple(a.shape)}")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    maps = []
    try:
        x = net.topk_proj(a.to(device, torch.float32))
        for blk in net.blocks:
            att = blk.attn
            b, n, c = x.shape
            q, k, _ = att.qkv(blk.norm1(x)).reshape(b, n, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4)
            maps.append(torch.softmax(q @ k.transpose(-2, -1) * att.scale, dim=-1))
            x = blk(x)
    finally:
        net.train(was_training)
    return maps


def candidate_scores(qvecs: Any, dbvecs: Any, ranks: Any, csa_scores: Any, gnd: Sequence[Mapping[str, Any]],
                     protocol: str = "medium") -> pd.DataFrame:
    """Every query's top-K candidates with their first-stage cosine and CSA score, one row each.

    ``csa_scores`` (Q, K) are :func:`csa.rerank.rerank_scores` (first-stage order).  Columns:
    ``query``, ``position`` (1-based first-stage rank), ``image``, ``label``, ``first_stage``
    (cosine of query and candidate) and ``csa`` (cosine of their output tokens).
    """
    s = np.asarray(csa_scores, dtype=np.float64)
    q, db = np.asarray(qvecs, dtype=np.float64), np.asarray(dbvecs, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != q.shape[0] or len(gnd) != q.shape[0]:
        raise CSAInputError(f"csa_scores must be (Q, K) for the Q = {q.shape[0]} queries of qvecs and gnd "
                            f"({len(gnd)} entries); got {s.shape}")
    k = s.shape[1]
    top = np.asarray(ranks)[:k].astype(np.int64)                        # (K, Q)
    rows = []
    for j in range(q.shape[0]):
        cand = top[:, j]
        rows.append(pd.DataFrame({"query": j, "position": np.arange(1, k + 1), "image": cand,
                                  "label": label_ranked(cand, gnd[j], protocol),
                                  "first_stage": db[cand] @ q[j], "csa": s[j]}))
    return pd.concat(rows, ignore_index=True)


def score_separation(table: pd.DataFrame, columns: Sequence[str] = ("first_stage", "csa")) -> pd.DataFrame:
    """Per query, the share of (positive, negative) candidate pairs a score orders correctly (ties count half).

    This is the area under the ROC curve of the query's top-K: 1 = every positive above every negative,
    0.5 = chance.  ``table`` is :func:`candidate_scores`; queries without a positive or a negative in their
    top-K are left out.  Returns one row per query with one column per score.
    """
    out = {}
    for query, part in table.groupby("query", sort=True):
        pos, neg = part[part["label"] == "pos"], part[part["label"] == "neg"]
        if len(pos) and len(neg):
            out[query] = {c: _pair_share(pos[c].to_numpy(float), neg[c].to_numpy(float)) for c in columns}
    return pd.DataFrame.from_dict(out, orient="index", columns=list(columns)).rename_axis("query")


def _pair_share(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def positive_rank_moves(before: Any, after: Any, gnd: Sequence[Mapping[str, Any]], topk: int,
                        protocol: str = "medium") -> pd.DataFrame:
    """Where each positive of each query stands before and after re-ranking (1-based list positions).

    Only positives in the first-stage top-``topk`` are listed (below it nothing moves); ``after`` must list
    every image ``before`` lists in its top-``topk`` (a re-ranking of the same lists).  Columns:
    ``query``, ``image``, ``rank_before``, ``rank_after`` (junk images count as positions, as listed).
    """
    b, a = np.asarray(before), np.asarray(after)
    if b.shape != a.shape or b.ndim != 2 or b.shape[1] != len(gnd):
        raise CSAInputError(f"before and after must be (N, Q) rankings of the {len(gnd)} queries of gnd; got "
                            f"{b.shape} and {a.shape}")
    k = min(int(topk), b.shape[0])
    frames = []
    for j, entry in enumerate(gnd):
        labels = np.asarray(label_ranked(b[:k, j], entry, protocol))
        images = b[:k, j][labels == "pos"]
        pos_after = np.full(int(max(a[:, j].max(), b[:, j].max())) + 1, -1, dtype=np.int64)
        pos_after[a[:, j]] = np.arange(1, a.shape[0] + 1)
        if (pos_after[images] < 0).any():
            raise CSAInputError(f"query {j}: a positive of the first-stage top-{k} is missing from 'after'; pass a "
                                "re-ranking of the same lists (e.g. csa.search.resort_topk of 'before')")
        frames.append(pd.DataFrame({"query": j, "image": images, "rank_before": np.flatnonzero(labels == "pos") + 1,
                                    "rank_after": pos_after[images]}))
    return pd.concat(frames, ignore_index=True)


def ap_gains(aps_before: Any, aps_after: Any) -> pd.DataFrame:
    """Per-query AP gain (points), sorted ascending, with ``outcome`` helped / hurt / unchanged.

    Queries without positives (NaN AP) are dropped.  Columns: ``query``, ``ap_before``, ``ap_after``,
    ``gain``, ``outcome``.
    """
    before = np.asarray(aps_before, dtype=np.float64).ravel()
    after = np.asarray(aps_after, dtype=np.float64).ravel()
    if before.shape != after.shape:
        raise CSAInputError(f"aps_before ({before.size}) and aps_after ({after.size}) must hold the same queries")
    gain = after - before
    keep = np.flatnonzero(~np.isnan(gain))
    outcome = np.where(gain[keep] > 0, "helped", np.where(gain[keep] < 0, "hurt", "unchanged"))
    table = pd.DataFrame({"query": keep, "ap_before": before[keep], "ap_after": after[keep], "gain": gain[keep],
                          "outcome": outcome})
    return table.sort_values(["gain", "query"], kind="stable").reset_index(drop=True)


def pick_median_gain_query(aps_before: Any, aps_after: Any) -> int:
    """The query whose AP gain is the median of all queries' gains (lower median; ties: smaller index).

    A rule fixed before looking: neither the best nor the worst case, the typical one.
    """
    gains = ap_gains(aps_before, aps_after)
    if gains.empty:
        raise CSAInputError("no query has positives under this protocol: there is no gain to take the median of")
    median = gains["gain"].iloc[(len(gains) - 1) // 2]
    return int(gains.loc[gains["gain"] == median, "query"].min())


def pick_median_positives_sample(training_set: Any) -> int:
    """The training sample whose count of positives among its K tokens is the median (lower median; ties:
    the first sample).  ``training_set`` is a :class:`csa.training.sampler.TrainingSet`; returns its item index.

    The token set of a sample does not depend on the epoch's random order, so neither does the choice.
    """
    table, clusters, queries = training_set.table, np.asarray(training_set.clusters), np.asarray(training_set.queries)
    if queries.size == 0:
        raise CSAInputError("the training set has no samples")
    neighbours = np.asarray(table.indices)[queries, 1: table.topk + 1]
    counts = (clusters[neighbours] == clusters[queries][:, None]).sum(axis=1)
    median = np.sort(counts)[(counts.size - 1) // 2]
    return int(np.flatnonzero(counts == median)[0])
