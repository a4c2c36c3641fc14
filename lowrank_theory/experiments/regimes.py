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
from matplotlib.ticker import FuncFormatter

from ..theory.expressivity import best_error
from ..theory.targets import make_target
from ._evidence import Evidence, problems
from ._plot import note_ties, plt, save, styles

NAME = "regimes"
TITLE = "Frequency vs low rank at equal budget (LoCA's regime map)"
CLAIM = "DCT wins for flat spectra (α ≈ 0) and on frequency-sparse targets; LoRA wins for fast decay (α ≥ 1)."

PAPERS = (("LoCA", "2502.06820"),)
NOTEBOOK = "notebooks/02_loca_regimes.py"
PROOFS = ("proofs/08-frequency-vs-lowrank-regimes.md", "proofs/06-best-c-term.md", "proofs/01-eckart-young-mirsky.md")
ENGINE = "NumPy/SciPy float64 (ignores --backend)"

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


#: the frequency-sparse target is exactly DCT-sparse: the DCT's error is round-off (relative, float64)
EXACT_ATOL = 1e-6
PAPER = "LoCA §3: frequency components can surpass low rank; which wins depends on the spectrum (qualitative)"


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the claim is checked on (see :mod:`._evidence`); :func:`check` is their failures."""
    out = []
    for r in rows:
        rank = r["rank"]
        if r["target"] == "frequency_sparse":
            out.append(Evidence("DCT is exact on the frequency-sparse target", f"rank-{rank} budget", r["ratio"], "<=",
                                0.0, EXACT_ATOL, quantity="error ratio DCT/LoRA", against="0",
                                tol_text="float64 round-off", paper=PAPER,
                                message=f"DCT should be exact on the frequency-sparse target (rank {rank})"))
        elif r["alpha"] == 0.0:
            out.append(Evidence("DCT wins on a flat spectrum (α = 0)", f"rank-{rank} budget", r["ratio"], "<", 1.0,
                                quantity="error ratio DCT/LoRA", against="1", paper="proofs/08: theorem",
                                message=f"DCT should win on a flat spectrum (rank {rank}): ratio {r['ratio']:.3f}"))
        elif r["alpha"] >= 1.0:
            out.append(Evidence("LoRA wins for fast decay (α ≥ 1)", f"α = {r['alpha']:g}, rank-{rank} budget",
                                r["ratio"], ">", 1.0, quantity="error ratio DCT/LoRA", against="1", paper=PAPER,
                                message=f"LoRA should win at α={r['alpha']} (rank {rank}): ratio {r['ratio']:.3f}"))
    return out


def check(rows: list[dict]) -> list[str]:
    """The claim's problems on ``rows`` (empty: it holds): the failing asserted :func:`evidence`."""
    return problems(evidence(rows))


def plot(rows: list[dict], path) -> list:
    """The ratio error(DCT)/error(LoRA) against α on a log axis (at full scale it spans decades), one
    line per budget; the frequency-sparse ratios (exactly 0, off a log axis) are written in the panel."""
    fig, ax = plt.subplots(figsize=(5.8, 4.0), layout="constrained")
    ranks = sorted({r["rank"] for r in rows})
    sty = styles(f"rank {k}" for k in ranks)
    for k in ranks:
        pts = sorted((r["alpha"], r["ratio"]) for r in rows if r["rank"] == k and r["target"] == "power_law")
        ax.plot(*zip(*pts), ms=4, lw=1.2, label=f"budget = rank-{k} LoRA ({_budget(rows, k)} params)",
                **sty[f"rank {k}"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.text(0.3, 0.5, "above 1: LoRA better\nbelow 1: DCT better", transform=ax.transAxes, ha="left",
            va="center", fontsize=7, color="0.3")
    sparse = [r for r in rows if r["target"] == "frequency_sparse"]
    if sparse:
        worst = max(r["ratio"] for r in sparse)
        note_ties(ax, [], loc="lower right", extra=[f"frequency-sparse target: ratio ≤ {worst:.1g} "
                                                    f"(DCT exact) at every budget"])
    ax.set_xlabel("spectral decay α  (σ_i = i^-α)")
    ax.set_ylabel("error(DCT) / error(LoRA)   (log scale)")
    ax.set_title(TITLE, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return save(fig, path)


def _budget(rows: list[dict], rank: int) -> int:
    return next(r["budget"] for r in rows if r["rank"] == rank)
