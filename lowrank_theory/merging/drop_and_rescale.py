r"""DARE (drop and rescale) on weight deltas :math:`\Delta = W_{\text{ft}} - W_0`: DARE / DAREx, and the
DARE merges (DARE-linear, DARE-TIES).

Pure functions on any array backend (NumPy, torch, CuPy): the random mask is drawn on the host
with ``numpy.random.default_rng(seed)`` and moved to the delta's backend, device and dtype, so one
seed gives one mask everywhere.  Torch deltas keep their autograd graph.

Two parametrizations meet here: :func:`dare` and :func:`dare_merge` take the DARE paper's drop
probability :math:`p`; the merges :func:`dare_linear` and :func:`dare_ties` take PEFT's *density*
:math:`\rho = 1 - p` (the fraction kept), like every other pruning merge of this package.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_api_compat import is_torch_array

from ..backend import check_finite, check_float_array, from_numpy_like, namespace, to_numpy
from ..linalg import derive_seed
from ._validate import check_density, check_seed, check_task_vectors, check_weights, to_output, working
from .arithmetic import weighted_sum
from .ties_merging import SIGN_METHODS, elect_and_merge

__all__ = ["dare", "dare_keep_mask", "dare_linear", "dare_merge", "dare_optimal_rescale", "dare_ties"]


def _check_p(p: Any, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def _check_rescale(rescale: Any, p: float) -> float:
    if rescale is None:
        return 1.0 / (1.0 - p)
    if isinstance(rescale, bool) or not isinstance(rescale, numbers.Real):
        raise TypeError(f"rescale must be a positive float or None, got {type(rescale).__name__}")
    rescale = float(rescale)
    if not 0.0 < rescale < float("inf"):
        raise ValueError(f"rescale must be a finite positive float, got {rescale}")
    return rescale


def _check_delta(delta: Any, name: str = "delta"):
    """A finite floating array; torch float16/bfloat16 deltas (checkpoints are often bf16) are accepted too."""
    if not (is_torch_array(delta) and delta.is_floating_point()):
        check_float_array(delta, name)
    check_finite(delta, name)
    return delta


def dare_keep_mask(shape: tuple[int, ...], p: float, *, seed: int | np.random.Generator | None = None) -> np.ndarray:
    r"""The host boolean mask of DARE: each entry kept independently with probability :math:`1 - p`.

    Parameters
    ----------
    shape : tuple of int
    p : float
        Drop probability in [0, 1).
    seed : int, numpy Generator or None
        ``numpy.random.default_rng(seed)``; ``None`` uses fresh OS entropy.

    Returns
    -------
    numpy.ndarray of bool, shape ``shape``
        ``rng.random(shape) >= p``.
    """
    p = _check_p(p)
    rng = np.random.default_rng(seed)
    return rng.random(tuple(shape)) >= p


def dare(delta: Any, p: float, *, seed: int | np.random.Generator | None = None, rescale: float | None = None):
    r"""DARE: drop each entry of a delta with probability p and rescale the survivors.

    Parameters
    ----------
    delta : array, any shape
        Finite float32/float64 delta :math:`\Delta` (NumPy, torch or CuPy).
    p : float
        Drop probability, :math:`0 \le p < 1`.
    seed : int, numpy Generator or None
        Seed of the mask (:func:`dare_keep_mask`); ``None`` is non-reproducible.
    rescale : float, optional
        Factor :math:`c` applied to the survivors.  ``None``: DARE's :math:`c = 1/(1-p)`.  DAREx-q
        uses :math:`c = 1/q` with a tuned :math:`q` (typically :math:`q > 1 - p`, a smaller
        factor); see :func:`dare_optimal_rescale`.

    Returns
    -------
    array, like ``delta``
        :math:`c\, m \odot \Delta`, :math:`m_{ij} \sim \text{Bernoulli}(1-p)` i.i.d.

    Raises
    ------
    TypeError
        If ``delta`` is not a float array, or ``p`` / ``rescale`` is not a real number.
    ValueError
        If ``delta`` has NaN/Inf, ``p`` is outside [0, 1), or ``rescale`` is not finite and positive.

    Notes
    -----
    With :math:`c = 1/(1-p)`, every entry is unbiased, :math:`\mathbb E[\hat\Delta_{ij}] = \Delta_{ij}`,
    with variance :math:`\operatorname{Var}[\hat\Delta_{ij}] = \frac{p}{1-p}\Delta_{ij}^2`.  A general
    :math:`c` gives mean :math:`c(1-p)\Delta_{ij}` and variance :math:`c^2 p(1-p)\Delta_{ij}^2`:
    DAREx-q trades a bias for a smaller variance at large p (Deng et al. 2024, §3).

    References
    ----------
    L. Yu, B. Yu, H. Yu, F. Huang, Y. Li, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", arXiv:2311.03099.
    W. Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning For Fine-Tuned Models",
    arXiv:2410.09344.
    """
    _check_delta(delta)
    p = _check_p(p)
    c = _check_rescale(rescale, p)
    keep = dare_keep_mask(tuple(delta.shape), p, seed=seed)
    return delta * (from_numpy_like(keep.astype(np.float64) * c, like=delta))


def dare_optimal_rescale(
    delta: Any, X: Any, p: float, *, seed: int | np.random.Generator | None = None
) -> float:
    r"""Layer-wise DAREx-q: the rescale :math:`c = 1/q` that minimizes the output change on inputs X.

    Parameters
    ----------
    delta : array, shape (m, n)
        Delta of a linear layer (acts as :math:`x \mapsto \Delta x`).
    X : array, shape (N, n)
        A batch of that layer's inputs (rows).
    p : float
        Drop probability in [0, 1).
    seed : int, numpy Generator or None
        Seed of the mask; pass the same seed to :func:`dare` to apply the returned factor to the
        same mask.

    Returns
    -------
    float
        :math:`c^\star = \langle X\hat\Delta^\top, X\Delta^\top\rangle / \|X\hat\Delta^\top\|_F^2` with
        :math:`\hat\Delta = m \odot \Delta`: the exact minimizer over :math:`c` of
        :math:`\|X(c\,\hat\Delta - \Delta)^\top\|_F^2` (a quadratic in c).  ``inf`` never occurs: if
        :math:`X\hat\Delta^\top = 0`, DARE's :math:`1/(1-p)` is returned.

    Raises
    ------
    TypeError, ValueError
        If ``delta``/``X`` are not finite float matrices of matching width, or ``p`` is invalid.

    Notes
    -----
    Deng et al. (2024) pick :math:`q` so that the pruned model's **last-layer** output changes least
    on one training batch, by a search over q.  For a single linear layer that criterion is a
    least-squares problem in :math:`c = 1/q` with the closed form above; this function is that
    per-layer analogue (not the paper's whole-network search).
    """
    _check_delta(delta)
    check_float_array(delta, "delta", ndim=2)
    check_float_array(X, "X", ndim=2)
    check_finite(X, "X")
    if X.shape[1] != delta.shape[1]:
        raise ValueError(f"X must have shape (N, {delta.shape[1]}) to match delta {tuple(delta.shape)}, "
                         f"got {tuple(X.shape)}")
    p = _check_p(p)
    xp = namespace(delta, X)
    pruned = delta * from_numpy_like(dare_keep_mask(tuple(delta.shape), p, seed=seed).astype(np.float64), like=delta)
    Yp = X @ xp.matrix_transpose(pruned)
    Y = X @ xp.matrix_transpose(delta)
    den = float(to_numpy(xp.sum(Yp * Yp)))
    if den == 0.0:
        return 1.0 / (1.0 - p)
    return float(to_numpy(xp.sum(Yp * Y))) / den


def _per_delta(value: Any, k: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != k:
            raise ValueError(f"{name} must have one entry per delta ({k}), got {len(value)}")
        return list(value)
    return [value] * k


def dare_merge(
    base: Any,
    deltas: Sequence[Any],
    weights: Sequence[float] | None = None,
    p: float | Sequence[float] = 0.9,
    *,
    seed: int | None = None,
    rescale: float | Sequence[float | None] | None = None,
):
    r"""Merge several deltas into one base with DARE: :math:`W = W_0 + \sum_t \lambda_t\,\operatorname{DARE}(\Delta_t)`.

    Parameters
    ----------
    base : array or mapping of str to array
        :math:`W_0` (one tensor, or a state dict).
    deltas : sequence
        :math:`\Delta_t`, each shaped like ``base`` (for a mapping: the same keys, each shaped like
        ``base[key]``).
    weights : sequence of float, optional
        :math:`\lambda_t` (task-arithmetic weights); default 1 for each delta.
    p : float or sequence of float
        Drop probability, one for all deltas or one per delta.
    seed : int, optional
        Root seed; delta t (and key k) uses ``derive_seed(seed, t[, k])``, so masks are independent
        across deltas and keys and reproducible.  ``None``: fresh entropy.
    rescale : float, None or sequence
        Survivor factor per delta (``None``: :math:`1/(1-p_t)`), see :func:`dare`.

    Returns
    -------
    array or dict
        The merged weight(s), like ``base``.

    Raises
    ------
    TypeError, ValueError
        On empty ``deltas``, mismatched shapes or keys, wrong-length ``weights``/``p``/``rescale``,
        non-finite values, or invalid ``p``/``rescale``.

    Notes
    -----
    DARE is applied to each delta independently before the weighted sum (Yu et al. 2023, §4: DARE
    as a plug-in in front of task arithmetic); each term is unbiased, so
    :math:`\mathbb E[W] = W_0 + \sum_t\lambda_t\Delta_t`.

    References
    ----------
    L. Yu et al., arXiv:2311.03099; W. Deng et al., arXiv:2410.09344.
    """
    if isinstance(deltas, Mapping) or not isinstance(deltas, Sequence) or len(deltas) == 0:
        raise ValueError("deltas must be a non-empty sequence of deltas (arrays or state dicts)")
    k = len(deltas)
    weights = [1.0] * k if weights is None else _per_delta(weights, k, "weights")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(w):
            raise ValueError(f"weights[{i}] must be a finite real number, got {w!r}")
    ps = [_check_p(pi, f"p[{i}]") for i, pi in enumerate(_per_delta(p, k, "p"))]
    rescales = _per_delta(rescale, k, "rescale")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")

    def merge_tensor(b, items: list, key: Any) -> Any:
        suffix = "" if key is None else f"[{key!r}]"
        _check_delta(b, "base" + suffix)
        out = b
        for i, d in items:
            label = f"deltas[{i}]{suffix}"
            _check_delta(d, label)
            if tuple(d.shape) != tuple(b.shape):
                raise ValueError(f"{label} must have the base's shape {tuple(b.shape)}, got {tuple(d.shape)}")
            keys = (i,) if key is None else (i, str(key))
            child = None if seed is None else derive_seed(int(seed), *keys)
            out = out + float(weights[i]) * dare(d, ps[i], seed=child, rescale=rescales[i])
        return out

    if not isinstance(base, Mapping):
        return merge_tensor(base, list(enumerate(deltas)), None)
    for i, d in enumerate(deltas):
        if not isinstance(d, Mapping):
            raise TypeError(f"deltas[{i}] must be a mapping like base, got {type(d).__name__}")
        extra = set(d) - set(base)
        if extra:
            raise ValueError(f"deltas[{i}] has keys not in base: {sorted(extra)}")
    return {
        key: merge_tensor(b, [(i, d[key]) for i, d in enumerate(deltas) if key in d], key) for key, b in base.items()
    }


# ----------------------------------------------------------------------------- DARE merges
def _dropped(tvs: list, density: float, seed: int | None) -> list:
    """Each task vector through DARE at drop probability 1 - density; task t's mask from ``derive_seed(seed, t)``."""
    p = 1.0 - density
    return [dare(working(t), p, seed=None if seed is None else derive_seed(seed, i)) for i, t in enumerate(tvs)]


def dare_linear(task_vectors: Sequence[Any], weights: Sequence[float] | None, density: float, *,
                seed: int | None = None):
    r"""DARE-linear: drop and rescale each task vector, then task arithmetic.

    Parameters
    ----------
    task_vectors : sequence of arrays, each of shape ``S``
        :math:`\tau_1, \dots, \tau_T` of one backend and dtype.
    weights : sequence of float or None
        :math:`w_t` (``None``: 1 each).
    density : float in (0, 1]
        :math:`\rho`, the keep probability of each entry (DARE's drop rate is :math:`p = 1 - \rho`).
    seed : int, optional
        Root seed; task vector t draws its mask from ``derive_seed(seed, t)`` (independent across
        task vectors, reproducible).  ``None``: fresh entropy.

    Returns
    -------
    array, shape ``S``
        :math:`\sum_t w_t\,\rho^{-1}\,m_t \odot \tau_t` with :math:`m_t` i.i.d. Bernoulli(:math:`\rho`),
        in the inputs' dtype (half precision computed in float32).

    Raises
    ------
    TypeError, ValueError
        On bad task vectors, weights, density or seed.

    Notes
    -----
    Unbiased: :math:`\mathbb E\,\tau_m = \sum_t w_t\tau_t` (``proofs/16-dare-unbiased.md``).  PEFT's
    ``dare_linear`` draws its masks with ``torch.bernoulli`` (global torch generator), so the two agree in
    distribution, not draw by draw.  ``dare_linear(tvs, w, 1 - p, seed=s)`` added to a base equals
    :func:`dare_merge` ``(base, tvs, w, p, seed=s)`` up to the order of the additions (the same child
    seeds, so the same masks).

    References
    ----------
    L. Yu, B. Yu, H. Yu, F. Huang, Y. Li, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", ICML 2024, arXiv:2311.03099.
    """
    tvs = check_task_vectors(task_vectors)
    ws = check_weights(weights, len(tvs))
    rho = check_density(density)
    return to_output(weighted_sum(_dropped(tvs, rho, check_seed(seed)), ws), tvs[0])


def dare_ties(task_vectors: Sequence[Any], weights: Sequence[float] | None, density: float, *,
              seed: int | None = None, majority_sign_method: str = "total"):
    r"""DARE-TIES: DARE's random drop and rescale in place of TIES's trim, then sign election and disjoint mean.

    Parameters
    ----------
    task_vectors : sequence of arrays, each of shape ``S``
    weights : sequence of float or None
    density : float in (0, 1]
        Keep probability :math:`\rho` of each entry.
    seed : int, optional
        As in :func:`dare_linear` (the same masks for the same seed).
    majority_sign_method : {"total", "frequency"}
        See :func:`~lowrank_theory.merging.ties_merging.elect_sign`.

    Returns
    -------
    array, shape ``S``
        :func:`~lowrank_theory.merging.ties_merging.elect_and_merge` of the DARE'd task vectors.

    Raises
    ------
    TypeError, ValueError
        On bad task vectors, weights, density, seed or sign method.

    Notes
    -----
    PEFT's ``dare_ties`` (``peft.utils.merge_utils``): ``prune(..., "random", rescale=True)``, sign
    election on the unweighted pruned vectors, disjoint mean of the weighted ones.  Sign election and
    the division by the agreeing count make it biased (unlike :func:`dare_linear`): an entry's
    expected value is not :math:`\sum_t w_t \tau_t`.

    References
    ----------
    L. Yu et al., arXiv:2311.03099 (DARE as a plug-in before TIES, their §4); P. Yadav et al.,
    arXiv:2306.01708 (TIES).
    """
    tvs = check_task_vectors(task_vectors)
    ws = check_weights(weights, len(tvs))
    rho = check_density(density)
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    return to_output(elect_and_merge(_dropped(tvs, rho, check_seed(seed)), ws, majority_sign_method), tvs[0])
