r"""LDU factorizations :math:`A = P L \operatorname{diag}(D) U`, with and without pivoting.

:func:`ldu` splits the pivots out of the backend's partially pivoted LU (LAPACK ``getrf`` via
SciPy, ``torch.linalg.lu``, ``cupyx``); :func:`ldu_nopivot` is Doolittle elimination without row
interchanges, whose pivots are the ratios of leading principal minors
:math:`D_i = \det A_{1:i,1:i} / \det A_{1:i-1,1:i-1}` (used by ``proofs/`` and by LoLDU, whose
initialization reads the LDU factors of the frozen weight).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from ..backend import check_matrix, device_of, lu

__all__ = ["LDUResult", "ldu", "ldu_nopivot"]


class LDUResult(NamedTuple):
    """Factors of :math:`A = P L \\operatorname{diag}(D) U`, with k = min(m, n).

    Attributes
    ----------
    P : array, shape (m, m)
        Permutation matrix (the identity for :func:`ldu_nopivot`), in ``A``'s dtype.
    L : array, shape (m, k)
        Unit lower-trapezoidal: ones on the diagonal, zeros above.
    D : array, shape (k,)
        Pivots.
    U : array, shape (k, n)
        Unit upper-trapezoidal: ones on the diagonal, zeros below.
    """

    P: Any
    L: Any
    D: Any
    U: Any


def ldu(A: Any) -> LDUResult:
    r"""LDU factorization with partial pivoting, :math:`A = P L \operatorname{diag}(D) U`.

    Parameters
    ----------
    A : array, shape (m, n)
        Finite float32/float64 matrix (NumPy, torch or CuPy); rectangular allowed.

    Returns
    -------
    LDUResult
        ``P`` (m, m) permutation, ``L`` (m, k) unit lower-trapezoidal with :math:`|L_{ij}| \le 1`,
        ``D`` (k,), ``U`` (k, n) unit upper-trapezoidal, k = min(m, n); on ``A``'s backend, device
        and dtype.

    Raises
    ------
    TypeError
        If ``A`` is not a float32/float64 array.
    ValueError
        If ``A`` is not a finite 2-D matrix with no zero-sized dimension, or if elimination meets an
        exactly zero pivot whose row of the LU factor is not zero (see Notes).

    Notes
    -----
    From the pivoted LU :math:`A = P L \tilde U` (``backend.lu``) take :math:`D = \operatorname{diag}
    (\tilde U)` and :math:`U = \operatorname{diag}(D)^{-1}\tilde U`, so :math:`U_{ii} = 1` exactly
    and the identity holds to the rounding of one division per entry.  For square nonsingular
    :math:`A`, :math:`\det A = \det P \prod_i D_i`.

    **Zero pivots.**  Partial pivoting meets a zero pivot at step :math:`i` exactly when column
    :math:`i` of the remaining Schur complement vanishes.  Then :math:`\tilde U_{ii} = 0` and:

    * if the whole row :math:`\tilde U_{i,:}` is zero, we set :math:`D_i = 0` and
      :math:`U_{i,:} = e_i^\top`; the identity still holds exactly (the row contributes nothing);
    * otherwise no factorization with a unit-diagonal :math:`U` exists for this pivot order, since
      :math:`D_i U_{ij} = \tilde U_{ij} \ne 0` would need :math:`D_i \ne 0 = \tilde U_{ii}`
      (e.g. :math:`A = \begin{pmatrix}0 & 1\\ 0 & 1\end{pmatrix}` has no LDU for any row order),
      and a ``ValueError`` is raised.  Perturb :math:`A` or use a rank-revealing factorization.

    Only exact zeros are special: a tiny nonzero pivot is kept, and the identity still holds to
    rounding.

    References
    ----------
    G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed. (2013), §§3.2–3.4 (LU, pivoting).
    N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed. (2002), ch. 9.
    Y. Shi et al., "LoLDU: Low-rank adaptation via lower-diag-upper decomposition",
    arXiv:2410.13618 (the adapter that uses these factors).
    """
    xp = check_matrix(A, "A")
    with warnings.catch_warnings():
        # cupyx warns on an exactly zero pivot; the zero-pivot policy below handles (or reports) it
        warnings.filterwarnings("ignore", message="Diagonal number .* is exactly zero", category=RuntimeWarning)
        P, L, Ut = lu(A)
    k = min(A.shape)
    D = xp.linalg.diagonal(Ut)
    zero = D == 0
    if bool(xp.any(zero)):
        row_nonzero = xp.any(Ut != 0, axis=1)
        bad = xp.nonzero(zero & row_nonzero)[0]
        if bad.shape[0] > 0:
            i = int(bad[0])
            raise ValueError(
                f"A has an exactly zero pivot at elimination step {i} (column {i} of the Schur complement "
                f"vanishes) while row {i} of its LU factor is nonzero: no A = P L diag(D) U with unit-diagonal "
                "U exists for this pivot order; A is rank-deficient (perturb it or use a rank-revealing method)"
            )
    ones = xp.ones_like(D)
    zero_f = xp.astype(zero, D.dtype)
    U = Ut / xp.where(zero, ones, D)[:, None]
    U = U + xp.eye(k, A.shape[1], dtype=A.dtype, device=device_of(A)) * zero_f[:, None]
    _check_finite_factors(xp, A, L, D, U)
    return LDUResult(P, L, D, U)


def _check_finite_factors(xp, A: Any, L: Any, D: Any, U: Any) -> None:
    """Refuse factors that overflowed (a pivot tiny next to its row: ``U = Ũ / D`` leaves the dtype's range)."""
    for name, F in (("L", L), ("D", D), ("U", U)):
        if not bool(xp.all(xp.isfinite(F))):
            raise ValueError(
                f"A's LDU factor {name} is not finite in {A.dtype}: a pivot is too small next to the entries it "
                "divides (|U_ij| = |Ũ_ij / D_i| overflows); rescale A or factor it in float64"
            )


def ldu_nopivot(A: Any) -> LDUResult:
    r"""LDU factorization without pivoting (Doolittle), :math:`A = L \operatorname{diag}(D) U`.

    Parameters
    ----------
    A : array, shape (m, n)
        Finite float32/float64 matrix; rectangular allowed.

    Returns
    -------
    LDUResult
        ``P`` the (m, m) identity, ``L`` (m, k) unit lower-trapezoidal, ``D`` (k,), ``U`` (k, n)
        unit upper-trapezoidal, k = min(m, n); on ``A``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``A`` is not a float32/float64 array.
    ValueError
        If ``A`` is not a finite 2-D matrix, or a leading principal minor that the factorization
        divides by vanishes (numerically, see Notes); the message names its order.

    Notes
    -----
    **Existence and uniqueness.**  Let :math:`\Delta_i = \det A_{1:i,1:i}` (:math:`\Delta_0 = 1`)
    and k = min(m, n).  If :math:`\Delta_1, \dots, \Delta_{k-1} \ne 0` — and also
    :math:`\Delta_k \ne 0` when :math:`A` is not square — then :math:`A = L\operatorname{diag}(D)U`
    with unit-trapezoidal :math:`L`, :math:`U` exists, is unique, and

    .. math:: D_i = \frac{\Delta_i}{\Delta_{i-1}}, \qquad i = 1, \dots, k,

    because the leading :math:`i \times i` block of the factorization is
    :math:`A_{1:i,1:i} = L_{1:i,1:i}\operatorname{diag}(D_{1:i})U_{1:i,1:i}` with unit-triangular
    outer factors, so :math:`\Delta_i = D_1 \cdots D_i`.  For square :math:`A` the last pivot divides
    nothing and may be zero (:math:`D_n = 0` iff :math:`A` is singular).

    **Algorithm.**  Right-looking elimination on the Schur complement :math:`S` (initially
    :math:`A`): :math:`D_i = S_{11}`, :math:`L_{i+1:,i} = S_{2:,1}/D_i`,
    :math:`U_{i,i+1:} = S_{1,2:}/D_i`, :math:`S \leftarrow S_{2:,2:} - S_{2:,1}S_{1,2:}/D_i`;
    :math:`O(mnk)` flops, no in-place updates (autograd-safe on torch).

    **When a pivot counts as zero.**  In floating point a vanishing minor leaves a pivot of the
    size of the rounding error.  The computed pivot carries an error of at most
    :math:`\gamma_i\,(|L||D||U|)_{ii}` (Higham 2002, Thm 9.3, :math:`\gamma_i = iu/(1-iu)`), so a
    pivot that the factorization must divide by is treated as zero when

    .. math:: |D_i| \le 2 i \varepsilon \sum_{j \le i} |L_{ij}|\,|D_j|\,|U_{ji}|

    (:math:`\varepsilon = 2u`, a margin of 4 over :math:`\gamma_i`), and ``ValueError`` names the
    minor of order :math:`i`.  Without pivoting the factorization can be unstable for pivots above
    this level; prefer :func:`ldu` for computation and use this one where the no-pivot factors
    themselves are the object (proofs, diagonally dominant matrices, for which partial pivoting
    does no interchanges and both functions agree).  One host synchronization per step (the
    pivot test).

    References
    ----------
    G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed. (2013), §3.2 (LU without pivoting).
    N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed. (2002), Thm 9.1
    (existence), Thm 9.3 (backward error).
    """
    xp = check_matrix(A, "A")
    m, n = A.shape
    k = min(m, n)
    dev = device_of(A)
    eps = float(xp.finfo(A.dtype).eps)
    S = A
    # running diagonal of sum_{j<i} |L_:j| |D_j| |U_j:| over the remaining Schur complement
    acc = xp.zeros((k,), dtype=A.dtype, device=dev)
    l_cols, u_rows, pivots = [], [], []
    for i in range(k):
        d = S[0, 0]
        scale = acc[0] + xp.abs(d)  # (|L||D||U|)_{ii}
        divides = S.shape[0] > 1 or S.shape[1] > 1
        if divides and bool(xp.abs(d) <= 2 * (i + 1) * eps * scale):
            raise ValueError(
                f"A: leading principal minor of order {i + 1} vanishes (pivot {float(d):.3g} is within "
                f"rounding of zero, level {2 * (i + 1) * eps * float(scale):.3g}); no A = L diag(D) U without "
                "pivoting exists (ldu() pivots)"
            )
        lc = S[1:, 0] / d if S.shape[0] > 1 else S[1:, 0]
        ur = S[0, 1:] / d if S.shape[1] > 1 else S[0, 1:]
        one = xp.ones((1,), dtype=A.dtype, device=dev)
        l_cols.append(xp.concat([xp.zeros((i,), dtype=A.dtype, device=dev), one, lc]))
        u_rows.append(xp.concat([xp.zeros((i,), dtype=A.dtype, device=dev), one, ur]))
        pivots.append(d)
        if i + 1 < k:
            S = S[1:, 1:] - lc[:, None] * S[0, 1:][None, :]
            r = k - i - 1
            acc = acc[1:] + xp.abs(d) * xp.abs(lc[:r]) * xp.abs(ur[:r])
    L = xp.stack(l_cols, axis=1)
    U = xp.stack(u_rows, axis=0)
    D = xp.stack(pivots)
    P = xp.eye(m, dtype=A.dtype, device=dev)
    _check_finite_factors(xp, A, L, D, U)
    return LDUResult(P, L, D, U)
