# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gradient approximation: LoRA vs LoRA-Pro vs LoRA-SB vs AltLoRA
#
# **Papers.** Z. Wang et al., *LoRA-Pro: Are Low-Rank Adapters Properly Optimized?* arXiv:2407.18242;
# K. Ponkshe et al., *LoRA-SB*, arXiv:2411.19557; S. Hayou et al., *LoRA+*, arXiv:2402.12354; AltLoRA (seed).
#
# **Claim.** A LoRA step changes $W$ by $s^2(BB^\top G + GA^\top A)$, which is not the best step the
# factors can express. The best one is the projection of $G$ on the tangent space $\{BX + YA\}$,
# $P_BG + GP_A - P_BGP_A$, with residual $(I-P_B)G(I-P_A)$ — a lower bound for every method.
# LoRA-Pro's adjusted gradients reach it exactly; alternating exact projected steps (AltLoRA) reach
# it too under a unit-Hessian model.
#
# Two sources of $G$: random with a $1/(1+i)$ spectrum, and real full-weight gradients of MiniLM's
# first query and last value projections taken along a short LoRA run on the docstring task (with
# the LoRA factors $B, A$ of that step), column `source` = `minilm`.

# %%
import os

import numpy as np

from lowrank_theory.experiments import gradients

SCALE = os.environ.get("LRT_SCALE", "full")

# %%
rows = gradients.run(SCALE)
methods = list(dict.fromkeys(r["method"] for r in rows))
ranks = sorted({r["rank"] for r in rows})
print("rank  " + "  ".join(f"{m:>10s}" for m in methods))
for k in ranks:
    vals = [np.mean([r["rel_error_best_scale"] for r in rows if r["rank"] == k and r["method"] == m]) for m in methods]
    print(f"{k:4d}  " + "  ".join(f"{v:10.4f}" for v in vals))

# %%
os.makedirs("figures", exist_ok=True)
gradients.plot(rows, "figures/03_gradient_approximation")

# %% [markdown]
# **Reading** (quick scale; numbers above; the last cell asserts the claim). LoRA-Pro's step error
# equals the tangent-space bound to round-off (largest difference 2e-16 on the random gradients, 0 on
# MiniLM's), and so does the AltLoRA step: in the figure the two sit on the bound's dashed line, drawn as
# concentric markers and named in the panel. No method goes below the bound. Random $G$ with a
# $1/(1+i)$ spectrum, rank 1/4/16: bound 0.975/0.894/0.578, LoRA 0.982/0.949/0.784, LoRA+
# 0.979/0.911/0.818 (LoRA+ is closer than LoRA at small rank and farther at rank 16), LoRA-SB
# 0.9998/0.993/0.963 (its step lives in the smaller space $\{BXA\}$). Real MiniLM gradients (first
# query and last value projection, along a short LoRA run) at rank 4/16: bound 0.929/0.825, while LoRA
# and LoRA+ stay at 0.99/0.97 and LoRA-SB at 0.999/0.997 — the gap between a plain LoRA step and the best
# reachable one is larger on real gradients than on the synthetic ones. The papers make the equality a
# theorem (LoRA-Pro) and report task scores, not step errors, so there is no number of theirs to put
# beside ours.

# %%
problems = gradients.check(rows)
assert not problems, problems
gap = [r["rel_error_best_scale"] for r in rows if r["method"] == "lora"]
bound = [r["rel_error_best_scale"] for r in rows if r["method"] == "bound"]
assert np.mean(gap) > np.mean(bound)  # vanilla LoRA is strictly worse on average
print("claim holds: LoRA-Pro = tangent bound <= every other step")
