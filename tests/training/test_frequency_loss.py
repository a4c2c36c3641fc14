"""HiPA's high-frequency-promoting loss (``training.frequency_loss``) against dense NumPy references in float64.

References are independent code: ``numpy.fft`` for the mask, the filter and both norms, ``scipy.signal.correlate2d``
for the Sobel responses.  Tolerance: the float64 one (1e-10 relative, tests/conftest.py) -- an FFT of at most 13×11
bins of O(1) numbers rounds at ~1e-15.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.training.frequency_loss import (
    edge_loss,
    high_frequency_loss,
    high_pass,
    high_pass_mask,
    hipa_loss,
    sobel_edges,
)
from tests.conftest import tol

TOL = tol("float64")
SHAPES = [(8, 8), (7, 10), (13, 11), (1, 6)]


def _np_mask(H, W, c):
    f, g = np.fft.fftfreq(H), np.fft.fftfreq(W)
    return np.sqrt(f[:, None] ** 2 + g[None, :] ** 2) > c


def _np_high_pass(x, c):
    """Dense reference: numpy's FFT of each (H, W) slice, masked, inverted; returns the complex result."""
    return np.fft.ifft2(np.fft.fft2(x, axes=(-2, -1)) * _np_mask(*x.shape[-2:], c), axes=(-2, -1))


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randn(*shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("c", [0.0, 0.1, 0.25, 0.5])
def test_mask_matches_numpy_and_is_point_symmetric(H, W, c):
    M = high_pass_mask(H, W, c).numpy()
    np.testing.assert_array_equal(M, _np_mask(H, W, c))
    mirror = M[(-np.arange(H)) % H][:, (-np.arange(W)) % W]
    np.testing.assert_array_equal(M, mirror)
    assert not M[0, 0]  # the mean is never high-frequency


@pytest.mark.parametrize("H,W", SHAPES)
def test_high_pass_matches_numpy_and_is_real(H, W):
    x, _ = _pair((3, H, W))
    ref = _np_high_pass(x.numpy(), 0.2)
    assert np.abs(ref.imag).max() < 1e-12  # the mask's point symmetry makes the filtered signal real
    np.testing.assert_allclose(high_pass(x, 0.2).numpy(), ref.real, **TOL)


@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("c", [0.0, 0.3])
def test_l2_loss_is_the_spatial_mean_square_of_the_filtered_error(H, W, c):
    x, y = _pair((2, 3, H, W), seed=1)
    ref = np.mean(np.abs(_np_high_pass((x - y).numpy(), c)) ** 2)
    got = high_frequency_loss(x, y, cutoff=c, norm="l2")
    assert got.ndim == 0
    np.testing.assert_allclose(got.item(), ref, **TOL)


@pytest.mark.parametrize("H,W", SHAPES)
def test_l1_loss_matches_numpy(H, W):
    x, y = _pair((4, H, W), seed=2)
    ref = np.mean(np.abs(_np_high_pass((x - y).numpy(), 0.25).real))
    np.testing.assert_allclose(high_frequency_loss(x, y, cutoff=0.25, norm="l1").item(), ref, **TOL)


def test_cutoff_zero_is_the_mean_square_of_the_centred_error():
    x, y = _pair((5, 9, 7), seed=3)
    d = (x - y).numpy()
    ref = np.mean((d - d.mean(axis=(-2, -1), keepdims=True)) ** 2)
    np.testing.assert_allclose(high_frequency_loss(x, y, cutoff=0.0).item(), ref, **TOL)


def test_loss_sees_only_frequencies_above_the_cutoff():
    """A cosine at 1/8 cycle per sample costs nothing with c = 0.25; a checkerboard (1/2, 1/2) costs its full power."""
    i, j = torch.meshgrid(torch.arange(16.0, dtype=torch.float64), torch.arange(16.0, dtype=torch.float64),
                          indexing="ij")
    low = torch.cos(2 * math.pi * i / 8)
    checker = (-1.0) ** (i + j)
    zero = torch.zeros_like(low)
    assert high_frequency_loss(low, zero, cutoff=0.25).item() < 1e-28
    np.testing.assert_allclose(high_frequency_loss(checker, zero, cutoff=0.25).item(), 1.0, **TOL)
    np.testing.assert_allclose(high_frequency_loss(low + checker, zero, cutoff=0.25).item(), 1.0, **TOL)
    # the spatial MSE charges the low-frequency cosine its full power 1/2
    assert torch.nn.functional.mse_loss(low, zero).item() == pytest.approx(0.5)


@pytest.mark.parametrize("H,W", [(6, 6), (5, 9)])
def test_sobel_matches_scipy(H, W):
    x, _ = _pair((2, H, W), seed=4)
    k = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    sh, sv = sobel_edges(x)
    for b in range(2):
        xb = x[b].numpy()
        np.testing.assert_allclose(sh[b].numpy(), scipy.signal.correlate2d(xb, k, mode="same"), **TOL)
        np.testing.assert_allclose(sv[b].numpy(), scipy.signal.correlate2d(xb, k.T, mode="same"), **TOL)


def test_edge_loss_and_hipa_loss_compose_as_documented():
    x, y = _pair((2, 3, 8, 8), seed=5)
    k = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    d = (x - y).numpy().reshape(-1, 8, 8)
    ref_edge = 0.5 * (np.mean([np.abs(scipy.signal.correlate2d(s, k, mode="same")) for s in d])
                      + np.mean([np.abs(scipy.signal.correlate2d(s, k.T, mode="same")) for s in d]))
    np.testing.assert_allclose(edge_loss(x, y).item(), ref_edge, **TOL)
    ref_hf = np.mean(np.abs(_np_high_pass(d, 0.25)) ** 2)
    mse = np.mean(d**2)
    np.testing.assert_allclose(hipa_loss(x, y, hf_weight=2.0, edge_weight=0.5).item(),
                               mse + 2.0 * ref_hf + 0.5 * ref_edge, **TOL)
    l1 = lambda a, b: (a - b).abs().mean()  # noqa: E731 - a user's spatial term
    np.testing.assert_allclose(hipa_loss(x, y, hf_weight=0.0, spatial=l1).item(), np.mean(np.abs(d)), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_matches_float64(dtype):
    """float32: 2e-4 relative (tests/conftest.py).  Half inputs are transformed in float32 and the result rounded
    once to the input dtype (bf16: 2^-8 = 4e-3 relative; 1e-2 allowed against the float64 loss of the same rounded
    inputs); against the unrounded inputs their own rounding adds about as much again (3e-2 allowed)."""
    x, y = _pair((3, 7, 8), seed=8)
    ref = high_frequency_loss(x, y).item()
    xl, yl = x.to(dtype), y.to(dtype)
    got = high_frequency_loss(xl, yl)
    assert got.dtype == dtype
    exact_inputs = high_frequency_loss(xl.double(), yl.double()).item()  # the same rounded inputs, in float64
    rtol = 2e-4 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(got.float().item(), exact_inputs, rtol=rtol)
    np.testing.assert_allclose(got.float().item(), ref, rtol=2e-4 if dtype == torch.float32 else 3e-2)
    assert high_pass(xl).dtype == dtype


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_gradcheck(norm):
    x, y = _pair((2, 5, 6), seed=6)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: high_frequency_loss(a, y, cutoff=0.2, norm=norm), (x,))
    assert torch.autograd.gradcheck(lambda a: hipa_loss(a, y, edge_weight=1.0, norm=norm), (x,))


def test_l2_gradient_is_the_projector_applied_to_the_error():
    """d/dx (1/N)‖P(x−y)‖² = (2/N) P(x−y) for each image (P symmetric idempotent; averaged over the batch of 3)."""
    x, y = _pair((3, 7, 8), seed=7)
    x.requires_grad_(True)
    high_frequency_loss(x, y, cutoff=0.2).backward()
    ref = 2.0 / (7 * 8) / 3 * _np_high_pass((x - y).detach().numpy(), 0.2).real
    np.testing.assert_allclose(x.grad.numpy(), ref, **TOL)


def test_trains_a_lora_adaptor_toward_the_target_high_frequencies():
    """The paper's use: LoRA adaptors trained with the loss.  Gradients reach the factors (B first: B = 0 at
    init) and 60 Adam steps cut the high-frequency error of the adapted layer's 8×8 outputs by > 10×."""
    torch.manual_seed(0)
    base = nn.Linear(16, 64).double()
    layer = AdaptedLinear(base, adapters.create("lora", 64, 16, rank=4, alpha=4).double())
    x = torch.randn(32, 16, dtype=torch.float64)
    with torch.no_grad():
        W_target = base.weight + 0.5 * torch.randn(64, 4, dtype=torch.float64) @ torch.randn(4, 16, dtype=torch.float64)
        target = (x @ W_target.T + base.bias).reshape(32, 8, 8)

    def loss():
        return hipa_loss(layer(x).reshape(32, 8, 8), target, hf_weight=4.0, edge_weight=0.1)

    start = high_frequency_loss(layer(x).reshape(32, 8, 8), target).item()
    loss().backward()
    ad = layer.adapter
    assert ad.B.grad.abs().max() > 0 and ad.A.grad.abs().max() == 0
    opt = torch.optim.Adam(ad.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    end = high_frequency_loss(layer(x).reshape(32, 8, 8), target).item()
    assert end < start / 10, (start, end)
    assert base.weight.grad is None  # the frozen base is untouched


# ----------------------------------------------------------------------------- bad arguments
X = torch.zeros(2, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: high_frequency_loss(X, torch.zeros(2, 4, 5, dtype=torch.float64)), ValueError, "target"),
    (lambda: high_frequency_loss(torch.zeros(4), torch.zeros(4)), ValueError, "pred"),
    (lambda: high_frequency_loss(X.long(), X.long()), TypeError, "pred"),
    (lambda: high_frequency_loss(X.numpy(), X), TypeError, "pred"),
    (lambda: high_frequency_loss(X, X.to(torch.complex128)), TypeError, "target"),
    (lambda: high_frequency_loss(X, X, cutoff=0.75), ValueError, "cutoff"),
    (lambda: high_frequency_loss(X, X, cutoff=-0.1), ValueError, "cutoff"),
    (lambda: high_frequency_loss(X, X, cutoff=float("nan")), TypeError, "cutoff"),
    (lambda: high_frequency_loss(X, X, norm="l3"), ValueError, "norm"),
    (lambda: hipa_loss(X, X, hf_weight=-1.0), ValueError, "hf_weight"),
    (lambda: hipa_loss(X, X, edge_weight=float("inf")), ValueError, "edge_weight"),
    (lambda: hipa_loss(X, X, spatial="mse"), TypeError, "spatial"),
    (lambda: hipa_loss(X, X, norm="max"), ValueError, "norm"),
    (lambda: high_pass_mask(0, 4, 0.1), ValueError, "height"),
    (lambda: high_pass_mask(4, 2.5, 0.1), ValueError, "width"),
    (lambda: sobel_edges(torch.zeros(3)), ValueError, "x"),
])
def test_bad_arguments_name_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
