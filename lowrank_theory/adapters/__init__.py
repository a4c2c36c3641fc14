"""Adapters: each method of ``shared/methods.md`` as a structured torch module.

Import a family module to register its adapters; this package imports them all, so
``lowrank_theory.adapters.create(name, d_out, d_in, **cfg)`` knows every method.
"""

from __future__ import annotations

import importlib

from .base import Adapter
from .layer import AdaptedLinear
from .registry import create, get, names, register

__all__ = ["AdaptedLinear", "Adapter", "create", "get", "names", "register"]

# One file per family; each registers its classes on import.
_FAMILIES = (
    "lowrank",
    "lowrank_variants",
    "adaptive_rank",
    "gated_rank",
    "triangular",
    "squeeze",
    "svd_based",
    "ldu",
    "random_basis",
    "projection",
    "frequency",
    "loca_locations",
    "tensor",
    "conv",
    "sparse",
    "sara",
    "quantized",
    "multiplicative",
    "hira",
    "sketch",
    "sparse_support",
    "kernel_sparse",
)
for _fam in _FAMILIES:
    importlib.import_module(f"{__name__}.{_fam}")
