r"""Task arithmetic (linear merging): the weighted sum of task vectors.

A task vector is :math:`\tau_t = \theta_t - \theta_0`, the change fine-tuning on task :math:`t` made to a
pretrained weight (Ilharco et al. 2023).  Every merge of this package takes task vectors of one shape
and returns one merged task vector :math:`\tau_m`; the merged weight is :math:`\theta_0 + \tau_m`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._validate import check_task_vectors, check_weights, to_output, working

__all__ = ["linear", "task_arithmetic", "weighted_sum"]


def weighted_sum(tvs: list, weights: list[float]):
    r""":math:`\sum_t w_t \tau_t` of already validated, already upcast arrays (the shared inner step)."""
    out = weights[0] * tvs[0]
    for w, t in zip(weights[1:], tvs[1:]):
        out = out + w * t
    return out


def task_arithmetic(task_vectors: Sequence[Any], weights: Sequence[float] | None = None):
    r"""Task arithmetic: :math:`\tau_m = \sum_t w_t\,\tau_t`.

    Parameters
    ----------
    task_vectors : sequence of arrays, each of shape ``S``
        :math:`\tau_1, \dots, \tau_T` (NumPy, torch or CuPy, one backend and dtype; any shape).
    weights : sequence of float, optional
        :math:`w_t`, one per task vector; default 1 each.  Task arithmetic's single scaling
        coefficient :math:`\lambda` is ``weights = [λ] * T``; negative weights subtract a task
        ("forgetting via negation").

    Returns
    -------
    array, shape ``S``
        :math:`\sum_t w_t \tau_t`, on the inputs' backend and device, in their dtype.  Half-precision
        torch inputs are summed in float32 and rounded once at the end.

    Raises
    ------
    TypeError, ValueError
        On an empty sequence, mismatched shapes/dtypes/backends, non-finite values or a wrong number
        of weights (:func:`~lowrank_theory.merging._validate.check_task_vectors`).

    Notes
    -----
    .. math:: \theta_m = \theta_0 + \lambda \sum_{t=1}^T \tau_t

    is Ilharco et al.'s task addition (their eq. for a multi-task model, with :math:`\lambda` chosen
    on held-out data); PEFT's ``task_arithmetic`` (``peft.utils.merge_utils``) is this function with a
    weight per task.

    References
    ----------
    G. Ilharco, M. T. Ribeiro, M. Wortsman, S. Gururangan, L. Schmidt, H. Hajishirzi, A. Farhadi,
    "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089.
    """
    tvs = check_task_vectors(task_vectors)
    ws = check_weights(weights, len(tvs))
    return to_output(weighted_sum([working(t) for t in tvs], ws), tvs[0])


#: PEFT's and mergekit's name for task arithmetic.
linear = task_arithmetic
