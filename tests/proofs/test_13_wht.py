"""Check of proofs/13-walsh-hadamard.md: H_{2n} = H_2 ⊗ H_n, H_n H_nᵀ = n I, and the fast transform equals
the dense product.

Sympy works with exact integers: the closed form H_n[i, j] = (−1)^{popcount(i & j)}, the Kronecker recursion,
orthogonality, and the factorization of H_8 into log2(8) butterfly stages applied to a symbolic vector.
The library's ``hadamard_matrix``, ``wht`` and ``wht2`` are then compared with those exact matrices and with
a radix-2 recursion derived from the theorem itself (independent of the library's block algorithm, which
uses dense 64×64 blocks, so sizes above 64 are needed to exercise it).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import hadamard_matrix, wht, wht2
from tests.conftest import tol

TOL = tol("float64")


def _H_closed(n: int) -> sp.Matrix:
    return sp.Matrix(n, n, lambda i, j: (-1) ** bin(int(i) & int(j)).count("1"))


def _H_kron(n: int) -> sp.Matrix:
    H2 = sp.Matrix([[1, 1], [1, -1]])
    H = sp.Matrix([[1]])
    while H.shape[0] < n:
        H = sp.kronecker_product(H2, H)
    return H


def _wht_recursive(x: np.ndarray) -> np.ndarray:
    """H_n x along the last axis by H_{2n}x = [H_n(x_1 + x_2); H_n(x_1 − x_2)] (the theorem, read as code)."""
    n = x.shape[-1]
    if n == 1:
        return x.copy()
    a, b = x[..., : n // 2], x[..., n // 2 :]
    return np.concatenate([_wht_recursive(a + b), _wht_recursive(a - b)], axis=-1)


# ----------------------------------------------------------------------------- sympy, exact
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_sympy_kronecker_recursion_closed_form_and_orthogonality(n):
    H = _H_closed(n)
    assert H == _H_kron(n)  # Sylvester: H_{2n} = H_2 ⊗ H_n, unrolled, equals the popcount closed form
    H2n = _H_closed(2 * n)
    assert H2n == sp.kronecker_product(sp.Matrix([[1, 1], [1, -1]]), H)
    assert H2n == sp.BlockMatrix([[H, H], [H, -H]]).as_explicit()
    assert H == H.T
    assert H * H.T == n * sp.eye(n)  # orthogonality of the rows, exactly
    # the library's ±1 matrix is this exact matrix
    assert np.array_equal(hadamard_matrix(n, normalized=False), np.array(H.tolist(), dtype=np.float64))


def test_sympy_fast_transform_is_the_dense_product_on_n8():
    """H_8 = (H_2⊗I_4)(I_2⊗H_2⊗I_2)(I_4⊗H_2): three butterfly stages of 8 additions each (n log n)."""
    n = 8
    x = sp.Matrix(sp.symbols(f"x0:{n}"))
    H2, I2 = sp.Matrix([[1, 1], [1, -1]]), sp.eye(2)
    stages = [sp.kronecker_product(*([I2] * (2 - s) + [H2] + [I2] * s)) for s in range(3)]
    assert stages[0] * stages[1] * stages[2] == _H_closed(n)
    y = x
    for S in reversed(stages):  # apply the rightmost stage first
        y = S * y
    assert all(sp.expand(a - b) == 0 for a, b in zip(y, _H_closed(n) * x))
    # cost: each stage row has two ±1 entries (one addition), so n log2 n additions in all,
    # against n(n − 1) for the dense product
    adds = sum(sum(1 for e in S.row(i) if e != 0) - 1 for S in stages for i in range(n))
    assert adds == n * 3 < n * (n - 1)
    # the library's transform on the basis vectors is H_8/√8, entry by entry
    np.testing.assert_allclose(wht(np.eye(n)), np.array(_H_closed(n).tolist(), dtype=np.float64) / np.sqrt(n),
                               **TOL)


# ----------------------------------------------------------------------------- numerical, library
@given(k=st.integers(0, 13), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3))
def test_library_wht_equals_the_recursive_reference(k, seed, batch):
    """k up to 13 covers the library's multi-block path (block sizes 2^c, c <= 6, when k > 6)."""
    n = 1 << k
    x = np.random.default_rng(seed).standard_normal((batch, n))
    y = wht(x)
    np.testing.assert_allclose(y, _wht_recursive(x) / np.sqrt(n), rtol=1e-10, atol=1e-10 * np.sqrt(k + 1))
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)  # orthonormal: Parseval
    np.testing.assert_allclose(wht(y), x, rtol=1e-10, atol=1e-12)  # W = Wᵀ = W⁻¹


@pytest.mark.parametrize(("m", "n"), [(8, 8), (4, 128), (256, 2)])
def test_library_2d_transform_and_torch_agree_with_the_dense_product(m, n):
    rng = np.random.default_rng(m * n)
    X = rng.standard_normal((m, n))
    Hm = _wht_recursive(np.eye(m)) / np.sqrt(m)
    Hn = _wht_recursive(np.eye(n)) / np.sqrt(n)
    np.testing.assert_allclose(wht2(X), Hm @ X @ Hn, **TOL)
    np.testing.assert_allclose(wht(X, axis=0), Hm @ X, **TOL)
    Xt = torch.from_numpy(X).requires_grad_(True)
    Yt = wht2(Xt)
    np.testing.assert_allclose(Yt.detach().numpy(), Hm @ X @ Hn, **TOL)
    G = rng.standard_normal((m, n))
    (Yt * torch.from_numpy(G)).sum().backward()
    np.testing.assert_allclose(Xt.grad.numpy(), Hm @ G @ Hn, **TOL)  # adjoint = itself (symmetric)


def test_negative_control_kronecker_with_a_non_hadamard_block_is_not_orthogonal():
    """Weaken 'H_n is Hadamard' in the induction step: H_2 ⊗ M with M a ±1 matrix with M Mᵀ ≠ nI is not."""
    M = sp.Matrix([[1, 1], [1, 1]])
    K = sp.kronecker_product(sp.Matrix([[1, 1], [1, -1]]), M)
    assert K * K.T != 4 * sp.eye(4)


def test_negative_control_natural_order_matters():
    """The sequency-ordered Walsh matrix (rows sorted by sign changes) is orthogonal too, but it is not the
    Sylvester matrix; the library's transform must match exactly one of them (natural order)."""
    n = 8
    H = np.array(_H_closed(n).tolist(), dtype=np.float64)
    changes = [int(np.sum(row[1:] != row[:-1])) for row in H]
    W_seq = H[np.argsort(changes)]
    np.testing.assert_allclose(W_seq @ W_seq.T, n * np.eye(n))
    assert not np.allclose(W_seq, H)
    assert not np.allclose(wht(np.eye(n)), W_seq / np.sqrt(n))


def test_negative_control_unnormalized_matrix_is_not_an_isometry():
    x = np.random.default_rng(0).standard_normal(16)
    H = hadamard_matrix(16, normalized=False)
    assert np.linalg.norm(H @ x) == pytest.approx(4 * np.linalg.norm(x), rel=1e-12)  # scales by √n, not 1


def test_negative_control_no_hadamard_matrix_of_order_3():
    """The power-of-two assumption cannot be dropped to 'any n': no 3×3 ±1 matrix has orthogonal rows
    (exhaustive over all 2^9 sign patterns; the rows have odd length so ⟨h_i, h_j⟩ is odd, never 0).
    The library refuses such lengths with a ValueError naming the length."""
    found = 0
    for signs in itertools.product((1, -1), repeat=9):
        M = np.array(signs, dtype=np.int64).reshape(3, 3)
        found += bool(np.array_equal(M @ M.T, 3 * np.eye(3, dtype=np.int64)))
    assert found == 0
    with pytest.raises(ValueError, match="power of two"):
        wht(np.ones(3))
    with pytest.raises(ValueError, match="power of two"):
        wht(np.ones((4, 12)), axis=-1)
