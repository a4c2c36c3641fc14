r"""Orthonormal transforms of the frequency-domain adapters: DCT, 2-D DFT and Walsh–Hadamard.

FourierFT (arXiv:2405.03003) parametrizes :math:`\Delta W = \operatorname{Re}\,\mathrm{IDFT2}(F)`,
LoCA (arXiv:2502.06820) :math:`\Delta W = \mathrm{IDCT2}(F)` and QWHA (arXiv:2509.17428)
:math:`\Delta W = F H_n^{-1}` (one-sided, along the input axis; the two-sided :math:`H_m^\top F H_n` is
:func:`wht2`), with a sparse spectrum :math:`F`.  The functions here are thin, validated wrappers:

* the DCT comes from :func:`lowrank_theory.backend.dct` / :func:`~lowrank_theory.backend.idct`
  (``scipy.fft`` on NumPy, an FFT-based DCT on torch, ``cupyx.scipy.fft`` on CuPy);
* the 2-D DFT from the array API's ``xp.fft.fftn`` / ``ifftn`` on the last two axes;
* the Walsh–Hadamard transform is written here (no library in our stack has one), as a radix-:math:`2^c`
  fast transform made of reshapes and small dense products, identical code for every backend.

All are orthonormal by default (``norm="ortho"``), so each is an isometry, the DCT and DFT inverses are
the adjoints, and the WHT is its own inverse; outputs are on the input's backend, device and dtype
(complex of the matching precision for the DFT).  On torch, autograd flows through all of them.
Dense matrices :func:`dct_matrix` and :func:`hadamard_matrix` are :math:`O(n^2)` references for tests
and theory, not for the forward pass.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .. import backend as _B

__all__ = [
    "dct",
    "dct2",
    "dct_matrix",
    "dft2",
    "hadamard_matrix",
    "idct",
    "idct2",
    "idft2",
    "wht",
    "wht2",
]


# ----------------------------------------------------------------------------- validation
def _check_input(x: Any, name: str, *, allow_complex: bool = False, min_ndim: int = 1, finite: bool = True):
    """A float32/float64 (complex optionally) array of at least ``min_ndim`` axes, none of size 0."""
    _B.check_float_array(x, name, allow_complex=allow_complex)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must have no zero-sized axis, got shape {tuple(x.shape)}")
    if finite:
        _B.check_finite(x, name)
    return _B.namespace(x)


def _check_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must satisfy -{ndim} <= axis < {ndim} for a {ndim}-d input, got axis={axis}")
    return int(axis) % ndim


def _check_size(n: Any, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be a positive int, got {n}")
    return int(n)


def _like(a: np.ndarray, like: Any):
    """Host float64 ``a`` on ``like``'s backend, device and dtype (NumPy float64 without ``like``)."""
    if like is None:
        return a
    _B.check_float_array(like, "like", allow_complex=True)
    return _B.from_numpy_like(a, like)


# ----------------------------------------------------------------------------- DCT
def dct(x: Any, axis: int = -1, norm: str = "ortho", *, check_finite: bool = True):
    r"""Type-II discrete cosine transform along ``axis``.

    Parameters
    ----------
    x : array, shape (..., n, ...)
        Real float32/float64 array (NumPy, torch or CuPy), ``n = x.shape[axis] >= 1``.
    axis : int, default -1
        Axis transformed.
    norm : {"ortho", "backward"}, default "ortho"
        ``"ortho"``: the orthonormal DCT-II; ``"backward"``: SciPy's unnormalized one (see Notes).
    check_finite : bool, default True
        Refuse NaN/Inf (costs one device synchronization; pass ``False`` on a hot path whose input is
        known finite).

    Returns
    -------
    array, shape of ``x``
        On ``x``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``x`` is not a real float32/float64 array or ``axis`` is not an int.
    ValueError
        If ``axis`` is out of range, ``x`` has a zero-sized axis or NaN/Inf entries, or ``norm`` is
        unknown.

    Notes
    -----
    .. math:: y_k = s_k \sum_{j=0}^{n-1} x_j \cos\frac{\pi k (2j + 1)}{2n}, \qquad
              s_0 = \sqrt{1/n},\ s_{k>0} = \sqrt{2/n}\quad(\text{ortho}),

    i.e. :math:`y = D_n x` with :math:`D_n` = :func:`dct_matrix` ``(n)`` orthogonal, so
    :math:`\|y\|_2 = \|x\|_2` (Parseval) and the inverse is :math:`D_n^\top` (:func:`idct`).
    ``"backward"`` computes :math:`2\sum_j x_j \cos(\cdot)` (no :math:`s_k`).  Cost
    :math:`O(n \log n)` per transformed vector: SciPy/CuPy's DCT, or on torch one length-n FFT of a
    reordered copy (Makhoul 1980), which autograd differentiates.

    References
    ----------
    N. Ahmed, T. Natarajan and K. R. Rao, "Discrete cosine transform", IEEE Trans. Computers C-23
    (1974) 90–93.  J. Makhoul, "A fast cosine transform in one and two dimensions", IEEE Trans. ASSP 28
    (1980) 27–34.
    """
    _check_input(x, "x", finite=check_finite)
    axis = _check_axis(axis, x.ndim)
    return _B.dct(x, axis=axis, norm=norm)


def idct(y: Any, axis: int = -1, norm: str = "ortho", *, check_finite: bool = True):
    r"""Inverse of :func:`dct` along ``axis``: a type-III DCT.

    Parameters
    ----------
    y : array, shape (..., n, ...)
        Real float32/float64 coefficients.
    axis : int, default -1
        Axis transformed.
    norm : {"ortho", "backward"}, default "ortho"
        Must match the ``norm`` of the forward :func:`dct`.
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization).

    Returns
    -------
    array, shape of ``y``
        On ``y``'s backend, device and dtype, with ``idct(dct(x)) == x`` up to round-off.

    Raises
    ------
    TypeError
        If ``y`` is not a real float32/float64 array or ``axis`` is not an int.
    ValueError
        If ``axis`` is out of range, ``y`` has a zero-sized axis or NaN/Inf entries, or ``norm`` is
        unknown.

    Notes
    -----
    With ``norm="ortho"``, :math:`x = D_n^\top y`:
    :math:`x_j = \sum_k s_k y_k \cos\frac{\pi k (2j+1)}{2n}`.
    """
    _check_input(y, "y", finite=check_finite)
    axis = _check_axis(axis, y.ndim)
    return _B.idct(y, axis=axis, norm=norm)


def dct2(X: Any, norm: str = "ortho", *, check_finite: bool = True):
    r"""2-D type-II DCT on the last two axes: :math:`D_m X D_n^\top`.

    Parameters
    ----------
    X : array, shape (..., m, n)
        Real float32/float64 array with at least two axes; leading axes are a batch.
    norm : {"ortho", "backward"}, default "ortho"
        Normalization of each 1-D :func:`dct`.
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization).

    Returns
    -------
    array, shape (..., m, n)
        On ``X``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``X`` is not a real float32/float64 array.
    ValueError
        If ``X`` has fewer than two axes, a zero-sized axis, NaN/Inf entries, or ``norm`` is unknown.

    Notes
    -----
    Separable: a DCT of every row, then of every column, :math:`O(mn \log(mn))`.  With
    ``norm="ortho"`` it is an orthogonal map of :math:`\mathbb R^{m \times n}` (Frobenius norm kept), the
    transform of LoCA's spectrum (arXiv:2502.06820).
    """
    _check_input(X, "X", min_ndim=2, finite=check_finite)
    return _B.dct(_B.dct(X, axis=X.ndim - 1, norm=norm), axis=X.ndim - 2, norm=norm)


def idct2(Y: Any, norm: str = "ortho", *, check_finite: bool = True):
    r"""Inverse of :func:`dct2` on the last two axes: :math:`D_m^\top Y D_n`.

    Parameters
    ----------
    Y : array, shape (..., m, n)
        Real float32/float64 coefficients with at least two axes.
    norm : {"ortho", "backward"}, default "ortho"
        Must match the forward :func:`dct2`.
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization).

    Returns
    -------
    array, shape (..., m, n)
        On ``Y``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``Y`` is not a real float32/float64 array.
    ValueError
        If ``Y`` has fewer than two axes, a zero-sized axis, NaN/Inf entries, or ``norm`` is unknown.

    Notes
    -----
    LoCA's update is :math:`\Delta W = s\,\mathrm{IDCT2}(F) = s\,D_m^\top F D_n` for a sparse :math:`F`.
    """
    _check_input(Y, "Y", min_ndim=2, finite=check_finite)
    return _B.idct(_B.idct(Y, axis=Y.ndim - 1, norm=norm), axis=Y.ndim - 2, norm=norm)


def dct_matrix(n: int, *, like: Any = None):
    r"""The orthonormal DCT-II matrix :math:`D_n` (dense, :math:`O(n^2)`; a reference for tests and theory).

    Parameters
    ----------
    n : int
        Size, ``n >= 1``.
    like : array, optional
        The result goes to ``like``'s backend, device and dtype; default a NumPy float64 array.

    Returns
    -------
    array, shape (n, n)
        :math:`D_n[k, j] = s_k \cos(\pi k (2j+1) / 2n)`, :math:`s_0 = \sqrt{1/n}`, :math:`s_{k>0} =
        \sqrt{2/n}`; orthogonal, and ``dct(x) == D_n @ x``.

    Raises
    ------
    TypeError
        If ``n`` is not an int or ``like`` is not a floating array.
    ValueError
        If ``n < 1``.
    """
    n = _check_size(n)
    k = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    D = np.cos(np.pi * k * (2.0 * j + 1.0) / (2.0 * n)) * math.sqrt(2.0 / n)
    D[0, :] = math.sqrt(1.0 / n)
    return _like(D, like)


# ----------------------------------------------------------------------------- DFT
_COMPLEX = {"float32": "complex64", "float64": "complex128", "complex64": "complex64", "complex128": "complex128"}


def _as_complex(xp, X):
    target = getattr(xp, _COMPLEX[str(X.dtype).rsplit(".", 1)[-1]])
    return X if X.dtype == target else xp.astype(X, target)


def _check_fft_norm(norm: Any) -> str:
    if norm not in ("ortho", "backward", "forward"):
        raise ValueError(f"norm must be 'ortho', 'backward' or 'forward', got {norm!r}")
    return norm


def dft2(X: Any, norm: str = "ortho", *, check_finite: bool = True):
    r"""2-D discrete Fourier transform on the last two axes (complex output).

    Parameters
    ----------
    X : array, shape (..., m, n)
        Float32/float64 or complex64/complex128 array with at least two axes.
    norm : {"ortho", "backward", "forward"}, default "ortho"
        ``"ortho"`` scales by :math:`1/\sqrt{mn}` (unitary); ``"backward"`` by 1 and ``"forward"`` by
        :math:`1/(mn)`, as in :func:`numpy.fft.fft2`.
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization).

    Returns
    -------
    array, shape (..., m, n), complex
        complex64 for float32/complex64 input, complex128 for float64/complex128; on ``X``'s backend and
        device.

    Raises
    ------
    TypeError
        If ``X`` is not a float32/float64/complex64/complex128 array.
    ValueError
        If ``X`` has fewer than two axes, a zero-sized axis, NaN/Inf entries, or ``norm`` is unknown.

    Notes
    -----
    .. math:: \hat X[p, q] = \frac{1}{\sqrt{mn}} \sum_{j<m} \sum_{k<n} X[j, k]\,
              e^{-2\pi i (pj/m + qk/n)}  \qquad(\text{ortho}),

    i.e. :math:`\hat X = F_m X F_n^\top` with unitary :math:`F_m, F_n`.  Computed by the array API's
    ``xp.fft.fftn`` over the last two axes, :math:`O(mn \log(mn))`.
    """
    xp = _check_input(X, "X", allow_complex=True, min_ndim=2, finite=check_finite)
    norm = _check_fft_norm(norm)
    return xp.fft.fftn(_as_complex(xp, X), axes=(-2, -1), norm=norm)


def idft2(Y: Any, norm: str = "ortho", *, check_finite: bool = True):
    r"""Inverse of :func:`dft2` on the last two axes (complex output).

    Parameters
    ----------
    Y : array, shape (..., m, n)
        Float32/float64 or complex64/complex128 array with at least two axes.
    norm : {"ortho", "backward", "forward"}, default "ortho"
        Must match the forward :func:`dft2` (``"backward"`` puts :math:`1/(mn)` here).
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization).

    Returns
    -------
    array, shape (..., m, n), complex
        ``idft2(dft2(X)) == X`` up to round-off.

    Raises
    ------
    TypeError
        If ``Y`` is not a float32/float64/complex64/complex128 array.
    ValueError
        If ``Y`` has fewer than two axes, a zero-sized axis, NaN/Inf entries, or ``norm`` is unknown.

    Notes
    -----
    :math:`X = F_m^* Y \bar F_n`.  FourierFT's update is :math:`\Delta W = s\,\operatorname{Re}\,
    \mathrm{IDFT2}(F)`; take the real part with ``xp.real`` (PEFT's FourierFT uses the
    ``"backward"`` normalization, i.e. an extra :math:`1/(mn)`, folded into its scale :math:`s`).
    """
    xp = _check_input(Y, "Y", allow_complex=True, min_ndim=2, finite=check_finite)
    norm = _check_fft_norm(norm)
    return xp.fft.ifftn(_as_complex(xp, Y), axes=(-2, -1), norm=norm)


# ----------------------------------------------------------------------------- Walsh–Hadamard
_MAX_BLOCK_BITS = 6  # dense H_64 blocks: 64 multiply-adds per entry and level, matmul-friendly
_BLOCKS: dict[tuple, Any] = {}


def _sylvester(m: int) -> np.ndarray:
    """The ±1 Sylvester–Hadamard matrix of size ``m`` (a power of two): ``H[i, j] = (-1)^{popcount(i & j)}``."""
    i = np.arange(m)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros((m, m), dtype=np.int64)
    while np.any(bits):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity


def _block(m: int, like: Any):
    """The ±1 block :math:`H_m` on ``like``'s backend/device/dtype, cached (≤ 64×64 per key)."""
    key = (m, _B.backend_name(like), str(_B.device_of(like)), str(like.dtype))
    H = _BLOCKS.get(key)
    if H is None:
        if key[1] == "torch":
            import torch

            # a tensor made under inference_mode could not be saved for a later backward pass
            with torch.inference_mode(False), torch.no_grad():
                H = _B.from_numpy_like(_sylvester(m), like)
        else:
            H = _B.from_numpy_like(_sylvester(m), like)
        _BLOCKS[key] = H
    return H


def _block_bits(k: int) -> list[int]:
    """Split ``k`` bits into as few chunks of at most ``_MAX_BLOCK_BITS`` as possible, sizes within 1."""
    chunks = max(1, -(-k // _MAX_BLOCK_BITS))
    base, extra = divmod(k, chunks)
    return [base + (i < extra) for i in range(chunks)]


def _check_pow2(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two for the Walsh–Hadamard transform, got {n}; pad it first")
    return n.bit_length() - 1


def _fwht(xp, x, axis: int):
    """Unnormalized Sylvester WHT of ``x`` along ``axis`` (length ``2^k``) by blocks of dense ``H_{2^c}``."""
    shape = tuple(x.shape)
    n = shape[axis]
    k = n.bit_length() - 1
    pre = math.prod(shape[:axis])
    post = math.prod(shape[axis + 1 :])
    y = x
    left = 1
    for bits in _block_bits(k):
        m = 1 << bits
        right = n // (left * m) * post
        H = _block(m, x)
        if right == 1:  # the chunk is the last axis: one big (pre*left, m) @ (m, m) product
            y = xp.matmul(xp.reshape(y, (pre * left, m)), H)
        else:  # H_m applied to the middle axis of (pre*left, m, right); H_m is symmetric
            y = xp.matmul(H, xp.reshape(y, (pre * left, m, right)))
        left *= m
    return xp.reshape(y, shape)


def wht(x: Any, axis: int = -1, *, check_finite: bool = True):
    r"""Orthonormal fast Walsh–Hadamard transform along ``axis`` (Sylvester / natural order).

    Parameters
    ----------
    x : array, shape (..., n, ...)
        Real float32/float64 array; ``n = x.shape[axis]`` must be a power of two.
    axis : int, default -1
        Axis transformed.
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization; pass ``False`` on a hot path whose input is known
        finite).

    Returns
    -------
    array, shape of ``x``
        :math:`H_n x / \sqrt n` along ``axis``, on ``x``'s backend, device and dtype.

    Raises
    ------
    TypeError
        If ``x`` is not a real float32/float64 array or ``axis`` is not an int.
    ValueError
        If the length along ``axis`` is not a power of two (the message names the length and the
        axis), ``axis`` is out of range, or ``x`` holds NaN/Inf.

    Notes
    -----
    Sylvester's construction :math:`H_1 = [1]`, :math:`H_{2n} = \begin{bmatrix} H_n & H_n \\ H_n & -H_n
    \end{bmatrix} = H_2 \otimes H_n`, so :math:`H_n[i, j] = (-1)^{\operatorname{popcount}(i \,\&\, j)}`
    (natural, not sequency, order; the matrix of ``scipy.linalg.hadamard``).  :math:`H_n` is symmetric
    with :math:`H_n^2 = nI`, so :math:`W = H_n/\sqrt n` is orthogonal **and its own inverse**:
    ``wht(wht(x)) == x`` and Parseval holds.

    Fast algorithm: for :math:`n = 2^k`, :math:`H_n = H_{2^{c_1}} \otimes \cdots \otimes H_{2^{c_L}}`
    with :math:`\sum c_l = k`, :math:`c_l \le 6`.  Viewing the axis as an :math:`L`-way array (C order,
    first factor = most significant bits), each factor acts on one of its axes: a reshape and a product
    with a dense :math:`2^{c_l} \times 2^{c_l}` block.  Cost :math:`O(n \log n)` (at most
    :math:`64/6 \approx 11` multiply-adds per entry and bit), in a few large matrix products instead of
    :math:`k` memory-bound butterfly passes: about 3–7× faster than the radix-2 butterfly on CPU and
    within 2–3× of an FFT of the same length.  Out of place (no in-place update of views), so torch
    autograd differentiates it; its adjoint is itself.

    QWHA (arXiv:2509.17428) writes :math:`\Delta W = F H^{-1}` with an orthogonal WHT kernel; its code
    (``vantaa89/qwha``, ``peft/src/peft/tuners/fourierft/hadamard.py``) uses the same natural-order
    :math:`H_n` (a radix-2 butterfly, lowest bit first) but scales the forward transform by 1 (entries
    :math:`\pm 1`) and the inverse by :math:`1/n`.  Our orthonormal :math:`1/\sqrt n` on both sides gives
    the same :math:`\Delta W` up to a constant that the adapter folds into its scale.

    References
    ----------
    J. J. Sylvester, "Thoughts on inverse orthogonal matrices ...", Phil. Mag. 34 (1867) 461–475.
    K. J. Horadam, *Hadamard Matrices and Their Applications*, Princeton (2007), ch. 1.
    """
    xp = _check_input(x, "x", finite=check_finite)
    ax = _check_axis(axis, x.ndim)
    n = x.shape[ax]
    _check_pow2(n, f"the length of x along axis={axis} (x.shape[{ax}])")
    return _fwht(xp, x, ax) * (1.0 / math.sqrt(n))


def wht2(X: Any, *, check_finite: bool = True):
    r"""Orthonormal 2-D Walsh–Hadamard transform on the last two axes: :math:`H_m X H_n / \sqrt{mn}`.

    Parameters
    ----------
    X : array, shape (..., m, n)
        Real float32/float64 array, ``m`` and ``n`` powers of two.
    check_finite : bool, default True
        Refuse NaN/Inf (one device synchronization).

    Returns
    -------
    array, shape (..., m, n)
        On ``X``'s backend, device and dtype; ``wht2(wht2(X)) == X``.

    Raises
    ------
    TypeError
        If ``X`` is not a real float32/float64 array.
    ValueError
        If ``X`` has fewer than two axes, ``m`` or ``n`` is not a power of two, or ``X`` holds NaN/Inf.

    Notes
    -----
    :math:`H_m` and :math:`H_n` are symmetric, so this is also :math:`H_m^\top X H_n / \sqrt{mn}`, the
    two-sided map :math:`F \mapsto \Delta W` of the QWHA form in our methods table (the paper's own adapter
    is one-sided, :math:`F H_n^{-1}`: use :func:`wht` on the last axis).  Cost :math:`O(mn \log(mn))`.
    """
    xp = _check_input(X, "X", min_ndim=2, finite=check_finite)
    m, n = X.shape[-2], X.shape[-1]
    _check_pow2(m, "the length of X along axis=-2")
    _check_pow2(n, "the length of X along axis=-1")
    Y = _fwht(xp, _fwht(xp, X, X.ndim - 1), X.ndim - 2)
    return Y * (1.0 / math.sqrt(m * n))


def hadamard_matrix(n: int, *, like: Any = None, normalized: bool = True):
    r"""The Sylvester–Hadamard matrix :math:`H_n` (dense, :math:`O(n^2)`; a reference for tests and theory).

    Parameters
    ----------
    n : int
        Size, a power of two.
    like : array, optional
        The result goes to ``like``'s backend, device and dtype; default a NumPy float64 array.
    normalized : bool, default True
        Return :math:`H_n / \sqrt n` (orthogonal, ``wht(x) == hadamard_matrix(n) @ x``); ``False`` gives
        the :math:`\pm 1` matrix.

    Returns
    -------
    array, shape (n, n)
        :math:`H_n[i, j] = (-1)^{\operatorname{popcount}(i \,\&\, j)}` (times :math:`1/\sqrt n`),
        symmetric.

    Raises
    ------
    TypeError
        If ``n`` is not an int or ``like`` is not a floating array.
    ValueError
        If ``n`` is not a power of two.
    """
    n = _check_size(n)
    _check_pow2(n, "n")
    H = _sylvester(n)
    if normalized:
        H = H / math.sqrt(n)
    return _like(H, like)
