"""Figure: the computational limits of LoRA (arXiv:2406.03136) as a phase transition.

Claim checked: the best sub-quadratic (rank 0.1·L) approximation of softmax attention has
entrywise error far below 1/L for Γ = β/log L below a constant and far above it past it, and
the gap widens as L grows.
"""

from __future__ import annotations

from ..theory.limits import phase_transition
from ._evidence import Evidence, problems
from ._plot import COLORS, plt, save

NAME = "limits"
TITLE = "Computational limits of LoRA: approximability vs norm bound"
CLAIM = "A sharp transition in Γ = β / log L, independent of L, sharpening as L grows."

PAPERS = (("Computational Limits of LoRA", "2406.03136"),)
NOTEBOOK = "notebooks/05_computational_limits.py"
PROOFS = ()
ENGINE = "NumPy/SciPy float64 (ignores --backend)"

SCALES = {"quick": dict(lengths=[64, 256], ratios=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0]),
          "full": dict(lengths=[64, 256, 1024, 2048], ratios=[0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0])}


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    cfg = SCALES[scale]
    return phase_transition(cfg["lengths"], cfg["ratios"], seed=seed)


#: the check's thresholds, in units of 1/L (entrywise error of the softmax attention)
EASY_GAMMA, EASY_MAX = 0.25, 0.5
HARD_GAMMA, HARD_MIN = 2.0, 2.0
PAPER = "a sharp transition at a norm threshold: sub-quadratic algorithms exist only below it (theorem, SETH)"


def _contrast(rows: list[dict], L: int) -> float:
    pts = sorted((r["gamma"], r["lowrank_entry_error"]) for r in rows if r["L"] == L)
    return pts[-1][1] / pts[0][1] if pts and pts[0][1] > 0 else float("nan")


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the claim is checked on (see :mod:`._evidence`); :func:`check` is their failures."""
    out = []
    for r in rows:
        case, e = f"L = {r['L']}, Γ = {r['gamma']:g}", r["lowrank_entry_error"]
        if r["gamma"] <= EASY_GAMMA:
            out.append(Evidence(f"approximable below the threshold (Γ ≤ {EASY_GAMMA})", case, e, "<=", EASY_MAX,
                                quantity="L·max|P − P̂|", against="threshold", paper=PAPER,
                                message=f"L={r['L']} Γ={r['gamma']}: expected approximable, error {e:.3g}"))
        if r["gamma"] >= HARD_GAMMA:
            out.append(Evidence(f"not approximable above it (Γ ≥ {HARD_GAMMA})", case, e, ">=", HARD_MIN,
                                quantity="L·max|P − P̂|", against="threshold", paper=PAPER,
                                message=f"L={r['L']} Γ={r['gamma']}: expected hard, error {e:.3g}"))
    Ls = sorted({r["L"] for r in rows})
    if len(Ls) > 1:
        out.append(Evidence("the transition sharpens as L grows", f"L = {Ls[-1]} vs L = {Ls[0]}",
                            _contrast(rows, Ls[-1]), ">", _contrast(rows, Ls[0]),
                            quantity=f"error(Γ max)/error(Γ min) at L={Ls[-1]}", against=f"same at L={Ls[0]}",
                            asserted=False, paper=PAPER))
    return out


def check(rows: list[dict]) -> list[str]:
    """The claim's problems on ``rows`` (empty: it holds): the failing asserted :func:`evidence`."""
    return problems(evidence(rows))


def plot(rows: list[dict], path) -> list:
    """Entrywise error (units of 1/L) against Γ: one colour per L, solid circles for the best rank-0.1L
    approximation (SVD), dotted crosses for the Taylor polynomial; the check's thresholds shaded."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2), layout="constrained")
    Ls = sorted({r["L"] for r in rows})
    for i, L in enumerate(Ls):
        c = COLORS[i % len(COLORS)]
        pts = sorted((r["gamma"], r["lowrank_entry_error"]) for r in rows if r["L"] == L)
        ax.plot(*zip(*pts), color=c, marker="o", ms=4, ls="-", label=f"rank-0.1L SVD, L={L}")
        pts = sorted((r["gamma"], r["taylor_entry_error"]) for r in rows if r["L"] == L)
        ax.plot(*zip(*pts), color=c, marker="x", ms=5, ls=":", label=f"Taylor deg {rows[0]['taylor_degree']}, L={L}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvspan(min(r["gamma"] for r in rows) / 1.2, EASY_GAMMA, color="tab:green",
               alpha=0.08, lw=0, label=f"checked: SVD error ≤ {EASY_MAX}")
    ax.axvspan(HARD_GAMMA, max(r["gamma"] for r in rows) * 1.2, color="tab:red", alpha=0.08, lw=0,
               label=f"checked: SVD error ≥ {HARD_MIN}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Γ = logit bound / log L")
    ax.set_ylabel("L · max |P − P̂|  (units of 1/L)")
    ax.set_title(TITLE, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, path)
