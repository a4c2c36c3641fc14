"""Check of proofs/19-merging-factored-merges.md: `cat` is exact at rank Σ r_t, the `svd` merge is the Eckart–Young
optimum built from the concatenated factors, and the factor-wise "linear" merge adds cross terms.

References: NumPy float64 (QR, SVD, matrix_rank) and sympy, called independently of the library.
"""

from __future__ import annotations

import numpy as np
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.merging import cat, combine_lora, svd, task_arithmetic
from tests.conftest import tol

TOL = tol("float64")


def _factors(m, n, ranks, seed):
    g = np.random.default_rng(seed)
    return [(g.standard_normal((m, r)), g.standard_normal((r, n))) for r in ranks]


@given(m=st.integers(6, 12), n=st.integers(6, 12), ranks=st.lists(st.integers(1, 2), min_size=1, max_size=3),
       ws=st.lists(st.floats(0.1, 3.0), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_cat_identity_and_rank(m, n, ranks, ws, seed):
    pairs = _factors(m, n, ranks, seed)
    w = [x * (-1) ** i for i, x in enumerate(ws[: len(pairs)])]
    B, A = cat(pairs, w)
    delta = sum(wi * Bt @ At for (Bt, At), wi in zip(pairs, w))
    np.testing.assert_allclose(B @ A, delta, **TOL)
    R = sum(ranks)
    assert np.linalg.matrix_rank(B @ A) == R  # generic factors, R <= 6 <= min(m, n)
    # negative control: a repeated B makes [B_1 ... B_T] rank-deficient, and the rank of the sum drops
    dup = [*pairs, (pairs[0][0], np.ones_like(pairs[0][1]))]
    Bd, Ad = cat(dup, [*w, 1.0])
    assert np.linalg.matrix_rank(Bd @ Ad) < R + ranks[0]


def test_svd_merge_is_the_rotated_core_svd():
    m, n, ranks, k = 30, 22, (3, 4, 2), 4
    pairs = _factors(m, n, ranks, seed=1)
    w = [0.8, -1.1, 2.0]
    B, A = svd(pairs, k, w)
    # the construction of item 2, written here with NumPy
    Bbar = np.concatenate([Bt for Bt, _ in pairs], axis=1)
    Abar = np.concatenate([wi * At for (_, At), wi in zip(pairs, w)], axis=0)
    QB, RB = np.linalg.qr(Bbar)
    QA, RA = np.linalg.qr(Abar.T)
    Uh, S, Vh = np.linalg.svd(RB @ RA.T)
    U, V = QB @ Uh, QA @ Vh.T
    np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), **TOL)  # an SVD: orthonormal factors
    delta = Bbar @ Abar
    np.testing.assert_allclose((U * S) @ V.T, delta, **TOL)
    np.testing.assert_allclose(B @ A, (U[:, :k] * S[:k]) @ V[:, :k].T, **TOL)
    np.testing.assert_allclose(B.T @ B, np.diag(S[:k] ** 2), **TOL)
    np.testing.assert_allclose(A @ A.T, np.eye(k), **TOL)
    best = np.linalg.norm(delta - B @ A) ** 2
    np.testing.assert_allclose(best, np.sum(S[k:] ** 2), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False)[: len(S)], S, **TOL)
    # negative controls: other rank-k matrices do worse
    g = np.random.default_rng(2)
    for _ in range(25):
        X = (B + 0.05 * g.standard_normal(B.shape)) @ (A + 0.05 * g.standard_normal(A.shape))
        assert np.linalg.norm(delta - X) ** 2 > best
    Bb, Ab = pairs[1]
    Ub, Sb, Vbh = np.linalg.svd(w[1] * Bb @ Ab)
    assert np.linalg.norm(delta - (Ub[:, :k] * Sb[:k]) @ Vbh[:k]) ** 2 > best


def test_sympy_factorwise_linear_cross_terms():
    w1, w2, c = sp.symbols("w1 w2 c", positive=True)
    b1, b2 = sp.Matrix(sp.symbols("p0:3")), sp.Matrix(sp.symbols("q0:3"))
    a1, a2 = sp.Matrix(sp.symbols("u0:2")).T, sp.Matrix(sp.symbols("v0:2")).T
    Bp, Ap = sp.sqrt(w1) * b1 + sp.sqrt(w2) * b2, sp.sqrt(w1) * a1 + sp.sqrt(w2) * a2
    delta = w1 * b1 * a1 + w2 * b2 * a2
    cross = sp.sqrt(w1 * w2) * (b1 * a2 + b2 * a1)
    assert sp.simplify(Bp * Ap - delta - cross) == sp.zeros(3, 2)
    assert sp.simplify(cross) != sp.zeros(3, 2)
    # the cancelling configuration b2 = -c b1, a2 = c a1
    cancel = (b1 * a2 + b2 * a1).subs(dict(zip(b2, -c * b1))).subs(dict(zip(a2, c * a1)))
    assert sp.simplify(cancel) == sp.zeros(3, 2)


def test_factorwise_linear_equals_the_expansion():
    m, n, r = 9, 7, 2
    pairs = _factors(m, n, (r, r, r), seed=3)
    w = [0.5, -1.5, 2.0]
    B, A = combine_lora(pairs, w, "linear")
    sa = [np.sign(x) * np.sqrt(abs(x)) for x in w]  # A's weights carry the sign, B's do not
    sb = [np.sqrt(abs(x)) for x in w]
    delta = task_arithmetic([Bt @ At for Bt, At in pairs], w)
    cross = sum(sb[s] * sa[t] * pairs[s][0] @ pairs[t][1] for s in range(3) for t in range(3) if s != t)
    np.testing.assert_allclose(B @ A, delta + cross, **TOL)
    # negative control: the cross terms are not small, so "linear" is not task arithmetic on ΔW
    assert np.linalg.norm(cross) > 0.5 * np.linalg.norm(delta)
    assert np.linalg.matrix_rank(B @ A) <= r < np.linalg.matrix_rank(delta)
    # the cancelling configuration: factor-wise linear = task arithmetic
    g = np.random.default_rng(4)
    b1, a1 = g.standard_normal((m, 1)), g.standard_normal((1, n))
    Bx, Ax = combine_lora([(b1, a1), (-0.7 * b1, 0.7 * a1)], [1.0, 1.0], "linear")
    np.testing.assert_allclose(Bx @ Ax, b1 @ a1 - 0.49 * b1 @ a1, **TOL)


def test_torch_and_numpy_agree():
    pairs = _factors(11, 8, (2, 3), seed=5)
    tp = [(torch.from_numpy(B), torch.from_numpy(A)) for B, A in pairs]
    Bn, An = svd(pairs, 3, [1.0, -0.5])
    Bt, At = svd(tp, 3, [1.0, -0.5])
    np.testing.assert_allclose((Bt @ At).numpy(), Bn @ An, **TOL)
