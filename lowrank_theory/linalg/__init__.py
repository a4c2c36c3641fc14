"""Decompositions on any array backend (NumPy, torch CPU/CUDA, CuPy).

Every function takes arrays of one backend and returns arrays of the same backend,
device and dtype; see each module for the math.
"""

from __future__ import annotations

__all__: list[str] = []
