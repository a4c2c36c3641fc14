r"""Structured projections: Uni-LoRA's isometric projection and Comp-LoRA's complement projector.

Both are small operator objects holding only what defines them (an index vector; a matrix with
orthonormal columns) and applying themselves through that structure; ``to_dense()`` exists for
tests and theory only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..backend import (
    backend_name,
    check_float_array,
    check_matrix,
    device_of,
    from_numpy_like,
    namespace,
)
from ..backend import check_finite as _check_finite
from .random import _check_seed

__all__ = ["ComplementProjector", "IsometricProjection", "complement_projector", "isometric_projection"]


def _check_size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _same_kind(x: Any, ref_dtype: Any, name: str, what: str) -> None:
    if x.dtype != ref_dtype:
        raise TypeError(f"{name} must have dtype {ref_dtype} like {what}, got {x.dtype}")


# ============================================================================= Uni-LoRA
class IsometricProjection:
    r"""The sparse isometry :math:`P \in \mathbb R^{D \times d}` of Uni-LoRA, stored as indices.

    Row :math:`i` of :math:`P` has a single non-zero, at column :math:`j(i)`, equal to
    :math:`1/\sqrt{n_{j(i)}}` where :math:`n_j = |\{i : j(i) = j\}|` is the size of group
    :math:`j`.  Build one with :func:`isometric_projection`.

    Parameters
    ----------
    indices : numpy.ndarray of int, shape (D,)
        :math:`j(i)` for every row; every column :math:`0 \le j < d` must occur at least once.
    d : int
        Number of columns.

    Attributes
    ----------
    D, d : int
        Shape of :math:`P`.
    indices : numpy.ndarray of int64, shape (D,)
        Column of each row's non-zero.
    values : numpy.ndarray of float64, shape (D,)
        The non-zero of each row, :math:`1/\sqrt{n_{j(i)}}`.
    counts : numpy.ndarray of int64, shape (d,)
        Group sizes :math:`n_j \ge 1`.

    Notes
    -----
    Columns of :math:`P` have disjoint supports and unit norm
    (:math:`\sum_{i : j(i) = j} 1/n_j = 1`), so :math:`P^\top P = I_d`: :math:`\theta_d \mapsto
    P\theta_d` is an isometry, :math:`\|P\theta\| = \|\theta\|`, and gradient steps in
    :math:`\theta_d` are the orthogonal projection of steps in :math:`\theta_D`
    (:math:`\nabla_{\theta_d} = P^\top \nabla_{\theta_D}`).

    :meth:`apply` is a gather and a scale, :meth:`adjoint` a scatter-add (``index_add`` for
    torch, ``numpy.bincount`` / ``numpy.add.at`` for NumPy, ``cupy.add.at`` for CuPy):
    :math:`O(D)` work and memory, never the dense :math:`D \times d` matrix.  Index and value
    arrays are converted once per (backend, device, dtype) and cached.
    """

    def __init__(self, indices: Any, d: int) -> None:
        d = _check_size(d, "d")
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= d:
            raise ValueError(f"indices must lie in [0, d) = [0, {d}), got range [{idx.min()}, {idx.max()}]")
        counts = np.bincount(idx, minlength=d)
        if np.any(counts == 0):
            raise ValueError(
                f"every column must be hit by some row, but {int(np.sum(counts == 0))} of d={d} columns are "
                "empty (P^T P would be singular)"
            )
        self.D = int(idx.size)
        self.d = d
        self.indices = idx.astype(np.int64)
        self.counts = counts.astype(np.int64)
        self.values = 1.0 / np.sqrt(self.counts[self.indices].astype(np.float64))
        self._cache: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, d)``."""
        return (self.D, self.d)

    def __repr__(self) -> str:
        return f"IsometricProjection(D={self.D}, d={self.d})"

    # ------------------------------------------------------------------ helpers
    def _on(self, x: Any) -> tuple[Any, Any]:
        """Indices and values on ``x``'s backend, device and dtype (cached)."""
        key = (backend_name(x), str(device_of(x)), str(x.dtype))
        if key not in self._cache:
            idx = from_numpy_like(self.indices, x, dtype=None)
            vals = from_numpy_like(self.values, x)
            self._cache[key] = (idx, vals)
        return self._cache[key]

    def _check(self, x: Any, name: str, size: int, check: bool) -> None:
        check_float_array(x, name)
        if x.ndim < 1 or x.shape[0] != size:
            raise ValueError(f"{name} must have shape ({size}, ...), got {tuple(x.shape)}")
        if check:
            _check_finite(x, name)

    # ------------------------------------------------------------------ operator
    def apply(self, theta_d: Any, *, check_finite: bool = True):
        r""":math:`\theta_D = P\theta_d`: gather :math:`\theta_d[j(i)]` and scale by :math:`1/\sqrt{n_{j(i)}}`.

        Parameters
        ----------
        theta_d : array, shape (d,) or (d, ...)
            Float array (NumPy, torch, CuPy); trailing axes are a batch.  Autograd flows through
            for torch.
        check_finite : bool, default True
            Scan the input for NaN/Inf (a device sync on GPU; a training loop may switch it off).

        Returns
        -------
        array, shape (D,) or (D, ...)
            On ``theta_d``'s backend, device and dtype.

        Raises
        ------
        TypeError
            If ``theta_d`` is not a float array.
        ValueError
            If its first axis is not ``d`` long or it holds NaN/Inf.
        """
        self._check(theta_d, "theta_d", self.d, check_finite)
        xp = namespace(theta_d)
        idx, vals = self._on(theta_d)
        out = xp.take(theta_d, idx, axis=0)
        return out * xp.reshape(vals, (self.D,) + (1,) * (theta_d.ndim - 1))

    def adjoint(self, theta_D: Any, *, check_finite: bool = True):
        r""":math:`P^\top\theta_D`: :math:`(P^\top\theta_D)_j = n_j^{-1/2}\sum_{i : j(i) = j}(\theta_D)_i`.

        Parameters
        ----------
        theta_D : array, shape (D,) or (D, ...)
            Float array; trailing axes are a batch.  Autograd flows through for torch.
        check_finite : bool, default True
            Scan the input for NaN/Inf.

        Returns
        -------
        array, shape (d,) or (d, ...)
            On ``theta_D``'s backend, device and dtype.

        Raises
        ------
        TypeError
            If ``theta_D`` is not a float array.
        ValueError
            If its first axis is not ``D`` long or it holds NaN/Inf.
        """
        self._check(theta_D, "theta_D", self.D, check_finite)
        xp = namespace(theta_D)
        idx, vals = self._on(theta_D)
        weighted = theta_D * xp.reshape(vals, (self.D,) + (1,) * (theta_D.ndim - 1))
        out_shape = (self.d, *tuple(theta_D.shape[1:]))
        kind = backend_name(theta_D)
        if kind == "torch":
            zeros = xp.zeros(out_shape, dtype=theta_D.dtype, device=device_of(theta_D))
            return zeros.index_add(0, idx, weighted)
        if kind == "numpy":
            if theta_D.ndim == 1:
                return np.bincount(idx, weights=weighted, minlength=self.d).astype(theta_D.dtype, copy=False)
            out = np.zeros(out_shape, dtype=theta_D.dtype)
            np.add.at(out, idx, weighted)
            return out
        import cupy

        out = xp.zeros(out_shape, dtype=theta_D.dtype)
        cupy.add.at(out, idx, weighted)
        return out

    def to_dense(self, like: Any = None):
        """The dense (D, d) matrix, float64 NumPy or on ``like``'s backend/device/dtype (tests only)."""
        P = np.zeros((self.D, self.d))
        P[np.arange(self.D), self.indices] = self.values
        return P if like is None else from_numpy_like(P, like)


def isometric_projection(D: int, d: int, seed: int) -> IsometricProjection:
    r"""Uni-LoRA's random isometric projection :math:`P \in \mathbb R^{D \times d}`, :math:`P^\top P = I_d`.

    Parameters
    ----------
    D : int
        Length of the projected vector :math:`\theta_D` (all LoRA parameters of a model).
    d : int
        Length of the trainable vector :math:`\theta_d`, :math:`1 \le d \le D`.
    seed : int
        Non-negative seed of the host generator ``numpy.random.default_rng(seed)`` (PCG64).

    Returns
    -------
    IsometricProjection
        Backend-agnostic; :meth:`~IsometricProjection.apply` works on NumPy, torch and CuPy.

    Raises
    ------
    TypeError
        If ``D``, ``d`` or ``seed`` is not an int.
    ValueError
        If ``D < d`` or a size is not positive.

    Notes
    -----
    Uni-LoRA (Li et al. 2025) flattens every LoRA parameter of a model into
    :math:`\theta_D = P\theta_d`, where row :math:`i` of :math:`P` is one-hot at a column
    :math:`j(i)` drawn uniformly at random, rescaled by :math:`1/\sqrt{n_j}`: a random partition
    of the :math:`D` coordinates into :math:`d` groups that share one trainable value each.  The
    authors' code draws every :math:`j(i)` i.i.d. uniform and normalizes by the ``bincount`` of
    the draws.  A column that no row hits is then a zero column of :math:`P`, so
    :math:`P^\top P` has a zero on its diagonal and is singular (and the code's :math:`1/\sqrt{0}`
    is infinite); with the paper's :math:`D/d` in the hundreds this has probability about
    :math:`d\,e^{-D/d}`, negligible, but not for the small :math:`D/d` of tests and theory.

    We therefore **guarantee coverage**: :math:`d` distinct rows chosen uniformly at random
    (``rng.choice(D, d, replace=False)``) are assigned columns :math:`0, \dots, d-1`, one each,
    and the remaining :math:`D - d` rows draw :math:`j(i)` uniformly, as in the paper.  So
    :math:`n_j = 1 + \text{Multinomial}(D - d; 1/d, \dots, 1/d)_j \ge 1`, every column of
    :math:`P` has unit norm, and :math:`P^\top P = I_d` exactly.  For :math:`D = d`, :math:`P` is
    a random permutation matrix.  No random signs are used (the paper has none).

    References
    ----------
    K. Li, S. Han, Q. Su, W. Li, Z. Cai, S. Ji, "Uni-LoRA: One Vector is All You Need",
    arXiv:2506.00799.
    """
    D = _check_size(D, "D")
    d = _check_size(d, "d")
    if D < d:
        raise ValueError(f"D must be >= d (P is D x d with orthonormal columns), got D={D}, d={d}")
    rng = np.random.default_rng(_check_seed(seed))
    indices = rng.integers(0, d, size=D, dtype=np.int64)
    indices[rng.choice(D, size=d, replace=False)] = np.arange(d, dtype=np.int64)
    return IsometricProjection(indices, d)


# ============================================================================= Comp-LoRA
class ComplementProjector:
    r"""The orthogonal projector :math:`I - UU^\top` onto the complement of :math:`\operatorname{col}(U)`.

    Build one with :func:`complement_projector`.

    Attributes
    ----------
    U : array, shape (m, k)
        Orthonormal columns spanning the protected subspace.
    m : int
        Ambient dimension.
    k : int
        Dimension of the protected subspace.
    rank : int
        Rank of the projector, :math:`m - k`.

    Notes
    -----
    :meth:`apply` computes :math:`X - U(U^\top X)` in :math:`O(mkn)` and never forms the
    :math:`m \times m` projector.
    """

    def __init__(self, U: Any) -> None:
        self.U = U
        self.m, self.k = int(U.shape[0]), int(U.shape[1])

    @property
    def rank(self) -> int:
        """Rank of :math:`I - UU^\\top`, i.e. :math:`m - k`."""
        return self.m - self.k

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, m)``."""
        return (self.m, self.m)

    def __repr__(self) -> str:
        return f"ComplementProjector(m={self.m}, k={self.k})"

    def apply(self, X: Any, *, check_finite: bool = True):
        r""":math:`X - U(U^\top X)`.

        Parameters
        ----------
        X : array, shape (m,) or (m, n)
            Same backend, device and dtype as ``U``.  Autograd flows through for torch.
        check_finite : bool, default True
            Scan ``X`` for NaN/Inf.

        Returns
        -------
        array, shape of ``X``

        Raises
        ------
        TypeError
            If ``X`` is not a float array of ``U``'s backend and dtype.
        ValueError
            If ``X.shape[0] != m``, ``X`` is not 1-D/2-D, or it holds NaN/Inf.
        """
        check_float_array(X, "X")
        if X.ndim not in (1, 2) or X.shape[0] != self.m:
            raise ValueError(f"X must have shape ({self.m},) or ({self.m}, n), got {tuple(X.shape)}")
        if backend_name(X) != backend_name(self.U) or str(device_of(X)) != str(device_of(self.U)):
            raise TypeError(
                f"X must be on U's backend/device ({backend_name(self.U)}, {device_of(self.U)}), "
                f"got ({backend_name(X)}, {device_of(X)})"
            )
        _same_kind(X, self.U.dtype, "X", "U")
        if check_finite:
            _check_finite(X, "X")
        return X - self.U @ (self.U.T @ X)

    def to_dense(self):
        """The dense (m, m) matrix :math:`I - UU^\\top` on ``U``'s backend (tests only)."""
        xp = namespace(self.U)
        eye = xp.eye(self.m, dtype=self.U.dtype, device=device_of(self.U))
        return eye - self.U @ self.U.T


def complement_projector(U: Any, *, atol: float | None = None) -> ComplementProjector:
    r"""Comp-LoRA's projector :math:`X \mapsto (I - UU^\top)X` away from the span of ``U``.

    Parameters
    ----------
    U : array, shape (m, k)
        Float32/float64 matrix with orthonormal columns, :math:`k \le m` (e.g. the top-:math:`k`
        left singular vectors of the frozen weight).
    atol : float, optional
        Tolerance on :math:`\max_{ij} |(U^\top U - I)_{ij}|`.  Default :math:`10\sqrt{\varepsilon}`
        with :math:`\varepsilon` the dtype's machine epsilon (:math:`3.5\cdot10^{-3}` in float32,
        :math:`1.5\cdot10^{-7}` in float64): half the dtype's digits, so singular vectors computed
        in float32 and cast to float64 pass, while a non-orthonormal matrix, whose error is of
        order one, is refused.

    Returns
    -------
    ComplementProjector
        With ``apply(X)``, ``to_dense()`` and ``rank = m - k``.

    Raises
    ------
    TypeError
        If ``U`` is not a float32/float64 array.
    ValueError
        If ``U`` is not a finite 2-D matrix with ``k <= m``, or its columns are not orthonormal
        within ``atol``.

    Notes
    -----
    :math:`\Pi = I - UU^\top` is the orthogonal projector onto :math:`\operatorname{col}(U)^\perp`:
    :math:`\Pi^2 = \Pi = \Pi^\top` and :math:`\Pi U = 0`.  Comp-LoRA keeps the update
    :math:`\Delta W = \Pi BA` in that complement, so the pretrained top-:math:`k` left singular
    directions of :math:`W_0` are left untouched (:math:`U^\top \Delta W = 0`).
    """
    xp = check_matrix(U, "U")
    m, k = U.shape
    if k > m:
        raise ValueError(f"U must have at most as many columns as rows (orthonormal columns), got shape {(m, k)}")
    if atol is None:
        eps = float(np.finfo(np.float32 if str(U.dtype).endswith("float32") else np.float64).eps)
        atol = 10.0 * math.sqrt(eps)
    elif isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not (math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite real >= 0 or None, got {atol!r}")
    gram = U.T @ U - xp.eye(k, dtype=U.dtype, device=device_of(U))
    err = float(xp.max(xp.abs(gram)))
    if err > atol:
        raise ValueError(f"U must have orthonormal columns: max |U^T U - I| = {err:.3g} > atol = {atol:.3g}")
    return ComplementProjector(U)
