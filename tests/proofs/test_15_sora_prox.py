"""Check of proofs/15-sora-proximal-step.md: the prox of τ|·| is soft-thresholding, and SoRA's gate step
T_{ηλ}(g − η∇L0) is the proximal-gradient step on L0 + λ‖g‖₁.

Sympy proves the piecewise minimizer region by region (a subgradient certificate plus the exact identity
f(z) − f(z*) = ½(z − z*)² + τ(|z| − s z) ≥ ½(z − z*)²).  The library's ``soft_threshold``,
``sora_proximal_step`` and the ``SoRA`` adapter are then checked by the optimality (KKT) conditions, by a
grid search, and by running proximal gradient to a lasso solution.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters.adaptive_rank import soft_threshold, sora_proximal_step
from tests.conftest import tol

TOL = tol("float64")

tau = sp.Symbol("tau", positive=True)
z = sp.Symbol("z", real=True)


def _f(v):
    return sp.Rational(1, 2) * (z - v) ** 2 + tau * sp.Abs(z)


def _regions():
    """(v, z*, s) per region: v = τ + u (u > 0), v = τw (|w| <= 1), v = −τ − u, with v − z* = τ s."""
    u = sp.Symbol("u", positive=True)
    w = sp.Symbol("w", real=True)
    return [(tau + u, u, sp.Integer(1), []), (tau * w, sp.Integer(0), w, [w]), (-tau - u, -u, sp.Integer(-1), [])]


# ----------------------------------------------------------------------------- sympy
def test_sympy_soft_threshold_is_the_unique_minimizer_on_each_region():
    for v, zstar, s, bounded in _regions():
        assert sp.simplify(v - zstar - tau * s) == 0  # v − z* = τ s
        # s is a subgradient of |·| at z*: s = sign z* where z* ≠ 0, |s| <= 1 where z* = 0
        assert sp.simplify(sp.Abs(zstar) - s * zstar) == 0
        gap = _f(v) - _f(v).subs(z, zstar) - sp.Rational(1, 2) * (z - zstar) ** 2
        assert sp.simplify(sp.expand(gap - tau * (sp.Abs(z) - s * z))) == 0
        # and |z| − s z >= 0 for |s| <= 1 (split on the sign of z)
        zp = sp.Symbol("zp", positive=True)
        for zz in (zp, -zp):
            term = sp.Abs(zz) - s * zz
            if bounded:  # s = w with |w| <= 1: term = zp(1 ∓ w)
                for wv in (-1, sp.Rational(-1, 3), 0, sp.Rational(1, 2), 1):
                    assert term.subs(bounded[0], wv).is_nonnegative
                assert sp.simplify(term - zp * (1 - sp.sign(zz) * bounded[0])) == 0
            else:
                assert term.is_nonnegative
        # the closed form sign(v)·max(|v| − τ, 0) gives this z*
        closed = sp.sign(v) * sp.Max(sp.Abs(v) - tau, 0)
        if bounded:
            for wv in (-1, sp.Rational(-1, 3), 0, sp.Rational(1, 2), 1):
                assert sp.simplify(closed.subs(bounded[0], wv)) == 0
        else:
            assert sp.simplify(closed - zstar) == 0


def test_sympy_proximal_gradient_step_is_the_prox_of_the_gradient_step():
    """⟨∇, z − g⟩ + (z − g)²/(2η) and (z − (g − η∇))²/(2η) differ by a constant in z."""
    g, grad = sp.symbols("g grad", real=True)
    eta = sp.Symbol("eta", positive=True)
    linearized = grad * (z - g) + (z - g) ** 2 / (2 * eta)
    prox_form = (z - (g - eta * grad)) ** 2 / (2 * eta)
    assert sp.simplify(sp.diff(linearized - prox_form, z)) == 0


def test_sympy_negative_control_hard_threshold_is_not_the_prox():
    """Hard thresholding z = v·1{|v| > τ}: at v = 3τ/2 its objective is 3τ²/2 > τ² (soft's)."""
    v = sp.Rational(3, 2) * tau
    f = _f(v)
    assert sp.simplify(f.subs(z, v) - sp.Rational(3, 2) * tau**2) == 0
    assert sp.simplify(f.subs(z, v - tau) - tau**2) == 0


# ----------------------------------------------------------------------------- library
def _kkt_violation(znew: np.ndarray, g: np.ndarray, grad: np.ndarray, eta: float, lam: float) -> float:
    """Distance of 0 from ∇ + (z − g)/η + λ∂|z| (coordinate-wise), the optimality of the prox step."""
    smooth = grad + (znew - g) / eta
    nz = znew != 0
    v = np.where(nz, np.abs(smooth + lam * np.sign(znew)), np.maximum(np.abs(smooth) - lam, 0.0))
    return float(np.max(v)) if v.size else 0.0


@given(r=st.integers(1, 30), seed=st.integers(0, 2**31 - 1), eta=st.floats(1e-3, 2.0), lam=st.floats(0.0, 3.0))
def test_library_step_satisfies_the_optimality_conditions(r, seed, eta, lam):
    rng = np.random.default_rng(seed)
    g, grad = rng.standard_normal(r), rng.standard_normal(r)
    out = sora_proximal_step(torch.from_numpy(g), torch.from_numpy(grad), eta, lam).numpy()
    scale = 1.0 + np.max(np.abs(g)) / eta + np.max(np.abs(grad)) + lam
    assert _kkt_violation(out, g, grad, eta, lam) <= 1e-12 * scale
    v = g - eta * grad
    np.testing.assert_array_equal(out == 0, np.abs(v) <= eta * lam)  # exact zeros, exactly where predicted
    np.testing.assert_allclose(soft_threshold(torch.from_numpy(v), eta * lam).numpy(), out, **TOL)
    # grid search on the objective of each coordinate, as an independent reference
    zs = out[:, None] + np.linspace(-1.0, 1.0, 201)[None, :]

    def Q(Z):
        return grad[:, None] * (Z - g[:, None]) + (Z - g[:, None]) ** 2 / (2 * eta) + lam * np.abs(Z)

    assert np.all(Q(out[:, None])[:, 0] <= Q(zs).min(axis=1) + 1e-12 * scale)


def test_lasso_by_repeated_library_steps_reaches_the_kkt_point():
    """Proximal gradient with η < 1/L converges; its limit satisfies the lasso optimality conditions."""
    rng = np.random.default_rng(0)
    M, y = rng.standard_normal((40, 12)), rng.standard_normal(40)
    lam = 3.0
    L = np.linalg.norm(M, 2) ** 2
    g = torch.zeros(12, dtype=torch.float64)
    Mt, yt = torch.from_numpy(M), torch.from_numpy(y)
    for _ in range(3000):
        grad = Mt.T @ (Mt @ g - yt)
        g = sora_proximal_step(g, grad, 1.0 / L, lam)
    gn = g.numpy()
    grad = M.T @ (M @ gn - y)
    nz = gn != 0
    assert 0 < nz.sum() < 12  # some, not all, coordinates are exactly zero
    np.testing.assert_allclose(grad[nz], -lam * np.sign(gn[nz]), rtol=1e-8, atol=1e-8)
    assert np.all(np.abs(grad[~nz]) <= lam * (1 + 1e-8))


def test_negative_control_hard_threshold_and_subgradient_steps_are_wrong():
    rng = np.random.default_rng(1)
    M, y = rng.standard_normal((40, 12)), rng.standard_normal(40)
    lam, L = 3.0, np.linalg.norm(M, 2) ** 2
    g_hard = np.zeros(12)
    g_sub = np.zeros(12)
    for _ in range(3000):
        v = g_hard - M.T @ (M @ g_hard - y) / L
        g_hard = np.where(np.abs(v) > lam / L, v, 0.0)  # hard threshold instead of the prox
        g_sub = g_sub - (M.T @ (M @ g_sub - y) + lam * np.sign(g_sub)) / L  # subgradient step, no prox
    grad = M.T @ (M @ g_hard - y)
    nz = g_hard != 0
    viol = np.abs(grad[nz] + lam * np.sign(g_hard[nz]))
    assert viol.max() > 1e-2 * lam  # hard thresholding stops at a point that is not a lasso solution
    assert np.count_nonzero(g_sub) == 12  # subgradient steps never produce an exact zero: nothing to cut


def test_sora_adapter_step_then_prune_keeps_delta_and_lowers_rank():
    m, n, r = 8, 6, 6
    ad = adapters.create("sora", m, n, rank=r, seed=0).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ad.B.copy_(torch.randn(m, r, generator=g, dtype=torch.float64))
    x = torch.randn(16, n, dtype=torch.float64, generator=g)
    y = torch.randn(16, m, dtype=torch.float64, generator=g)
    loss = ((ad(x) - y) ** 2).mean()
    loss.backward()
    eta, lam = 0.1, 5.0
    new_gate = sora_proximal_step(ad.gate, ad.gate.grad, eta, lam)
    v = (ad.gate - eta * ad.gate.grad).detach()
    np.testing.assert_allclose(new_gate.numpy(), (torch.sign(v) * (v.abs() - eta * lam).clamp_min(0)).numpy(),
                               **TOL)
    with torch.no_grad():
        ad.gate.copy_(new_gate)
    zeros = int((new_gate == 0).sum())
    assert 0 < zeros < r
    before = ad.delta_weight().detach().clone()
    ad.prune_zero_gates()
    assert ad.rank == r - zeros
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), before.numpy(), **TOL)
    np.testing.assert_allclose(ad.to_lora().delta_weight().detach().numpy(), before.numpy(), **TOL)
    assert ad.num_trainable == type(ad).param_count(m, n, rank=r - zeros)


def test_library_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match="tau"):
        soft_threshold(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match="lam"):
        sora_proximal_step(torch.ones(3), torch.ones(3), 0.1, -1.0)
