"""rerank / rerank_scores vs a naive per-query loop written like the official test loop."""
import numpy as np
import pytest
import torch

from csa.model import RerankTransformer
from csa.device import resolve_precision
from csa.rerank import rerank, rerank_scores
from csa.search import first_stage, rerank_depth
from csa.validation import CSAInputError

L, K = 16, 24


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = RerankTransformer(anchor_len=L, embed_dim=32, depth=2, num_heads=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))    # make scores spread out so the order really changes
    q, db = unit(6, 12, 1), unit(80, 12, 2)
    return model, q, db, first_stage(q, db)


def naive_rerank(model, q, db, ranks, K, L):
    """One query at a time: build tokens/anchors by hand, score, stable argsort, permute top-K."""
    model.eval()
    out = ranks.copy()
    all_scores = []
    for j in range(len(q)):
        tokens = np.stack([q[j]] + [db[i] for i in ranks[:K, j]])
        anchors = np.stack([q[j]] + [db[i] for i in ranks[:L - 1, j]])
        aff = torch.from_numpy(tokens @ anchors.T)[None]
        with torch.no_grad():
            s = model.score(aff)[0].numpy()
        all_scores.append(s)
        out[:K, j] = ranks[:K, j][np.argsort(-s, kind="stable")]
    return out, np.stack(all_scores)


def test_matches_naive_loop(setup):
    model, q, db, ranks = setup
    model.train()
    ref, ref_scores = naive_rerank(model, q, db, ranks, K, L)
    model.train()
    got = rerank(model, q, db, ranks, topk=K, anchor_len=L, batch_size=4, progress=False)
    assert model.training  # mode restored
    assert isinstance(got, np.ndarray) and got.shape == ranks.shape and got.dtype == ranks.dtype
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got[:K], ranks[:K])         # the model really re-orders
    np.testing.assert_array_equal(got[K:], ranks[K:])      # the tail is untouched
    for j in range(len(q)):                                # top-K is a permutation of the old top-K
        assert sorted(got[:K, j]) == sorted(ranks[:K, j])
    scores = rerank_scores(model, q, db, ranks, topk=K, anchor_len=L, batch_size=5, progress=False)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_batch_size_kinds_and_truncated_ranks(setup):
    model, q, db, ranks = setup
    a = rerank(model, q, db, ranks, topk=K, anchor_len=L, batch_size=1, progress=False)
    b = rerank(model, q, db, ranks[:K].astype(np.int32), topk=K, anchor_len=L, batch_size=64, progress=False)
    assert b.dtype == np.int32
    np.testing.assert_array_equal(a[:K], b)
    t = rerank(model, torch.from_numpy(q), torch.from_numpy(db), torch.from_numpy(ranks), topk=K, anchor_len=L,
               batch_size=3, progress=False)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), a)
    # K smaller than the anchor count L-1 also works (anchors come from deeper in the list)
    ref, _ = naive_rerank(model, q, db, ranks, 5, L)
    np.testing.assert_array_equal(rerank(model, q, db, ranks, topk=5, anchor_len=L, progress=False), ref)


def test_rerank_depth_is_the_deeper_of_candidates_and_anchors(setup):
    """max(K, L-1): K candidates follow the query; the anchors are the query and its top L-1 images."""
    assert rerank_depth(1024, 512) == 1024 and rerank_depth(128, 512) == 511 and rerank_depth(5, 6) == 5
    model, q, db, ranks = setup
    depth = rerank_depth(5, L)  # exactly that many first-stage rows suffice; one fewer is refused
    full = rerank(model, q, db, ranks, topk=5, anchor_len=L, progress=False)
    np.testing.assert_array_equal(rerank(model, q, db, ranks[:depth], topk=5, anchor_len=L, progress=False),
                                  full[:depth])
    with pytest.raises(CSAInputError):
        rerank(model, q, db, ranks[:depth - 1], topk=5, anchor_len=L, progress=False)


def test_ties_keep_first_stage_order(setup):
    _, q, db, ranks = setup
    flat = RerankTransformer(anchor_len=L, embed_dim=32, depth=1, num_heads=4)
    with torch.no_grad():
        for p in flat.parameters():
            p.zero_()
        flat.blocks[0].mlp.fc2.bias.fill_(1.0)   # every token equals the same constant vector: all scores 1
    s = rerank_scores(flat, q, db, ranks, topk=K, anchor_len=L, progress=False)
    assert np.all(s == s[0, 0])
    np.testing.assert_array_equal(rerank(flat, q, db, ranks, topk=K, anchor_len=L, progress=False), ranks)


def test_bf16_close_to_fp32(setup):
    model, q, db, ranks = setup
    s32 = rerank_scores(model, q, db, ranks, topk=K, anchor_len=L, progress=False)
    s16 = rerank_scores(model, q, db, ranks, topk=K, anchor_len=L, precision="bf16", progress=False)
    assert s16.dtype == np.float32
    assert np.abs(s16 - s32).max() < 0.05
    assert np.corrcoef(s16.ravel(), s32.ravel())[0, 1] > 0.99
    from csa.device import cpu_has_native_bf16

    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert resolve_precision("auto", torch.device("cpu")) is expected
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16


def test_bad_inputs(setup):
    model, q, db, ranks = setup
    kw = dict(progress=False)
    with pytest.raises(CSAInputError, match="model was built for anchor_len=16"):
        rerank(model, q, db, ranks, topk=K, anchor_len=8, **kw)
    with pytest.raises(CSAInputError, match="topk=81 is larger"):
        rerank(model, q, db, ranks, topk=81, anchor_len=L, **kw)
    with pytest.raises(CSAInputError, match="24 are needed"):
        rerank(model, q, db, ranks[:10], topk=K, anchor_len=L, **kw)
    with pytest.raises(CSAInputError, match="dimensions differ"):
        rerank(model, q[:, :6], db, ranks, topk=K, anchor_len=L, **kw)
    bad = q.copy()
    bad[1, 0] = np.nan
    with pytest.raises(CSAInputError, match="NaN"):
        rerank(model, bad, db, ranks, topk=K, anchor_len=L, **kw)
    with pytest.raises(CSAInputError, match="use ranks.T"):
        rerank(model, q, db, ranks.T.copy(), topk=K, anchor_len=L, **kw)
    with pytest.raises(CSAInputError, match="precision"):
        rerank(model, q, db, ranks, topk=K, anchor_len=L, precision="fp16", **kw)
    with pytest.raises(CSAInputError, match="not L2-normalized"):
        rerank(model, q * 2, db, ranks, topk=K, anchor_len=L, normalize="error", **kw)
    for bad, fact in ((0, "batch_size must be >= 1"), (True, "batch_size must be an integer"), (2.0, "integer")):
        with pytest.raises(CSAInputError, match=fact):
            rerank(model, q, db, ranks, topk=K, anchor_len=L, batch_size=bad, **kw)
