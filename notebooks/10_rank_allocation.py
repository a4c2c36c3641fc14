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
# # Rank allocation: where AdaLoRA, SoRA and IncreLoRA put their ranks in MiniLM
#
# **Papers.** Q. Zhang et al., *AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
# Fine-Tuning*, arXiv:2303.10512; N. Ding et al., *Sparse Low-rank Adaptation of Pre-trained
# Language Models* (SoRA), arXiv:2311.11696; F. Zhang et al., *IncreLoRA: Incremental Parameter
# Allocation Method for Parameter-Efficient Fine-tuning*, arXiv:2308.12043.
#
# **Claim.** One rank for every weight matrix wastes parameters: some matrices matter more than
# others. Adaptive-rank methods move rank to where it helps under one global budget — AdaLoRA by
# pruning the least important SVD triplets, SoRA by a sparsity penalty on per-rank gates, IncreLoRA
# by adding triplets to the most important modules. AdaLoRA's paper (DeBERTaV3-base on GLUE) reports
# that the learned allocation gives **more rank to the feed-forward matrices and to the top layers**.
#
# **What we run.** The docstring classification task (5 standard-library modules) on the real
# all-MiniLM-L6-v2 (offline; its first 2 blocks at quick scale), the head fitted by a linear probe
# and frozen, every linear layer of every block adapted: `q, k, v, o` (attention) and `ffn_in`,
# `ffn_out` (the 384→1536→384 pair). Each method runs with its schedule from
# `lowrank_theory.training` as a `Trainer` callback:
#
# | method | start | rule | budget |
# |---|---|---|---|
# | AdaLoRA | rank 4 everywhere | cut the least important triplets (sensitivity × uncertainty) | total 2 × modules |
# | SoRA | rank 4 everywhere | proximal $\ell_1$ step on the gates, zero gates cut | none (≤ initial) |
# | IncreLoRA | rank 1 everywhere | add a triplet to the highest-scoring module every few steps | total 2 × modules |
#
# Checked: AdaLoRA and IncreLoRA end *exactly* at the budget and SoRA at or below its start; every
# method allocates non-uniformly; every run lowered the test loss below the probe's (so the
# allocation comes from a run that learned). Reported: which roles and blocks get more rank, how
# much two seeds agree, and for SoRA how many ranks equal a gradient-free control (pruning by the
# initial gate magnitudes alone).

# %%
import os

from lowrank_theory.experiments import rank_allocation as exp

SCALE = os.environ.get("LRT_SCALE", "full")  # "quick" | "full"
DEVICE = "cpu"
print(exp.SCALES[SCALE])

# %%
rows = exp.run(SCALE, device=DEVICE)
for (seed, m), t in exp.totals(rows).items():
    print(f"seed {seed} {m:9s} total rank {t['total']:3d} (budget {t['budget']}, start {t['initial']}), "
          f"min {t['min']} max {t['max']}, test loss {t['test_loss']:.3f} (probe {t['probe_test_loss']:.3f})")
print()
roles = exp.by_role(rows)
keys = ["q", "k", "v", "o", "ffn_in", "ffn_out", "attention", "ffn", "bottom", "top"]
print("mean final rank     " + " ".join(f"{k:>9s}" for k in keys))
for m, d in roles.items():
    print(f"{m:19s} " + " ".join(f"{d[k]:9.2f}" for k in keys))
print("\nseed agreement (Spearman of per-module ranks):",
      {m: round(v, 2) for m, v in exp.seed_agreement(rows).items()})
print("SoRA ranks equal to the gradient-free control:", f"{exp.sora_init_agreement(rows):.0%}")

# %%
os.makedirs("figures", exist_ok=True)
exp.plot(rows, "figures/10_rank_allocation")

# %% [markdown]
# **Reading** (quick scale: 2 blocks, 60 steps, 2 seeds; numbers above).
#
# * **Budgets hold exactly and allocations are non-uniform.** AdaLoRA prunes 48 → 24 triplets and
#   IncreLoRA grows 12 → 24, both ending exactly on the budget, and both move ranks between
#   modules (AdaLoRA 0–4 per module, IncreLoRA 1–12); SoRA keeps 33 and 27 of 48 gates.
# * **Not AdaLoRA's picture, at this size.** AdaLoRA gives the attention value and output
#   projections the most (mean 3.0 and 2.5) and the key the least (0.75); the feed-forward pair
#   gets the same mean as attention (2.0 vs 2.0) and the upper block no more than the lower one
#   (1.92 vs 2.08). Its two seeds barely agree (Spearman 0.01): after 60 steps the importance
#   scores have not settled into a property of the task. The paper's "more rank to FFN and top
#   layers" comes from DeBERTaV3-base (12 blocks) after thousands of steps; whether MiniLM shows it
#   is a question for the full scale (6 blocks, 300 steps, 3 seeds), not for this check.
# * **IncreLoRA concentrates.** Its score $\frac{1}{\sqrt{mn}}\sum|\Delta W|\,|G|$ is zero for a
#   module whose update is still zero and grows with the rank already given, so the first modules
#   to move keep winning: block 0's output projections (`o`, `ffn_out`) collect 6 and 7.5 ranks on
#   average while most modules stay at 1. The feed-forward mean is higher (2.62 vs 1.69 for attention) — but all
#   of it is `ffn_out` — and the *bottom* block gets more (2.92 vs 1.08). The seeds agree more
#   (0.39) than AdaLoRA's.
# * **SoRA's gates decide partly by their random start.** Only a quarter of SoRA's final ranks
#   equal those of pruning by the initial gate magnitudes alone, so the loss gradient does choose
#   here — but only because we set the gate step large ($\eta = 3$) and the penalty small: the
#   schedule's gate step is plain SGD and the gate gradients are about 1e-3, so with the
#   textbook-looking $\eta = 0.1$, $\lambda = 0.05$–$0.2$ every final rank equalled the control's (we
#   measured it): the allocation was the random init's. The authors' code takes an Adam step on
#   the gates, which would not have this scale problem. Its seeds disagree (Spearman −0.30); on
#   average it keeps a little more in the feed-forward pair (2.75 vs 2.38) and in the bottom block
#   (2.75 vs 2.25).

# %%
problems = exp.check(rows)
assert not problems, problems
print("claim holds: budgets respected exactly (AdaLoRA, IncreLoRA), SoRA below its start, allocations "
      "non-uniform, every run below the probe's test loss")
