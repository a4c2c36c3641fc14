"""Check of proofs/03-lorapro-tangent-projection.md.

Sympy proves the projection identities on symbolic entries (m = n = 3, r = 1) and derives the
Sylvester equation for the free matrix (r = 1); hypothesis then checks the library's
``tangent_projection``, ``tangent_residual``, ``lorapro_gradients`` and ``lorapro_step`` against an
independent least-squares projection built from Kronecker products.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.theory.gradients import (
    lorapro_gradients,
    lorapro_step,
    tangent_projection,
    tangent_residual,
)
from tests.conftest import tol

TOL = tol("float64")


# ----------------------------------------------------------------------------- sympy
def _sym(name: str, rows: int, cols: int) -> sp.Matrix:
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}{i}{j}", real=True))


def _is_zero(M: sp.Matrix) -> bool:
    return all(sp.expand(e) == 0 for e in M)


def _projector_sym():
    """Symbolic B (3×1), A (1×3), G (3×3) and Π scaled by αβ (α = AAᵀ, β = BᵀB) to stay polynomial."""
    m = n = 3
    B, A, G = _sym("b", m, 1), _sym("a", 1, n), _sym("g", m, n)
    alpha, beta = (A * A.T)[0, 0], (B.T * B)[0, 0]

    def proj_ab(M):  # αβ·(P_B M + M P_A − P_B M P_A), with P_B = BBᵀ/β, P_A = AᵀA/α
        return alpha * B * B.T * M + beta * M * A.T * A - B * B.T * M * A.T * A

    return B, A, G, alpha, beta, proj_ab


def test_sympy_projection_is_the_orthogonal_projection_on_the_tangent_space():
    B, A, G, alpha, beta, proj_ab = _projector_sym()
    m, n = G.shape
    X, Y = _sym("x", 1, n), _sym("y", m, 1)
    T = B * X + Y * A  # a generic tangent vector
    PG_ab = proj_ab(G)
    # (1) fixes the tangent space: Π(T) = T
    assert _is_zero(proj_ab(T) - alpha * beta * T)
    # (2) maps into it: Π(G) = B X* + Y* A, X* = BᵀG/β, Y* = (I − P_B) G Aᵀ/α
    assert _is_zero(PG_ab - (alpha * B * B.T * G + (beta * sp.eye(m) - B * B.T) * G * A.T * A))
    # (3) residual = (I − P_B) G (I − P_A), orthogonal to every tangent vector
    R_ab = (beta * sp.eye(m) - B * B.T) * G * (alpha * sp.eye(n) - A.T * A)
    assert _is_zero(alpha * beta * G - PG_ab - R_ab)
    assert sp.expand((R_ab.T * T).trace()) == 0


def test_sympy_negative_control_without_cross_term():
    """P_B G + G P_A (no − P_B G P_A) double-counts P_B G P_A: it does not fix the tangent space."""
    B, A, _, alpha, beta, _ = _projector_sym()
    X = _sym("x", 1, 3)
    T = B * X
    wrong_ab = alpha * B * B.T * T + beta * T * A.T * A  # αβ (P_B T + T P_A)
    assert not _is_zero(wrong_ab - alpha * beta * T)


def test_sympy_sylvester_equation_for_the_free_matrix():
    """r = 1: minimize ‖g_A − sBᵀG‖² + ‖g_B − sGAᵀ‖² over the free X; its root solves the Sylvester eq."""
    m = n = 2
    B, A, G = _sym("b", m, 1), _sym("a", 1, n), _sym("g", m, n)
    s, x = sp.symbols("s x", positive=True)
    BtB, AAt = (B.T * B)[0, 0], (A * A.T)[0, 0]
    PB = B * B.T / BtB
    gA = (B.T * G) / (s * BtB) + x * A
    gB = (sp.eye(m) - PB) * G * A.T / (s * AAt) - B * x
    f = sum(e**2 for e in gA - s * B.T * G) + sum(e**2 for e in gB - s * G * A.T)
    root = sp.solve(sp.diff(f, x), x)
    assert len(root) == 1
    sylvester = -(B.T * G * A.T)[0, 0] / (s * BtB * (BtB + AAt))  # BᵀB x + x AAᵀ = −(1/s)(BᵀB)⁻¹BᵀGAᵀ
    assert sp.simplify(root[0] - sylvester) == 0
    # and whatever x is, the weight-space step s(B g_A + g_B A) is the same (x is free)
    step = s * (B * gA + gB * A)
    assert _is_zero(sp.Matrix(step.diff(x)))


# ----------------------------------------------------------------------------- numerical, library
def _reference_projection(G, B, A):
    """Orthogonal projection of vec(G) on range([I_n ⊗ B, Aᵀ ⊗ I_m]) (column-major vec), by lstsq."""
    m, n = G.shape
    M = np.hstack([np.kron(np.eye(n), B), np.kron(A.T, np.eye(m))])
    g = G.reshape(-1, order="F")
    coef = np.linalg.lstsq(M, g, rcond=None)[0]
    return (M @ coef).reshape((m, n), order="F")


@st.composite
def problems(draw):
    m, n = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    r = draw(st.integers(1, min(m, n) - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.standard_normal((m, r)), rng.standard_normal((r, n)), rng


@given(prob=problems(), s=st.floats(0.25, 4.0))
def test_library_matches_reference_projection(prob, s):
    G, B, A, rng = prob
    P = tangent_projection(G, B, A)
    np.testing.assert_allclose(P, _reference_projection(G, B, A), rtol=1e-9, atol=1e-9)
    R = tangent_residual(G, B, A)
    QB, QA = np.linalg.qr(B)[0], np.linalg.qr(A.T)[0]
    np.testing.assert_allclose(R, (G - QB @ (QB.T @ G)) - (G - QB @ (QB.T @ G)) @ QA @ QA.T, **TOL)
    # LoRA-Pro's adjusted step is that projection
    np.testing.assert_allclose(lorapro_step(G, B, A, s), P, rtol=1e-8, atol=1e-8)
    # and no other pair of factor gradients gets closer to G
    best = np.linalg.norm(P - G)
    for _ in range(5):
        gA, gB = rng.standard_normal(A.shape), rng.standard_normal(B.shape)
        assert np.linalg.norm(s * (B @ gA + gB @ A) - G) >= best * (1 - 1e-12)


@given(prob=problems(), s=st.floats(0.25, 4.0))
def test_free_matrix_solves_sylvester_and_minimizes_the_distance(prob, s):
    G, B, A, rng = prob
    gA, gB, X = lorapro_gradients(G, B, A, s)
    BtB, AAt = B.T @ B, A @ A.T
    rhs = -np.linalg.solve(BtB, B.T @ G @ A.T) / s
    scale = np.linalg.norm(rhs) + np.linalg.norm(BtB) * np.linalg.norm(X) + 1e-300
    assert np.linalg.norm(BtB @ X + X @ AAt - rhs) <= 1e-9 * scale

    def f(Xv):
        ga = gA + (Xv - X) @ A
        gb = gB - B @ (Xv - X)
        return np.sum((ga - s * B.T @ G) ** 2) + np.sum((gb - s * G @ A.T) ** 2)

    # negative control: any other X is strictly worse (f is strictly convex in X) while the step is unchanged
    for _ in range(3):
        D = 1e-2 * rng.standard_normal(X.shape)
        assert f(X + D) > f(X)
        step_D = s * (B @ (gA + D @ A) + (gB - B @ D) @ A)
        np.testing.assert_allclose(step_D, lorapro_step(G, B, A, s), rtol=1e-8, atol=1e-8)


def test_negative_control_missing_cross_term_is_not_a_projection():
    rng = np.random.default_rng(0)
    G, B, A = rng.standard_normal((6, 5)), rng.standard_normal((6, 2)), rng.standard_normal((2, 5))
    QB, QA = np.linalg.qr(B)[0], np.linalg.qr(A.T)[0]
    PB, PA = QB @ QB.T, QA @ QA.T

    def wrong(M):
        return PB @ M + M @ PA

    W = wrong(G)
    assert np.linalg.norm(wrong(W) - W) > 1e-3 * np.linalg.norm(W)  # not idempotent
    # its residual is not orthogonal to the tangent vector B Bᵀ G
    assert abs(np.sum((G - W) * (PB @ G))) > 1e-3 * np.linalg.norm(G) ** 2
    # the library's operator is idempotent
    P = tangent_projection(G, B, A)
    np.testing.assert_allclose(tangent_projection(P, B, A), P, rtol=1e-9, atol=1e-9)


def test_negative_control_rank_deficient_factor_is_rejected():
    """Assumption 'B has full column rank' is needed for (BᵀB)⁻¹: the library refuses otherwise."""
    rng = np.random.default_rng(1)
    G, A = rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    b = rng.standard_normal((5, 1))
    B = np.hstack([b, 2 * b])
    with pytest.raises(ValueError, match="full rank"):
        lorapro_gradients(G, B, A)
