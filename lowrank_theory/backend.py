"""One backend layer for NumPy, PyTorch (CPU/CUDA) and CuPy arrays.

Every function in :mod:`lowrank_theory.linalg` starts with ``xp = namespace(A)``: the
array namespace is chosen **by the input**, never by a global switch, following the
Python array API standard through :mod:`array_api_compat`.  The few operations the
standard lacks (LU with pivoting, the discrete cosine transform) are dispatched here per
backend: SciPy for NumPy, ``torch.linalg`` / an FFT-based DCT for torch, ``cupyx`` for CuPy.

CuPy is optional.  Importing this module never imports CuPy; a CuPy array can only reach
us if the caller already imported it, and a CuPy install without a GPU is reported as
"no CuPy backend" by :func:`cupy_available`.

Conversions between backends go through DLPack (zero-copy where the devices agree).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "as_backend",
    "backend_name",
    "check_finite",
    "check_float_array",
    "check_matrix",
    "cupy_available",
    "dct",
    "device_of",
    "fake_mode_active",
    "from_numpy_like",
    "idct",
    "is_complex",
    "lu",
    "namespace",
    "real_dtype_of",
    "to_numpy",
    "torch_cuda_available",
]

FLOAT_DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------- namespaces
def namespace(*arrays: Any):
    """Return the array-API namespace shared by ``arrays``.

    Parameters
    ----------
    *arrays : array_like
        NumPy, torch or CuPy arrays (all of one backend).

    Returns
    -------
    module
        The array-API-compatible namespace (``array_api_compat.numpy``, ``.torch``, ``.cupy``).

    Raises
    ------
    TypeError
        If an argument is not an array, or the arrays mix backends.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:  # pragma: no cover - message clarified below
        kinds = ", ".join(type(a).__module__ + "." + type(a).__name__ for a in arrays)
        raise TypeError(
            f"expected NumPy, torch or CuPy arrays of one backend, got {kinds}: {exc}"
        ) from None


def backend_name(x: Any) -> str:
    """Return ``"numpy"``, ``"torch"`` or ``"cupy"`` for an array."""
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    raise TypeError(
        f"expected a NumPy, torch or CuPy array, got {type(x).__module__}.{type(x).__name__}"
    )


def device_of(x: Any):
    """The device of ``x`` as its backend names it (``"cpu"`` for NumPy)."""
    return array_api_compat.device(x)


def cupy_available() -> bool:
    """True when CuPy imports **and** sees at least one CUDA device.

    A CuPy wheel installs and imports on a machine without a GPU; the first call touching
    the device then raises ``CUDARuntimeError``.  We probe the device count inside ``try``
    and treat any failure as "no CuPy backend".
    """
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def torch_cuda_available() -> bool:
    """True when torch is importable and ``torch.cuda.is_available()``."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


# ----------------------------------------------------------------------------- dtype policy
def _dtype_name(x: Any) -> str:
    name = str(x.dtype)
    return name.rsplit(".", 1)[-1]  # "torch.float32" -> "float32"


def is_complex(x: Any) -> bool:
    """True if ``x`` holds complex numbers."""
    return _dtype_name(x).startswith("complex")


def real_dtype_of(x: Any):
    """The real floating dtype matching ``x`` (float32 for complex64, float64 for complex128)."""
    xp = namespace(x)
    name = _dtype_name(x)
    if name == "complex64":
        return xp.float32
    if name == "complex128":
        return xp.float64
    return x.dtype


def check_float_array(x: Any, name: str, *, allow_complex: bool = False, ndim: int | None = None):
    """Validate that ``x`` is a float32/float64 array (complex optionally) of a given rank.

    Integer and boolean arrays are refused (a decomposition of an integer matrix would
    silently change dtype); float16/bfloat16 are refused too, since the factorizations
    here are unstable in half precision: cast to float32 first.

    Raises
    ------
    TypeError
        If ``x`` is not an array of a supported backend, or its dtype is not floating.
    ValueError
        If ``ndim`` is given and ``x.ndim`` differs.
    """
    try:
        backend_name(x)
    except TypeError:
        raise TypeError(
            f"{name} must be a NumPy, torch or CuPy array, got {type(x).__name__}"
        ) from None
    dt = _dtype_name(x)
    ok = dt in FLOAT_DTYPES or (allow_complex and dt in ("complex64", "complex128"))
    if not ok:
        expected = "float32 or float64" + (" (or complex64/complex128)" if allow_complex else "")
        raise TypeError(f"{name} must have dtype {expected}, got {dt}; cast it first")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(x.shape)}")
    return x


def check_finite(x: Any, name: str):
    """Raise ``ValueError`` if ``x`` contains NaN or Inf (reported, never propagated)."""
    xp = namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_matrix(A: Any, name: str = "A", *, allow_complex: bool = False):
    """Validate a finite 2-D float matrix with no zero-sized dimension; return its namespace."""
    check_float_array(A, name, allow_complex=allow_complex, ndim=2)
    if A.shape[0] == 0 or A.shape[1] == 0:
        raise ValueError(f"{name} must have no zero-sized dimension, got shape {tuple(A.shape)}")
    check_finite(A, name)
    return namespace(A)


# ----------------------------------------------------------------------------- conversions
def to_numpy(x: Any) -> np.ndarray:
    """Copy/convert any supported array to a host NumPy array (zero-copy for CPU arrays)."""
    kind = backend_name(x)
    if kind == "numpy":
        return x
    if kind == "torch":
        t = x.detach()
        if t.dtype.is_floating_point and str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.resolve_conj().resolve_neg()  # lazy conjugate/negative views are invisible to DLPack
        return t.cpu().numpy() if t.device.type != "cpu" else np.from_dlpack(t)
    return x.get()  # cupy


def as_backend(x: Any, like: Any = None, *, backend: str | None = None, device: Any = None):
    """Convert ``x`` to the backend/device of ``like`` (or to ``backend`` on ``device``).

    Uses DLPack where the devices agree, so CPU NumPy <-> CPU torch and CUDA torch <->
    CuPy conversions share memory.  Crossing host/device copies once.

    Parameters
    ----------
    x : array
        Source array (NumPy, torch or CuPy).
    like : array, optional
        Target exemplar; its backend and device are used.
    backend : {"numpy", "torch", "cupy"}, optional
        Target backend when ``like`` is not given.
    device : optional
        Target device (torch device or CuPy device id) when ``like`` is not given.
    """
    if like is not None:
        backend = backend_name(like)
        device = device_of(like)
    if backend is None:
        raise ValueError("as_backend needs either like= or backend=")
    src = backend_name(x)
    if backend == "numpy":
        return to_numpy(x)
    if backend == "torch":
        import torch

        dev = torch.device(device) if device is not None else torch.device("cpu")
        if src == "torch":
            return x.to(dev)
        if src == "numpy":
            # np.ascontiguousarray would turn a 0-d array into shape (1,); read-only arrays (e.g. a
            # memory-mapped safetensors file) are copied, since torch tensors are always writable.
            if not x.flags.writeable:
                x = np.array(x, copy=True)
            t = torch.from_numpy(x if x.flags.c_contiguous else np.ascontiguousarray(x))
            return t.to(dev)
        # cupy -> torch via DLPack (both on CUDA)
        t = torch.from_dlpack(x)
        return t.to(dev)
    if backend == "cupy":
        import cupy

        if src == "cupy":
            return x
        if src == "torch" and x.device.type == "cuda":
            return cupy.from_dlpack(x.detach())
        return cupy.asarray(to_numpy(x))
    raise ValueError(f"backend must be 'numpy', 'torch' or 'cupy', got {backend!r}")


def from_numpy_like(a: np.ndarray, like: Any, *, dtype: Any = "same"):
    """Move a host NumPy array to the backend, device (and by default dtype) of ``like``.

    This is how random numbers are produced: drawn on the host with a NumPy ``Generator``,
    then moved, so one seed gives one array on every backend and device.
    """
    out = as_backend(np.asarray(a), like=like)
    if dtype == "same":
        dtype = like.dtype
    if dtype is not None:
        xp = namespace(out)
        out = xp.astype(out, dtype)
    return out


# ----------------------------------------------------------------------------- missing ops
def lu(A: Any):
    """LU factorization with partial pivoting, ``A = P @ L @ U``, on ``A``'s backend.

    Dispatch: ``scipy.linalg.lu`` (NumPy), ``torch.linalg.lu`` (torch),
    ``cupyx.scipy.linalg.lu`` (CuPy).  For ``A`` of shape (m, n) with k = min(m, n):
    ``P`` is (m, m), ``L`` is (m, k) unit lower-trapezoidal, ``U`` is (k, n) upper-trapezoidal.
    """
    kind = backend_name(A)
    if kind == "numpy":
        import scipy.linalg

        return scipy.linalg.lu(A)
    if kind == "torch":
        import torch

        return torch.linalg.lu(A)
    import cupyx.scipy.linalg

    return cupyx.scipy.linalg.lu(A)


def fake_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is active (a shape-only run): caches must not keep its tensors."""
    import torch

    if torch.compiler.is_compiling():  # dynamo's own fake tensors never reach a cache: it traces through them
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _torch_dct_constants(kind: str, n: int, norm: str, dtype, device) -> tuple:
    """The per-length constants of :func:`_torch_dct_ii` / :func:`_torch_dct_iii`, built once per
    (length, norm, dtype, device) instead of on every call (they are a handful of tiny kernels each,
    and the transforms run per training step).  Read-only; created outside inference mode so that
    autograd may save them.  Under a fake-tensor mode (shape-only runs such as
    :func:`lowrank_theory.theory.memory.peak_tensor_bytes`) they are built uncached, so no fake tensor
    is ever cached for a later real call."""
    if fake_mode_active():
        return _build_dct_constants.__wrapped__(kind, n, norm, dtype, device)
    return _build_dct_constants(kind, n, norm, dtype, device)


@functools.lru_cache(maxsize=64)
def _build_dct_constants(kind: str, n: int, norm: str, dtype, device) -> tuple:
    import torch

    h = n // 2 + 1
    with torch.inference_mode(False), torch.no_grad():
        k = torch.arange(h, device=device, dtype=dtype)
        if kind == "ii":
            w = torch.exp(torch.complex(torch.zeros_like(k), -math.pi * k / (2 * n)))
            scale = torch.full((n,), math.sqrt(2.0 / n) if norm == "ortho" else 2.0, dtype=dtype, device=device)
            if norm == "ortho":
                scale[0] = math.sqrt(1.0 / n)
            return w, scale
        angle = k * (math.pi / (2 * n))
        scale = None
        if norm == "ortho":
            scale = torch.full((n,), math.sqrt(2.0 * n), dtype=dtype, device=device)
            scale[0] = math.sqrt(4.0 * n)
        return torch.cos(angle), torch.sin(angle), scale


def _torch_dct_ii(x, axis: int, norm: str):
    r"""Orthonormal/unnormalized DCT-II along ``axis`` via one length-n real FFT (Makhoul 1980).

    With :math:`v` the reordering (even indices ascending, odd ones descending) and
    :math:`P_k = V_k e^{-\mathrm{i}\pi k/2n}` for :math:`V = \mathrm{rfft}(v)`, :math:`k \le n/2`:
    :math:`y_k = 2\,\mathrm{Re}\,P_k` and, since :math:`V_{n-j} = \overline{V_j}` and
    :math:`e^{-\mathrm{i}\pi(n-j)/2n} = -\mathrm{i}\,\overline{e^{-\mathrm{i}\pi j/2n}}`,
    :math:`y_{n-j} = -2\,\mathrm{Im}\,P_j`: half the transform and twiddle work of a complex FFT.
    """
    import torch

    x = torch.movedim(x, axis, -1)
    n = x.shape[-1]
    h = n // 2 + 1
    v = torch.cat([x[..., ::2], torch.flip(x[..., 1::2], dims=(-1,))], dim=-1)
    w, scale = _torch_dct_constants("ii", n, norm, x.dtype, x.device)
    P = torch.fft.rfft(v, dim=-1) * w
    y = torch.cat([P.real, -torch.flip(P.imag[..., 1 : n - h + 1], dims=(-1,))], dim=-1)
    return torch.movedim(y * scale, -1, axis)


def _torch_dct_iii(y, axis: int, norm: str):
    r"""Inverse of :func:`_torch_dct_ii` (a DCT-III), via one length-n inverse real FFT.

    Undoes :math:`y_k = 2\,\mathrm{Re}(V_k e^{-\mathrm{i}\pi k/2n})` with
    :math:`V_k = \tfrac12 (y_k - \mathrm{i}\,y_{n-k})\,e^{\mathrm{i}\pi k/2n}` (:math:`y_n = 0`), needed
    only for :math:`k \le n/2` since :math:`v` is real (:math:`V_0` and, n even, :math:`V_{n/2}` are real).
    """
    import torch

    y = torch.movedim(y, axis, -1)
    n = y.shape[-1]
    h = n // 2 + 1
    c, s, scale = _torch_dct_constants("iii", n, norm, y.dtype, y.device)
    if scale is not None:
        y = y * scale
    a = y[..., :h]
    b = torch.cat([torch.zeros_like(y[..., :1]), torch.flip(y[..., n - h + 1 :], dims=(-1,))], dim=-1)  # y_{n-k}
    V = torch.complex(0.5 * (a * c + b * s), 0.5 * (a * s - b * c))
    v = torch.fft.irfft(V, n=n, dim=-1)
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = torch.flip(v[..., half:], dims=(-1,))
    return torch.movedim(x, -1, axis)


def _check_norm(norm: str | None) -> str:
    if norm not in ("ortho", "backward", None):
        raise ValueError(f"norm must be 'ortho' or 'backward', got {norm!r}")
    return "backward" if norm is None else norm


def dct(x: Any, axis: int = -1, norm: str | None = "ortho"):
    """Type-II DCT along ``axis`` on ``x``'s backend (the array API has no DCT).

    ``norm="ortho"`` gives the orthonormal transform
    :math:`y_k = s_k \\sum_{j=0}^{n-1} x_j \\cos(\\pi k (2j+1) / 2n)`,
    :math:`s_0 = \\sqrt{1/n}`, :math:`s_k = \\sqrt{2/n}`; ``"backward"`` gives SciPy's
    unnormalized DCT-II (factor 2, no s_k).  Dispatch: ``scipy.fft.dct`` (NumPy),
    an FFT-based DCT (torch; Makhoul 1980), ``cupyx.scipy.fft.dct`` (CuPy).
    """
    norm = _check_norm(norm)
    kind = backend_name(x)
    if kind == "numpy":
        import scipy.fft

        return scipy.fft.dct(x, type=2, axis=axis, norm=norm)
    if kind == "torch":
        return _torch_dct_ii(x, axis, norm)
    import cupyx.scipy.fft

    return cupyx.scipy.fft.dct(x, type=2, axis=axis, norm=norm)


def idct(y: Any, axis: int = -1, norm: str | None = "ortho"):
    """Inverse of :func:`dct` (a type-III DCT) along ``axis`` on ``y``'s backend."""
    norm = _check_norm(norm)
    kind = backend_name(y)
    if kind == "numpy":
        import scipy.fft

        return scipy.fft.idct(y, type=2, axis=axis, norm=norm)
    if kind == "torch":
        return _torch_dct_iii(y, axis, norm)
    import cupyx.scipy.fft

    return cupyx.scipy.fft.idct(y, type=2, axis=axis, norm=norm)


def info() -> dict[str, Any]:
    """Versions and devices of every backend this process can use."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "array_api_compat": array_api_compat.__version__,
    }
    try:
        import scipy

        out["scipy"] = scipy.__version__
    except Exception:  # pragma: no cover
        out["scipy"] = None
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.cuda.is_available()
        out["cuda_devices"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
    except Exception:  # pragma: no cover
        out["torch"] = None
    try:
        import cupy

        out["cupy"] = cupy.__version__
        out["cupy_gpu"] = cupy_available()
    except Exception:
        out["cupy"] = None
        out["cupy_gpu"] = False
    return out
