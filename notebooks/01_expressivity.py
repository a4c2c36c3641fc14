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
# # Expressivity: best error vs parameter budget, every family
#
# **Papers.** LoRA (arXiv:2106.09685; Eckart–Young), FourierFT (arXiv:2405.03003), LoCA
# (arXiv:2502.06820), VeRA (arXiv:2310.11454), NOLA (arXiv:2310.02556), RandLoRA (arXiv:2502.00987),
# SVFit (arXiv:2409.05926), LoRA-XS (arXiv:2405.17604), LoLDU (arXiv:2410.13618), SLTrain (arXiv:2406.02214).
#
# **Question.** For a target update $\Delta W^\star$ and a budget of $p$ trainable numbers, what is the
# smallest $\|\Delta W(\theta)-\Delta W^\star\|_F/\|\Delta W^\star\|_F$ each method can reach?
# Closed forms where they exist (Eckart–Young; best $c$-term in an orthonormal basis; least squares on
# bases fixed by $W_0$), alternating least squares with reported convergence otherwise.
#
# **Targets.** flat, power-law and exponential spectra; low rank plus noise; frequency-sparse; and a
# real update (`finetune`): $W_{after} - W_{before}$ of MiniLM's first query projection after a
# 30-step full fine-tune (AdamW) on the docstring task, with $W_0 = W_{before}$.

# %%
import os

from lowrank_theory.experiments import expressivity

SCALE = os.environ.get("LRT_SCALE", "full")

# %%
rows = expressivity.run(SCALE)
targets = list(dict.fromkeys(r["target"] for r in rows))
budgets = sorted({r["budget"] for r in rows})
for t in targets:
    print(f"\n{t}")
    for m in dict.fromkeys(r["method"] for r in rows if r["target"] == t):
        errs = {r["budget"]: r["error"] for r in rows if r["target"] == t and r["method"] == m}
        print(f"  {m:10s} " + " ".join(f"{errs.get(b, float('nan')):7.3f}" for b in budgets))

# %%
os.makedirs("figures", exist_ok=True)
expressivity.plot(rows, "figures/01_expressivity")

# %% [markdown]
# **Reading.** On the exponential spectrum LoRA (= Eckart–Young) is best by far; on the flat spectrum
# the orthonormal transforms (DCT, WHT) beat LoRA at equal budget, because LoRA spends $r^2$ of its
# $r(m+n)$ parameters on a gauge freedom; on the frequency-sparse target the DCT is exact once the
# budget covers its support. Methods whose bases come from $W_0$ (SVFit, LoRA-XS, LoLDU) can only
# reach what those bases span: near 1 for targets unrelated to $W_0$. The real fine-tune update is
# far from low rank (AdamW's per-coordinate steps): at the largest budget the DCT keeps more of it
# than LoRA does.

# %%
problems = expressivity.check(rows)
assert not problems, problems
print("claim holds")
