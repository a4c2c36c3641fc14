"""Figure: how close each low-rank method's step is to the full-gradient step.

Claim checked (LoRA-Pro, arXiv:2407.18242): LoRA-Pro's step error equals the tangent-space
bound ‖(I−P_B)G(I−P_A)‖/‖G‖ to round-off; no method goes below it; vanilla LoRA is above it.
Gradients: (1) synthetic G with a decaying spectrum and random factors; (2) real MiniLM
gradients: the full-weight gradient of the first query and last value projection along a short
LoRA run on the docstring task, with the LoRA factors B, A and scale at that step
(:func:`._real.lora_gradient_trace`; needs the ``train`` extra, otherwise those rows are left out).
Step 0 is skipped for the real rows: there B = 0 and the tangent space is {Y A} only.
"""

from __future__ import annotations

import logging

import numpy as np

from ..backend import as_backend
from ..theory.gradients import compare_steps
from ._plot import plt, save
from ._real import lora_gradient_trace

log = logging.getLogger(__name__)

NAME = "gradients"
TITLE = "Gradient approximation: step error vs rank"
CLAIM = "LoRA-Pro attains the tangent-space bound; vanilla LoRA, LoRA+ and LoRA-SB sit above it."

SCALES = {"quick": dict(m=48, n=32, ranks=[1, 2, 4, 8, 16], trials=3, real_ranks=[4, 16], real_batches=3),
          "full": dict(m=384, n=384, ranks=[1, 2, 4, 8, 16, 32, 64], trials=10, real_ranks=[4, 8, 16, 32],
                       real_batches=8)}
REAL_LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.5.attention.self.value")


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
                rows.append(dict(source="synthetic", trial=trial, rank=r, **row))
    for r in cfg["real_ranks"]:
        try:
            trace = lora_gradient_trace(REAL_LAYERS, r, cfg["real_batches"], seed)
        except ImportError as exc:
            log.warning("gradients: real MiniLM rows left out (%s)", exc)
            break
        for layer in trace.layers:
            for t in range(1, cfg["real_batches"]):
                f = trace.factors[layer][t]
                args = (trace.grads[layer][t].numpy(), f["B"].numpy(), f["A"].numpy())
                if like is not None:
                    args = tuple(as_backend(a, like=like) for a in args)
                for row in compare_steps(*args, scale=f["scale"]):
                    rows.append(dict(source="minilm", trial=f"{layer}@{t}", rank=r, **row))
    return rows


def check(rows: list[dict]) -> list[str]:
    problems = []
    by = {}
    for r in rows:
        by.setdefault((r.get("source", "synthetic"), r["trial"], r["rank"]), {})[r["method"]] = r
    for key, d in by.items():
        bound = d["bound"]["rel_error"]
        if abs(d["lorapro"]["rel_error"] - bound) > 1e-8:
            problems.append(f"lorapro != bound at {key}")
        for mth, row in d.items():
            if row["rel_error_best_scale"] < bound - 1e-9:
                problems.append(f"{mth} below the bound at {key}")
    return problems


def plot(rows: list[dict], path) -> list:
    sources = list(dict.fromkeys(r.get("source", "synthetic") for r in rows))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 3.8), squeeze=False, layout="constrained")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, src in zip(axes.ravel(), sources):
        sub = [r for r in rows if r.get("source", "synthetic") == src]
        ranks = sorted({r["rank"] for r in sub})
        for mth in methods:
            ys = [np.mean([r["rel_error_best_scale"] for r in sub if r["method"] == mth and r["rank"] == k])
                  for k in ranks]
            ax.plot(ranks, ys, marker="o", ms=3, label=mth, ls="--" if mth == "bound" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("relative error after best rescaling")
        ax.set_title("random G, decaying spectrum" if src == "synthetic" else "MiniLM gradients along a LoRA run",
                     fontsize=9)
    axes.ravel()[0].legend(fontsize=8)
    fig.suptitle(TITLE)
    return save(fig, path)
