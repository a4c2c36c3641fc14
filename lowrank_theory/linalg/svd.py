r"""Truncated, randomized and factored singular value decompositions.

Three ways to the best rank-:math:`k` approximation :math:`A_k = U_k \Sigma_k V_k^\top` of a
matrix, all returning an :class:`SVDResult` ``(U, S, Vh)`` on the input's backend, device and
dtype:

* :func:`truncated_svd`: the exact one, from a full (economy) SVD;
* :func:`randomized_svd`: the Halko–Martinsson–Tropp range finder with power iterations;
* :func:`recompress_factors`: the best rank-:math:`k` approximation of a product :math:`BA`
  (a LoRA update) without ever forming :math:`BA`.

Sign convention
---------------
Singular vectors are unique only up to a simultaneous sign flip of :math:`(u_i, v_i)`.  All three
functions fix it the same way: the entry of largest magnitude of each :math:`u_i` is made positive
(the first such entry on a tie), so one input gives one output on every backend.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

from ..backend import check_matrix, device_of, from_numpy_like, namespace

__all__ = ["SVDResult", "randomized_svd", "recompress_factors", "truncated_svd"]


class SVDResult(NamedTuple):
    """A (truncated) SVD :math:`A \\approx U \\operatorname{diag}(S) V_h`.

    Attributes
    ----------
    U : array, shape (m, k)
        Left singular vectors, orthonormal columns.
    S : array, shape (k,)
        Singular values, non-negative, descending.
    Vh : array, shape (k, n)
        Right singular vectors as rows, orthonormal rows.
    """

    U: Any
    S: Any
    Vh: Any


# ----------------------------------------------------------------------------- helpers
def _check_rank(rank: Any, upper: int, what: str) -> int:
    """Validate ``1 <= rank <= upper``; ``what`` says where ``upper`` comes from."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    rank = int(rank)
    if not 1 <= rank <= upper:
        raise ValueError(f"rank must satisfy 1 <= rank <= {what} = {upper}, got rank={rank}")
    return rank


def _check_count(value: Any, name: str) -> int:
    """Validate a non-negative integer parameter (``oversample``, ``n_iter``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _fix_signs(xp, U, Vh):
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive."""
    m, k = U.shape
    idx = xp.argmax(xp.abs(U), axis=0)  # (k,) row index of each column's largest entry
    flat = xp.reshape(U.T, (-1,))  # column i of U occupies flat[i*m:(i+1)*m]
    offsets = xp.arange(k, dtype=idx.dtype, device=device_of(idx))
    picked = xp.take(flat, idx + offsets * m)
    signs = xp.where(picked < 0, -xp.ones_like(picked), xp.ones_like(picked))
    return U * signs[None, :], Vh * signs[:, None]


def _svd_result(xp, U, S, Vh, rank: int) -> SVDResult:
    """Keep the leading ``rank`` triplets and fix the signs."""
    U, Vh = _fix_signs(xp, U[:, :rank], Vh[:rank, :])
    return SVDResult(U, S[:rank], Vh)


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int, a numpy Generator or None, got {type(seed).__name__}")
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- truncated
def truncated_svd(A: Any, rank: int) -> SVDResult:
    r"""Best rank-``rank`` approximation of ``A`` from its economy SVD.

    Parameters
    ----------
    A : array, shape (m, n)
        Finite float32/float64 matrix (NumPy, torch or CuPy).
    rank : int
        Number of singular triplets kept, :math:`1 \le k \le \min(m, n)`.

    Returns
    -------
    SVDResult
        ``U`` (m, k) with orthonormal columns, ``S`` (k,) descending, ``Vh`` (k, n) with
        orthonormal rows, on ``A``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``A`` is not a float32/float64 array or ``rank`` is not an int.
    ValueError
        If ``A`` is not 2-D, has a zero-sized dimension or NaN/Inf entries, or ``rank`` is out of
        range.

    Notes
    -----
    With :math:`A = \sum_i \sigma_i u_i v_i^\top` (:math:`\sigma_1 \ge \sigma_2 \ge \dots`) the result
    is :math:`A_k = \sum_{i \le k} \sigma_i u_i v_i^\top`.  By the Eckart–Young–Mirsky theorem it
    minimizes :math:`\|A - X\|` over all :math:`X` of rank at most :math:`k`, in the Frobenius norm
    and in every unitarily invariant norm, with

    .. math:: \|A - A_k\|_F^2 = \sum_{i > k} \sigma_i^2, \qquad \|A - A_k\|_2 = \sigma_{k+1}.

    Cost: one economy SVD, :math:`O(mn\min(m, n))`.  Use :func:`randomized_svd` when
    :math:`k \ll \min(m, n)`.

    References
    ----------
    C. Eckart and G. Young, "The approximation of one matrix by another of lower rank",
    Psychometrika 1 (1936) 211–218.
    """
    xp = check_matrix(A, "A")
    rank = _check_rank(rank, min(A.shape), "min(m, n)")
    U, S, Vh = xp.linalg.svd(A, full_matrices=False)
    return _svd_result(xp, U, S, Vh, rank)


# ----------------------------------------------------------------------------- randomized
def randomized_svd(
    A: Any,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int | np.random.Generator | None = None,
) -> SVDResult:
    r"""Approximate top-``rank`` SVD by a randomized range finder (Halko–Martinsson–Tropp).

    Parameters
    ----------
    A : array, shape (m, n)
        Finite float32/float64 matrix (NumPy, torch or CuPy).
    rank : int
        Number of singular triplets returned, :math:`1 \le k \le \min(m, n)`.
    oversample : int, default 10
        Extra sketch columns :math:`p`; the sketch has :math:`\ell = \min(k + p, \min(m, n))`
        columns.
    n_iter : int, default 2
        Number of power (subspace) iterations :math:`q`.
    seed : int, numpy.random.Generator or None
        Seed of the Gaussian test matrix.  It is drawn on the host in float64 by
        ``numpy.random.default_rng(seed)`` and then moved to ``A``'s backend, device and dtype, so
        one seed gives the same result on every backend (up to round-off).  ``None`` draws fresh
        entropy.

    Returns
    -------
    SVDResult
        ``U`` (m, k), ``S`` (k,) descending, ``Vh`` (k, n), on ``A``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``A`` is not a float32/float64 array, or ``rank``/``seed`` have the wrong type.
    ValueError
        If ``A`` is not a finite 2-D matrix, ``rank`` is out of range, or ``oversample`` /
        ``n_iter`` is negative.

    Notes
    -----
    Algorithm (HMT 2011, Algorithms 4.4 and 5.1), with :math:`\Omega \in \mathbb R^{n \times \ell}`
    standard Gaussian:

    1. :math:`Q \leftarrow \operatorname{qr}(A\Omega)`;
    2. :math:`q` times: :math:`\tilde Q \leftarrow \operatorname{qr}(A^\top Q)`,
       :math:`Q \leftarrow \operatorname{qr}(A \tilde Q)` — the power scheme
       :math:`(AA^\top)^q A\Omega`, re-orthonormalized after every product so that directions
       below :math:`\varepsilon^{1/(2q+1)}\sigma_1` are not lost to round-off;
    3. :math:`B = Q^\top A` (:math:`\ell \times n`), :math:`B = \hat U \Sigma V^\top`,
       :math:`U = Q\hat U`; keep the leading :math:`k` triplets.

    The output is :math:`\hat A_k = Q[Q^\top A]_k`.  Cost: :math:`(2q + 2)` products with
    :math:`A` or :math:`A^\top` against :math:`\ell` vectors, :math:`O(mn\ell)`, plus
    :math:`O((m + n)\ell^2)` for the QRs and the small SVD.  When :math:`\ell = \min(m, n)` the range
    is captured exactly and the result equals :func:`truncated_svd` up to round-off.

    **Expected error** (:math:`q = 0`, :math:`k \ge 2`, :math:`p \ge 2`,
    :math:`\tau_k^2 = \sum_{j>k}\sigma_j^2`).  HMT Theorem 10.5 bounds the projection,
    :math:`\mathbb E\|A - QQ^\top A\|_F \le (1 + k/(p-1))^{1/2}\tau_k`; its proof bounds the second
    moment.  The truncated output obeys the same bound: :math:`Q[Q^\top A]_k` is the best
    approximation of rank :math:`\le k` with columns in :math:`\operatorname{range}(Q)`
    (Pythagoras plus Eckart–Young on :math:`Q^\top A`), and the competitor
    :math:`Z = A\Omega\Omega_1^\dagger V_1^\top` of HMT Theorem 9.1 (:math:`\Omega_i = V_i^\top\Omega`,
    :math:`V_1` the top :math:`k` right singular vectors) is such a matrix with
    :math:`\|A - Z\|_F^2 = \tau_k^2 + \|\Sigma_2\Omega_2\Omega_1^\dagger\|_F^2`.  Averaging over the
    independent Gaussian blocks (HMT Propositions 10.1–10.2,
    :math:`\mathbb E\|\Omega_1^\dagger\|_F^2 = k/(p-1)`) gives

    .. math:: \mathbb E\,\|A - \hat A_k\|_F^2 \le \Big(1 + \frac{k}{p-1}\Big)\sum_{j>k}\sigma_j^2 .

    In the spectral norm HMT Theorem 10.6 gives
    :math:`\mathbb E\|A - QQ^\top A\|_2 \le (1 + \sqrt{k/(p-1)})\sigma_{k+1}
    + \tfrac{e\sqrt{k+p}}{p}\tau_k`, and with :math:`q` power iterations (Corollary 10.10)

    .. math::
        \mathbb E\,\|A - QQ^\top A\|_2 \le \Big[\Big(1 + \sqrt{\tfrac{k}{p-1}}\Big)\sigma_{k+1}^{2q+1}
        + \frac{e\sqrt{k+p}}{p}\Big(\sum_{j>k}\sigma_j^{2(2q+1)}\Big)^{1/2}\Big]^{1/(2q+1)},

    so each iteration sharpens the decay of the tail; truncating to rank :math:`k` adds at most
    :math:`\sigma_{k+1}` in the spectral norm (HMT §9.4).  Power iterations help most when the
    spectrum decays slowly.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
    algorithms for constructing approximate matrix decompositions", SIAM Review 53 (2011)
    217–288, arXiv:0909.4061.
    """
    xp = check_matrix(A, "A")
    m, n = A.shape
    rank = _check_rank(rank, min(m, n), "min(m, n)")
    oversample = _check_count(oversample, "oversample")
    n_iter = _check_count(n_iter, "n_iter")
    rng = _rng(seed)

    ell = min(rank + oversample, m, n)
    omega = from_numpy_like(rng.standard_normal((n, ell)), A)
    Q = xp.linalg.qr(A @ omega)[0]  # (m, ell)
    for _ in range(n_iter):
        Qt = xp.linalg.qr(A.T @ Q)[0]  # (n, ell)
        Q = xp.linalg.qr(A @ Qt)[0]  # (m, ell)
    Ub, S, Vh = xp.linalg.svd(Q.T @ A, full_matrices=False)  # (ell, ell), (ell,), (ell, n)
    return _svd_result(xp, Q @ Ub, S, Vh, rank)


# ----------------------------------------------------------------------------- factored
def recompress_factors(B: Any, A: Any, rank: int) -> SVDResult:
    r"""Best rank-``rank`` approximation of the product ``B @ A`` without forming it.

    Parameters
    ----------
    B : array, shape (m, r)
        Left factor (a LoRA ``B``), finite float32/float64.
    A : array, shape (r, n)
        Right factor (a LoRA ``A``), same backend, device and dtype as ``B``.
    rank : int
        Target rank :math:`k`, :math:`1 \le k \le \min(m, n, r)` (the product has rank at most
        :math:`r`).

    Returns
    -------
    SVDResult
        ``U`` (m, k), ``S`` (k,) descending, ``Vh`` (k, n) with
        :math:`U\operatorname{diag}(S)V_h = [BA]_k`, on the factors' backend, device and dtype.

    Raises
    ------
    TypeError
        If ``B`` or ``A`` is not a float32/float64 array, or their dtypes or backends differ.
    ValueError
        If either is not a finite 2-D matrix, the inner dimensions of ``B`` and ``A`` differ, or
        ``rank`` is out of range.

    Notes
    -----
    Thin QR factorizations :math:`B = Q_B R_B` and :math:`A^\top = Q_A R_A` give

    .. math:: BA = Q_B\,(R_B R_A^\top)\,Q_A^\top ,

    with :math:`Q_B`, :math:`Q_A` orthonormal, so the SVD of the small core
    :math:`R_B R_A^\top = \hat U \Sigma \hat V^\top` (at most :math:`r \times r`) is an SVD of
    :math:`BA` after rotating, :math:`U = Q_B\hat U`, :math:`V = Q_A \hat V`; truncating it is
    exact (Eckart–Young), not an approximation of :func:`truncated_svd` ``(B @ A)``.  Cost:
    :math:`O((m + n)r^2 + r^3)` instead of :math:`O(mnr)` to form the product and
    :math:`O(mn\min(m,n))` to decompose it.  Householder QR keeps :math:`Q_B` orthonormal even when
    :math:`B` is rank-deficient (then the trailing core singular values are zero).  This is the
    LoRA-Squeeze compression step (``methods.md``: compress :math:`BA` from rank :math:`r` to
    :math:`k` via QR of :math:`B` and :math:`A^\top` and an SVD of the :math:`r \times r` core).

    References
    ----------
    G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed. (2013), §2.4 and §5.2
    (SVD and thin QR).  E. J. Hu et al., "LoRA: Low-rank adaptation of large language models",
    arXiv:2106.09685 (the factored update :math:`BA`).
    """
    check_matrix(B, "B")
    check_matrix(A, "A")
    xp = namespace(B, A)
    if B.dtype != A.dtype:
        raise TypeError(f"B and A must have the same dtype, got B: {B.dtype} and A: {A.dtype}")
    m, r = B.shape
    r_a, n = A.shape
    if r != r_a:
        raise ValueError(
            f"inner dimensions of B (m, r) and A (r, n) must match, got B {tuple(B.shape)} and A {tuple(A.shape)}"
        )
    rank = _check_rank(rank, min(m, n, r), "min(m, n, r)")
    QB, RB = xp.linalg.qr(B)  # (m, kb), (kb, r), kb = min(m, r)
    QA, RA = xp.linalg.qr(A.T)  # (n, ka), (ka, r), ka = min(n, r)
    Uc, S, Vhc = xp.linalg.svd(RB @ RA.T, full_matrices=False)
    return _svd_result(xp, QB @ Uc, S, Vhc @ QA.T, rank)
