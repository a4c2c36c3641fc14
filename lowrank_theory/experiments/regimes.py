"""Figure: LoCA's regime map -- where a c-term DCT beats rank-r LoRA at equal parameters.

For targets with power-law spectra σ_i = i^{-α} (random singular vectors), the ratio
error(DCT, p) / error(LoRA, p) at equal budget p = r(m+n).  Theory (proofs/08): with a flat
spectrum (α = 0) LoRA's r(m+n) parameters capture only r/min(m,n) of the energy while any
orthonormal basis captures at least p/(mn) > r/min(m,n); as α grows the energy concentrates in
a few singular directions that a DCT spreads over many coefficients, so LoRA wins.
A frequency-sparse target is the opposite extreme (DCT exact, LoRA far off).
"""

from __future__ import annotations

import numpy as np

from ..theory.expressivity import best_error
from ..theory.targets import make_target
from ._plot import plt, save

NAME = "regimes"
TITLE = "Frequency vs low rank at equal budget (LoCA's regime map)"
CLAIM = "DCT wins for flat spectra (α ≈ 0) and on frequency-sparse targets; LoRA wins for fast decay (α ≥ 1)."

SCALES = {"quick": dict(m=32, n=24, ranks=[2, 4], alphas=[0.0, 0.25, 0.5, 1.0, 1.5, 2.0]),
          "full": dict(m=128, n=96, ranks=[2, 4, 8, 16], alphas=list(np.round(np.linspace(0, 2.5, 11), 3)))}


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    cfg = SCALES[scale]
    m, n = cfg["m"], cfg["n"]
    rows = []
    for r in cfg["ranks"]:
        p = r * (m + n)
        for a in cfg["alphas"]:
            t = make_target("power_law", m, n, seed=seed, alpha=float(a))
            e_l, e_d = best_error("lora", t, p).error, best_error("dct", t, p).error
            rows.append(dict(target="power_law", alpha=float(a), rank=r, budget=p, lora_error=e_l, dct_error=e_d,
                             ratio=e_d / e_l))
        t = make_target("frequency_sparse", m, n, seed=seed, n_coefficients=p // 2)
        e_l, e_d = best_error("lora", t, p).error, best_error("dct", t, p).error
        rows.append(dict(target="frequency_sparse", alpha=None, rank=r, budget=p, lora_error=e_l, dct_error=e_d,
                         ratio=e_d / max(e_l, 1e-300)))
    return rows


def check(rows: list[dict]) -> list[str]:
    problems = []
    for r in rows:
        if r["target"] == "frequency_sparse" and r["ratio"] > 1e-6:
            problems.append(f"DCT should be exact on the frequency-sparse target (rank {r['rank']})")
        if r["target"] == "power_law" and r["alpha"] == 0.0 and r["ratio"] >= 1:
            problems.append(f"DCT should win on a flat spectrum (rank {r['rank']}): ratio {r['ratio']:.3f}")
        if r["target"] == "power_law" and r["alpha"] >= 1.0 and r["ratio"] <= 1:
            problems.append(f"LoRA should win at α={r['alpha']} (rank {r['rank']}): ratio {r['ratio']:.3f}")
    return problems


def plot(rows: list[dict], path) -> list:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r_ in sorted({r["rank"] for r in rows}):
        pts = sorted((r["alpha"], r["ratio"]) for r in rows if r["rank"] == r_ and r["target"] == "power_law")
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"budget = rank-{r_} LoRA")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("spectral decay α  (σ_i = i^-α)")
    ax.set_ylabel("error(DCT) / error(LoRA)")
    ax.set_title(TITLE, fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)
