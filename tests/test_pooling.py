"""GeM, L2N and whitening against float64 re-derivations."""
import numpy as np
import pytest
import torch

from csa.descriptors.pooling import GeM, L2N, Whitening, gem, l2n, whiten_apply
from csa.validation import CSAInputError


def _gem_reference(x: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    x = np.maximum(x.astype(np.float64), eps)
    b, c, h, w = x.shape
    return (np.sum(x ** p, axis=(2, 3)) / (h * w)) ** (1.0 / p)


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_matches_float64_formula(p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 7)).astype(np.float32)  # negatives are clamped to eps
    got = gem(torch.from_numpy(x), p).numpy()
    np.testing.assert_allclose(got, _gem_reference(x, p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(GeM(p)(torch.from_numpy(x)).numpy(), got, rtol=1e-6, atol=0)


def test_gem_p1_is_mean_and_large_p_tends_to_max():
    x = torch.rand(1, 4, 5, 6) + 0.1
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=(2, 3)))
    torch.testing.assert_close(gem(x.double(), 200.0), x.double().amax(dim=(2, 3)), rtol=2e-2, atol=0)


def test_gem_learnable_p_gets_gradient_and_fixed_p_is_a_buffer():
    learn = GeM(3.0, learnable=True)
    assert isinstance(learn.p, torch.nn.Parameter) and learn.p.shape == (1,)
    learn(torch.rand(2, 3, 4, 4) + 0.1).sum().backward()
    assert learn.p.grad is not None and learn.p.grad.abs().item() > 0
    fixed = GeM(3.0)
    assert list(fixed.parameters()) == [] and "p" in fixed.state_dict()
    with pytest.raises(CSAInputError):
        GeM(0.0)
    with pytest.raises(CSAInputError):
        gem(torch.rand(3, 4), 3.0)


def test_l2n_numpy_and_torch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    ref = x / (np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(l2n(x), ref, rtol=1e-6)
    np.testing.assert_allclose(L2N()(torch.from_numpy(x)).numpy(), ref, rtol=1e-6)
    assert isinstance(l2n(x), np.ndarray)


def test_whitening_matches_numpy_column_formula():
    rng = np.random.default_rng(2)
    d, n = 6, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    m = rng.normal(size=(d, 1))            # cirtorch stores m as (D, 1) and P as (D', D)
    P = rng.normal(size=(d, d))
    cols = P @ (x.T.astype(np.float64) - m)  # cirtorch's whitenapply on D x N columns
    ref = (cols / (np.linalg.norm(cols, axis=0, keepdims=True) + 1e-6)).T
    np.testing.assert_allclose(whiten_apply(x, m, P), ref, rtol=1e-5, atol=1e-6)
    assert whiten_apply(x, m, P).dtype == np.float32
    np.testing.assert_allclose(Whitening(m, P)(torch.from_numpy(x)).numpy(), ref, rtol=1e-4, atol=1e-5)
    cols3 = P[:3] @ (x.T.astype(np.float64) - m)
    ref3 = (cols3 / np.linalg.norm(cols3, axis=0, keepdims=True)).T
    np.testing.assert_allclose(whiten_apply(x, m, P, dimensions=3), ref3, rtol=1e-5, atol=1e-6)
    with pytest.raises(CSAInputError, match="whitening shapes"):
        whiten_apply(x, m, P[:, :4])
