# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LoCA's regime map: when does frequency-domain adaptation beat low rank?
#
# **Paper.** Z. Du et al., *LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient
# Fine-Tuning*, arXiv:2502.06820.
#
# **Claim.** At an equal number of parameters, a $c$-term inverse-DCT update is more expressive than
# rank-$r$ LoRA when the target's singular values decay slowly, and less when they decay fast.
#
# **Theory (proofs/08).** With a flat spectrum LoRA captures the fraction $r/\min(m,n)$ of the
# energy while the best $p=r(m+n)$ coefficients of any orthonormal basis capture at least
# $p/(mn) > r/\min(m,n)$. With a fast decay the energy sits in a few singular directions that the DCT
# spreads over many coefficients.

# %%
import os

from lowrank_theory.experiments import regimes

SCALE = os.environ.get("LRT_SCALE", "full")

# %%
rows = regimes.run(SCALE)
for r in rows:
    a = "   -" if r["alpha"] is None else f"{r['alpha']:4.2f}"
    print(f"{r['target']:16s} α={a} rank={r['rank']:2d}  LoRA {r['lora_error']:.3f}  DCT {r['dct_error']:.3f}"
          f"  ratio {r['ratio']:.3f}")

# %%
os.makedirs("figures", exist_ok=True)
regimes.plot(rows, "figures/02_loca_regimes")

# %%
problems = regimes.check(rows)
assert not problems, problems
cross = [r["alpha"] for r in rows if r["target"] == "power_law" and r["ratio"] > 1]
print(f"LoRA wins from α = {min(cross):.2f} on at these sizes; DCT wins below")
