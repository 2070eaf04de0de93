"""CSA losses against a float64 direct transcription of the formulas."""
import numpy as np
import pytest
import torch

from csa.losses import CSACriterion, contrastive_loss, reconstruction_loss


def direct_contrastive(tokens, targets, t):
    x = tokens.double().numpy()
    y = targets.double().numpy()
    out = []
    for b in range(x.shape[0]):
        n = x[b] / np.linalg.norm(x[b], axis=1, keepdims=True)
        s = np.exp(np.array([n[0] @ n[i] for i in range(x.shape[1])]) / t)
        out.append(-np.log((s * y[b]).sum() / s.sum()))
    return float(np.mean(out))


def direct_reconstruction(a, r):
    a = a.double().numpy()
    r = r.double().numpy()
    vals = []
    for b in range(a.shape[0]):
        for i in range(a.shape[1]):
            d = a[b, i] / np.linalg.norm(a[b, i]) - r[b, i] / np.linalg.norm(r[b, i])
            vals.append(np.sqrt(min(max(d @ d, 1e-4), 1e4)))
    return float(np.mean(vals))


def _targets(B, K1, gen):
    y = (torch.rand(B, K1, generator=gen) < 0.3).float()
    y[:, 0] = 1
    return y


@pytest.mark.parametrize("t", [2.0, 0.5, 0.05])
def test_contrastive_equals_formula(t):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 9, 8, generator=g)
    y = _targets(4, 9, g)
    got = contrastive_loss(tokens, y, temperature=t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(direct_contrastive(tokens, y, t), rel=1e-5, abs=1e-6)


def test_contrastive_special_cases():
    # all items relevant -> loss 0; only the query relevant and all tokens identical -> log(K+1)
    tokens = torch.randn(2, 5, 4)
    assert contrastive_loss(tokens, torch.ones(2, 5)).item() == pytest.approx(0, abs=1e-6)
    same = torch.ones(1, 5, 4)
    y = torch.zeros(1, 5)
    y[0, 0] = 1
    assert contrastive_loss(same, y).item() == pytest.approx(np.log(5), rel=1e-6)


def test_contrastive_is_stable_at_tiny_temperature():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 7, 6, generator=g, requires_grad=True)
    y = _targets(3, 7, g)
    loss = contrastive_loss(tokens, y, temperature=1e-3)   # exp(1000) overflows a direct float32 version
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tokens.grad).all()
    # compare to float64 direct formula at a temperature float64 can still represent
    l2 = contrastive_loss(tokens.detach(), y, temperature=0.01)
    assert l2.item() == pytest.approx(direct_contrastive(tokens.detach(), y, 0.01), rel=1e-4, abs=1e-5)


def test_reconstruction_equals_formula_including_clamp():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 6, 10, generator=g)
    r = torch.randn(3, 6, 10, generator=g)
    r[0, 0] = 5 * a[0, 0]       # identical direction: squared distance 0 -> clamped to 1e-4 -> 0.01
    got = reconstruction_loss(a, r)
    assert got.item() == pytest.approx(direct_reconstruction(a, r), rel=1e-5)
    one = reconstruction_loss(a[:1, :1], r[:1, :1])
    assert one.item() == pytest.approx(0.01, rel=1e-4)


def test_criterion_combines_terms_and_backprops():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    rec = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    aff = torch.rand(2, 5, 12, generator=g)
    y = _targets(2, 5, g)
    out = CSACriterion(alpha=0.3, temperature=1.5)(tokens, rec, aff, y)
    assert set(out) == {"loss", "contrastive", "reconstruction"}
    expected = direct_contrastive(tokens.detach(), y, 1.5) + 0.3 * direct_reconstruction(aff, rec.detach())
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert tokens.grad.abs().sum() > 0 and rec.grad.abs().sum() > 0


def test_shape_errors():
    with pytest.raises(ValueError):
        contrastive_loss(torch.randn(2, 5, 4), torch.ones(2, 4))
    with pytest.raises(ValueError):
        reconstruction_loss(torch.randn(2, 5, 4), torch.randn(2, 5, 3))
