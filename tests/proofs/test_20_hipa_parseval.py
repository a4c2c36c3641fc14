"""Check of proofs/20-hipa-parseval.md: HiPA's spectral high-frequency loss is (1/N) dᵀ P d with P the real
orthogonal projector of a point-symmetric mask, and its gradient is (2/N) P d.

The library's ``high_pass`` builds P column by column (independent of the loss's own frequency-domain formula);
sympy proves the 1×4 case exactly.  Negative controls: a one-sided mask (P's real part has eigenvalue 1/2) and the
L1 norm (degree-1 homogeneous, no quadratic form).  Tolerance: float64's 1e-10 (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch

from lowrank_theory.training.frequency_loss import high_frequency_loss, high_pass, high_pass_mask
from tests.conftest import tol

TOL = tol("float64")
CASES = [(5, 6, 0.2), (6, 6, 0.0), (7, 5, 0.35), (4, 8, 0.5)]


def _dense_projector(H: int, W: int, c: float) -> np.ndarray:
    """P as an N×N real matrix (row-major vec): column j is high_pass of the j-th basis array."""
    N = H * W
    basis = torch.eye(N, dtype=torch.float64).reshape(N, H, W)
    return high_pass(basis, c).reshape(N, N).numpy().T


@pytest.mark.parametrize("H,W,c", CASES)
def test_projector_of_the_radial_mask(H, W, c):
    P = _dense_projector(H, W, c)
    np.testing.assert_allclose(P, P.T, **TOL)
    np.testing.assert_allclose(P @ P, P, **TOL)
    ev = np.linalg.eigvalsh((P + P.T) / 2)
    assert np.all(np.minimum(np.abs(ev), np.abs(ev - 1)) < 1e-10)
    assert round(float(ev.sum())) == int(high_pass_mask(H, W, c).sum())


@pytest.mark.parametrize("H,W,c", CASES)
def test_loss_is_the_quadratic_form_and_the_gradient_is_2Pd_over_N(H, W, c):
    N = H * W
    P = _dense_projector(H, W, c)
    g = torch.Generator().manual_seed(H * 31 + W)
    x = torch.randn(H, W, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(H, W, generator=g, dtype=torch.float64)
    d = (x - y).detach().numpy().ravel()
    L = high_frequency_loss(x, y, cutoff=c)
    np.testing.assert_allclose(L.item(), d @ P @ d / N, **TOL)
    np.testing.assert_allclose(L.item(), np.sum((P @ d) ** 2) / N, **TOL)
    L.backward()
    np.testing.assert_allclose(x.grad.numpy().ravel(), 2 / N * P @ d, **TOL)


def _sym_projector(W: int, keep: set[int]) -> sp.Matrix:
    w = sp.exp(2 * sp.pi * sp.I / W)
    F = sp.Matrix(W, W, lambda k, a: w ** (-k * a))
    Finv = sp.Matrix(W, W, lambda a, k: w ** (k * a) / W)
    return sp.simplify(Finv * sp.diag(*[1 if k in keep else 0 for k in range(W)]) * F)


def test_sympy_point_symmetric_mask_gives_a_real_projector():
    P = _sym_projector(4, {1, 3})
    assert all(sp.simplify(sp.im(e)) == 0 for e in P)
    assert sp.simplify(P - P.T) == sp.zeros(4, 4)
    assert sp.simplify(P * P - P) == sp.zeros(4, 4)
    # Parseval for a symbolic real d: (1/N^2) sum_M |F d|^2 == (1/N) d^T P d
    d = sp.Matrix(sp.symbols("d0:4", real=True))
    w = sp.exp(2 * sp.pi * sp.I / 4)
    Fd = [sum(d[a] * w ** (-k * a) for a in range(4)) for k in range(4)]
    spectral = sum(sp.expand(Fd[k] * sp.conjugate(Fd[k])) for k in (1, 3)) / 16
    assert sp.simplify(spectral - (d.T * P * d)[0] / 4) == 0


def test_negative_control_one_sided_mask():
    # exact: keep bin 1 of 4, drop its mirror bin 3
    P = _sym_projector(4, {1})
    assert any(sp.simplify(sp.im(e)) != 0 for e in P)  # complex output for real input
    ReP = P.applyfunc(lambda e: sp.simplify(sp.re(e)))
    assert sp.simplify(ReP * ReP - ReP) != sp.zeros(4, 4)
    assert set(ReP.eigenvals()) == {sp.Rational(1, 2), 0}
    # float64, 6×6: keep the high-pass bins with f_k > 0 only (no mirror)
    H = W = 6
    M = high_pass_mask(H, W, 0.2).numpy() & (np.fft.fftfreq(H)[:, None] > 0)
    N = H * W
    basis = np.eye(N).reshape(N, H, W)
    Pc = np.fft.ifft2(np.fft.fft2(basis) * M).reshape(N, N).T
    ReP6 = Pc.real
    assert np.abs(ReP6 @ ReP6 - ReP6).max() > 0.1
    d = np.random.default_rng(0).standard_normal(N)
    spectral = np.sum(M * np.abs(np.fft.fft2(d.reshape(H, W))) ** 2) / N**2
    assert abs(spectral - np.sum((ReP6 @ d) ** 2) / N) > 1e-3 * spectral
    # while the symmetric mask of the same cutoff satisfies the identity (the positive case, same d)
    P6 = _dense_projector(H, W, 0.2)
    dt = torch.tensor(d.reshape(H, W))
    np.testing.assert_allclose(high_frequency_loss(dt, torch.zeros_like(dt), cutoff=0.2).item(), d @ P6 @ d / N, **TOL)


def test_negative_control_l1_is_not_a_quadratic_form():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(6, 7, generator=g, dtype=torch.float64)
    z = torch.zeros_like(d)
    l1, l1_3 = (high_frequency_loss(t * d, z, norm="l1").item() for t in (1.0, 3.0))
    l2, l2_3 = (high_frequency_loss(t * d, z, norm="l2").item() for t in (1.0, 3.0))
    np.testing.assert_allclose(l2_3, 9 * l2, **TOL)  # degree 2: a quadratic form
    np.testing.assert_allclose(l1_3, 3 * l1, **TOL)  # degree 1
    assert abs(l1_3 - 9 * l1) > 1.0 * l1  # so no Q gives l1 = dᵀQd/N
