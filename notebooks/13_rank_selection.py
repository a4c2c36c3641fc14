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
# # Rank selection: does CoDyRA gate most ranks off, and does it forget less?
#
# **Paper.** H. Lu, C. Zhao, J. Xue, L. Yao, K. Moore, D. Gong, *Adaptive Rank, Reduced Forgetting: Knowledge
# Retention in Continual Learning Vision-Language Models with Dynamic Rank-Selective LoRA* (CoDyRA),
# arXiv:2412.01004 — **abstract only** (v4–v8); the training rule (ℓ1 on per-rank gates, a threshold rising
# linearly after a dense half, zero gates cut, the rest merged after each task) as read in third-party code that
# embeds a CoDyRA layer (see `lowrank_theory/adapters/gated_rank.py`; we use the soft threshold, the stored code
# a variant that is no proximal step, `proofs/24-codyra-prune-exact.md`).
#
# **Claim.** Higher-rank LoRA learns more but forgets more; CoDyRA "adaptively minimizes ranks with
# sparsity-promoting regularization", so that each task's update keeps only the ranks it needs: **most ranks
# can be gated off with little loss on the new task, and the model forgets earlier tasks less**.
#
# **What we run.** Two docstring sub-tasks in sequence (A: asyncio/email/logging, then B:
# _pydecimal/xml/unittest; one few-shot-probe head per task, frozen) on the real all-MiniLM-L6-v2 (offline; its
# first block at quick scale), the attention projections `query, key, value, output.dense` adapted at rank 8.
# Each method trains on A, its update is merged into the backbone, then it trains on B from there (continual
# learning as a sequence of LoRA tasks). Methods: plain LoRA (rank 8); a control, the gated adapter with
# CoDyRA's init but no penalty and no threshold; and CoDyRA (rank 8, gates
# $\mathcal U(\pm0.05)$, $\lambda = 10^{-3}$, dense half, then $\kappa$ rising to $\kappa_{max}$) at
# $\kappa_{max} \in \{0.005$ (the stored default)$, 0.01, 0.015\}$. Every run is a `Trainer` fit (AdamW, 40 steps,
# linear decay), the CoDyRA schedule a callback.
#
# Checked (must hold): the merged $W_0 + \Delta W$ scores as the trained adapted model; the threshold cuts
# ranks, more as $\kappa$ rises; every run beats the pretrained model. Reported beside the paper: whether some
# $\kappa$ gates off at least half the ranks within 3 points of LoRA's accuracy, and whether CoDyRA forgets A
# less than LoRA and than the control.

# %%
import os

from lowrank_theory.experiments import rank_selection as exp

SCALE = os.environ.get("LRT_SCALE", "full")  # "quick" | "full"
DEVICE = "cpu"
print(exp.SCALES[SCALE])

# %%
rows = exp.run(SCALE, device=DEVICE)
for (seed, method, kappa), d in exp.summary(rows).items():
    label = method if kappa is None else f"{method} κ={kappa:g}"
    print(f"seed {seed} {label:18s} acc A {d['acc_A']:.3f}  acc B {d['acc_B']:.3f}  A after B {d['acc_A_after_B']:.3f} "
          f"(forgot {d['forgetting_A']:+.3f})  kept A {d['kept_A']:.2f} B {d['kept_B']:.2f}  "
          f"‖ΔW_A‖ {d['norm_A']:.2f} ‖ΔW_B‖ {d['norm_B']:.2f}")
print()
for c in exp.claims(rows, SCALE):
    tag = "checked " if c["asserted"] else "reported"
    print(f"[{tag}] {'holds' if c['holds'] else 'FAILS'}: {c['name']} — {c['detail']}")

# %%
os.makedirs("figures", exist_ok=True)
exp.plot(rows, "figures/13_rank_selection")

# %% [markdown]
# **Reading** (quick scale: 1 block, 40 steps, 1 seed; numbers above, 111 / 114 test examples for A / B).
#
# * **Partly: about half the ranks go, not "most", at no loss.** At the stored default $\kappa_{max} = 0.005$
#   CoDyRA keeps 62 % (A) and 84 % (B) of its 32 ranks, with accuracy *above* LoRA's (0.937 / 0.912 vs 0.892 /
#   0.904). At $\kappa_{max} = 0.01$ it keeps 56 % / 53 %, still above LoRA (0.910 / 0.921). At $0.015$ it keeps
#   38 % / 34 % but loses 6 points on A (0.829). So "at least half of the ranks gated off within 3 points" is
#   missed narrowly on this sweep: the trade-off is there, the "most ranks" end of it costs accuracy at this
#   scale. The threshold does select — the kept fraction falls steadily with $\kappa$ — and the surviving ranks
#   are spread unevenly over `query / key / value / output` (e.g. 2 / 4 / 6 / 3 at $\kappa = 0.0125$ in a
#   side run).
# * **Holds, but mostly not because of the rank.** After training B, LoRA's accuracy on A drops from 0.892 to
#   0.721 (−17 points); CoDyRA's does not drop at all at $\kappa = 0.005$ (0.937 → 0.937) and slightly rises at
#   the larger $\kappa$. The control decides how to read that: the *same gated adapter with the same small gate
#   init, trained without penalty or threshold*, keeps all 32 ranks and already forgets only 5.4 points
#   (0.955 → 0.901). So about two thirds of the gap to LoRA comes from the gated form and its small init (the
#   update starts near zero and stays smaller: ‖ΔW_A‖ 16.2 vs LoRA's 43.2), and the sparsity rule closes the
#   rest (5.4 → 0 points, ‖ΔW_A‖ 7.3) while also cutting ranks. The drift of the weight is bounded by the gates'
#   weighted ℓ1 norm (item 4 of the proof), which is what the penalty shrinks; our numbers cannot separate the
#   rank from the update size. One seed, one block, two tasks: a direction, not an effect size.
# * **Exactness.** Pruning and merging change nothing: the merged $W_0 + \Delta W$ gives the same test
#   accuracy as the trained adapted model on every run (0 examples differ).

# %%
problems = exp.check(rows, SCALE)
assert not problems, problems
print("checks hold: merged = trained, the threshold cuts ranks (more as κ rises), every run learned; "
      "paper's claims: 'most ranks off with little loss' partly (about half), 'less forgetting' holds "
      "(mostly from the gated form and its init, the rest from the sparsity rule)")
