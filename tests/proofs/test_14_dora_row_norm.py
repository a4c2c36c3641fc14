"""Check of proofs/14-dora-row-norm.md: the row norms of W0 + sBA from r-sized products, and DoRA's
zero-norm edge case.

Sympy proves the identity on symbolic entries; the library's ``lowrank_row_norms`` is compared with the
dense norm (and watched, by a torch dispatch mode, never to build an m×n product), and ``DoRA``'s
clamped direction map is checked against its closed form (ε-ball projection, |g|/ε-Lipschitz).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_theory.adapters.multiplicative import DoRA, lowrank_row_norms
from tests.conftest import tol

TOL = tol("float64")


def _sym(name: str, rows: int, cols: int) -> sp.Matrix:
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}{i}{j}", real=True))


# ----------------------------------------------------------------------------- sympy
def test_sympy_row_norm_identity():
    m, n, r = 2, 3, 2
    W0, B, A = _sym("w", m, n), _sym("b", m, r), _sym("a", r, n)
    s = sp.Symbol("s", real=True)
    V = W0 + s * B * A
    W0At, AAt = W0 * A.T, A * A.T
    for i in range(m):
        lhs = sum(V[i, j] ** 2 for j in range(n))
        cross = sum(W0At[i, k] * B[i, k] for k in range(r))
        quad = (B[i, :] * AAt * B[i, :].T)[0, 0]
        rhs = sum(W0[i, j] ** 2 for j in range(n)) + 2 * s * cross + s**2 * quad
        assert sp.expand(lhs - rhs) == 0
        # negative control: dropping the cross term (treating W0 and sBA as orthogonal) is not an identity
        assert sp.expand(lhs - (rhs - 2 * s * cross)) != 0


def test_sympy_direction_has_no_limit_at_zero():
    """v/‖v‖ along v = t·e_1 and v = t·e_2 (t → 0⁺) tends to different limits: no continuous extension."""
    t = sp.Symbol("t", positive=True)
    lim1 = [sp.limit(c / sp.sqrt(t**2), t, 0, "+") for c in (t, 0)]
    lim2 = [sp.limit(c / sp.sqrt(t**2), t, 0, "+") for c in (0, t)]
    assert lim1 == [1, 0] and lim2 == [0, 1]


# ----------------------------------------------------------------------------- library
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1), s=st.floats(0.1, 4.0),
       data=st.data())
def test_library_row_norms_equal_the_dense_norm(m, n, seed, s, data):
    r = data.draw(st.integers(1, min(m, n)))
    g = torch.Generator().manual_seed(seed)
    W0, B, A = (torch.randn(sh, generator=g, dtype=torch.float64) for sh in ((m, n), (m, r), (r, n)))
    ref = np.linalg.norm(W0.numpy() + s * B.numpy() @ A.numpy(), axis=1)
    np.testing.assert_allclose(lowrank_row_norms(W0, B, A, s).numpy(), ref, **TOL)


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_library_never_forms_the_m_by_n_product():
    m, n, r = 40, 30, 3
    g = torch.Generator().manual_seed(0)
    W0, B, A = (torch.randn(sh, generator=g, dtype=torch.float64) for sh in ((m, n), (m, r), (r, n)))
    rec = _MatmulShapes()
    with rec:
        nu = lowrank_row_norms(W0, B, A, 0.5)
    assert rec.shapes and all(max(sh[-2:]) <= max(m, n) and min(sh[-2:]) <= r for sh in rec.shapes)
    assert (m, n) not in rec.shapes
    np.testing.assert_allclose(nu.numpy(), np.linalg.norm(W0.numpy() + 0.5 * B.numpy() @ A.numpy(), axis=1), **TOL)
    # negative control: the recorder does see a dense product when one is formed
    with rec:
        torch.linalg.vector_norm(W0 + 0.5 * (B @ A), dim=1)
    assert (m, n) in rec.shapes


def test_negative_control_unrefined_formula_loses_accuracy_under_cancellation():
    """Near-cancelling rows (W0 ≈ −sBA): the expanded formula alone loses ~all digits in float32; the
    library evaluates it in float64 for a float32 W0 (item 2) and stays accurate."""
    m, n, r, s = 6, 64, 4, 1.0
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    W0 = -s * (B @ A) + 1e-3 * torch.randn(m, n, generator=g)
    exact = np.linalg.norm(W0.double().numpy() + s * B.double().numpy() @ A.double().numpy(), axis=1)
    raw_sq = (W0 * W0).sum(1) + 2 * s * ((W0 @ A.T) * B).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    raw = raw_sq.clamp_min(0).sqrt().numpy()
    lib = lowrank_row_norms(W0, B, A, s).numpy()
    assert np.max(np.abs(raw - exact) / exact) > 0.1  # the textbook identity, evaluated naively: no digits
    np.testing.assert_allclose(lib, exact, rtol=1e-3)  # float64 working precision, κ ≈ 4e6: error ≈ 1e-9


def _cancelling_rows(dtype, n=512, r=8, s=0.7, seed=0):
    """W0, B, A in ``dtype`` whose rows v_i = w_i + s(BA)_i cancel to relative size t_i = 1 ... 1e-7
    (κ_i ≈ 2/t_i² up to 1e14); the exact values are those of the rounded inputs."""
    g = np.random.default_rng(seed)
    m = 15
    B, A = g.standard_normal((m, r)), g.standard_normal((r, n)) / np.sqrt(n)
    BA = s * B @ A
    t = np.logspace(0, -7, m)[:, None]
    W0 = -BA + t * np.linalg.norm(BA, axis=1, keepdims=True) * g.standard_normal((m, n)) / np.sqrt(n)
    W0_, B_, A_ = (torch.from_numpy(v).to(dtype) for v in (W0, B, A))
    W0d, Bd, Ad = (v.double().numpy() for v in (W0_, B_, A_))
    return W0_, B_, A_, s, W0d + s * Bd @ Ad


def _output_row_error(W0, B, A, s, V, tokens=64):
    """Relative error per output row of x W0ᵀ + s(xAᵀ)Bᵀ computed in W0's dtype (as the DoRA layer
    does) against the exact x Vᵀ."""
    x = torch.randn(tokens, W0.shape[1], generator=torch.Generator().manual_seed(9)).to(W0.dtype)
    z = (x @ W0.T + s * ((x @ A.T) @ B.T)).double().numpy()
    z_exact = x.double().numpy() @ V.T
    return np.linalg.norm(z - z_exact, axis=0) / np.linalg.norm(z_exact, axis=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_working_precision_error_stays_below_the_layer_output_error(dtype):
    """Item 2: wherever the layer's output row is not pure round-off (relative error < 1), the row
    norm's error is below that row's own and the norm is not 0; no dense refinement, no host sync."""
    W0, B, A, s, V = _cancelling_rows(dtype)
    exact = np.linalg.norm(V, axis=1)
    nu = lowrank_row_norms(W0, B, A, s).double().numpy()
    norm_err = np.abs(nu - exact) / exact
    out_err = _output_row_error(W0, B, A, s, V)
    kappa = (np.linalg.norm(W0.double().numpy(), axis=1) ** 2
             + np.linalg.norm(s * B.double().numpy() @ A.double().numpy(), axis=1) ** 2) / exact**2
    digits = out_err < 1
    assert kappa[digits].max() > 1e3 and digits.sum() >= 6  # the sweep reaches strong cancellation
    assert np.all(norm_err[digits] <= out_err[digits]), (norm_err, out_err)
    assert np.all(nu[digits] > 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_negative_control_float32_working_precision_is_not_enough_for_float16_or_float32(dtype):
    """The identity evaluated in float32 for a float16 or float32 W0 (working dtypes the library does
    not use, u > u_c²/32): at some row whose output still has a digit the norm's error exceeds the
    output's own, and for float32 the computed norm collapses to 0 there."""
    W0, B, A, s, V = _cancelling_rows(dtype)
    W, Bf, Af = W0.float(), B.float(), A.float()
    exact = np.linalg.norm(V, axis=1)
    sq = (W * W).sum(1) + 2 * s * ((W @ Af.T) * Bf).sum(1) + s * s * ((Bf @ (Af @ Af.T)) * Bf).sum(1)
    nu = sq.clamp_min(0).sqrt().double().numpy()
    norm_err = np.abs(nu - exact) / exact
    out_err = _output_row_error(W0, B, A, s, V)
    digits = out_err < 1
    assert np.any(norm_err[digits] > out_err[digits])
    if dtype == torch.float32:
        assert np.any(nu[digits] == 0)


def _dora(m, n, r, seed, eps, dtype=torch.float64):
    ad = DoRA(m, n, rank=r, eps=eps).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ad.B.copy_(torch.randn(ad.B.shape, generator=g, dtype=dtype))
        ad.A.copy_(torch.randn(ad.A.shape, generator=g, dtype=dtype))
        ad.magnitude.copy_(torch.rand(m, generator=g, dtype=dtype) + 0.5)
    ad._magnitude_ready = True
    return ad


def test_merged_rows_have_norm_g_and_zero_rows_stay_zero():
    m, n, r = 5, 7, 2
    ad = _dora(m, n, r, seed=2, eps=1e-8)
    W0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        W0[2] = -ad.scale * (ad.B[2] @ ad.A)  # row 2 of W0 + sBA is exactly zero (row-wise evaluation)
    nu = lowrank_row_norms(W0, ad.B, ad.A, ad.scale)
    assert float(nu[2].detach()) == 0.0
    Wm = ad.merged_weight(W0)
    assert torch.isfinite(Wm).all()
    assert float(Wm[2].abs().max()) == 0.0  # the convention: an undefined direction gives a zero row
    others = [i for i in range(m) if i != 2]
    np.testing.assert_allclose(Wm[others].norm(dim=1).numpy(), ad.magnitude.detach()[others].numpy(), **TOL)


@given(seed=st.integers(0, 2**31 - 1), t=st.floats(1e-3, 3.0))
def test_clamped_direction_is_a_scaled_ball_projection(seed, t):
    """W'_i = (g_i/ε)·Π_{B_ε}(v_i): equal to g_i v_i/‖v_i‖ outside the ball, linear g_i v_i/ε inside,
    hence continuous and |g_i|/ε-Lipschitz (Π is 1-Lipschitz)."""
    m, n, r, eps = 3, 4, 2, 0.5
    ad = _dora(m, n, r, seed=seed % 1000, eps=eps)
    V = (ad.scale * (ad.B @ ad.A)).detach()
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((m, n))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    target_v = torch.from_numpy(t * eps * dirs)  # rows of norm t·ε: inside the ball when t < 1
    W0 = target_v - V
    Wm = ad.merged_weight(W0).numpy()
    g = ad.magnitude.detach().numpy()[:, None]
    v = target_v.numpy()
    expected = g * v / max(t * eps, eps)
    np.testing.assert_allclose(Wm, expected, rtol=1e-9, atol=1e-12)
    # Lipschitz along a second point: ‖W'(v) − W'(v')‖ <= |g|/ε ‖v − v'‖
    W0b = W0 + torch.from_numpy(0.1 * eps * rng.standard_normal((m, n)))
    Wmb = ad.merged_weight(W0b).numpy()
    lhs = np.linalg.norm(Wm - Wmb, axis=1)
    rhs = g[:, 0] / eps * np.linalg.norm((W0 - W0b).numpy(), axis=1)
    assert np.all(lhs <= rhs * (1 + 1e-9))


def test_negative_control_unclamped_direction_is_nan_and_discontinuous():
    """Weaken the convention to the raw formula g v/‖v‖: NaN at v = 0, and jumps of size 2|g| next to it."""
    v0 = torch.zeros(4, dtype=torch.float64)
    assert torch.isnan(v0 / v0.norm()).all()
    e = torch.tensor([1e-12, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert float((e / e.norm() - (-e) / (-e).norm()).norm()) == pytest.approx(2.0)
    # the library's clamp: the same two points map within 2|g|·1e-12/ε of each other
    ad = _dora(1, 4, 1, seed=0, eps=1e-6)
    V = (ad.scale * (ad.B @ ad.A)).detach()
    Wp = ad.merged_weight(e[None] - V)
    Wn = ad.merged_weight(-e[None] - V)
    assert float((Wp - Wn).norm()) <= 2 * float(ad.magnitude.detach()) * 1e-12 / 1e-6 * (1 + 1e-6) + 1e-15


@pytest.mark.parametrize("detach_norm", [True, False])
def test_gradients_at_an_exact_zero_row_are_finite(detach_norm):
    """Inside the ε-ball the clamped map is linear in v, so its gradient exists and is finite.

    (Regression: ``lowrank_row_norms`` once took sqrt(0), whose infinite derivative times the zero
    derivative of DoRA's clamp gave NaN gradients for A and B when the norm is not detached.)
    """
    m, n, r = 4, 5, 2
    ad = _dora(m, n, r, seed=4, eps=1e-8)
    ad.detach_norm = detach_norm
    W0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        W0[1] = -ad.scale * (ad.B[1] @ ad.A)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = ad.layer_output(x, x @ W0.T, W0, None)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for name in ("A", "B", "magnitude"):
        assert torch.isfinite(getattr(ad, name).grad).all(), name
