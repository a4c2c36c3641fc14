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
from ._evidence import Evidence, problems
from ._plot import figure_legend, note_ties, plt, save, styles, tie_sizes, ties
from ._real import lora_gradient_trace

log = logging.getLogger(__name__)

NAME = "gradients"
TITLE = "Gradient approximation: step error vs rank"
CLAIM = "LoRA-Pro attains the tangent-space bound; vanilla LoRA, LoRA+ and LoRA-SB sit above it."

SCALES = {"quick": dict(m=48, n=32, ranks=[1, 2, 4, 8, 16], trials=3, real_ranks=[4, 16], real_batches=3),
          "full": dict(m=384, n=384, ranks=[1, 2, 4, 8, 16, 32, 64], trials=10, real_ranks=[4, 8, 16, 32],
                       real_batches=8)}
PAPERS = (("LoRA-Pro", "2407.18242"), ("LoRA-SB", "2411.19557"), ("LoRA+", "2402.12354"), ("AltLoRA", "2505.12455"))
NOTEBOOK = "notebooks/03_gradient_approximation.py"
PROOFS = ("proofs/03-lorapro-tangent-projection.md", "proofs/04-lorasb-subspace.md")
#: which ``--backend`` values ``run`` honours (the projections run on that backend, float64)
BACKENDS = ("numpy", "torch", "cupy")
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
    elif backend == "cupy":
        import cupy

        like = cupy.empty(0, dtype=cupy.float64)
    elif backend != "numpy":
        raise ValueError(f"backend must be 'numpy', 'torch' or 'cupy', got {backend!r}")
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


#: |LoRA-Pro − bound| (relative errors of order one, float64 projections) and the slack below the bound
TIE_ATOL = 1e-8
BELOW_ATOL = 1e-9
#: the methods the claim says sit above the bound
ABOVE = ("lora", "lora_plus", "lora_sb")
_SOURCE = {"synthetic": "random G", "minilm": "MiniLM gradients"}


def _keyed(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r.get("source", "synthetic"), r["trial"], r["rank"]), {})[r["method"]] = r
    return by


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the claim is checked on (see :mod:`._evidence`); :func:`check` is their failures."""
    out = []
    by = _keyed(rows)
    for key, d in by.items():
        src, trial, rank = key
        case = f"{_SOURCE.get(src, src)}, {trial}, rank {rank}"
        bound = d["bound"]["rel_error"]
        out.append(Evidence("LoRA-Pro's step error equals the tangent-space bound", case, d["lorapro"]["rel_error"],
                            "==", bound, TIE_ATOL, quantity="LoRA-Pro error", against="bound",
                            tol_text="float64 round-off", message=f"lorapro != bound at {key}",
                            paper="LoRA-Pro: its adjusted gradients are the optimal ones (theorem)"))
        for mth, row in d.items():
            out.append(Evidence("no method's step goes below the bound", f"{case}, {mth}", row["rel_error_best_scale"],
                                ">=", bound, BELOW_ATOL, quantity=f"{mth} error", against="bound",
                                tol_text="float64 round-off", message=f"{mth} below the bound at {key}",
                                paper="a theorem (proofs/03)"))
        if "altlora" in d:
            out.append(Evidence("AltLoRA's exact alternating step attains the bound", case,
                                d["altlora"]["rel_error_best_scale"], "==", bound, TIE_ATOL, quantity="AltLoRA error",
                                against="bound", tol_text="float64 round-off", asserted=False,
                                paper="AltLoRA: alternating projections, no joint-gradient approximation (abstract)"))
    for src in dict.fromkeys(k[0] for k in by):
        keys = [k for k in by if k[0] == src]
        bound = float(np.mean([by[k]["bound"]["rel_error"] for k in keys]))
        for mth in ABOVE:
            vals = [by[k][mth]["rel_error_best_scale"] for k in keys if mth in by[k]]
            if vals:
                out.append(Evidence(f"{', '.join(ABOVE)} sit above the bound (mean over cases)",
                                    f"{_SOURCE.get(src, src)}, {mth}", float(np.mean(vals)), ">", bound,
                                    quantity=f"mean {mth} error", against="mean bound",
                                    message=f"{mth} does not sit above the bound on {src} rows"))
    return out


def check(rows: list[dict]) -> list[str]:
    """The claim's problems on ``rows`` (empty: it holds): the failing asserted :func:`evidence`."""
    return problems(evidence(rows))


def plot(rows: list[dict], path) -> list:
    """Step error (after the best rescaling) against the rank, one panel per gradient source.  Methods
    that attain the bound exactly are drawn as concentric markers on it and named in the panel."""
    sources = list(dict.fromkeys(r.get("source", "synthetic") for r in rows))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.3), squeeze=False, layout="constrained")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sty = styles(methods)
    if "bound" in sty:
        sty["bound"] = dict(color="k", marker="_", ls="--")
    for ax, src in zip(axes.ravel(), sources):
        sub = [r for r in rows if r.get("source", "synthetic") == src]
        ranks = sorted({r["rank"] for r in sub})
        curves = {m: [float(np.mean([r["rel_error_best_scale"] for r in sub if r["method"] == m and r["rank"] == k]))
                      for k in ranks] for m in methods}
        groups = ties(curves, rtol=1e-7)
        size = tie_sizes(methods, groups, base=4.5)
        for mth in methods:
            ax.plot(ranks, curves[mth], label=mth, lw=1.2, **sty[mth], **size[mth])
        note_ties(ax, groups, what="exact tie: the curves coincide", loc="lower left")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("relative error after best rescaling")
        ax.set_title("random G, decaying spectrum" if src == "synthetic" else "MiniLM gradients along a LoRA run",
                     fontsize=9)
    figure_legend(fig, axes.ravel())
    fig.suptitle(TITLE)
    return save(fig, path)
