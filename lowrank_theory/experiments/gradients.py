"""Figure: how close each low-rank method's step is to the full-gradient step.

Claim checked (LoRA-Pro, arXiv:2407.18242): LoRA-Pro's step error equals the tangent-space
bound ‖(I−P_B)G(I−P_A)‖/‖G‖ to round-off; no method goes below it; vanilla LoRA is above it.
Gradients: random Gaussian G with a decaying spectrum (real MiniLM gradients come with the
training layer).
"""

from __future__ import annotations

import numpy as np

from ..backend import as_backend
from ..theory.gradients import compare_steps
from ._plot import plt, save

NAME = "gradients"
TITLE = "Gradient approximation: step error vs rank"
CLAIM = "LoRA-Pro attains the tangent-space bound; vanilla LoRA, LoRA+ and LoRA-SB sit above it."

SCALES = {"quick": dict(m=48, n=32, ranks=[1, 2, 4, 8, 16], trials=3),
          "full": dict(m=384, n=384, ranks=[1, 2, 4, 8, 16, 32, 64], trials=10)}


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    cfg = SCALES[scale]
    m, n = cfg["m"], cfg["n"]
    rng = np.random.default_rng(seed)
    rows = []
    like = None
    if backend == "torch":
        import torch

        like = torch.empty(0, dtype=torch.float64, device=device)
    for trial in range(cfg["trials"]):
        # G with singular values 1/(1+i): gradients of trained layers are far from flat
        U, _ = np.linalg.qr(rng.standard_normal((m, m)))
        V, _ = np.linalg.qr(rng.standard_normal((n, n)))
        q = min(m, n)
        G = (U[:, :q] / (1 + np.arange(q))) @ V[:, :q].T
        for r in cfg["ranks"]:
            B = rng.standard_normal((m, r)) / np.sqrt(r)
            A = rng.standard_normal((r, n)) / np.sqrt(n)
            args = (G, B, A) if like is None else tuple(as_backend(a, like=like) for a in (G, B, A))
            for row in compare_steps(*args, scale=1.0):
                rows.append(dict(trial=trial, rank=r, **row))
    return rows


def check(rows: list[dict]) -> list[str]:
    problems = []
    by = {}
    for r in rows:
        by.setdefault((r["trial"], r["rank"]), {})[r["method"]] = r
    for key, d in by.items():
        bound = d["bound"]["rel_error"]
        if abs(d["lorapro"]["rel_error"] - bound) > 1e-8:
            problems.append(f"lorapro != bound at {key}")
        for mth, row in d.items():
            if row["rel_error_best_scale"] < bound - 1e-9:
                problems.append(f"{mth} below the bound at {key}")
    return problems


def plot(rows: list[dict], path) -> list:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for mth in methods:
        ranks = sorted({r["rank"] for r in rows})
        ys = [np.mean([r["rel_error_best_scale"] for r in rows if r["method"] == mth and r["rank"] == k])
              for k in ranks]
        ax.plot(ranks, ys, marker="o", ms=3, label=mth, ls="--" if mth == "bound" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("relative error after best rescaling")
    ax.set_title(TITLE)
    ax.legend(fontsize=8)
    return save(fig, path)
