"""Validation shared by every merge: task vectors of one shape, weights, densities, the working dtype.

One place per concept: each public merge calls these before doing any work, so a bad input gets the
same ``TypeError`` / ``ValueError`` (naming the argument and what was expected) whichever merge it
reaches.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_api_compat import is_torch_array

from ..backend import backend_name, check_finite, check_float_array, namespace

__all__ = ["check_density", "check_seed", "check_task_vectors", "check_weights", "to_output", "working"]

_HALF = ("float16", "bfloat16")


def _dtype_name(x: Any) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


def check_array(x: Any, name: str):
    """A finite floating array: float32/float64 on any backend, or a torch float16/bfloat16 tensor."""
    if not (is_torch_array(x) and x.is_floating_point()):
        check_float_array(x, name)
    check_finite(x, name)
    return x


def check_task_vectors(task_vectors: Any, name: str = "task_vectors") -> list:
    r"""Validate a non-empty sequence of finite float arrays of one backend, shape and dtype.

    Parameters
    ----------
    task_vectors : sequence of arrays
        :math:`\tau_1, \dots, \tau_T`, each of the same shape (any number of dimensions).
    name : str
        The argument's name, for the error messages.

    Returns
    -------
    list
        The arrays, unchanged.

    Raises
    ------
    TypeError
        If ``task_vectors`` is a mapping, a single array or not a sequence; an entry is not a float
        array; the entries mix backends or dtypes.
    ValueError
        If the sequence is empty, an entry has NaN/Inf, or the shapes differ.
    """
    if isinstance(task_vectors, (Mapping, str)) or not isinstance(task_vectors, Sequence):
        raise TypeError(f"{name} must be a non-empty sequence (list or tuple) of arrays of one shape, "
                        f"got {type(task_vectors).__name__}")
    tvs = list(task_vectors)
    if not tvs:
        raise ValueError(f"{name} must hold at least one array, got an empty sequence")
    first = check_array(tvs[0], f"{name}[0]")
    kind, shape, dtype = backend_name(first), tuple(first.shape), _dtype_name(first)
    for i, t in enumerate(tvs[1:], start=1):
        check_array(t, f"{name}[{i}]")
        if backend_name(t) != kind:
            raise TypeError(f"{name} must all be {kind} arrays, but {name}[{i}] is {backend_name(t)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must all have shape {shape} (that of {name}[0]), "
                             f"but {name}[{i}] has shape {tuple(t.shape)}")
        if _dtype_name(t) != dtype:
            raise TypeError(f"{name} must all have dtype {dtype} (that of {name}[0]), "
                            f"but {name}[{i}] has dtype {_dtype_name(t)}")
    return tvs


def check_weights(weights: Any, k: int, name: str = "weights") -> list[float]:
    """``[1.0] * k`` for ``None``; else a length-``k`` sequence (or 1-D NumPy array) of finite reals, as floats.

    Raises
    ------
    TypeError
        If ``weights`` is not a sequence of real numbers.
    ValueError
        If its length is not ``k`` or an entry is not finite.
    """
    if weights is None:
        return [1.0] * k
    if isinstance(weights, np.ndarray) and weights.ndim == 1:
        weights = weights.tolist()
    if isinstance(weights, (Mapping, str)) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a sequence of {k} real numbers (one per task vector) or None, "
                        f"got {type(weights).__name__}")
    if len(weights) != k:
        raise ValueError(f"{name} must have one entry per task vector ({k}), got {len(weights)}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a real number, got {type(w).__name__}")
        if not np.isfinite(float(w)):
            raise ValueError(f"{name}[{i}] must be finite, got {w!r}")
        out.append(float(w))
    return out


def check_density(density: Any, name: str = "density") -> float:
    """A real number in (0, 1]: the fraction of entries a pruning step keeps.

    Raises
    ------
    TypeError
        If ``density`` is not a real number (``None`` included: every pruning merge needs one).
    ValueError
        If it is outside (0, 1].
    """
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {type(density).__name__}")
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries kept), got {density}")
    return density


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """``None`` or a non-negative int (the root seed of :func:`~lowrank_theory.linalg.derive_seed`)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {seed!r}")
    return int(seed)


def working(x: Any):
    """``x`` in its working dtype: torch float16/bfloat16 are computed in float32, everything else as is."""
    if is_torch_array(x) and _dtype_name(x) in _HALF:
        return x.float()
    return x


def to_output(x: Any, like: Any):
    """Cast a merge result back to the input's dtype (a no-op unless the input was half precision)."""
    if x.dtype == like.dtype:
        return x
    return namespace(x).astype(x, like.dtype)
