r"""Merges of factored task vectors :math:`\Delta W_t = B_t A_t` (LoRA factors) that never form an m×n matrix.

* :func:`cat` -- concatenate the factors: exact, the rank adds up (:math:`\sum_t r_t`);
* :func:`svd` -- the best rank-:math:`k` approximation of :math:`\sum_t w_t B_t A_t` from the concatenated
  factors by :func:`~lowrank_theory.linalg.recompress_factors` (thin QRs and an SVD of a
  :math:`\sum r_t \times \sum r_t` core).

Both are PEFT's ``add_weighted_adapter`` combinations of the same names
(:func:`~lowrank_theory.merging.lora.combine_lora` has the rest); the exactness of ``cat`` and the
optimality of ``svd`` are proved in ``proofs/19-merging-factored-merges.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ..backend import backend_name, check_matrix, namespace
from ..linalg import recompress_factors
from ._validate import check_weights, to_output, working

__all__ = ["cat", "check_factors", "svd"]


def check_factors(factors: Any, name: str = "factors") -> list[tuple[Any, Any]]:
    r"""Validate a non-empty sequence of pairs ``(B_t, A_t)``, :math:`B_t` (m, r_t), :math:`A_t` (r_t, n).

    All factors must be finite 2-D float arrays of one backend and dtype (float32/float64, or torch
    float16/bfloat16), with one m and one n; the ranks :math:`r_t` may differ.

    Raises
    ------
    TypeError
        Not a sequence of pairs, a factor not a float array, mixed backends or dtypes.
    ValueError
        Empty, a factor not 2-D or with a zero-sized dimension, non-finite, inner dimensions that
        differ, or an m or n different from the first pair's.
    """
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a non-empty sequence of (B, A) pairs, got {type(factors).__name__}")
    pairs = list(factors)
    if not pairs:
        raise ValueError(f"{name} must hold at least one (B, A) pair, got an empty sequence")
    ref = None
    for t, pair in enumerate(pairs):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{name}[{t}] must be a pair (B, A), got {type(pair).__name__}")
        B, A = pair
        for label, X in ((f"{name}[{t}][0] (B)", B), (f"{name}[{t}][1] (A)", A)):
            check_matrix(working(X), label)
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"{name}[{t}]: B (m, r) and A (r, n) must share r, got B {tuple(B.shape)} "
                             f"and A {tuple(A.shape)}")
        key = (backend_name(B), backend_name(A), B.dtype, A.dtype)
        if key[0] != key[1] or key[2] != key[3]:
            raise TypeError(f"{name}[{t}]: B and A must share backend and dtype, got {key}")
        if ref is None:
            ref = (key, B.shape[0], A.shape[1])
            continue
        if key != ref[0]:
            raise TypeError(f"{name} must all be {ref[0][0]} arrays of dtype {ref[0][2]}, {name}[{t}] is "
                            f"{key[0]} of dtype {key[2]}")
        if (B.shape[0], A.shape[1]) != (ref[1], ref[2]):
            raise ValueError(f"{name} must all describe an ({ref[1]}, {ref[2]}) update, but {name}[{t}] gives "
                             f"B {tuple(B.shape)} @ A {tuple(A.shape)}")
    return [(B, A) for B, A in pairs]


def _concatenated(pairs: list, ws: list[float]):
    xp = namespace(working(pairs[0][0]))
    B = xp.concat([working(B) for B, _ in pairs], axis=1)
    A = xp.concat([w * working(A) for (_, A), w in zip(pairs, ws)], axis=0)
    return B, A


def cat(factors: Sequence[tuple[Any, Any]], weights: Sequence[float] | None = None):
    r"""Concatenate LoRA factors: the exact merge :math:`\sum_t w_t B_t A_t` at rank :math:`\sum_t r_t`.

    Parameters
    ----------
    factors : sequence of pairs ``(B_t, A_t)``
        :math:`B_t` (m, r_t) and :math:`A_t` (r_t, n) with :math:`\Delta W_t = B_t A_t` (fold a LoRA
        scale :math:`s_t` into a factor or into ``weights``).
    weights : sequence of float, optional
        :math:`w_t` (default 1 each).

    Returns
    -------
    B : array, shape (m, R), :math:`R = \sum_t r_t`
        :math:`[B_1 \;\cdots\; B_T]`.
    A : array, shape (R, n)
        :math:`[w_1 A_1; \dots; w_T A_T]` (stacked rows), so :math:`BA = \sum_t w_t B_t A_t` exactly.

    Raises
    ------
    TypeError, ValueError
        On bad factors (:func:`check_factors`) or weights.

    Notes
    -----
    Block multiplication: :math:`[B_1 \cdots B_T]\,[w_1A_1; \dots; w_TA_T] = \sum_t w_t B_tA_t`.  PEFT's
    ``cat`` does the same, with :math:`w_t s_t` on the :math:`A_t` (``proofs/19-merging-factored-merges.md``).
    Nothing of size m×n is formed; the output has :math:`R(m + n)` entries.
    """
    pairs = check_factors(factors)
    ws = check_weights(weights, len(pairs))
    B, A = _concatenated(pairs, ws)
    return to_output(B, pairs[0][0]), to_output(A, pairs[0][1])


def svd(factors: Sequence[tuple[Any, Any]], rank: int, weights: Sequence[float] | None = None):
    r"""Best rank-``rank`` approximation of :math:`\sum_t w_t B_t A_t`, as factors, without forming it.

    Parameters
    ----------
    factors : sequence of pairs ``(B_t, A_t)``
        As in :func:`cat`.
    rank : int
        :math:`k`, :math:`1 \le k \le \min(m, n, \sum_t r_t)`.
    weights : sequence of float, optional
        :math:`w_t` (default 1 each).

    Returns
    -------
    B : array, shape (m, k)
        :math:`U_k \operatorname{diag}(\sigma_1, \dots, \sigma_k)`.
    A : array, shape (k, n)
        :math:`V_k^\top`; :math:`BA = [\sum_t w_t B_tA_t]_k`, the truncated SVD (PEFT's split: the
        singular values go into B).

    Raises
    ------
    TypeError, ValueError
        On bad factors or weights, or ``rank`` out of range.

    Notes
    -----
    :math:`\sum_t w_t B_tA_t = \bar B\bar A` with the concatenated factors of :func:`cat`; then
    :func:`~lowrank_theory.linalg.recompress_factors` takes thin QRs :math:`\bar B = Q_BR_B`,
    :math:`\bar A^\top = Q_AR_A` and the SVD of the :math:`R\times R` core :math:`R_BR_A^\top`, which is an
    SVD of :math:`\bar B\bar A` after rotation, so its truncation is the Eckart–Young optimum in the
    Frobenius and spectral norms (``proofs/01-eckart-young-mirsky.md``).  Cost
    :math:`O((m + n)R^2 + R^3)`; the largest arrays formed are m×R and R×n.  PEFT's ``svd``
    combination computes the same product by a dense SVD of the m×n sum (equal up to rounding and to
    the sign of each singular pair, whose product is unique where singular values are distinct).
    """
    pairs = check_factors(factors)
    ws = check_weights(weights, len(pairs))
    total = sum(int(B.shape[1]) for B, _ in pairs)
    m, n = int(pairs[0][0].shape[0]), int(pairs[0][1].shape[1])
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= int(rank) <= min(m, n, total):
        raise ValueError(f"rank must satisfy 1 <= rank <= min(m, n, sum of the factor ranks) = "
                         f"min({m}, {n}, {total}), got {rank}")
    B, A = _concatenated(pairs, ws)
    U, S, Vh = recompress_factors(B, A, int(rank))
    return to_output(U * S[None, :], pairs[0][0]), to_output(Vh, pairs[0][1])
