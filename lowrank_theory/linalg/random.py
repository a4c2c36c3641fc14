r"""Seeded random bases, identical on every backend.

Random numbers are drawn **on the host** with NumPy's :class:`numpy.random.Generator` built by
``numpy.random.default_rng(seed)`` (the PCG64 bit generator seeded through a
:class:`numpy.random.SeedSequence`), always in float64, and only then moved to the backend, device
and dtype of ``like`` with :func:`lowrank_theory.backend.from_numpy_like`.  So one seed gives one
basis on NumPy, torch (CPU or CUDA) and CuPy, equal bit for bit after the final cast; an adapter can
store the seed instead of the basis and regenerate it anywhere.

Adapters with many layers derive one independent child seed per layer with :func:`derive_seed`,
which hashes ``(seed, *keys)`` through a :class:`~numpy.random.SeedSequence` spawn key.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import backend_name, from_numpy_like, namespace

__all__ = ["BASIS_KINDS", "derive_seed", "random_basis"]

BASIS_KINDS = ("gaussian", "rademacher", "orthogonal", "sparse_ternary")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


# ----------------------------------------------------------------------------- validation
def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed}")
    return int(seed)


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or len(shape) == 0:
        raise TypeError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    out = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"shape must be a tuple of positive ints, got {tuple(shape)!r}")
        if s < 1:
            raise ValueError(f"shape must be a tuple of positive ints, got {tuple(shape)!r}")
        out.append(int(s))
    return tuple(out)


def _check_density(density: Any) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def _scale_factor(scale: Any, shape: tuple[int, ...]) -> float:
    if isinstance(scale, str):
        if scale == "unit":
            return 1.0
        if scale == "fan_in":
            return 1.0 / math.sqrt(shape[-1])
        raise ValueError(f"scale must be 'unit', 'fan_in' or a positive float, got {scale!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < scale < math.inf):
        raise ValueError(f"scale must be 'unit', 'fan_in' or a positive float, got {scale!r}")
    return float(scale)


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` for np.float32, np.dtype("float32"), torch.float32 or the string itself."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    return str(dtype).rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- seeds
def _key_int(key: Any) -> int:
    """A stable non-negative integer for a spawn key (ints as is, strings by SHA-256)."""
    if isinstance(key, bool):
        raise TypeError("keys must be non-negative ints or strings, got bool")
    if isinstance(key, numbers.Integral):
        if key < 0:
            raise ValueError(f"keys must be non-negative ints or strings, got {key}")
        return int(key)
    if isinstance(key, str):
        # Python's hash() is salted per process; SHA-256 is the same everywhere.
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    raise TypeError(f"keys must be non-negative ints or strings, got {type(key).__name__}")


def derive_seed(seed: int, *keys: int | str) -> int:
    r"""An independent child seed for ``(seed, *keys)``, e.g. one per layer of an adapter.

    Parameters
    ----------
    seed : int
        Root seed, non-negative.
    *keys : int or str
        A path naming the child: layer index, module name, basis index, ...  Strings are mapped
        to integers by SHA-256 (stable across processes and platforms, unlike :func:`hash`).

    Returns
    -------
    int
        A seed in :math:`[0, 2^{63})`.  ``derive_seed(s)`` with no keys is ``s``'s own child.

    Raises
    ------
    TypeError, ValueError
        If ``seed`` is not a non-negative int, or a key is neither a non-negative int nor a string.

    Notes
    -----
    The child is ``SeedSequence(seed, spawn_key=keys).generate_state(1, uint64)``: NumPy's
    SeedSequence hashes entropy and spawn key together, so children for distinct key paths
    are statistically independent streams, which consecutive seeds ``seed + i`` do not
    guarantee for every bit generator.
    """
    seed = _check_seed(seed)
    spawn_key = tuple(_key_int(k) for k in keys)
    state = np.random.SeedSequence(seed, spawn_key=spawn_key).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- draws
def _haar_orthogonal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Haar-distributed orthonormal columns (or rows, for wide shapes) of the last two axes."""
    *batch, m, n = shape
    tall = m >= n
    Z = rng.standard_normal((*batch, m, n) if tall else (*batch, n, m))
    Q, R = np.linalg.qr(Z)  # reduced: Q (..., max, min), R (..., min, min)
    d = np.sign(np.diagonal(R, axis1=-2, axis2=-1))
    d = np.where(d == 0, 1.0, d)  # a zero pivot has probability zero; keep Q orthonormal anyway
    Q = Q * d[..., None, :]
    return Q if tall else np.swapaxes(Q, -1, -2)


def _draw(kind: str, shape: tuple[int, ...], rng: np.random.Generator, density: float) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal(shape)
    if kind == "rademacher":
        return 2.0 * rng.integers(0, 2, size=shape).astype(np.float64) - 1.0
    if kind == "sparse_ternary":
        keep = rng.random(shape) < density
        sign = 2.0 * rng.integers(0, 2, size=shape).astype(np.float64) - 1.0
        return np.where(keep, sign * math.sqrt(1.0 / density), 0.0)
    return _haar_orthogonal(rng, shape)


def random_basis(
    shape: int | Sequence[int],
    kind: str,
    *,
    seed: int,
    like: Any = None,
    dtype: Any = None,
    density: float = 1 / 3,
    scale: str | float = "unit",
):
    r"""A seeded random array: the frozen bases of VeRA, NOLA, RandLoRA and friends.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of the result, positive sizes.  ``"orthogonal"`` needs at least two axes; leading
        axes are a batch of independent matrices.
    kind : {"gaussian", "rademacher", "orthogonal", "sparse_ternary"}
        Distribution of the entries (see Notes).
    seed : int
        Non-negative seed of the host generator ``numpy.random.default_rng(seed)`` (PCG64).
    like : array, optional
        The result goes to ``like``'s backend and device, in ``like``'s dtype unless ``dtype``
        is given.  Default: a NumPy array.
    dtype : dtype or str, optional
        Floating dtype of the result (``"float32"``, ``torch.bfloat16``, ...).  Default: ``like``'s
        dtype, or float64 without ``like``.  The draw is always float64, then cast once.
    density : float, default 1/3
        Probability that an entry is non-zero, in (0, 1] (``"sparse_ternary"`` only).
    scale : {"unit", "fan_in"} or float, default "unit"
        ``"unit"``: entries of unit variance (orthonormal columns/rows for ``"orthogonal"``);
        ``"fan_in"``: divided by :math:`\sqrt{\text{shape}[-1]}`; a positive float multiplies.

    Returns
    -------
    array, shape ``shape``
        On ``like``'s backend and device.

    Raises
    ------
    TypeError
        If ``shape``, ``seed`` or ``density`` has the wrong type, ``like`` is not an array, or the
        target dtype is not floating.
    ValueError
        If ``shape`` has a non-positive size (or fewer than 2 axes for ``"orthogonal"``), ``kind``
        is unknown, ``density`` is outside (0, 1] or ``scale`` is invalid.

    Notes
    -----
    * ``"gaussian"``: i.i.d. :math:`\mathcal N(0, 1)`.
    * ``"rademacher"``: i.i.d. :math:`\pm 1` with probability 1/2 each.
    * ``"sparse_ternary"``: i.i.d. :math:`\sqrt{1/\rho}\,\{-1, 0, +1\}` with probabilities
      :math:`\rho/2, 1-\rho, \rho/2` (:math:`\rho` = ``density``): unit variance, the sparse
      random projections of Achlioptas (2003) with :math:`s = 1/\rho` (:math:`\rho = 1/3` is his
      "database-friendly" choice), used as sparse bases by RandLoRA.
    * ``"orthogonal"``: for an :math:`m \times n` shape, draw :math:`Z` Gaussian of shape
      :math:`\max(m,n) \times \min(m,n)`, take the reduced QR :math:`Z = QR` and return
      :math:`Q\,\operatorname{diag}(\operatorname{sign} R_{ii})` (transposed for a wide shape).
      The sign fix makes the factorization unique, so :math:`Q` inherits the invariance of
      :math:`Z` under :math:`Z \mapsto OZ` and is Haar-distributed on the Stiefel manifold
      (Mezzadri 2007); without it, LAPACK's Householder signs bias the result.  Tall shapes give
      orthonormal columns (:math:`Q^\top Q = I_n`), wide shapes orthonormal rows.

    References
    ----------
    D. Achlioptas, "Database-friendly random projections: Johnson–Lindenstrauss with binary coins",
    J. Comput. Syst. Sci. 66 (2003) 671–687.
    F. Mezzadri, "How to generate random matrices from the classical compact groups",
    Notices AMS 54 (2007) 592–604, arXiv:math-ph/0609050.
    P. Albert et al., "RandLoRA: full-rank parameter-efficient fine-tuning of large models",
    arXiv:2502.00987.
    """
    shape = _check_shape(shape)
    if kind not in BASIS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, BASIS_KINDS))}; got {kind!r}")
    if kind == "orthogonal" and len(shape) < 2:
        raise ValueError(f"shape must have at least 2 axes for kind='orthogonal', got {shape}")
    seed = _check_seed(seed)
    density = _check_density(density)
    factor = _scale_factor(scale, shape)
    if like is not None:
        try:
            backend_name(like)
        except TypeError:
            raise TypeError(f"like must be a NumPy, torch or CuPy array, got {type(like).__name__}") from None

    target = dtype if dtype is not None else (like.dtype if like is not None else np.float64)
    if _dtype_name(target) not in _FLOAT_NAMES:
        which = "dtype" if dtype is not None else "like"
        raise TypeError(f"{which} must give a floating dtype ({', '.join(_FLOAT_NAMES)}), got {_dtype_name(target)}")

    a = _draw(kind, shape, np.random.default_rng(seed), density)
    if factor != 1.0:
        a = a * factor
    if like is None:
        out = a
        if dtype is not None:
            if _dtype_name(dtype) == "bfloat16":
                raise TypeError("dtype bfloat16 needs like= a torch tensor; NumPy has no bfloat16")
            out = a.astype(np.dtype(_dtype_name(dtype)))
        return out
    if isinstance(dtype, str):
        dtype = _backend_dtype(dtype, like)
    return from_numpy_like(a, like, dtype=target if dtype is None else dtype)


def _backend_dtype(name: str, like: Any):
    """The dtype object called ``name`` on ``like``'s backend (torch has bfloat16, the array API does not)."""
    kind = backend_name(like)
    if kind == "torch":
        import torch

        return getattr(torch, name)
    return getattr(namespace(like), name, None) or np.dtype(name)
