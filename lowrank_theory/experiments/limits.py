"""Figure: the computational limits of LoRA (arXiv:2406.03136) as a phase transition.

Claim checked: the best sub-quadratic (rank 0.1·L) approximation of softmax attention has
entrywise error far below 1/L for Γ = β/log L below a constant and far above it past it, and
the gap widens as L grows.
"""

from __future__ import annotations

from ..theory.limits import phase_transition
from ._plot import plt, save

NAME = "limits"
TITLE = "Computational limits of LoRA: approximability vs norm bound"
CLAIM = "A sharp transition in Γ = β / log L, independent of L, sharpening as L grows."

SCALES = {"quick": dict(lengths=[64, 256], ratios=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0]),
          "full": dict(lengths=[64, 256, 1024, 2048], ratios=[0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0])}


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    cfg = SCALES[scale]
    return phase_transition(cfg["lengths"], cfg["ratios"], seed=seed)


def check(rows: list[dict]) -> list[str]:
    problems = []
    for r in rows:
        if r["gamma"] <= 0.25 and r["lowrank_entry_error"] > 0.5:
            problems.append(f"L={r['L']} Γ={r['gamma']}: expected approximable, error {r['lowrank_entry_error']:.3g}")
        if r["gamma"] >= 2.0 and r["lowrank_entry_error"] < 2.0:
            problems.append(f"L={r['L']} Γ={r['gamma']}: expected hard, error {r['lowrank_entry_error']:.3g}")
    return problems


def plot(rows: list[dict], path) -> list:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for L in sorted({r["L"] for r in rows}):
        pts = sorted((r["gamma"], r["lowrank_entry_error"]) for r in rows if r["L"] == L)
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"rank-0.1L SVD, L={L}")
        pts = sorted((r["gamma"], r["taylor_entry_error"]) for r in rows if r["L"] == L)
        ax.plot(*zip(*pts), marker="x", ms=3, ls=":", label=f"Taylor deg {rows[0]['taylor_degree']}, L={L}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Γ = logit bound / log L")
    ax.set_ylabel("L · max |P − P̂|  (units of 1/L)")
    ax.set_title(TITLE, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)
