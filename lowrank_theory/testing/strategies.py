r"""Hypothesis strategies for the inputs the checks and the theory use.

* :func:`shapes` -- layer sizes ``(d_out, d_in)``;
* :func:`matrices_with_spectrum` -- :math:`A = U \operatorname{diag}(\sigma) V^\top` with Haar
  :math:`U, V` and a chosen or drawn spectrum, optionally scaled to magnitudes near 1e±30 (for
  diagnostics that must stay meaningful there);
* :func:`lowrank_plus_noise` -- a rank-k signal plus Gaussian noise of a given relative size;
* :func:`frequency_sparse` -- an inverse 2-D DCT of a few spikes: sparse in frequency, full rank;
* :func:`adapter_configs` -- valid constructor keywords of a registered method, drawn from its
  typed ``params`` schema (:mod:`lowrank_theory.adapters.params`) and kept only when they build.

Every strategy returns NumPy float64 arrays drawn from a seed that hypothesis chooses, so failures
shrink and replay.  Needs ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..linalg import idct2, random_basis

__all__ = ["adapter_configs", "frequency_sparse", "lowrank_plus_noise", "matrices_with_spectrum", "shapes"]

SPECTRA = ("flat", "power_law", "exponential", "geometric")


def shapes(min_side: int = 1, max_side: int = 24) -> st.SearchStrategy[tuple[int, int]]:
    """``(d_out, d_in)`` with both sides in ``[min_side, max_side]``."""
    side = st.integers(min_side, max_side)
    return st.tuples(side, side)


def _spectrum(kind: str, q: int, param: float) -> np.ndarray:
    i = np.arange(q, dtype=np.float64)
    if kind == "flat":
        return np.ones(q)
    if kind == "power_law":
        return (i + 1) ** (-param)
    if kind == "exponential":
        return np.exp(-param * i)
    if kind == "geometric":  # condition number 10**param across the spectrum
        return 10.0 ** (-param * i / max(q - 1, 1))
    raise ValueError(f"spectrum must be one of {SPECTRA} or an array, got {kind!r}")


@st.composite
def matrices_with_spectrum(
    draw,
    shape: tuple[int, int] | st.SearchStrategy[tuple[int, int]] | None = None,
    spectrum: str | Sequence[float] | None = None,
    *,
    magnitudes: Sequence[float] = (1.0,),
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(A, sigma)``: :math:`A = c\,U \operatorname{diag}(\sigma) V^\top` (m×n, float64), σ descending.

    Parameters
    ----------
    shape : (m, n) or a strategy of them, optional
        Default :func:`shapes` ``(1, 24)``.
    spectrum : {"flat", "power_law", "exponential", "geometric"} or a sequence of floats, optional
        The singular values (a sequence is sorted and must have ``min(m, n)`` non-negative entries);
        default a kind and its rate drawn by hypothesis (geometric: condition numbers up to 1e12).
    magnitudes : sequence of float
        Values of the overall scale :math:`c` to draw from, e.g. ``(1e-30, 1.0, 1e30)``; the returned
        ``sigma`` includes it.
    """
    m, n = draw(shape if isinstance(shape, st.SearchStrategy) else st.just(shape)) if shape else draw(shapes())
    q = min(m, n)
    if spectrum is None:
        kind = draw(st.sampled_from(SPECTRA))
        rate = draw(st.floats(0.0, 12.0 if kind == "geometric" else 2.0))
        sigma = _spectrum(kind, q, rate)
    elif isinstance(spectrum, str):
        sigma = _spectrum(spectrum, q, 1.0)
    else:
        sigma = np.sort(np.asarray(spectrum, dtype=np.float64))[::-1]
        if sigma.shape != (q,) or np.any(sigma < 0) or not np.all(np.isfinite(sigma)):
            raise ValueError(f"spectrum must hold min(m, n) = {q} finite non-negative values, got {spectrum!r}")
    c = draw(st.sampled_from(list(magnitudes)))
    seed = draw(st.integers(0, 2**31 - 1))
    U = random_basis((m, q), "orthogonal", seed=seed)
    V = random_basis((n, q), "orthogonal", seed=seed + 1)
    sigma = c * sigma
    return (U * sigma) @ V.T, sigma


@st.composite
def lowrank_plus_noise(
    draw,
    shape: tuple[int, int] | None = None,
    rank: int | None = None,
    noise: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(T, L)``: a rank-``rank`` signal ``L`` (unit Frobenius norm) plus noise of relative size ``noise``.

    Drawn when not given: shape from :func:`shapes` ``(2, 24)``, rank in ``[1, min(m, n)]``, noise in [0, 0.5].
    """
    m, n = shape if shape else draw(shapes(2, 24))
    k = rank if rank is not None else draw(st.integers(1, min(m, n)))
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}], got {k}")
    eps = noise if noise is not None else draw(st.floats(0.0, 0.5))
    seed = draw(st.integers(0, 2**31 - 1))
    U = random_basis((m, k), "orthogonal", seed=seed)
    V = random_basis((n, k), "orthogonal", seed=seed + 1)
    L = U @ V.T / np.sqrt(k)
    E = np.random.default_rng(seed + 2).standard_normal((m, n))
    return L + eps * E / np.linalg.norm(E), L


@st.composite
def frequency_sparse(
    draw, shape: tuple[int, int] | None = None, n_coefficients: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(T, F)``: ``T = idct2(F)`` (orthonormal) with ``F`` zero but for ``n_coefficients`` N(0, 1) spikes."""
    m, n = shape if shape else draw(shapes(2, 24))
    c = n_coefficients if n_coefficients is not None else draw(st.integers(1, m * n))
    if not 1 <= c <= m * n:
        raise ValueError(f"n_coefficients must be in [1, {m * n}], got {c}")
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    F = np.zeros(m * n)
    F[rng.choice(m * n, size=c, replace=False)] = rng.standard_normal(c)
    F = F.reshape(m, n)
    return idct2(F), F


def _value_strategy(name: str, p: Any) -> st.SearchStrategy[Any] | None:
    """A strategy for one schema entry, or None to leave the default (tensors, objects, dropout)."""
    if name == "dropout" or p.kind in ("tensor", "instance", "shape2"):
        return None  # dropout makes the forward random; tensors and shared objects need the caller
    if p.kind == "bool":
        return st.booleans()
    if p.kind == "choice":
        return st.sampled_from(p.choices)
    if p.kind == "seed":
        return st.integers(0, 2**31 - 1)
    if p.kind in ("int", "ints"):
        lo = 1 if p.low is None else int(p.low) + (1 if p.low_open else 0)
        hi = lo + 7 if p.high is None else min(int(p.high), lo + 7)
        return st.integers(max(lo, 1), max(hi, 1))
    if p.kind == "float":
        lo = 0.05 if p.low is None else max(float(p.low), 0.05) if p.low >= 0 else -4.0
        hi = 4.0 if p.high is None else min(float(p.high), 4.0)
        return st.floats(lo, hi, exclude_min=p.low_open, exclude_max=p.high_open, allow_nan=False)
    return None


@st.composite
def adapter_configs(draw, method: str, d_out: int, d_in: int, *, fixed: dict[str, Any] | None = None) -> dict:
    """Constructor keywords of ``method`` for a ``(d_out, d_in)`` weight, drawn from its ``params`` schema.

    Each keyword gets a small value of its declared type and range (ints up to 8 above their lower
    bound, floats in [0.05, 4] within their range); ``dropout``, tensors and shared objects keep their
    defaults; ``fixed`` overrides.  A draw that the constructor refuses (cross-parameter constraints
    such as ``rank <= min(d_out, d_in)``) is rejected, so every returned config builds.
    """
    from ..adapters import get

    cls = get(method)
    cfg: dict[str, Any] = {}
    for name, p in cls.params.items():
        strat = _value_strategy(name, p)
        if strat is not None and draw(st.booleans()):
            cfg[name] = draw(strat)
    cfg.update(fixed or {})
    try:
        cls(d_out, d_in, **cfg)
    except (TypeError, ValueError):
        from hypothesis import reject

        reject()
    return cfg
