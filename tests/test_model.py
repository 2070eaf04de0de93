"""RerankTransformer: official parameter layout, init, attention kernel, and a float64 plain-math
re-derivation of the whole forward pass from the state dict."""
import math

import numpy as np
import pytest
import torch

from csa.model import Attention, RerankTransformer
from csa.validation import CSAInputError

SMALL = dict(anchor_len=16, embed_dim=32, depth=2, num_heads=4)


def official_keys(depth, qkv_bias=True):
    """Parameter names/shapes of the official model, written out from its module structure."""
    def shapes(L, C, H):
        out = {"topk_proj.weight": (C, L), "topk_proj.bias": (C,),
               "feature_align.layers.0.weight": (L, C), "feature_align.layers.0.bias": (L,)}
        for b in range(depth):
            p = f"blocks.{b}."
            out.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,), p + "attn.qkv.weight": (3 * C, C),
                        p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
                        p + "norm2.weight": (C,), p + "norm2.bias": (C,),
                        p + "mlp.fc1.weight": (H, C), p + "mlp.fc1.bias": (H,),
                        p + "mlp.fc2.weight": (C, H), p + "mlp.fc2.bias": (C,)})
            if qkv_bias:
                out[p + "attn.qkv.bias"] = (3 * C,)
        return out
    return shapes


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_state_dict_matches_official_layout(qkv_bias):
    m = RerankTransformer(anchor_len=16, embed_dim=32, depth=3, num_heads=4, qkv_bias=qkv_bias)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == official_keys(3, qkv_bias)(16, 32, 128)


def test_paper_size_layout_and_defaults():
    m = RerankTransformer()
    assert m.config == dict(anchor_len=512, embed_dim=768, depth=2, num_heads=12, mlp_ratio=4, qkv_bias=True,
                            drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == official_keys(2)(512, 768, 3072)
    assert m.no_weight_decay() == {"feature_align"}


def test_init_and_drop_path_schedule():
    torch.manual_seed(0)
    m = RerankTransformer(anchor_len=256, embed_dim=128, depth=3, num_heads=4, drop_path_rate=0.3)
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name
    assert [b.drop_path.drop_prob for b in m.blocks] == pytest.approx([0.0, 0.15, 0.3])


def test_config_rebuilds_same_architecture():
    m = RerankTransformer(**SMALL, qkv_bias=False, drop_rate=0.0)
    m2 = RerankTransformer(**m.config)
    m2.load_state_dict(m.state_dict(), strict=True)
    assert m2.config == m.config


def test_sdpa_attention_equals_plain_softmax():
    torch.manual_seed(1)
    att = Attention(32, 4, qkv_bias=True).eval()
    with torch.no_grad():
        att.qkv.bias.normal_()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        got = att(x)
        q, k, v = att.qkv(x).reshape(3, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
        w = torch.softmax((q @ k.transpose(-1, -2)) * 8 ** -0.5, dim=-1)
        ref = att.proj((w @ v).transpose(1, 2).reshape(3, 7, 32))
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def _reference_forward(sd, affinity, depth, heads):
    """Independent float64 numpy transcription of the model's semantics from its state dict."""
    P = {k: v.detach().double().numpy() for k, v in sd.items()}

    def lin(x, name):
        return x @ P[name + ".weight"].T + P.get(name + ".bias", 0.0)

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * P[name + ".weight"] + P[name + ".bias"]

    erf = np.vectorize(math.erf)
    x = lin(affinity.double().numpy(), "topk_proj")
    B, N, C = x.shape
    d = C // heads
    for b in range(depth):
        p = f"blocks.{b}."
        h = lin(ln(x, p + "norm1"), p + "attn.qkv")
        out = np.zeros_like(x)
        for hd in range(heads):
            q = h[..., hd * d:(hd + 1) * d]
            k = h[..., C + hd * d:C + (hd + 1) * d]
            v = h[..., 2 * C + hd * d:2 * C + (hd + 1) * d]
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[..., hd * d:(hd + 1) * d] = (s / s.sum(-1, keepdims=True)) @ v
        x = x + lin(out, p + "attn.proj")
        h = lin(ln(x, p + "norm2"), p + "mlp.fc1")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = x + lin(h, p + "mlp.fc2")
    rec = lin(x, "feature_align.layers.0")
    n = x / np.linalg.norm(x, axis=-1, keepdims=True)
    score = np.einsum("bkc,bc->bk", n[:, 1:], n[:, 0])
    return x, rec, score


def test_forward_equals_float64_official_semantics():
    torch.manual_seed(2)
    m = RerankTransformer(**SMALL).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(10)
    aff = torch.rand(3, 9, 16) * 2 - 1
    with torch.no_grad():
        tokens, rec = m(aff)
        score = m.score(aff)
    rt, rr, rs = _reference_forward(m.state_dict(), aff, 2, 4)
    assert tokens.shape == (3, 9, 32) and rec.shape == (3, 9, 16) and score.shape == (3, 8)
    np.testing.assert_allclose(tokens.numpy(), rt, rtol=1e-4, atol=1e-4 * np.abs(rt).max())
    np.testing.assert_allclose(rec.numpy(), rr, rtol=1e-4, atol=1e-4 * np.abs(rr).max())
    np.testing.assert_allclose(score.numpy(), rs, atol=1e-5)
    assert score.dtype == torch.float32
    # the scores really vary (the test would be weak if all cosines were ~1)
    assert rs.std() > 0.05


def test_train_mode_is_stochastic_eval_is_not():
    torch.manual_seed(3)
    m = RerankTransformer(**SMALL)
    aff = torch.rand(2, 5, 16)
    m.train()
    assert not torch.equal(m(aff)[0], m(aff)[0])
    m.eval()
    assert torch.equal(m(aff)[0], m(aff)[0])
    # number of tokens is free; each sample is independent of the others in the batch
    with torch.no_grad():
        full = m.score(aff)
        torch.testing.assert_close(m.score(aff[1:]), full[1:])


def test_score_under_bf16_autocast_is_float32_and_close():
    torch.manual_seed(4)
    m = RerankTransformer(**SMALL).eval()
    aff = torch.rand(2, 6, 16)
    with torch.no_grad():
        ref = m.score(aff)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.score(aff)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=0)


def test_wrong_anchor_len_is_rejected():
    m = RerankTransformer(**SMALL)
    with pytest.raises(CSAInputError, match="anchor_len=16"):
        m(torch.rand(1, 4, 15))


def test_cpu_training_attention_with_dropout_equals_the_formula_and_its_gradients():
    """The CPU training attention (hand-written backward) against autograd through the float64 formula
    softmax(q k^T s) * mask @ v, with the very mask it drew (same seed)."""
    from csa.cpu_kernels import CPUDropoutAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, 9, 4, generator=g)
    p, scale = 0.3, 0.5
    torch.manual_seed(7)
    out = CPUDropoutAttention.apply(q, k, v, p, scale)
    out.backward(grad_out)
    torch.manual_seed(7)
    mask = (torch.rand(2, 3, 9, 9) >= p).double() / (1 - p)
    assert 0 < int((mask == 0).sum()) < mask.numel()  # some probabilities dropped, not all
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = (torch.softmax(q64 @ k64.transpose(-2, -1) * scale, dim=-1) * mask) @ v64
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products, float32 softmax
        torch.manual_seed(7)
        out16 = CPUDropoutAttention.apply(q.bfloat16(), k.bfloat16(), v.bfloat16(), p, scale)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), ref.detach(), rtol=5e-2, atol=5e-2)


def test_cpu_training_dropout_keeps_1_minus_p_scaled_and_routes_gradients_through_the_mask():
    from csa.cpu_kernels import Dropout

    drop = Dropout(0.1)
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    n = kept.numel()
    assert abs(int(kept.sum()) - 0.9 * n) < 5 * (0.09 * n) ** 0.5          # binomial(n, 0.9), 5 sigma
    torch.testing.assert_close(y[kept], torch.full((int(kept.sum()),), 1 / 0.9))
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, torch.where(kept, 2 / 0.9, 0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert drop(x.bfloat16()).dtype == torch.bfloat16
    drop.eval()
    assert drop(x) is x
