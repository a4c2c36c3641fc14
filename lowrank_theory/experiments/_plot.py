"""Shared matplotlib set-up for experiment figures (headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plt", "save"]


def save(fig, path: str | Path) -> list[Path]:
    """Save ``fig`` as PNG and SVG next to each other (``path`` without suffix); return both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in (".png", ".svg"):
        p = path.with_suffix(ext)
        fig.savefig(p, dpi=120, bbox_inches="tight")
        out.append(p)
    plt.close(fig)
    return out
