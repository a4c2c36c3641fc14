r"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al. 2023), with PEFT's weighting.

Sign election and the disjoint mean are also DARE-TIES's last two steps
(:func:`~lowrank_theory.merging.drop_and_rescale.dare_ties`), which calls :func:`elect_and_merge` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backend import device_of, namespace
from ._validate import check_density, check_task_vectors, check_weights, to_output, working
from .prune import trim_unchecked

__all__ = ["SIGN_METHODS", "elect_and_merge", "elect_sign", "ties"]

#: How the sign of each entry is elected: by the summed values ("total", TIES's mass) or by a vote of
#: the signs ("frequency").
SIGN_METHODS = ("total", "frequency")


def _check_method(method: Any) -> str:
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    return method


def elect_sign(stacked: Any, method: str = "total"):
    r"""The elected sign :math:`\gamma \in \{-1, +1\}` of every entry of stacked task vectors.

    Parameters
    ----------
    stacked : array, shape (T, ...)
        Task vectors stacked on axis 0.
    method : {"total", "frequency"}
        ``"total"``: :math:`\gamma = \operatorname{sgn}\sum_t \tau_t` (TIES's sign of largest total
        mass); ``"frequency"``: :math:`\gamma = \operatorname{sgn}\sum_t \operatorname{sgn}\tau_t` (a vote).

    Returns
    -------
    array, shape ``stacked.shape[1:]``
        :math:`\pm 1` in the dtype of ``stacked``; a sum of exactly 0 elects :math:`+1` (PEFT's rule).
    """
    xp = namespace(stacked)
    _check_method(method)
    s = xp.sum(stacked if method == "total" else xp.sign(stacked), axis=0)
    one = xp.ones_like(s)
    return xp.where(s >= 0, one, -one)


def elect_and_merge(tvs: list, weights: list[float], method: str):
    r"""Sign election on ``tvs``, then the disjoint mean of the weighted ``tvs`` (validated, upcast inputs).

    .. math:: \tau_m = \frac{\sum_t w_t\,\tau_t\,[\operatorname{sgn}\tau_t = \gamma]}
              {\max\big(1, \sum_t [\operatorname{sgn}\tau_t = \gamma]\big)}

    entrywise; zero entries never agree with :math:`\gamma`, so they neither add nor count.
    """
    xp = namespace(*tvs)
    stacked = xp.stack(tvs, axis=0)
    gamma = elect_sign(stacked, method)
    agree = xp.sign(stacked) == gamma[None, ...]
    w = xp.asarray(weights, dtype=stacked.dtype, device=device_of(stacked))
    w = xp.reshape(w, (len(weights),) + (1,) * (stacked.ndim - 1))
    zero = xp.zeros_like(stacked)
    total = xp.sum(xp.where(agree, w * stacked, zero), axis=0)
    count = xp.sum(xp.astype(agree, stacked.dtype), axis=0)
    return total / xp.maximum(count, xp.ones_like(count))


def ties(task_vectors: Sequence[Any], weights: Sequence[float] | None, density: float, *,
         majority_sign_method: str = "total"):
    r"""TIES-Merging: trim each task vector, elect a sign per entry, average the agreeing entries.

    Parameters
    ----------
    task_vectors : sequence of arrays, each of shape ``S``
        :math:`\tau_1, \dots, \tau_T` of one backend and dtype.
    weights : sequence of float or None
        :math:`w_t` (``None``: 1 each).  TIES's :math:`\lambda` is ``[λ] * T``.
    density : float in (0, 1]
        :math:`\rho`: each task vector keeps its :math:`\lfloor\rho D\rfloor` largest-magnitude
        entries (TIES's :math:`k` %, 20 % in the paper).  ``1`` skips the trim.
    majority_sign_method : {"total", "frequency"}
        See :func:`elect_sign`.

    Returns
    -------
    array, shape ``S``
        :math:`\tau_m`, in the inputs' dtype (half precision computed in float32).

    Raises
    ------
    TypeError, ValueError
        On bad task vectors, weights, density or sign method.

    Notes
    -----
    The three steps of Yadav et al. (2023, §4 and their Algorithm 1), per entry :math:`p`:

    1. trim: :math:`\hat\tau_t = \operatorname{trim}_\rho(\tau_t)` (:func:`~lowrank_theory.merging.prune.trim`);
    2. elect: :math:`\gamma^p = \operatorname{sgn}\sum_t \hat\tau_t^p`;
    3. disjoint mean over :math:`\mathcal A^p = \{t : \operatorname{sgn}\hat\tau_t^p = \gamma^p\}`:
       :math:`\tau_m^p = \frac{1}{|\mathcal A^p|}\sum_{t\in\mathcal A^p} w_t \hat\tau_t^p`.

    With equal weights :math:`w_t = \lambda` this is the paper's :math:`\lambda\,\tau_m`.  The trim keeps
    :math:`\lfloor\rho D\rfloor` entries, as the paper's "top-k %" and PEFT do; the TIES code base's
    ``topk_values_mask`` (``kthvalue`` then ``>=``; we read the copy in the PCB authors' repository,
    ``nlp_source_code/utils/merge_utils.py``) keeps one more.  For unequal
    weights we follow PEFT's ``ties`` (``peft.utils.merge_utils``): the sign is elected on the
    *unweighted* trimmed vectors and the weighted agreeing entries are divided by their *count*.
    (mergekit's ``generalized_task_arithmetic`` differs: it elects on the weighted vectors, divides by
    the sum of the agreeing *weights* and multiplies by a global :math:`\lambda`; with equal weights that
    is this function with ``weights = [λ] * T``.)  The trim ranks the entries of each array passed
    in; the TIES authors rank over the whole flattened model
    (:func:`~lowrank_theory.merging.state.merge_state_dicts` with ``scope="global"``), PEFT per layer.

    References
    ----------
    P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal, "TIES-Merging: Resolving Interference When
    Merging Models", NeurIPS 2023, arXiv:2306.01708.
    """
    tvs = check_task_vectors(task_vectors)
    ws = check_weights(weights, len(tvs))
    rho = check_density(density)
    method = _check_method(majority_sign_method)
    trimmed = [trim_unchecked(working(t), rho) for t in tvs]
    return to_output(elect_and_merge(trimmed, ws, method), tvs[0])
