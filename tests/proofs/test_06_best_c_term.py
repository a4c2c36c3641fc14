"""Check of proofs/06-best-c-term.md: in an orthonormal basis the best c-term approximation keeps the c
largest coefficients (DCT-II 2-D, unitary DFT 2-D, Walsh–Hadamard 2-D).

Library objects: ``dct2``/``idct2``, ``dft2``/``idft2``, ``wht``, ``dct_matrix``, ``hadamard_matrix``
and ``theory.expressivity.best_error`` for ``dct`` and ``wht``.  Reference: exhaustive search over every
support of size c (least squares per support) on tiny matrices.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import dct2, dct_matrix, dft2, hadamard_matrix, idct2, idft2, wht
from lowrank_theory.theory.expressivity import Target, best_error
from tests.conftest import tol

TOL = tol("float64")


def _basis_dct(m: int, n: int) -> np.ndarray:
    """Columns = vec of the 2-D DCT basis images D_m[k]ᵀ D_n[l] (orthonormal, real)."""
    return np.kron(dct_matrix(m), dct_matrix(n)).T


def _basis_dft(m: int, n: int) -> np.ndarray:
    Fm = np.fft.fft(np.eye(m), norm="ortho")
    Fn = np.fft.fft(np.eye(n), norm="ortho")
    return np.kron(Fm, Fn).conj().T  # unitary; column (k, l) = conj-vec of the (k, l) Fourier image


def _basis_wht(m: int, n: int) -> np.ndarray:
    return np.kron(hadamard_matrix(m), hadamard_matrix(n)).T


def _exhaustive_best(x: np.ndarray, Phi: np.ndarray, c: int) -> float:
    """min over supports |S| = c of the least-squares error ‖x − Φ_S b‖² (no orthogonality used)."""
    best = np.inf
    for S in combinations(range(Phi.shape[1]), c):
        P = Phi[:, S]
        b = np.linalg.lstsq(P, x, rcond=None)[0]
        best = min(best, float(np.linalg.norm(x - P @ b) ** 2))
    return best


def _keep_top(C: np.ndarray, c: int) -> np.ndarray:
    flat = np.abs(C).ravel()
    keep = np.argsort(flat)[::-1][:c]
    out = np.zeros_like(C).ravel()
    out[keep] = C.ravel()[keep]
    return out.reshape(C.shape)


TRANSFORMS = {
    "dct": (lambda X: dct2(X), lambda Y: idct2(Y), _basis_dct),
    "dft": (lambda X: dft2(X), lambda Y: idft2(Y), _basis_dft),
    "wht": (lambda X: wht(wht(X, axis=-1), axis=0), lambda Y: wht(wht(Y, axis=-1), axis=0), _basis_wht),
}


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 3))
def test_top_c_coefficients_are_optimal(kind, seed, c):
    fwd, inv, basis = TRANSFORMS[kind]
    m, n = (2, 4) if kind == "wht" else (2, 3)  # WHT needs powers of two
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n))
    if kind == "dft":
        X = X + 1j * rng.standard_normal((m, n))  # the unitary DFT theorem is over C^{m×n}
    C = fwd(X)
    np.testing.assert_allclose(np.linalg.norm(C), np.linalg.norm(X), **TOL)  # Parseval (orthonormality)
    approx = inv(_keep_top(C, c))
    err = np.linalg.norm(X - approx) ** 2
    tail = np.sum(np.sort(np.abs(C).ravel() ** 2)[: C.size - c])
    assert err == pytest.approx(tail, rel=1e-9, abs=1e-12)
    # independent reference: exhaustive search with least squares over every support of size c
    assert err == pytest.approx(_exhaustive_best(X.ravel(), basis(m, n), c), rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 60))
def test_best_error_dct_and_wht_equal_the_coefficient_tail(seed, c):
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((8, 8))
    t = Target("x", T)
    for method, C in (("dct", dct2(T)), ("wht", wht(wht(T, axis=-1), axis=0))):
        e2 = np.sort(np.abs(C).ravel() ** 2)
        expected = np.sqrt(np.sum(e2[: max(0, e2.size - c)]) / np.sum(T**2))
        assert best_error(method, t, c).error == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_negative_control_other_supports_are_worse():
    """Perturb the claimed optimum: swap the c-th largest coefficient for a smaller one -> larger error."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 5))
    C = dct2(X)
    c = 5
    order = np.argsort(np.abs(C).ravel())[::-1]
    opt = np.linalg.norm(X - idct2(_keep_top(C, c))) ** 2
    swapped = np.zeros(C.size)
    S = [*order[: c - 1], order[c + 3]]
    swapped[S] = C.ravel()[S]
    worse = np.linalg.norm(X - idct2(swapped.reshape(C.shape))) ** 2
    assert worse - opt == pytest.approx(C.ravel()[order[c - 1]] ** 2 - C.ravel()[order[c + 3]] ** 2, rel=1e-9)
    assert worse > opt
    # the low-pass choice (first c coefficients in row-major order) is also worse on a generic matrix
    low = np.zeros(C.size)
    low[:c] = C.ravel()[:c]
    assert np.linalg.norm(X - idct2(low.reshape(C.shape))) ** 2 > opt


def test_negative_control_non_orthonormal_basis():
    """Weaken 'orthonormal': in a skewed basis of R² the largest coefficient is not the best 1-term choice."""
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(200):
        Phi = rng.standard_normal((2, 2))
        x = rng.standard_normal(2)
        a = np.linalg.solve(Phi, x)  # coefficients in the basis
        by_coeff = int(np.argmax(np.abs(a)))
        errs = [np.linalg.norm(x - Phi[:, j] * (Phi[:, j] @ x) / (Phi[:, j] @ Phi[:, j])) for j in range(2)]
        if errs[by_coeff] > min(errs) * (1 + 1e-6):
            found += 1
    assert found > 10  # frequent, not a corner case
