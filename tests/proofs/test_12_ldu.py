"""Check of proofs/12-ldu-leading-minors.md: A = L D U without pivoting exists and is unique when the
leading principal minors Δ_1..Δ_{n−1} are non-zero, with D_k = Δ_k / Δ_{k−1}.

Sympy solves L D U = A for the unknown entries of L, D, U on a symbolic 3×3 matrix (unique solution,
pivots = ratios of minors); the library's ``ldu_nopivot`` (and the pivoted ``ldu``) is then checked
against determinant ratios on random matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import ldu, ldu_nopivot
from tests.conftest import tol

TOL = tol("float64")


def _unknown_ldu(n: int):
    l_ = {(i, j): sp.Symbol(f"l{i}{j}") for i in range(n) for j in range(i)}
    u_ = {(i, j): sp.Symbol(f"u{i}{j}") for i in range(n) for j in range(i + 1, n)}
    d_ = [sp.Symbol(f"d{i}") for i in range(n)]
    L = sp.Matrix(n, n, lambda i, j: 1 if i == j else l_.get((i, j), 0))
    U = sp.Matrix(n, n, lambda i, j: 1 if i == j else u_.get((i, j), 0))
    return L, sp.diag(*d_), U, [*l_.values(), *d_, *u_.values()], d_


def test_sympy_unique_solution_and_pivots_are_minor_ratios():
    n = 3
    A = sp.Matrix(n, n, lambda i, j: sp.Symbol(f"a{i}{j}"))
    L, D, U, unknowns, d = _unknown_ldu(n)
    sols = sp.solve(list(L * D * U - A), unknowns, dict=True)
    assert len(sols) == 1  # generic A (all minors non-zero as polynomials): exactly one factorization
    minors = [sp.Integer(1)] + [A[:k, :k].det() for k in range(1, n + 1)]
    for k in range(n):
        assert sp.simplify(sols[0][d[k]] - minors[k + 1] / minors[k]) == 0
    # consistency: the product of pivots is det A
    assert sp.simplify(sp.Mul(*[sols[0][dk] for dk in d]) - A.det()) == 0


def test_sympy_negative_control_zero_leading_minor():
    """Δ_1 = 0 with A nonsingular: no L D U without pivoting exists (the system has no solution)."""
    A = sp.Matrix([[0, 1], [1, 1]])
    L, D, U, unknowns, _ = _unknown_ldu(2)
    assert sp.solve(list(L * D * U - A), unknowns, dict=True) == []


def test_sympy_singular_matrix_shows_why_the_converse_needs_nonsingularity():
    """Δ_1 = 0 and A singular: a factorization exists but is not unique (a free parameter remains)."""
    A = sp.Matrix([[0, 0], [0, 1]])
    L, D, U, unknowns, _ = _unknown_ldu(2)
    sols = sp.solve(list(L * D * U - A), unknowns, dict=True)
    assert sols
    free = set().union(*(set(v.free_symbols) for v in sols[0].values())) | (set(unknowns) - set(sols[0]))
    assert free  # at least one unknown is left free: a one-parameter family of factorizations


@given(n=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_library_pivots_are_minor_ratios(n, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n)) + n * np.eye(n)  # keeps every leading minor well away from 0
    P, L, D, U = ldu_nopivot(A)
    np.testing.assert_allclose(P, np.eye(n), **TOL)
    np.testing.assert_allclose(L @ np.diag(D) @ U, A, rtol=1e-10, atol=1e-10)
    assert np.allclose(np.triu(L, 1), 0) and np.allclose(np.diag(L), 1)
    assert np.allclose(np.tril(U, -1), 0) and np.allclose(np.diag(U), 1)
    minors = [1.0] + [np.linalg.det(A[:k, :k]) for k in range(1, n + 1)]
    np.testing.assert_allclose(D, [minors[k + 1] / minors[k] for k in range(n)], rtol=1e-9)
    # uniqueness, seen through a second algorithm: whenever the pivoted routine makes no row
    # interchange (P = I), its factors must be the very same
    Pp, Lp, Dp, Up = ldu(A)
    if np.allclose(Pp, np.eye(n)):
        np.testing.assert_allclose(Dp, D, rtol=1e-9)
        np.testing.assert_allclose(Lp, L, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(Up, U, rtol=1e-9, atol=1e-12)


def test_negative_control_library_refuses_a_vanishing_minor():
    A = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="order 1"):
        ldu_nopivot(A)
    P, L, D, U = ldu(A)  # with row interchanges it exists
    assert not np.allclose(P, np.eye(3))
    np.testing.assert_allclose(P @ L @ np.diag(D) @ U, A, **TOL)
