"""Check of proofs/18-spectral-coefficient-gradient.md: ∂L/∂a_i of a sparse-spectrum update is
s Σ_t (C_m g_t)_{k_i} (C_n x_t)_{l_i} (DCT, LoCA) or (s/mn) Σ_t Re(Ĝ_{t k_i} X̂_{t l_i}) (DFT, FourierFT).

Sympy differentiates gᵀ ΔW(a) x built from exact transform matrices; the library's ``coefficient_grad``
(the dense path's backward) is compared with the formulas written with NumPy/SciPy transforms and with
autograd through ``delta_weight``.  Tolerance: float64 ``tol`` (1e-10 relative): each side is one or
two FFT-sized transforms and a sum over at most 5 tokens of O(1) numbers, round-off ~1e-15.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from tests.conftest import tol
from tests.proofs.test_17_dct_orthonormal import _D_sym

RTOL = tol("float64")["rtol"]
M, N = 3, 4
# complex Ĝ_k and X̂_l at both cells (so the sign of their imaginary product matters); (2, 3) is past both middles
CELLS = [(1, 1), (2, 3)]


def _symbols():
    a = sp.symbols("a0:2", real=True)
    x = sp.Matrix(sp.symbols(f"x0:{N}", real=True))
    g = sp.Matrix(sp.symbols(f"g0:{M}", real=True))
    s = sp.Symbol("s", positive=True)
    F = sp.zeros(M, N)
    for ai, (k, l) in zip(a, CELLS):
        F[k, l] += ai
    return a, x, g, s, F


def test_sympy_chain_rule_dct():
    a, x, g, s, F = _symbols()
    Cm, Cn = _D_sym(M), _D_sym(N)
    L = (g.T * (s * Cm.T * F * Cn) * x)[0, 0]
    gh, xh = Cm * g, Cn * x
    for ai, (k, l) in zip(a, CELLS):
        assert sp.simplify(sp.diff(L, ai) - s * gh[k] * xh[l]) == 0


def test_sympy_chain_rule_dft():
    a, x, g, s, F = _symbols()

    def omega(n, sign):
        return sp.Matrix(n, n, lambda p, k: sp.exp(sign * 2 * sp.pi * sp.I * p * k / n))

    dW = (s / (M * N)) * (omega(M, 1) * F * omega(N, 1)).applyfunc(lambda z: sp.re(sp.expand_complex(z)))
    L = (g.T * dW * x)[0, 0]
    G, X = omega(M, -1) * g, omega(N, -1) * x  # unnormalized forward FFTs (symmetric kernels)
    for ai, (k, l) in zip(a, CELLS):
        formula = (s / (M * N)) * sp.re(sp.expand_complex(G[k] * X[l]))
        assert sp.simplify(sp.expand_complex(sp.diff(L, ai) - formula)) == 0


def _formula(name, ad, x, g):
    k, l = ad.locations[:, 0].numpy(), ad.locations[:, 1].numpy()
    m, n = ad.d_out, ad.d_in
    if name == "loca":
        gh = scipy.fft.dct(g, norm="ortho", axis=-1)
        xh = scipy.fft.dct(x, norm="ortho", axis=-1)
        return ad.scale * (gh[:, k] * xh[:, l]).sum(0)
    G, X = np.fft.fft(g, axis=-1), np.fft.fft(x, axis=-1)
    return ad.scaling / (m * n) * (G[:, k] * X[:, l]).real.sum(0)


def _grad(ad, x, g):
    coef = next(iter(ad.parameters()))
    return ad.coefficient_grad(torch.from_numpy(x), torch.from_numpy(g), coef, True, False).detach().numpy()


@settings(max_examples=30)
@given(st.sampled_from(["fourierft", "loca"]), st.integers(1, 17), st.integers(1, 17), st.integers(1, 5), st.data())
def test_library_coefficient_grad_matches_the_formula(name, m, n, T, data):
    c = data.draw(st.integers(1, m * n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    if name == "loca":  # cells drawn with repeats
        locs = torch.from_numpy(np.stack([rng.integers(0, m, c), rng.integers(0, n, c)], axis=1))
        ad = adapters.create("loca", m, n, n_frequency=c, scale=1.7, locations=locs).double()
    else:
        ad = adapters.create("fourierft", m, n, n_frequency=c, scaling=20.0, random_loc_seed=int(rng.integers(99)))
        ad = ad.double()
    with torch.no_grad():
        next(iter(ad.parameters())).copy_(torch.from_numpy(rng.standard_normal(c)))
    x, g = rng.standard_normal((T, n)), rng.standard_normal((T, m))
    got = _grad(ad, x, g)
    want = _formula(name, ad, x, g)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(1.0, np.abs(want).max()))
    coef = next(iter(ad.parameters()))
    L = (torch.from_numpy(g) * (torch.from_numpy(x) @ ad.delta_weight().T)).sum()
    (auto,) = torch.autograd.grad(L, coef)
    np.testing.assert_allclose(got, auto.numpy(), rtol=RTOL, atol=RTOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_negative_controls(name):
    """A dropped conjugation (DFT) or the inverse DCT applied to g (DCT) changes the gradient."""
    m, n, T = 9, 12, 4
    rng = np.random.default_rng(0)
    ad = adapters.create(name, m, n, n_frequency=20).double()
    x, g = rng.standard_normal((T, n)), rng.standard_normal((T, m))
    got = _grad(ad, x, g)
    k, l = ad.locations[:, 0].numpy(), ad.locations[:, 1].numpy()
    if name == "fourierft":
        G, X = np.fft.fft(g, axis=-1), np.fft.fft(x, axis=-1)
        wrong = ad.scaling / (m * n) * (np.conj(G[:, k]) * X[:, l]).real.sum(0)
    else:
        gh = scipy.fft.idct(g, norm="ortho", axis=-1)
        wrong = ad.scale * (gh[:, k] * scipy.fft.dct(x, norm="ortho", axis=-1)[:, l]).sum(0)
    assert np.linalg.norm(got - wrong) > 0.1 * np.linalg.norm(got)
    np.testing.assert_allclose(got, _formula(name, ad, x, g), rtol=RTOL, atol=RTOL * np.abs(got).max())
