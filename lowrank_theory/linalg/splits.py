r"""Splits of a weight matrix: sparse + low-rank, and low-rank + quantized.

* :func:`sparse_plus_lowrank`: :math:`W \approx BA + S` by alternating minimization (GoDec-style),
  the decomposition behind SLTrain-like adapters;
* :func:`quantize_uniform`, :func:`quantize_nf4`: block-wise absmax quantizers returning the
  dequantized array (what the frozen base weight *is* after quantization);
* :func:`lowrank_plus_quantized`: LQ-LoRA's :math:`W \approx Q + BA` alternation.

All functions take and return arrays of one backend (NumPy, torch, CuPy), device and dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from ..backend import check_finite, check_float_array, check_matrix, device_of, from_numpy_like, namespace
from .random import _check_seed
from .svd import randomized_svd, truncated_svd

__all__ = [
    "LowRankQuantizedResult",
    "SparseLowRankResult",
    "lowrank_plus_quantized",
    "nf4_codebook",
    "quantize_nf4",
    "quantize_uniform",
    "sparse_plus_lowrank",
]


class SparseLowRankResult(NamedTuple):
    """:math:`W \\approx BA + S`.

    Attributes
    ----------
    B : array, shape (m, r)
    A : array, shape (r, n)
    S : array, shape (m, n)
        Dense, with at most :math:`\\lfloor \\text{density}\\cdot mn \\rfloor` non-zeros.
    """

    B: Any
    A: Any
    S: Any


class LowRankQuantizedResult(NamedTuple):
    """:math:`W \\approx Q + BA`.

    Attributes
    ----------
    Q : array, shape (m, n)
        Dequantized matrix (every block's values on the quantizer's code book times its scale).
    B : array, shape (m, r)
    A : array, shape (r, n)
    errors : tuple of float
        :math:`\\|W - Q^{(t)} - B^{(t)}A^{(t)}\\|_F` for each accepted iteration; the last entry is
        the error of the returned split.
    """

    Q: Any
    B: Any
    A: Any
    errors: tuple[float, ...]


# ----------------------------------------------------------------------------- validation
def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo} <= {name} <= {hi}" if hi is not None else f"{name} >= {lo}"
        raise ValueError(f"{name} must satisfy {rng}, got {value}")
    return value


def _balanced_factors(xp, U, S, Vh):
    """``B = U diag(sqrt S)``, ``A = diag(sqrt S) Vh`` (equal norms, as PiSSA initializes)."""
    root = xp.sqrt(S)
    return U * root[None, :], root[:, None] * Vh


def _fro(xp, X) -> float:
    """:math:`\\|X\\|_F = s\\,\\|X/s\\|_F` with :math:`s = \\max|X_{ij}|`: no square overflows or underflows,
    so the diagnostic is accurate for entries near 1e±30 in float32 too (returned as a Python float)."""
    if math.prod(X.shape) == 0:
        return 0.0
    s = float(xp.max(xp.abs(X)))
    return s * float(xp.linalg.vector_norm(X / s)) if s > 0 else 0.0


# ----------------------------------------------------------------------------- sparse + low-rank
def _keep_largest(xp, R, k: int):
    """``R`` with all but its ``k`` largest-magnitude entries set to zero (ties: lowest index first)."""
    if k == 0:
        return xp.zeros_like(R)
    flat = xp.reshape(R, (-1,))
    order = xp.argsort(xp.abs(flat), descending=True, stable=True)[:k]
    out = xp.zeros_like(flat)
    out[order] = xp.take(flat, order)
    return xp.reshape(out, R.shape)


def sparse_plus_lowrank(
    W: Any,
    rank: int,
    density: float,
    *,
    n_iter: int = 20,
    tol: float = 1e-12,
    seed: int | None = None,
) -> SparseLowRankResult:
    r"""Split :math:`W \approx BA + S` with :math:`BA` of rank :math:`r` and :math:`S` sparse.

    Parameters
    ----------
    W : array, shape (m, n)
        Finite float32/float64 matrix.
    rank : int
        Rank :math:`r` of the low-rank part, :math:`1 \le r \le \min(m, n)`.
    density : float
        Fraction of entries :math:`S` may use, in [0, 1]: at most
        :math:`s = \lfloor \text{density}\cdot mn \rfloor` non-zeros (0 gives a plain truncated SVD).
    n_iter : int, default 20
        Maximum number of alternations, :math:`\ge 1`.
    tol : float, default 1e-12
        Stop early when an alternation lowers the error by less than ``tol`` times the error.
    seed : int, optional
        ``None``: the low-rank step is the exact :func:`truncated_svd`.  An int: it is
        :func:`randomized_svd` with this seed (faster for large :math:`W`; the monotonicity
        below then holds up to the randomized approximation error).

    Returns
    -------
    SparseLowRankResult
        ``B`` (m, r), ``A`` (r, n) with :math:`B = U_r\Sigma_r^{1/2}`, :math:`A = \Sigma_r^{1/2}V_r^\top`,
        and ``S`` (m, n) dense with at most :math:`s` non-zeros; on ``W``'s backend, device, dtype.

    Raises
    ------
    TypeError
        If ``W`` is not a float32/float64 array, or ``rank``/``n_iter`` is not an int.
    ValueError
        If ``W`` is not a finite 2-D matrix, or ``rank``, ``density``, ``n_iter`` or ``tol`` is out of
        range.

    Notes
    -----
    A heuristic for the non-convex problem
    :math:`\min \|W - L - S\|_F` s.t. :math:`\operatorname{rank} L \le r`, :math:`\|S\|_0 \le s`.
    Starting from :math:`S_0 = 0`, alternate the two exact block minimizations

    .. math::
        L_t = \operatorname{SVD}_r(W - S_{t-1}), \qquad
        S_t = \mathcal H_s(W - L_t),

    where :math:`\mathcal H_s` keeps the :math:`s` entries of largest magnitude (Eckart–Young for
    the first, a sort for the second; the GoDec iteration of Zhou & Tao 2011 without its random
    projections).  Each step minimizes the objective over one block with the other fixed, so
    :math:`\|W - L_t - S_t\|_F` is **non-increasing** in :math:`t`; it need not reach the global
    minimum.  When :math:`W` is an incoherent low-rank matrix plus a sparse matrix of small
    support, the iteration recovers both (robust-PCA regime).  Cost per iteration: one SVD,
    :math:`O(mn\min(m,n))`, plus a sort of :math:`mn` entries.

    References
    ----------
    T. Zhou and D. Tao, "GoDec: Randomized low-rank & sparse matrix decomposition in noisy case",
    ICML 2011.
    A. Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
    pretraining", arXiv:2406.02214.
    """
    xp = check_matrix(W, "W")
    m, n = W.shape
    rank = _check_int(rank, "rank", 1, min(m, n))
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a float in [0, 1], got {density!r}")
    n_iter = _check_int(n_iter, "n_iter", 1)
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be a non-negative float, got {tol!r}")
    if seed is not None:
        _check_seed(seed)
    s = math.floor(density * m * n)

    def lowrank(X):
        if seed is None:
            return truncated_svd(X, rank)
        return randomized_svd(X, rank, seed=seed)

    S = xp.zeros_like(W)
    prev = math.inf
    for _ in range(n_iter):
        U, sv, Vh = lowrank(W - S)
        L = (U * sv[None, :]) @ Vh
        S = _keep_largest(xp, W - L, s)
        err = _fro(xp, W - L - S)
        if err == 0.0 or (prev < math.inf and prev - err <= tol * prev):
            break
        prev = err
    B, A = _balanced_factors(xp, U, sv, Vh)
    return SparseLowRankResult(B, A, S)


# ----------------------------------------------------------------------------- quantizers
def _check_quant_args(W: Any, block_size: Any):
    check_float_array(W, "W")
    if W.ndim == 0 or math.prod(W.shape) == 0:
        raise ValueError(f"W must be a non-empty array, got shape {tuple(W.shape)}")
    check_finite(W, "W")
    return _check_int(block_size, "block_size", 1)


def _blocks(xp, W, block_size: int):
    """Flatten ``W`` row-major into (n_blocks, block_size), zero-padding the last block."""
    flat = xp.reshape(W, (-1,))
    pad = (-flat.shape[0]) % block_size
    if pad:
        flat = xp.concat([flat, xp.zeros((pad,), dtype=W.dtype, device=device_of(W))])
    blocks = xp.reshape(flat, (-1, block_size))
    absmax = xp.max(xp.abs(blocks), axis=1, keepdims=True)
    return blocks, absmax


def _unblock(xp, blocks, W):
    n = math.prod(W.shape)
    return xp.reshape(xp.reshape(blocks, (-1,))[:n], W.shape)


def quantize_uniform(W: Any, bits: int, *, block_size: int = 64):
    r"""Symmetric absmax quantization to ``bits`` bits per block; returns the dequantized array.

    Parameters
    ----------
    W : array, any shape
        Finite float32/float64 array; flattened row-major into blocks of ``block_size`` entries
        (the last block zero-padded, which does not change its absmax).
    bits : int
        Bits per entry, 2 to 8.
    block_size : int, default 64
        Entries sharing one scale.

    Returns
    -------
    array
        Same shape, backend, device and dtype as ``W``.

    Raises
    ------
    TypeError
        If ``W`` is not a float32/float64 array, or ``bits``/``block_size`` is not an int.
    ValueError
        If ``W`` is empty or holds NaN/Inf, ``bits`` is outside 2..8 or ``block_size < 1``.

    Notes
    -----
    With :math:`q = 2^{b-1} - 1` and :math:`a = \max_{\text{block}} |w|`, each block becomes

    .. math:: \hat w = \frac{a}{q}\operatorname{round}\!\Big(\frac{q\,w}{a}\Big)
              \in \frac{a}{q}\{-q, \dots, q\},

    :math:`2q + 1 = 2^b - 1` symmetric levels including 0 (one code of the :math:`2^b` is unused,
    as in LLM.int8's absmax scheme).  Since :math:`|qw/a| \le q` nothing is clipped, and
    :math:`|w - \hat w| \le a/(2q)`, half a step.  An all-zero block stays zero.

    References
    ----------
    T. Dettmers et al., "LLM.int8(): 8-bit matrix multiplication for transformers at scale",
    arXiv:2208.07339.
    """
    block_size = _check_quant_args(W, block_size)
    bits = _check_int(bits, "bits", 2, 8)
    xp = namespace(W)
    q = float(2 ** (bits - 1) - 1)
    blocks, absmax = _blocks(xp, W, block_size)
    step = absmax / q
    safe = xp.where(step > 0, step, xp.ones_like(step))
    deq = xp.round(blocks / safe) * step
    return _unblock(xp, deq, W)


@functools.lru_cache(maxsize=1)
def _nf4_codebook_np() -> np.ndarray:
    from scipy.stats import norm

    offset = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)  # 0.9677083..., QLoRA's delta for 16 levels
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])  # 8 positive quantiles, largest first
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])  # 7 negative quantiles
    values = np.sort(np.concatenate([neg, [0.0], pos]))
    values = values / values.max()
    values.setflags(write=False)
    return values


def nf4_codebook(like: Any = None):
    r"""QLoRA's 16 NormalFloat-4 levels, ascending, in [-1, 1] with -1, 0 and 1 among them.

    Parameters
    ----------
    like : array, optional
        Return on ``like``'s backend, device and dtype (default: float64 NumPy, read-only).

    Returns
    -------
    array, shape (16,)

    Notes
    -----
    Dettmers et al. (2023, Sec. 3) estimate :math:`2^{k-1}` quantiles of :math:`\mathcal N(0,1)`
    for the negative half and :math:`2^{k-1}+1` for the positive half, merge them, drop one of the
    two zeros and normalize into :math:`[-1, 1]`; so 0 is exact and the type is asymmetric
    (8 positive, 7 negative levels).  The quantiles are taken at probabilities evenly spaced
    from :math:`\delta` to :math:`1/2`, :math:`\delta = 1 - \tfrac12(\tfrac1{30} + \tfrac1{32})
    = 0.9677083`, which avoids the infinite quantile at probability 1:

    .. math:: c^{+}_i = \Phi^{-1}\!\big(\delta - i\tfrac{\delta - 1/2}{8}\big),\ i = 0..7;\quad
              c^{-}_i = -\Phi^{-1}\!\big(\delta - i\tfrac{\delta - 1/2}{7}\big),\ i = 0..6,

    then divide everything by :math:`\Phi^{-1}(\delta)`.  This is the construction of
    bitsandbytes' ``create_normal_map`` (checked against its source), evaluated here in float64.

    References
    ----------
    T. Dettmers, A. Pagnoni, A. Holtzman, L. Zettlemoyer, "QLoRA: Efficient finetuning of
    quantized LLMs", arXiv:2305.14314.
    """
    c = _nf4_codebook_np()
    if like is None:
        return c
    check_float_array(like, "like")  # an integer ``like`` would round the levels to -1, 0, 1
    return from_numpy_like(c, like)


def quantize_nf4(W: Any, *, block_size: int = 64):
    r"""NormalFloat-4 quantization (QLoRA) with one absmax scale per block; returns the dequantized array.

    Parameters
    ----------
    W : array, any shape
        Finite float32/float64 array; flattened row-major into blocks of ``block_size``.
    block_size : int, default 64
        Entries sharing one scale (QLoRA uses 64).

    Returns
    -------
    array
        Same shape, backend, device and dtype as ``W``.

    Raises
    ------
    TypeError
        If ``W`` is not a float32/float64 array, or ``block_size`` is not an int.
    ValueError
        If ``W`` is empty or holds NaN/Inf, or ``block_size < 1``.

    Notes
    -----
    Each block is scaled into :math:`[-1, 1]` by its absmax :math:`a`, each entry is replaced by
    the nearest level :math:`c_j` of :func:`nf4_codebook` (ties to the lower level), and the
    result is :math:`a\,c_j`.  The nearest level is found by counting the midpoints
    :math:`(c_j + c_{j+1})/2` below :math:`w/a`: 15 comparisons, :math:`O(\text{size})` memory.
    QLoRA's double quantization of the scales is not modelled (the scales stay exact).

    References
    ----------
    T. Dettmers et al., "QLoRA: Efficient finetuning of quantized LLMs", arXiv:2305.14314.
    """
    block_size = _check_quant_args(W, block_size)
    xp = namespace(W)
    code = nf4_codebook(like=W)
    mids = (code[1:] + code[:-1]) / 2
    blocks, absmax = _blocks(xp, W, block_size)
    safe = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    x = blocks / safe
    idx = xp.zeros(x.shape, dtype=xp.int64, device=device_of(W))
    for j in range(mids.shape[0]):
        idx = idx + xp.astype(x > mids[j], xp.int64)
    deq = xp.reshape(xp.take(code, xp.reshape(idx, (-1,))), x.shape) * absmax
    return _unblock(xp, deq, W)


# ----------------------------------------------------------------------------- low-rank + quantized
def lowrank_plus_quantized(
    W: Any,
    rank: int,
    bits: int = 4,
    iters: int = 10,
    *,
    quantizer: str = "uniform",
    block_size: int = 64,
) -> LowRankQuantizedResult:
    r"""LQ-LoRA's split :math:`W \approx Q + BA`: quantized :math:`Q` plus a rank-:math:`r` correction.

    Parameters
    ----------
    W : array, shape (m, n)
        Finite float32/float64 matrix.
    rank : int
        Rank :math:`r` of :math:`BA`, :math:`1 \le r \le \min(m, n)`.
    bits : int, default 4
        Bits of the quantizer (2..8 for ``"uniform"``; must be 4 for ``"nf4"``).
    iters : int, default 10
        Maximum number of alternations :math:`T \ge 1`.
    quantizer : {"uniform", "nf4"}, default "uniform"
        :func:`quantize_uniform` or :func:`quantize_nf4`.
    block_size : int, default 64
        Entries per quantization block.

    Returns
    -------
    LowRankQuantizedResult
        ``Q`` (m, n) dequantized, ``B`` (m, r), ``A`` (r, n) with
        :math:`B = U_r\Sigma_r^{1/2}`, :math:`A = \Sigma_r^{1/2}V_r^\top`, on ``W``'s backend,
        device and dtype; ``errors`` the Frobenius error of every accepted iterate.

    Raises
    ------
    TypeError
        If ``W`` is not a float32/float64 array or an integer argument is not an int.
    ValueError
        If ``W`` is not a finite 2-D matrix, ``rank``/``bits``/``iters``/``block_size`` is out of
        range, or ``quantizer`` is unknown.

    Notes
    -----
    Guo et al. (2023, Alg. 1) start from :math:`Q^{(0)} = 0` and alternate

    .. math::
        L^{(t)} = \operatorname{SVD}_r\big(W - Q^{(t-1)}\big), \qquad
        Q^{(t)} = \operatorname{quantize}\big(W - L^{(t)}\big),

    stopping when :math:`\|W - Q^{(t)} - L^{(t)}\|_F` increases.  The SVD step is an exact
    minimization, but absmax quantization is not the Euclidean projection onto the (non-convex)
    set of quantizable matrices (the scale is tied to the block's maximum), so the error is
    **not** monotone in general: we stop at the first increase and return the previous (best)
    iterate, which makes ``errors`` non-increasing by construction.  The first iterate
    quantizes :math:`W - \operatorname{SVD}_r(W)`, whose outlying directions are removed, so on
    weights with a dominant low-rank part the error is well below that of
    :math:`\operatorname{quantize}(W)`; this is typical, not guaranteed.  The paper's
    mixed-precision ILP and Fisher weighting are not included.

    References
    ----------
    H. Guo, P. Greengard, E. P. Xing, Y. Kim, "LQ-LoRA: Low-rank plus quantized matrix
    decomposition for efficient language model finetuning", arXiv:2311.12023.
    """
    xp = check_matrix(W, "W")
    m, n = W.shape
    rank = _check_int(rank, "rank", 1, min(m, n))
    iters = _check_int(iters, "iters", 1)
    block_size = _check_int(block_size, "block_size", 1)
    if quantizer == "uniform":
        bits = _check_int(bits, "bits", 2, 8)

        def quantize(X):
            return quantize_uniform(X, bits, block_size=block_size)
    elif quantizer == "nf4":
        if _check_int(bits, "bits", 2, 8) != 4:
            raise ValueError(f"bits must be 4 for quantizer='nf4', got {bits}")

        def quantize(X):
            return quantize_nf4(X, block_size=block_size)
    else:
        raise ValueError(f"quantizer must be 'uniform' or 'nf4', got {quantizer!r}")

    Q = xp.zeros_like(W)
    errors: list[float] = []
    best = None
    for _ in range(iters):
        U, sv, Vh = truncated_svd(W - Q, rank)
        L = (U * sv[None, :]) @ Vh
        Q_new = quantize(W - L)
        err = _fro(xp, W - Q_new - L)
        if errors and err > errors[-1]:
            break
        Q, errors = Q_new, [*errors, err]
        best = (Q_new, U, sv, Vh)
    Q, U, sv, Vh = best
    B, A = _balanced_factors(xp, U, sv, Vh)
    return LowRankQuantizedResult(Q, B, A, tuple(errors))
