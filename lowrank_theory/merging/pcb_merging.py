r"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv:2410.02396).

What we read, and where.  The paper's abstract (arXiv:2410.02396, NeurIPS 2024) and reviews of it
(alphaxiv.org/overview/2410.02396, themoonlight.io) -- the full method section was not reachable
here.  The paper builds a matrix of per-parameter coefficients :math:`\beta_i` from an
*intra-balancing* term, the importance of a parameter within task :math:`i`, written there as
:math:`\mathrm{Softmax}(N\cdot\mathrm{Norm}(\tau_i\odot\tau_i))`, and an *inter-balancing* term, the
agreement of task :math:`i` with the others from the products :math:`\tau_i\odot\tau_j`; it drops the
parameters of low :math:`\beta` and rescales the rest so the coefficients of each parameter sum to one.
The authors' code (github.com/duguodong7/pcb-merging, commit 5897888) has the procedure in three
slightly different versions: ``pcb-merging.py`` (which its README names "the key steps of our
method"), ``vision_source_code/pcb.py`` and ``vision_source_code/pcb_ES.py``.  We implement
``pcb-merging.py``'s ``PCB_merge``:

* clip :math:`|\tau_i|` to its own quantiles at ``clip_ratio`` and ``1 - clip_ratio`` (1e-4 there;
  the vision scripts use 0.01): :math:`a_i`, and :math:`\bar\tau_i = \operatorname{sgn}(\tau_i)\,a_i`;
* intra-balancing :math:`\exp\big(N\,\mathrm{norm}(a_i)^2\big)`, with :math:`\mathrm{norm}` the min–max
  rescaling of a task's values to [0, 1] and :math:`N` the number of tasks -- the "Softmax" of the
  paper without its denominator, which the final rescale divides out anyway;
* inter-balancing :math:`\tanh\big(\tau_i \odot \sum_j \tau_j\big)` on the raw task vectors
  (``pcb_ES.py`` instead sums :math:`\tanh(\tilde\tau_i\odot\tilde\tau_j)` over :math:`j` of sign-kept
  min–max-normalized vectors :math:`\tilde\tau`; ``pcb.py`` multiplies :math:`\tau_i` by
  :math:`\sum_j\tilde\tau_j`);
* :math:`\beta_i` = intra × inter; drop: clamp :math:`\beta_i` from below at its value of sorted index
  :math:`\lfloor D(1-r)\rfloor` and min–max normalize, so the top fraction :math:`r` keeps weights in (0, 1]
  and the rest get 0;
* rescale: :math:`\tau_m = \sum_i \lambda_i\,\hat\beta_i\odot\bar\tau_i \,/\, \max(\sum_i\hat\beta_i, 10^{-12})`
  (the per-task :math:`\lambda_i` enter here, as in the authors' ``compute_acc``; they use
  :math:`\lambda = 1.2`, or search :math:`\lambda_i \in [0.8, 1.3]` with nevergrad).

Our choices where the code leaves one: a task whose values are all equal normalizes to zeros (the
authors' min–max divides by zero there and returns NaN); sorting picks positions exactly as the
authors' ``torch.sort`` does for distinct values.  The statistics are over all entries of the arrays
passed in: the authors flatten the whole model first
(:func:`~lowrank_theory.merging.state.merge_state_dicts` with ``scope="global"`` does the same).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ..backend import device_of, namespace
from ._validate import check_density, check_task_vectors, check_weights, to_output, working

__all__ = ["pcb"]


def _clip_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"clip_ratio must be a real number in [0, 0.5), got {type(value).__name__}")
    if not 0.0 <= float(value) < 0.5:
        raise ValueError(f"clip_ratio must be in [0, 0.5), got {value}")
    return float(value)


def _minmax(xp, x):
    """Row-wise (x - min) / (max - min); a constant row gives zeros."""
    lo = xp.min(x, axis=1, keepdims=True)
    hi = xp.max(x, axis=1, keepdims=True)
    span = hi - lo
    safe = xp.where(span > 0, span, xp.ones_like(span))
    return xp.where(span > 0, (x - lo) / safe, xp.zeros_like(x))


def pcb(task_vectors: Sequence[Any], weights: Sequence[float] | None = None, ratio: float = 0.1, *,
        clip_ratio: float = 1e-4, eps: float = 1e-12):
    r"""PCB-Merging: per-parameter coefficients from intra- and inter-task balancing, drop, rescale.

    Parameters
    ----------
    task_vectors : sequence of arrays, each of shape ``S`` (D entries)
        :math:`\tau_1, \dots, \tau_N` of one backend and dtype.
    weights : sequence of float, optional
        :math:`\lambda_i` (default 1 each; the authors use 1.2).
    ratio : float in (0, 1]
        :math:`r`, the fraction of each task's parameters kept by the drop step (0.1 in the
        authors' ``PCB_merge``, 0.05 in their vision scripts).
    clip_ratio : float in [0, 0.5)
        Quantile at which :math:`|\tau_i|` is clipped from both ends (1e-4 as in ``PCB_merge``; 0
        disables it).
    eps : float
        Floor of the coefficient sum in the rescale (1e-12, the authors').

    Returns
    -------
    array, shape ``S``
        .. math:: \tau_m = \frac{\sum_i \lambda_i\,\hat\beta_i \odot \bar\tau_i}{\max(\sum_i \hat\beta_i,\ \epsilon)},
                  \quad \beta_i = e^{N\,\mathrm{norm}(a_i)^2} \odot \tanh\Big(\tau_i \odot \sum_j \tau_j\Big),

        with :math:`a_i` the clipped :math:`|\tau_i|`, :math:`\bar\tau_i = \operatorname{sgn}(\tau_i)\,a_i`
        and :math:`\hat\beta_i` = min–max normalized :math:`\max(\beta_i, \beta_{i,(\lfloor D(1-r)\rfloor)})`
        (see the module docstring).  In the inputs' dtype (half precision computed in float32).

    Raises
    ------
    TypeError, ValueError
        On bad task vectors or weights, ``ratio`` outside (0, 1], ``clip_ratio`` outside [0, 0.5) or
        ``eps`` not positive.

    Notes
    -----
    The merge is a convex combination per parameter (before the :math:`\lambda_i`): where all
    :math:`\hat\beta_i > 0`, :math:`\tau_m` lies between the clipped task values.  With one task it is
    :math:`\lambda_1\bar\tau_1` on the kept fraction and 0 elsewhere (the drop step alone).  The
    element of lowest :math:`\beta_i` always gets weight 0 (min–max), even at ``ratio = 1``.

    References
    ----------
    G. Du, J. Lee, J. Li, R. Jiang, Y. Guo, S. Yu, H. Liu, S. K. Goh, H.-K. Tang, D. He, M. Zhang,
    "Parameter Competition Balancing for Model Merging", NeurIPS 2024, arXiv:2410.02396; code:
    github.com/duguodong7/pcb-merging (``pcb-merging.py``).
    """
    tvs = check_task_vectors(task_vectors)
    ws = check_weights(weights, len(tvs))
    r = check_density(ratio, "ratio")
    c = _clip_ratio(clip_ratio)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(f"eps must be a positive real number, got {eps!r}")
    shape = tuple(tvs[0].shape)
    xp = namespace(working(tvs[0]))
    X = xp.stack([xp.reshape(working(t), (-1,)) for t in tvs], axis=0)  # (N, D)
    N, D = X.shape
    if D == 0:
        return to_output(working(tvs[0]) * 0, tvs[0])
    a = xp.abs(X)
    s = xp.sort(a, axis=1)
    lo_i, hi_i = int(D * c), max(int(D * (1 - c)) - 1, 0)
    a = xp.minimum(xp.maximum(a, s[:, lo_i : lo_i + 1]), s[:, hi_i : hi_i + 1])
    clipped = xp.sign(X) * a
    intra = xp.exp(N * _minmax(xp, a) ** 2)
    inter = xp.tanh(X * xp.sum(X, axis=0, keepdims=True))
    beta = intra * inter
    k = int(D * (1 - r))
    thr = xp.sort(beta, axis=1)[:, k : k + 1]
    scale = _minmax(xp, xp.maximum(beta, thr))
    lam = xp.reshape(xp.asarray(ws, dtype=X.dtype, device=device_of(X)), (N, 1))
    num = xp.sum(lam * clipped * scale, axis=0)
    den = xp.sum(scale, axis=0)
    merged = num / xp.maximum(den, xp.full_like(den, float(eps)))
    return to_output(xp.reshape(merged, shape), tvs[0])
