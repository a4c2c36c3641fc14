"""Experiments: one module per reproduced figure.

Each module exposes ``NAME``, ``TITLE``, ``CLAIM``, ``run(scale="quick", *, backend="numpy",
device="cpu", seed=0) -> list[dict]`` (a tidy table), ``check(rows) -> list[str]`` (the claim
evaluated on the numbers: an empty list means it holds) and ``plot(rows, path)`` (draws the figure
with matplotlib).  The CLI, the notebooks and the tests share them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "load", "names"]

#: name -> module path (relative to this package), in report order
EXPERIMENTS = {
    "expressivity": ".expressivity",
    "regimes": ".regimes",
    "gradients": ".gradients",
    "limits": ".limits",
    "complexity": ".complexity",
    "squeeze": ".squeeze",
    "random_bases": ".random_bases",
    "init_from_update": ".init_from_update",
    "lr_sensitivity": ".lr_sensitivity",
    "rank_allocation": ".rank_allocation",
    "merging": ".merging",
}


def names() -> list[str]:
    """Experiment names in report order (those whose module exists)."""
    out = []
    for n in EXPERIMENTS:
        try:
            load(n)
        except ModuleNotFoundError:
            continue
        out.append(n)
    return out


def load(name: str) -> ModuleType:
    """Import the experiment module ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name], __name__)
