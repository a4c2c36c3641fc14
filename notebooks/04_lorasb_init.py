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
# # LoRA-SB — initialize from the first full-fine-tuning update
#
# **Papers.** K. Ponkshe, R. Singhal, E. Gorbunov, A. Tumanov, S. Horváth, P. Vepakomma,
# *Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank
# Fine-Tuning* (LoRA-SB), arXiv:2411.19557; K. Bałazy et al., *LoRA-XS*, arXiv:2405.17604.
#
# **Claim.** LoRA-XS trains only an $r\times r$ core $R$ between two frozen frames,
# $\Delta W = BRA$. LoRA-SB keeps that architecture but reads $B, R_0, A$ from the truncated SVD
# of the first update full fine-tuning would make, $\Delta_1 = -\eta_0\,\mathrm{sign}(G)$ (the
# first Adam step; $G$ the gradient at $W_0$): $BR_0A = [\Delta_1]_r$, the best rank-$r$
# approximation. With $B, A$ orthonormal every later step of $R$ moves the weight by the
# projection of the full gradient on $\{BXA\}$, so the run "simulates full fine-tuning in a
# low-rank subspace" chosen by the gradient. The paper reports that LoRA-SB beats LoRA-XS
# everywhere and LoRA with far fewer parameters; here we test the part about
# **initialization**: from the first update, training reaches a lower loss at equal steps early on
# than from LoRA-XS's frames (SVD of $W_0$) or from random orthonormal frames.
#
# **Task.** The teacher–student task on the real all-MiniLM-L6-v2 (offline): the teacher is MiniLM
# with a planted rank-4 update ($\|\Delta W^\star\|_F = 0.3\|W_0\|_F$) in the last block's attention
# value and output projections; the student learns, through adapters on those two layers, to
# reproduce the teacher's last hidden states on English sentences from standard-library
# docstrings. The loss is normalized: 1 for the unadapted student. At quick scale the model is the
# first 2 of MiniLM's 6 blocks (pretrained weights), so CI can afford it.
#
# **Variants** (AdamW, linear decay after a short warm-up; each variant's learning rate chosen
# from a grid by its final *training* loss):
#
# | variant | frames $B, A$ | core at start | trainable per layer |
# |---|---|---|---|
# | `lora_sb` | SVD of $\Delta_1$, $\eta_0 = 10^{-4}$ (a full-fine-tuning rate) | $R_0 = \Sigma_r(\Delta_1)$ | $r^2$ |
# | `lora_xs` | SVD of $W_0$ | 0 | $r^2$ |
# | `random` | Haar-random orthonormal | 0 | $r^2$ |
# | `lora` | trained ($A$ Kaiming, $B = 0$) | — | $r_{lora}(m+n)$ |
# | `sb_frames` (ablation) | SVD of $\Delta_1$ | 0 | $r^2$ |
# | `sb_train_lr` (ablation) | SVD of $\Delta_1$, $\eta_0$ = training rate (as authors) | $\Sigma_r(\Delta_1)$ | $r^2$ |
#
# The core rank $r = \lfloor\sqrt{r_{lora}(m+n)}\rfloor$ gives every method LoRA's parameter count
# (78 for $r_{lora} = 8$ on 384×384). The init spends one pass over `init_samples` examples; we
# charge it: `lora_sb` after $t$ steps is compared with the others after $t + 1$.

# %%
import os

from lowrank_theory.experiments import init_from_update as exp

SCALE = os.environ.get("LRT_SCALE", "full")  # "quick" | "full"
DEVICE = "cpu"
print(exp.SCALES[SCALE])

# %%
rows = exp.run(SCALE, device=DEVICE)
table = exp.summary(rows)
for r in table:
    losses = "  ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith("loss@"))
    print(f"{r['variant']:12s} lr={r['lr']:.0e} rank={r['rank']:3d} params={r['params']:6d} "
          f"init passes={r['init_passes']}  {losses}  final train={r['final_train_loss']:.3f}")

# %%
print("Claim 1 -- the init is the Eckart–Young truncation of Δ1 (‖BR0A − Δ1‖ vs the SVD tail):")
for r in rows:
    if r["kind"] == "init":
        print(f"  seed {r['seed']} {r['variant']:11s} {r['layer']:40s} {r['init_error']:.8f} vs {r['ey_tail']:.8f}")
print("\nlora_sb vs the others at equal gradient evaluations (step of lora_sb, its loss, the other's):")
for b in ("lora_xs", "random", "lora"):
    pts = exp.compare(rows, "lora_sb", b)
    print(f"  vs {b:8s}: " + "  ".join(f"{t}:{a:.3f}/{o:.3f}" for t, a, o in pts))
print("\nstep from which LoRA stays below LoRA-SB:", exp.overtaken_at(rows),
      "| with each method at its best rate per step:", exp.overtaken_at(rows, selected=False))

# %%
os.makedirs("figures", exist_ok=True)
exp.plot(rows, "figures/04_lorasb_init")

# %% [markdown]
# **Reading** (quick scale, numbers above; the last cell asserts the claim).
#
# * **Initialization from the update wins, and it is the frames that do it.** At the same
#   architecture and parameter count, `lora_sb` is below `lora_xs` and `random` from its first
#   step to the last (quick: test loss 0.64 vs 0.83 / 0.82 after 7 steps, 0.52 vs 0.74 / 0.74 after
#   24); only the init pass alone (0.998) is above the others' first step (0.93 / 0.94).
#   With $\eta_0 = 10^{-4}$ the start itself barely moves (0.998 vs 1.052 unadapted): the gain
#   comes from *where* $R$ can move. `sb_frames`, the same frames with $R_0 = 0$, follows
#   `lora_sb` within about 0.01 throughout. A rank-78 subspace of the one-batch gradient holds
#   most of what the planted update changes on these inputs; LoRA-XS's top singular directions of
#   $W_0$ and random directions do not, so their cores stall near 0.74.
# * **The authors' scale for $\Delta_1$ does not transfer.** Their code uses the *training* rate
#   as $\eta_0$. For the core we train at 1e-2 (Adam on $r^2$ entries), so $\Delta_1$ changes every
#   weight by ±0.01, $\|\Delta_1\|_F = 3.8$ per 384×384 layer, and the model starts at a test loss
#   of 21.7 (`sb_train_lr`); it is still at 3.4 after 24 steps. The first update must be a
#   *full-fine-tuning* step (here $\eta_0 = 10^{-4}$, the rate of this project's real full
#   fine-tunes), which is small for an $r\times r$ core's rate.
# * **Against standard LoRA (not asserted).** LoRA with the same parameter count learns its frames.
#   At equal gradient evaluations LoRA-SB is lower at steps 2 and 4–12 (e.g. 0.65 vs 0.75 at step 7),
#   LoRA at steps 0, 1 and 3 (its first steps are noisy) and for good from step 15 (0.47 vs 0.52
#   at the end). The paper's "LoRA-SB beats LoRA" is about final task scores after long runs on
#   LLMs; on this planted low-rank teacher, LoRA's learned frames end up fitting the planted
#   subspace better than a fixed one-batch gradient subspace. We report that rather than tune it
#   away; the full scale (6 blocks, 120 steps, 3 seeds, a 4-rate grid) is the place to see whether
#   the crossover moves.

# %%
problems = exp.check(rows)
assert not problems, problems
c = exp.curves(rows)
last = max(c["lora_sb"])
assert all(c["lora_sb"][last] < c[b][last] for b in exp.BASELINES), {v: c[v][last] for v in c}
print("claim holds: the update init is the Eckart–Young truncation of Δ1, and LoRA-SB is below "
      "LoRA-XS's and random frames at every early step at equal gradient evaluations")
