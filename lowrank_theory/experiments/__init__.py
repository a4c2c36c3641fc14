"""Experiments: one module per reproduced figure.

Each module exposes ``NAME``, ``TITLE``, ``CLAIM``, ``run(scale="quick", *, backend="numpy",
device="cpu", seed=0) -> list[dict]`` (a tidy table), ``check(rows) -> list[str]`` (the claim
evaluated on the numbers: an empty list means it holds) and ``plot(rows, path)`` (draws the figure
with matplotlib).  The CLI, the notebooks and the tests share them.

Optional hooks, read by the report (:mod:`.report`); a module without them still runs and renders,
with the fallback named:

``evidence(rows) -> list[Evidence]``
    The deciding numbers: one :class:`._evidence.Evidence` per comparison the claim is checked on
    (our value, the relation, the reference, the tolerance and how it was chosen, the paper's own
    value or finding where it gives one, and whether the comparison is *checked* or only
    *reported* beside the paper).  Define ``check(rows)`` as ``problems(evidence(rows))`` so the
    exit code and the report's table come from the same numbers; the report calls ``evidence``
    once and shows, per part of the claim, the case closest to failing.  A reported comparison that
    fails shows the claim as holding *partly*.  Fallback: the report lists ``check``'s problems
    and says the module declares no deciding numbers.
``PAPERS``
    ``(("short name", "arXiv id"), ...)``, linked from the report.  Fallback: none.
``NOTEBOOK``, ``PROOFS``
    Repository paths (``"notebooks/02_loca_regimes.py"``, ``("proofs/08-....md",)``), linked.
    Fallback: none.
``BACKENDS`` / ``ENGINE``
    The ``--backend`` values ``run`` honours, and otherwise what it computes with (text), for the
    report's provenance.  Fallback: the requested backend, marked "(requested)".
``settings(scale, device) -> dict``
    The sizes ``run`` uses (its ``seeds`` offsets included).  Fallback: ``SCALES[scale]``.
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
