"""Theory: expressivity, gradient approximation, complexity."""

from __future__ import annotations
