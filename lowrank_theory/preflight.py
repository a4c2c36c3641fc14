"""Checks of a run's settings before any work: the output folder, the device, the array backend.

The command line (``lowrank-theory reproduce`` and ``train``) and
:func:`~lowrank_theory.experiments.report.run_experiments` call these first, so a mistake costs
seconds, not a finished run: each raises a ``ValueError`` naming the option and what was
expected, and none of them creates or changes anything.  :func:`atomic_write_text` and
:func:`atomic_write_bytes` write a file so that a reader (or a crash) never sees half of it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "check_backend", "check_device", "check_output_dir"]


def check_output_dir(path: str | os.PathLike, name: str = "--out") -> Path:
    """Check that ``path`` is, or can be created as, a writable folder; create nothing.

    Parameters
    ----------
    path : str or path-like
        The output folder.  It may exist (a folder) or not (then its nearest existing parent
        must be a folder this process may write into).
    name : str
        How the error messages name the option.

    Returns
    -------
    Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    ValueError
        ``path`` (or a parent) is a file, or the folder that would hold it is not writable.
        Writability is tested by creating and removing one temporary file in the existing
        folder (``os.access`` alone is wrong on read-only mounts and under root).
    """
    p = Path(path)
    if str(path) == "":
        raise ValueError(f"{name} must be a folder path, got an empty string")
    probe = p
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise ValueError(f"{name} {str(path)!r}: {str(probe)!r} is a broken symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == p else f"cannot be created: {str(probe)!r} is a file"
        raise ValueError(f"{name} {str(path)!r} {what}, expected a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lrt-write-test-", dir=probe)
    except OSError as exc:
        where = "" if probe == p else f" (its nearest existing parent {str(probe)!r})"
        raise ValueError(f"{name} {str(path)!r}{where} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(tmp)
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader sees the old file or the new one, never a partial write; on an error the old file
    is kept and the temporary file removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_device(device: str | None, name: str = "--device") -> str | None:
    """Check that torch can run on ``device`` (``None``: the caller's default).

    Accepts ``"cpu"``, ``"cuda"``, ``"cuda:i"`` (``i`` below the device count) and ``"mps"``
    where torch offers it.

    Raises
    ------
    ValueError
        An unparseable device, or a CUDA/MPS device that this machine's torch does not have.
    """
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} {device!r} is not a device (expected cpu, cuda or cuda:<index>): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"{name} {device!r}: torch {torch.__version__} ({built}) finds no CUDA device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name} {device!r}: this machine has {count} CUDA device(s), indices 0..{count - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{name} {device!r}: torch finds no MPS device")
    elif dev.type != "cpu":
        raise ValueError(f"{name} {device!r}: expected cpu, cuda or cuda:<index>")
    return device


def check_backend(backend: str, name: str = "--backend") -> str:
    """Check that the array backend ``backend`` (``numpy``, ``torch``, ``cupy``) can run here.

    Raises
    ------
    ValueError
        Unknown name, or ``cupy`` when CuPy is not installed or sees no CUDA device (a CuPy
        wheel imports on a machine without a GPU; we probe the device count).
    """
    if backend not in ("numpy", "torch", "cupy"):
        raise ValueError(f"{name} must be numpy, torch or cupy, got {backend!r}")
    if backend == "cupy":
        try:
            import cupy  # noqa: F401
        except ImportError:
            raise ValueError(f"{name} cupy: CuPy is not installed (pip install -e \".[gpu]\")") from None
        from .backend import cupy_available

        if not cupy_available():
            raise ValueError(f"{name} cupy: CuPy is installed but finds no CUDA device")
    return backend
