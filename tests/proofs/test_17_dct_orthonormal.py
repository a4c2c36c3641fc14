"""Check of proofs/17-dct-orthonormal.md: the orthonormal DCT-II matrix D_n is orthogonal, so ``dct`` is an
isometry whose inverse is its adjoint ``idct``, and the 2-D transform is D_m X D_nᵀ.

Sympy proves the telescoping identity behind Σ_j cos((2j+1)θ) = sin(2nθ)/(2 sin θ) and the exact Gram
matrix D_n D_nᵀ = I for small n; the library's ``dct_matrix``, ``dct``, ``idct``, ``dct2``, ``idct2`` are
compared with the closed form, with ``scipy.fft.dct`` and with torch autograd (the adjoint).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import dct, dct2, dct_matrix, idct, idct2
from tests.conftest import tol

TOL = tol("float64")


def _D_sym(n: int) -> sp.Matrix:
    def entry(k, j):
        s = sp.sqrt(sp.Rational(1, n)) if k == 0 else sp.sqrt(sp.Rational(2, n))
        return s * sp.cos(sp.pi * k * (2 * j + 1) / (2 * n))

    return sp.Matrix(n, n, entry)


# ----------------------------------------------------------------------------- sympy
def test_sympy_telescoping_cosine_sum():
    """2 sin θ cos((2j+1)θ) = F(j+1) − F(j) with F(j) = sin(2jθ), so Σ_{j<n} = sin(2nθ)/(2 sin θ)."""
    j = sp.Symbol("j", integer=True, nonnegative=True)
    th = sp.Symbol("theta", real=True)
    summand = 2 * sp.sin(th) * sp.cos((2 * j + 1) * th)

    def F(k):
        return sp.sin(2 * k * th)

    assert sp.expand((summand - (F(j + 1) - F(j))).rewrite(sp.exp)) == 0
    for n in range(1, 7):
        total = sum(summand.subs(j, jj) for jj in range(n))
        assert sp.simplify((total - sp.sin(2 * n * th)).rewrite(sp.exp).expand()) == 0
    # at θ = πd/(2n) with 0 < d < 2n, sin(2nθ) = 0 while sin θ ≠ 0: the off-diagonal Gram sums vanish
    n = 5
    for d in range(1, 2 * n):
        th_d = sp.pi * d / (2 * n)
        assert sp.sin(2 * n * th_d) == 0 and sp.sin(th_d) != 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_sympy_exact_gram_matrix(n):
    D = _D_sym(n)
    G = D * D.T
    assert all(sp.simplify(G[k, l] - (1 if k == l else 0)) == 0 for k in range(n) for l in range(n))
    np.testing.assert_allclose(dct_matrix(n), np.array(D.evalf(30).tolist(), dtype=np.float64), rtol=0, atol=1e-15)


def test_sympy_negative_control_unscaled_dc_row_breaks_orthonormality():
    """Weaken the scale s_0 = √(1/n) to √(2/n) (one scale for every row): D Dᵀ is no longer I."""
    n = 4
    D = _D_sym(n)
    D[0, :] = D[0, :] * sp.sqrt(2)
    assert sp.simplify((D * D.T)[0, 0] - 1) != 0


# ----------------------------------------------------------------------------- library
@given(n=st.integers(1, 64), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3))
def test_library_dct_is_the_orthogonal_matrix(n, seed, batch):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n))
    D = dct_matrix(n)
    np.testing.assert_allclose(D @ D.T, np.eye(n), rtol=0, atol=1e-13)
    y = dct(x)
    np.testing.assert_allclose(y, x @ D.T, **TOL)
    np.testing.assert_allclose(y, scipy.fft.dct(x, type=2, norm="ortho", axis=-1), **TOL)  # independent code
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)  # isometry
    np.testing.assert_allclose(idct(y), x, **TOL)  # inverse
    z = rng.standard_normal((batch, n))
    assert np.sum(dct(x) * z) == pytest.approx(np.sum(x * idct(z)), rel=1e-10, abs=1e-12)  # adjoint = inverse


@pytest.mark.parametrize(("m", "n"), [(5, 7), (16, 3), (1, 9)])
def test_library_2d_dct_and_torch_adjoint(m, n):
    rng = np.random.default_rng(m + n)
    X = rng.standard_normal((m, n))
    Dm, Dn = dct_matrix(m), dct_matrix(n)
    np.testing.assert_allclose(dct2(X), Dm @ X @ Dn.T, **TOL)
    np.testing.assert_allclose(idct2(dct2(X)), X, **TOL)
    Xt = torch.from_numpy(X).requires_grad_(True)
    G = rng.standard_normal((m, n))
    (dct2(Xt) * torch.from_numpy(G)).sum().backward()
    np.testing.assert_allclose(Xt.grad.numpy(), idct2(G), **TOL)  # ∇ through the transform = its adjoint


def test_negative_control_unnormalized_dct_is_not_an_isometry_and_misranks_coefficients():
    """Drop the orthonormal scaling ('backward'): the gain differs between the DC row and the others, so
    ranking its coefficients by magnitude no longer finds the best 1-term approximation."""
    n = 8
    e0 = np.ones(n) / np.sqrt(n)  # the DC basis vector
    e1 = dct_matrix(n)[1]  # the first cosine basis vector
    g0 = np.linalg.norm(dct(e0, norm="backward"))
    g1 = np.linalg.norm(dct(e1, norm="backward"))
    assert g0 / g1 == pytest.approx(np.sqrt(2), rel=1e-12)  # two different gains: not a scaled isometry
    x = 0.8 * e0 + 1.0 * e1  # the cosine term carries more energy than the DC term ...
    yb = dct(x, norm="backward")
    yo = dct(x)
    assert np.argmax(np.abs(yo)) == 1  # ... the orthonormal ranking keeps it (the optimum, Theorem 6)
    assert np.argmax(np.abs(yb)) == 0  # the unnormalized ranking over-weights DC by √2 and picks it
    best = np.linalg.norm(x - yo[1] * e1)
    wrong = np.linalg.norm(x - yo[0] * e0)
    assert wrong > best + 0.1
