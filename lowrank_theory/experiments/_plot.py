"""Shared matplotlib set-up for experiment figures (headless Agg backend) and readability helpers.

* :func:`styles` gives every series a colour, a marker **and** a line style, so ten curves in one
  panel stay apart in print and for colour-blind readers.
* :func:`ties` finds series that are exactly equal (a method that attains a bound, two methods
  with the same optimum); :func:`tie_sizes` draws them as concentric hollow markers so every one
  stays visible, and :func:`note_ties` writes the tie into the panel instead of hiding it.
* :func:`figure_legend` puts one legend for all panels outside them (reachable for every panel,
  covering none).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["figure_legend", "note_ties", "plt", "save", "styles", "tie_sizes", "ties"]

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan", "k", "gold", "navy")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d")
LINESTYLES = ("-", "--", "-.", ":")


def save(fig, path: str | Path) -> list[Path]:
    """Save ``fig`` as PNG and SVG next to each other (``path`` without suffix, each file written
    atomically); close it; return both paths."""
    from ..preflight import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        for ext in (".png", ".svg"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext[1:], dpi=120, bbox_inches="tight")
            out.append(atomic_write_bytes(path.with_suffix(ext), buf.getvalue()))
    finally:
        plt.close(fig)
    return out


def styles(names: Iterable[str]) -> dict[str, dict]:
    """``{name: dict(color=, marker=, ls=)}``, all three distinct between neighbours.

    The i-th name gets colour ``i``, marker ``i`` and line style ``i mod 4``, so two series that
    share a colour (past 13) still differ in marker and style.
    """
    return {n: dict(color=COLORS[i % len(COLORS)], marker=MARKERS[i % len(MARKERS)],
                    ls=LINESTYLES[i % len(LINESTYLES)]) for i, n in enumerate(dict.fromkeys(names))}


def _equal(a: Sequence[float], b: Sequence[float], rtol: float, atol: float) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or abs(x - y) <= atol + rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


def ties(series: Mapping[str, Sequence[float]], *, rtol: float = 1e-9, atol: float = 1e-12) -> list[list[str]]:
    """Groups (of two or more names, in input order) whose values agree pointwise to ``atol + rtol·|y|``.

    The default tolerance is round-off for float64 quantities of order one: "exactly equal" in
    the sense a reader of the figure cares about (the curves cannot be told apart at any zoom).
    """
    groups: list[list[str]] = []
    for name, ys in series.items():
        for g in groups:
            if _equal(series[g[0]], ys, rtol, atol):
                g.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def tie_sizes(names: Iterable[str], groups: list[list[str]], base: float = 4.0) -> dict[str, dict]:
    """Marker kwargs so the members of a tie are concentric: larger hollow markers under a filled one.

    Returns ``{name: dict(ms=, mfc=)}`` for every name (``mfc`` only for hollow ones).
    """
    out = {n: dict(ms=base) for n in names}
    for g in groups:
        for k, n in enumerate(g):
            out[n] = dict(ms=base + 3.0 * (len(g) - 1 - k))
            if k < len(g) - 1:
                out[n]["mfc"] = "none"
    return out


def note_ties(ax, groups: list[list[str]], *, what: str = "identical", loc: str = "lower left",
              extra: Sequence[str] = ()) -> None:
    """Write each tie (``"lorapro = altlora = bound (identical)"``) and any ``extra`` lines into ``ax``."""
    lines = [" = ".join(g) + f" ({what})" for g in groups] + list(extra)
    if not lines:
        return
    x, ha = (0.02, "left") if "left" in loc else (0.98, "right")
    y, va = (0.08, "bottom") if "lower" in loc else (0.97, "top")
    ax.text(x, y, "\n".join(lines), transform=ax.transAxes, ha=ha, va=va, fontsize=7,
            bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.7", alpha=0.9))


def figure_legend(fig, axes: Iterable, *, ncol: int | None = None, title: str | None = None) -> None:
    """One legend for every panel of ``fig``, below the panels (labels de-duplicated, first seen order).

    ``fig`` should use ``layout="constrained"`` so the legend gets its own room.
    """
    from matplotlib.lines import Line2D

    handles: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label.startswith("_") or label in handles:
                continue
            if isinstance(h, Line2D):  # a plain copy: a tie's hollow, enlarged marker is a panel detail
                h = Line2D([], [], color=h.get_color(), ls=h.get_linestyle(), lw=h.get_linewidth(),
                           marker=h.get_marker(), ms=5, alpha=h.get_alpha())
            handles[label] = h
    if not handles:
        return
    n = ncol or min(len(handles), 6)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=n, fontsize=8,
               title=title, title_fontsize=8, frameon=False)
