"""lowrank_theory: structured adaptation of neural-network weights, theory first.

Subpackages: :mod:`~lowrank_theory.backend` (array-API backend layer),
:mod:`~lowrank_theory.linalg` (decompositions on any backend),
:mod:`~lowrank_theory.adapters` (torch modules, one per method),
:mod:`~lowrank_theory.merging` (task-vector merges: TIES, DARE, PCB, M2N2, ...).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
