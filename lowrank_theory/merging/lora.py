r"""PEFT's ``add_weighted_adapter`` combinations of LoRA factors, as one pure function per layer.

PEFT (``peft.tuners.lora.model.LoraModel.add_weighted_adapter``, 0.21) offers eleven combination
types, in three families:

* ``"cat"`` -- :func:`~lowrank_theory.merging.factored.cat` with weights :math:`w_t s_t`: exact;
* ``"svd"`` and the ``"*_svd"`` types (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``) -- merge the dense :math:`\Delta W_t = s_t B_t A_t` with the named method,
  then keep the best rank-``svd_rank`` approximation (``"svd"`` is task arithmetic, done here from the
  factors by :func:`~lowrank_theory.merging.factored.svd`, never dense);
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` -- merge the
  :math:`A_t` among themselves and the :math:`B_t` among themselves with weights
  :math:`\operatorname{sgn}(w_ts_t)\sqrt{|w_ts_t|}` on A and :math:`\sqrt{|w_ts_t|}` on B.  This is **not**
  the merge of the :math:`\Delta W_t`: for ``"linear"``,
  :math:`(\sum_t\sqrt{w_t}B_t)(\sum_t\sqrt{w_t}A_t) = \sum_t w_tB_tA_t + \sum_{s\ne t}\sqrt{w_sw_t}B_sA_t`
  (``proofs/19-merging-factored-merges.md``); it needs equal ranks.

:func:`combine_lora` reproduces each of them on one layer's factors; the tests compare it with PEFT.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from ..linalg import derive_seed, truncated_svd
from ._validate import check_density, check_seed, check_weights, to_output, working
from .arithmetic import task_arithmetic
from .drop_and_rescale import dare_linear, dare_ties
from .factored import cat, check_factors, svd
from .prune import magnitude_prune
from .ties_merging import ties

__all__ = ["COMBINATION_TYPES", "combine_lora"]

#: PEFT's combination types, in its order.
COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                  "magnitude_prune", "magnitude_prune_svd")


def _method(kind: str, density: float | None, sign: str, seed: int | None):
    """The task-vector merge of ``kind`` (without a ``_svd`` suffix) as ``f(tvs, weights, seed)``."""
    if kind in ("linear", "svd"):
        return lambda tvs, ws, s: task_arithmetic(tvs, ws)
    if kind == "ties":
        return lambda tvs, ws, s: ties(tvs, ws, density, majority_sign_method=sign)
    if kind == "magnitude_prune":
        return lambda tvs, ws, s: magnitude_prune(tvs, ws, density)
    if kind == "dare_linear":
        return lambda tvs, ws, s: dare_linear(tvs, ws, density, seed=s)
    return lambda tvs, ws, s: dare_ties(tvs, ws, density, seed=s, majority_sign_method=sign)


def combine_lora(factors: Sequence[tuple[Any, Any]], weights: Sequence[float], combination_type: str = "svd", *,
                 scalings: Sequence[float] | None = None, svd_rank: int | None = None, density: float | None = None,
                 majority_sign_method: str = "total", seed: int | None = None) -> tuple[Any, Any]:
    r"""One layer of PEFT's ``add_weighted_adapter``: the merged LoRA factors ``(B, A)``.

    Parameters
    ----------
    factors : sequence of pairs ``(B_t, A_t)``
        LoRA factors, :math:`B_t` (m, r_t), :math:`A_t` (r_t, n) (PEFT's ``lora_B`` / ``lora_A`` weights).
    weights : sequence of float
        :math:`w_t`, one per adapter (may be negative).
    combination_type : str
        One of :data:`COMBINATION_TYPES`.  With one adapter PEFT always uses ``"linear"``; so does this.
    scalings : sequence of float, optional
        Each adapter's LoRA scale :math:`s_t = \alpha_t / r_t` (PEFT's ``target.scaling``); default 1.
    svd_rank : int, optional
        Rank of the ``svd`` types' result (default: the largest :math:`r_t`, as PEFT).
    density : float in (0, 1]
        Required by the pruning types (PEFT's ``density``).
    majority_sign_method : {"total", "frequency"}
        For the TIES types.
    seed : int, optional
        Root seed of the DARE types' masks (A's and B's masks from ``derive_seed(seed, "A")`` and
        ``derive_seed(seed, "B")`` in the factor-wise types).  PEFT uses the global torch generator.

    Returns
    -------
    B : array, shape (m, r')
    A : array, shape (r', n)
        The new adapter's factors; PEFT gives it :math:`\alpha = r'`, i.e. scale 1, so its
        :math:`\Delta W` is ``B @ A``.  :math:`r'` is the common rank (factor-wise types),
        :math:`\sum_t r_t` (``cat``) or ``svd_rank``.

    Raises
    ------
    TypeError, ValueError
        Bad factors or weights, an unknown type, a missing or invalid density, unequal ranks for a
        factor-wise type, or an ``svd_rank`` out of range.

    Notes
    -----
    Differences from PEFT, all in inputs PEFT accepts and we refuse: ``svd`` with ``svd_rank`` above
    :math:`\min(m, n, \sum r_t)` (PEFT pads with zero singular values); ``svd_clamp`` and Conv / embedding
    / ``fan_in_fan_out`` layouts are not handled (pass the factors of an ``nn.Linear`` layout).  The
    ``*_svd`` types form the dense m×n merge, as PEFT does: TIES, DARE and pruning act entrywise on
    :math:`\Delta W`.
    """
    pairs = check_factors(factors)
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    if weights is None:
        raise TypeError("weights must be a sequence of real numbers, one per adapter, got None")
    ws = check_weights(weights, len(pairs))
    ss = check_weights(scalings, len(pairs), "scalings")
    seed = check_seed(seed)
    kind = "linear" if len(pairs) == 1 else combination_type
    if kind in _NEEDS_DENSITY:
        density = check_density(density)
    ranks = [int(B.shape[1]) for B, _ in pairs]
    ws_eff = [w * s for w, s in zip(ws, ss)]
    if kind == "cat":
        return cat(pairs, ws_eff)
    if kind in _FACTORWISE:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type {kind!r} merges the factors entrywise and needs equal ranks, "
                             f"got {ranks}; use 'cat' or an 'svd' type")
        wa = [math.copysign(math.sqrt(abs(w)), w) if w != 0 else 0.0 for w in ws_eff]
        wb = [math.sqrt(abs(w)) for w in ws_eff]
        f = _method(kind, density, majority_sign_method, seed)
        sa = None if seed is None else derive_seed(seed, "A")
        sb = None if seed is None else derive_seed(seed, "B")
        A = f([A for _, A in pairs], wa, sa)
        B = f([B for B, _ in pairs], wb, sb)
        return B, A
    m, n = int(pairs[0][0].shape[0]), int(pairs[0][1].shape[1])
    rank = max(ranks) if svd_rank is None else svd_rank
    if kind == "svd":
        return svd(pairs, rank, ws_eff)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= int(rank) <= min(m, n):
        raise ValueError(f"svd_rank must be an int in [1, min(m, n) = {min(m, n)}], got {rank!r}")
    dense = [s * (working(B) @ working(A)) for (B, A), s in zip(pairs, ss)]
    merged = _method(kind.removesuffix("_svd"), density, majority_sign_method, seed)(dense, ws, seed)
    U, S, Vh = truncated_svd(merged, int(rank))
    return to_output(U * S[None, :], pairs[0][0]), to_output(Vh, pairs[0][1])
