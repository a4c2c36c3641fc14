r"""Magnitude pruning: keep the largest-magnitude entries of a task vector ("trim"), and the pruned sum.

The trim step is shared by TIES (its first step, "trim") and by the magnitude-prune merge
(trim each task vector, then task arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backend import namespace
from ._validate import check_array, check_density, check_task_vectors, check_weights, to_output, working
from .arithmetic import weighted_sum

__all__ = ["keep_count", "magnitude_prune", "trim"]


def keep_count(size: int, density: float) -> int:
    r"""How many of ``size`` entries a magnitude trim at ``density`` keeps: :math:`k = \lfloor \rho\,D \rfloor`.

    The floor of the product in floating point, exactly as PEFT's ``magnitude_based_pruning``
    computes it (``int(density * numel)``), so both keep the same entries; ``density = 1`` keeps all.
    """
    return size if density >= 1.0 else int(density * size)


def trim_unchecked(x: Any, density: float):
    """:func:`trim` on an already validated array (no checks; the inner step of the merges)."""
    if density >= 1.0:
        return x
    xp = namespace(x)
    flat = xp.reshape(x, (-1,))
    k = keep_count(flat.shape[0], density)
    order = xp.argsort(xp.abs(flat), descending=True, stable=True)
    keep = xp.zeros_like(flat, dtype=xp.bool)
    keep[order[:k]] = True
    return xp.reshape(xp.where(keep, flat, xp.zeros_like(flat)), tuple(x.shape))


def trim(x: Any, density: float):
    r"""Keep the :math:`k = \lfloor \rho D\rfloor` largest-magnitude entries of ``x``; zero the rest.

    Parameters
    ----------
    x : array, any shape (D entries)
        A task vector (NumPy, torch or CuPy; float32/float64, or torch float16/bfloat16).
    density : float in (0, 1]
        :math:`\rho`, the fraction of entries kept.  ``1`` returns ``x`` itself.

    Returns
    -------
    array, like ``x``
        :math:`m \odot x` with :math:`m_i = 1` for the :math:`k` entries of largest :math:`|x_i|`
        (ties broken by position, the first kept), :math:`k` from :func:`keep_count`.

    Raises
    ------
    TypeError, ValueError
        If ``x`` is not a finite float array, or ``density`` is not in (0, 1].

    Notes
    -----
    TIES-Merging's step 1 ("trim": keep the top-k % values by magnitude, Yadav et al. 2023, §4) and
    PEFT's ``magnitude_based_pruning``.  The ranking is over all entries of ``x`` (one tensor here;
    flatten a whole model with :func:`~lowrank_theory.merging.state.flatten` to trim globally, as the
    TIES authors do).
    """
    check_array(x, "x")
    return trim_unchecked(x, check_density(density))


def magnitude_prune(task_vectors: Sequence[Any], weights: Sequence[float] | None, density: float):
    r"""Magnitude-prune merge: :math:`\tau_m = \sum_t w_t\,\operatorname{trim}_\rho(\tau_t)`.

    Parameters
    ----------
    task_vectors : sequence of arrays, each of shape ``S``
        :math:`\tau_1, \dots, \tau_T` of one backend and dtype.
    weights : sequence of float or None
        :math:`w_t` (``None``: 1 each).
    density : float in (0, 1]
        :math:`\rho`, the fraction of each task vector's entries kept (:func:`trim`).

    Returns
    -------
    array, shape ``S``
        The pruned weighted sum, in the inputs' dtype (half precision computed in float32).

    Raises
    ------
    TypeError, ValueError
        On bad task vectors, weights or density.

    Notes
    -----
    PEFT's ``magnitude_prune`` combination (``peft.utils.merge_utils.magnitude_prune``): TIES's trim
    without its sign election, i.e. task arithmetic on sparsified task vectors.

    References
    ----------
    P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal, "TIES-Merging: Resolving Interference When
    Merging Models", NeurIPS 2023, arXiv:2306.01708.
    """
    tvs = check_task_vectors(task_vectors)
    ws = check_weights(weights, len(tvs))
    rho = check_density(density)
    return to_output(weighted_sum([trim_unchecked(working(t), rho) for t in tvs], ws), tvs[0])
