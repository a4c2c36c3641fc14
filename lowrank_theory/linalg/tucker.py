r"""Tucker decompositions of N-d arrays: unfoldings, mode products, HOSVD and HOOI.

A Tucker tensor of multilinear rank :math:`(r_1, \dots, r_N)` is

.. math:: \mathcal T \approx \mathcal G \times_1 U_1 \times_2 U_2 \cdots \times_N U_N,
   \qquad \mathcal G \in \mathbb R^{r_1 \times \dots \times r_N},\ U_n \in \mathbb R^{I_n \times r_n},

the N-d form FLoRA (arXiv:2405.14739) uses for a convolution kernel's update.  Everything here works
on any array backend through the array API (``xp = namespace(T)``): the output is on the input's
backend, device and dtype.

Conventions (those of TensorLy, Kolda & Bader 2009 up to the column order of the unfolding):

* ``unfold(T, n)`` is the :math:`I_n \times \prod_{k \ne n} I_k` matrix whose rows are indexed by
  mode ``n``; its columns run over the remaining modes in C order (last index fastest), i.e. it is
  ``reshape(moveaxis(T, n, 0), (I_n, -1))``;
* ``mode_product(T, M, n)`` is :math:`\mathcal T \times_n M` with :math:`M \in \mathbb R^{J \times I_n}`:
  :math:`\operatorname{unfold}(\mathcal T \times_n M, n) = M \operatorname{unfold}(\mathcal T, n)`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..backend import backend_name, check_float_array, namespace
from ..backend import check_finite as _assert_finite
from .random import derive_seed, random_basis
from .svd import truncated_svd

__all__ = [
    "HOOIResult",
    "TuckerResult",
    "fold",
    "hooi",
    "hosvd",
    "mode_product",
    "tucker",
    "tucker_to_tensor",
    "unfold",
]


class TuckerResult(NamedTuple):
    r"""A Tucker tensor :math:`\mathcal G \times_1 U_1 \cdots \times_N U_N`.

    Attributes
    ----------
    core : array, shape (r_1, ..., r_N)
        The core tensor :math:`\mathcal G`.
    factors : list of arrays, the n-th of shape (I_n, r_n)
        Factor matrices with orthonormal columns.
    """

    core: Any
    factors: list


class HOOIResult(TuckerResult):
    r"""The :class:`TuckerResult` of :func:`hooi`, carrying how the iteration ended.

    It unpacks as ``core, factors = res`` like any :class:`TuckerResult`; three extra attributes
    (not tuple fields) describe the run.

    Attributes
    ----------
    n_iter : int
        Number of full HOOI sweeps performed (0 when ``n_iter=0`` was asked).
    converged : bool
        Whether the fit stopped improving by more than the tolerance before ``n_iter`` sweeps.
    errors : list of float
        Relative error :math:`\|\mathcal T - \hat{\mathcal T}\|_F / \|\mathcal T\|_F` after the
        initialization and after each sweep, computed as :math:`\sqrt{1 - \|\mathcal G\|_F^2 /
        \|\mathcal T\|_F^2}` (exact for orthonormal factors and the optimal core; its absolute
        accuracy is about :math:`\sqrt{\varepsilon}`).
    """

    n_iter: int = 0  # class-level defaults, seen by copies that namedtuple's ``_make``/``_replace`` build
    converged: bool = False
    errors: Sequence[float] = ()

    def __new__(cls, core: Any, factors: list, n_iter: int = 0, converged: bool = False, errors: Any = ()):
        self = super().__new__(cls, core, factors)
        self.n_iter = int(n_iter)
        self.converged = bool(converged)
        self.errors = list(errors)
        return self


# ----------------------------------------------------------------------------- validation
def _check_tensor(T: Any, name: str = "T", *, finite: bool = True):
    """A float32/float64 array with at least one axis and no zero-sized axis."""
    check_float_array(T, name)
    if T.ndim < 1:
        raise ValueError(f"{name} must have at least one axis, got a 0-d array")
    if any(s == 0 for s in T.shape):
        raise ValueError(f"{name} must have no zero-sized axis, got shape {tuple(T.shape)}")
    if finite:
        _assert_finite(T, name)
    return namespace(T)


def _check_mode(mode: Any, ndim: int) -> int:
    if isinstance(mode, bool) or not isinstance(mode, numbers.Integral):
        raise TypeError(f"mode must be an int, got {type(mode).__name__}")
    if not -ndim <= mode < ndim:
        raise ValueError(f"mode must satisfy -{ndim} <= mode < {ndim} for a {ndim}-d tensor, got mode={mode}")
    return int(mode) % ndim


def _check_ranks(ranks: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Validate a multilinear rank: length N, ``1 <= r_n <= I_n`` and ``r_n <= prod_{k != n} r_k``."""
    N = len(shape)
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        ranks = (int(ranks),) * N
    if not isinstance(ranks, Sequence) or isinstance(ranks, str):
        raise TypeError(f"ranks must be an int or a sequence of {N} ints, got {type(ranks).__name__}")
    if any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in ranks):
        raise TypeError(f"ranks must contain ints only, got {tuple(ranks)!r}")
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) != N:
        raise ValueError(f"ranks must have one entry per mode ({N} for shape {shape}), got ranks={ranks}")
    for n, (r, size) in enumerate(zip(ranks, shape)):
        if not 1 <= r <= size:
            raise ValueError(f"ranks must satisfy 1 <= ranks[n] <= shape[n]; ranks[{n}]={r}, shape[{n}]={size}")
    for n, r in enumerate(ranks):
        others = math.prod(ranks[:n] + ranks[n + 1 :])
        if r > others:
            raise ValueError(
                f"ranks must satisfy ranks[n] <= prod of the other ranks (no tensor has a larger multilinear "
                f"rank, and a larger core adds nothing); ranks[{n}]={r} > {others} for ranks={ranks}"
            )
    return ranks


def _check_factor(U: Any, name: str, like: Any, rows: int | None, cols: int | None):
    check_float_array(U, name, ndim=2)
    if backend_name(U) != backend_name(like) or U.dtype != like.dtype:
        raise TypeError(f"{name} must have the backend and dtype of the tensor ({like.dtype}), got {U.dtype}")
    if (rows is not None and U.shape[0] != rows) or (cols is not None and U.shape[1] != cols):
        want = f"({rows if rows is not None else 'any'}, {cols if cols is not None else 'any'})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(U.shape)}")


# ----------------------------------------------------------------------------- primitives
def _unfold(xp, T, mode: int):
    return xp.reshape(xp.moveaxis(T, mode, 0), (T.shape[mode], math.prod(T.shape) // T.shape[mode]))


def _fold(xp, M, mode: int, shape: tuple[int, ...]):
    moved = (shape[mode], *shape[:mode], *shape[mode + 1 :])
    return xp.moveaxis(xp.reshape(M, moved), 0, mode)


def _mode_product(xp, T, M, mode: int):
    # tensordot puts M's row axis first: (J, I_0, .., I_{n-1}, I_{n+1}, ..); move it back to position n.
    return xp.moveaxis(xp.tensordot(M, T, axes=([1], [mode])), 0, mode)


def unfold(T: Any, mode: int):
    r"""Mode-``mode`` unfolding (matricization) of an N-d array.

    Parameters
    ----------
    T : array, shape (I_0, ..., I_{N-1})
        Float32/float64 array with no zero-sized axis.
    mode : int
        The mode whose index becomes the row index, :math:`-N \le \text{mode} < N`.

    Returns
    -------
    array, shape (I_mode, prod_{k != mode} I_k)
        On ``T``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``T`` is not a float32/float64 array or ``mode`` is not an int.
    ValueError
        If ``T`` is 0-d, has a zero-sized axis, or ``mode`` is out of range.

    Notes
    -----
    :math:`T_{(n)}[i_n, j] = \mathcal T[i_0, \dots, i_{N-1}]` where :math:`j` enumerates
    :math:`(i_0, .., i_{n-1}, i_{n+1}, .., i_{N-1})` in C order (TensorLy's convention; Kolda & Bader use
    the reverse, Fortran order: the two differ by a permutation of the columns, which changes neither
    the column space nor the singular values).  A pure reshuffle of entries: values are not inspected,
    so NaN/Inf pass through (every function that computes with them checks).

    References
    ----------
    T. G. Kolda and B. W. Bader, "Tensor decompositions and applications", SIAM Review 51 (2009) 455–500.
    """
    xp = _check_tensor(T, "T", finite=False)
    return _unfold(xp, T, _check_mode(mode, T.ndim))


def fold(M: Any, mode: int, shape: Sequence[int]):
    r"""Inverse of :func:`unfold`: ``fold(unfold(T, n), n, T.shape) == T``.

    Parameters
    ----------
    M : array, shape (shape[mode], prod_{k != mode} shape[k])
        A mode-``mode`` unfolding.
    mode : int
        The mode the rows of ``M`` index.
    shape : sequence of int
        Shape of the folded tensor, positive sizes.

    Returns
    -------
    array, shape ``shape``
        On ``M``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``M`` is not a float32/float64 array, or ``mode``/``shape`` have the wrong type.
    ValueError
        If ``M`` is not 2-D, ``shape`` has a non-positive size, ``mode`` is out of range, or ``M.shape``
        does not match ``(shape[mode], prod of the others)``.
    """
    check_float_array(M, "M", ndim=2)
    if isinstance(shape, numbers.Integral) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of positive ints, got {shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape) or not shape:
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    mode = _check_mode(mode, len(shape))
    want = (shape[mode], math.prod(shape) // shape[mode])
    if tuple(M.shape) != want:
        raise ValueError(f"M must have shape {want} to fold into shape {shape} along mode {mode}, got {tuple(M.shape)}")
    return _fold(namespace(M), M, mode, shape)


def mode_product(T: Any, M: Any, mode: int, *, check_finite: bool = True):
    r"""The mode-``mode`` product :math:`\mathcal T \times_n M`.

    Parameters
    ----------
    T : array, shape (I_0, ..., I_{N-1})
        Float32/float64 tensor.
    M : array, shape (J, I_mode)
        Matrix of ``T``'s backend and dtype.
    mode : int
        The mode :math:`n` contracted with the columns of ``M``.
    check_finite : bool, default True
        Refuse NaN/Inf in ``T`` and ``M`` (one device synchronization each; pass ``False`` on a hot
        path whose inputs are known finite).

    Returns
    -------
    array, shape (I_0, ..., J, ..., I_{N-1})
        ``J`` at position ``mode``; on ``T``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``T`` or ``M`` is not float32/float64, they differ in backend or dtype, or ``mode`` is not
        an int.
    ValueError
        If ``M`` is not 2-D, ``M.shape[1] != T.shape[mode]``, ``mode`` is out of range, or an input
        holds NaN/Inf.

    Notes
    -----
    .. math:: (\mathcal T \times_n M)[i_0, .., j, .., i_{N-1}] = \sum_{i_n} M[j, i_n]\,
       \mathcal T[i_0, .., i_n, .., i_{N-1}],
       \qquad \operatorname{unfold}(\mathcal T \times_n M, n) = M\,\operatorname{unfold}(\mathcal T, n).

    One ``tensordot``: :math:`O(J \prod_k I_k)` flops.
    """
    xp = _check_tensor(T, "T", finite=check_finite)
    mode = _check_mode(mode, T.ndim)
    _check_factor(M, "M", T, None, T.shape[mode])
    if check_finite:
        _assert_finite(M, "M")
    return _mode_product(xp, T, M, mode)


def tucker_to_tensor(core: Any, factors: Sequence[Any], *, check_finite: bool = True):
    r"""The full tensor :math:`\mathcal G \times_1 U_1 \cdots \times_N U_N` of a Tucker tensor.

    Parameters
    ----------
    core : array, shape (r_1, ..., r_N)
        Float32/float64 core.
    factors : sequence of N arrays, the n-th of shape (I_n, r_n)
        Factor matrices of ``core``'s backend and dtype (need not be orthonormal).
    check_finite : bool, default True
        Refuse NaN/Inf in the inputs (one device synchronization per array).

    Returns
    -------
    array, shape (I_1, ..., I_N)
        On ``core``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If an input is not float32/float64 or the backends/dtypes differ.
    ValueError
        If ``len(factors) != core.ndim``, a factor's shape does not match, or an input holds NaN/Inf.

    Notes
    -----
    :math:`\hat{\mathcal T}[i_1, .., i_N] = \sum_{j} \mathcal G[j_1, .., j_N] \prod_n U_n[i_n, j_n]`,
    computed as N successive mode products, in :math:`O(\sum_n I_n \prod_{k \le n} I_k \prod_{k \ge n}
    r_k)` flops.
    """
    xp = _check_tensor(core, "core", finite=check_finite)
    factors = _check_factor_list(factors, core, check_finite)
    out = core
    for n, U in enumerate(factors):
        out = _mode_product(xp, out, U, n)
    return out


def _check_factor_list(factors: Any, core: Any, finite: bool) -> list:
    if not isinstance(factors, Sequence) or isinstance(factors, str):
        raise TypeError(f"factors must be a sequence of {core.ndim} matrices, got {type(factors).__name__}")
    if len(factors) != core.ndim:
        raise ValueError(f"factors must hold one matrix per mode of core ({core.ndim}), got {len(factors)}")
    for n, U in enumerate(factors):
        _check_factor(U, f"factors[{n}]", core, None, core.shape[n])
        if finite:
            _assert_finite(U, f"factors[{n}]")
    return list(factors)


# ----------------------------------------------------------------------------- HOSVD
def _leading_left(A, rank: int):
    """Leading ``rank`` left singular vectors of a matrix (sign-fixed by :func:`truncated_svd`)."""
    return truncated_svd(A, rank).U


def _core(xp, T, factors):
    G = T
    for n, U in enumerate(factors):
        G = _mode_product(xp, G, U.T, n)
    return G


def hosvd(T: Any, ranks: int | Sequence[int]) -> TuckerResult:
    r"""Truncated higher-order SVD (HOSVD) of an N-d array.

    Parameters
    ----------
    T : array, shape (I_1, ..., I_N)
        Finite float32/float64 tensor with no zero-sized axis.
    ranks : int or sequence of N ints
        Multilinear rank :math:`(r_1, .., r_N)`, :math:`1 \le r_n \le I_n` and
        :math:`r_n \le \prod_{k \ne n} r_k`; an int means the same rank for every mode.

    Returns
    -------
    TuckerResult
        ``core`` (r_1, ..., r_N) and ``factors`` [U_n (I_n, r_n)] with orthonormal columns, on ``T``'s
        backend, device and dtype.

    Raises
    ------
    TypeError
        If ``T`` is not a float32/float64 array or ``ranks`` is not made of ints.
    ValueError
        If ``T`` holds NaN/Inf or has a zero-sized axis, or ``ranks`` is invalid (the message names
        ``ranks``).

    Notes
    -----
    :math:`U_n` = the :math:`r_n` leading left singular vectors of :math:`T_{(n)}` (sign fixed as in
    :func:`~lowrank_theory.linalg.truncated_svd`), and :math:`\mathcal G = \mathcal T \times_1 U_1^\top
    \cdots \times_N U_N^\top`, the optimal core for these factors.  With :math:`\sigma^{(n)}_i` the
    singular values of :math:`T_{(n)}` (De Lathauwer, De Moor & Vandewalle 2000a, Property 10),

    .. math:: \|\mathcal T - \hat{\mathcal T}\|_F^2 \le \sum_{n=1}^N \sum_{i > r_n} \bigl(\sigma^{(n)}_i\bigr)^2
              \le N \min_{\operatorname{rank}(\mathcal X) \le (r_n)} \|\mathcal T - \mathcal X\|_F^2 ,

    i.e. HOSVD is quasi-optimal within a factor :math:`\sqrt N` in norm.  It is exact when
    :math:`\mathcal T` has multilinear rank at most :math:`(r_n)`.  Cost: N SVDs of the unfoldings,
    :math:`O(\sum_n I_n^2 \prod_{k \ne n} I_k)`.  (The sequentially truncated variant of
    Vannieuwenhoven et al. 2012 would be cheaper; we keep the classical one, whose bound above is the
    one stated.)

    References
    ----------
    L. De Lathauwer, B. De Moor and J. Vandewalle, "A multilinear singular value decomposition",
    SIAM J. Matrix Anal. Appl. 21 (2000) 1253–1278.
    """
    xp = _check_tensor(T, "T")
    ranks = _check_ranks(ranks, tuple(T.shape))
    factors = [_leading_left(_unfold(xp, T, n), r) for n, r in enumerate(ranks)]
    return TuckerResult(_core(xp, T, factors), factors)


# ----------------------------------------------------------------------------- HOOI
def _init_factors(T, ranks, init, seed) -> list:
    xp = namespace(T)
    if isinstance(init, str):
        if init == "hosvd":
            return [_leading_left(_unfold(xp, T, n), r) for n, r in enumerate(ranks)]
        if init == "random":
            if seed is None:
                seed = int(np.random.default_rng().integers(2**62))
            return [
                random_basis((T.shape[n], r), "orthogonal", seed=derive_seed(seed, n), like=T)
                for n, r in enumerate(ranks)
            ]
        raise ValueError(f"init must be 'hosvd', 'random' or a sequence of factor matrices, got {init!r}")
    if not isinstance(init, Sequence) or len(init) != T.ndim:
        raise ValueError(f"init must be 'hosvd', 'random' or a sequence of {T.ndim} matrices (I_n, r_n), got {init!r}")
    for n, U in enumerate(init):
        _check_factor(U, f"init[{n}]", T, T.shape[n], ranks[n])
        _assert_finite(U, f"init[{n}]")
    # orthonormalize the given factors so the fit formula ||G||^2 = ||T||^2 - err^2 holds
    return [xp.linalg.qr(U)[0] for U in init]


def hooi(
    T: Any,
    ranks: int | Sequence[int],
    *,
    n_iter: int = 50,
    tol: float = 1e-10,
    init: str | Sequence[Any] = "hosvd",
    seed: int | None = None,
) -> HOOIResult:
    r"""Higher-order orthogonal iteration (HOOI) for a rank-:math:`(r_1, .., r_N)` Tucker approximation.

    Parameters
    ----------
    T : array, shape (I_1, ..., I_N)
        Finite float32/float64 tensor with no zero-sized axis.
    ranks : int or sequence of N ints
        Multilinear rank, as in :func:`hosvd`.
    n_iter : int, default 50
        Maximum number of sweeps (each updates every factor once); 0 returns the initialization.
    tol : float, default 1e-10
        Stop when a sweep raises the fit :math:`\|\mathcal G\|_F^2 / \|\mathcal T\|_F^2` by at most
        ``max(tol, 16 eps)`` (eps of ``T``'s dtype: smaller changes are round-off).
    init : {"hosvd", "random"} or sequence of N arrays (I_n, r_n), default "hosvd"
        Starting factors: the HOSVD ones, Haar-random orthonormal ones drawn from ``seed``
        (:func:`~lowrank_theory.linalg.random_basis`), or given matrices (orthonormalized by QR).
    seed : int, optional
        Seed of ``init="random"``; ``None`` draws fresh entropy.

    Returns
    -------
    HOOIResult
        ``core`` (r_1, ..., r_N), ``factors`` [U_n (I_n, r_n)] with orthonormal columns, on ``T``'s
        backend, device and dtype; plus the attributes ``n_iter``, ``converged`` and ``errors``.

    Raises
    ------
    TypeError
        If ``T`` is not a float32/float64 array, ``ranks`` is not made of ints, or given initial
        factors have another backend/dtype.
    ValueError
        If ``T`` holds NaN/Inf or has a zero-sized axis, ``ranks`` is invalid (the message names
        ``ranks``), ``n_iter < 0``, ``tol < 0`` or ``init`` is invalid.

    Notes
    -----
    For orthonormal :math:`U_n` the best core is :math:`\mathcal G = \mathcal T \times_n U_n^\top`
    (all n), and :math:`\|\mathcal T - \mathcal G \times_n U_n\|_F^2 = \|\mathcal T\|_F^2 -
    \|\mathcal G\|_F^2`; so the best Tucker approximation maximizes :math:`\|\mathcal T \times_1 U_1^\top
    \cdots \times_N U_N^\top\|_F` over orthonormal factors.  HOOI maximizes it one factor at a time:
    for :math:`n = 1..N`,

    .. math:: \mathcal Y = \mathcal T \times_{k \ne n} U_k^\top, \qquad
              U_n \leftarrow \text{leading } r_n \text{ left singular vectors of } Y_{(n)},

    which is the exact maximizer over :math:`U_n` with the others fixed.  The fit is therefore
    non-decreasing from sweep to sweep and the error never exceeds that of the initialization (HOSVD by
    default).  HOOI is a local method: it converges to a stationary point, not necessarily the global
    best approximation (which is NP-hard in general).  Cost per sweep:
    :math:`O(\sum_n \prod_k I_k \cdot r_{\text{first contracted}})` for the contractions plus N small SVDs
    of :math:`I_n \times \prod_{k \ne n} r_k` matrices.

    References
    ----------
    L. De Lathauwer, B. De Moor and J. Vandewalle, "On the best rank-1 and rank-(R1, R2, ..., RN)
    approximation of higher-order tensors", SIAM J. Matrix Anal. Appl. 21 (2000) 1324–1342.
    """
    xp = _check_tensor(T, "T")
    ranks = _check_ranks(ranks, tuple(T.shape))
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative float, got {tol!r}")
    eps = float(np.finfo(np.dtype(str(T.dtype).rsplit(".", 1)[-1])).eps)
    threshold = max(float(tol), 16 * eps)

    factors = _init_factors(T, ranks, init, seed)
    # the error diagnostics on T / max|T|: squares of entries near 1e±30 would overflow or underflow
    scale = float(xp.max(xp.abs(T))) if math.prod(T.shape) else 0.0
    norm2 = float(xp.sum((T / scale) ** 2)) if scale > 0 else 0.0

    def rel_error(G) -> float:
        if norm2 == 0.0:
            return 0.0
        return math.sqrt(max(1.0 - float(xp.sum((G / scale) ** 2)) / norm2, 0.0))

    G = _core(xp, T, factors)
    errors = [rel_error(G)]
    fit = 1.0 - errors[-1] ** 2
    converged = norm2 == 0.0
    sweeps = 0
    while sweeps < n_iter and not converged:
        for n in range(T.ndim):
            Y = T
            for k in range(T.ndim):
                if k != n:
                    Y = _mode_product(xp, Y, factors[k].T, k)
            factors[n] = _leading_left(_unfold(xp, Y, n), ranks[n])
        G = _mode_product(xp, Y, factors[-1].T, T.ndim - 1)  # Y lacks only the last mode's contraction
        sweeps += 1
        errors.append(rel_error(G))
        new_fit = 1.0 - errors[-1] ** 2
        converged = new_fit - fit <= threshold
        fit = new_fit
    return HOOIResult(G, factors, n_iter=sweeps, converged=converged, errors=errors)


def tucker(T: Any, ranks: int | Sequence[int], *, method: str = "hooi", **kw: Any) -> TuckerResult:
    r"""Rank-:math:`(r_1, .., r_N)` Tucker approximation by ``method``.

    Parameters
    ----------
    T : array, shape (I_1, ..., I_N)
        Finite float32/float64 tensor.
    ranks : int or sequence of N ints
        Multilinear rank (see :func:`hosvd`).
    method : {"hooi", "hosvd"}, default "hooi"
        :func:`hooi` (HOSVD-initialized alternating refinement) or the one-pass :func:`hosvd`.
    **kw
        Keyword arguments of :func:`hooi` (``n_iter``, ``tol``, ``init``, ``seed``); none for ``"hosvd"``.

    Returns
    -------
    TuckerResult
        ``core, factors = tucker(T, ranks)``; a :class:`HOOIResult` for ``method="hooi"``.

    Raises
    ------
    ValueError
        If ``method`` is unknown, or as the chosen method raises.
    TypeError
        If ``kw`` holds an argument the chosen method does not take.
    """
    if method == "hooi":
        return hooi(T, ranks, **kw)
    if method == "hosvd":
        if kw:
            raise TypeError(f"method='hosvd' takes no extra keyword arguments, got {sorted(kw)}")
        return hosvd(T, ranks)
    raise ValueError(f"method must be 'hooi' or 'hosvd', got {method!r}")
