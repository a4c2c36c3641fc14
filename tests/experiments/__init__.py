"""Helpers shared by the experiment tests."""

from __future__ import annotations

from types import ModuleType


def run_tiny(exp: ModuleType, tiny: dict) -> list[dict]:
    """Rows of experiment ``exp`` run at a temporary ``"tiny"`` scale (removed from ``exp.SCALES`` after)."""
    exp.SCALES["tiny"] = tiny
    try:
        return exp.run("tiny")
    finally:
        del exp.SCALES["tiny"]
