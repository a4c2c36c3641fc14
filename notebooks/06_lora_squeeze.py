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
# # LoRA-Squeeze — train at a high rank, then compress
#
# **Paper.** I. Vulić, A. Grycner, Q. de Laroussilhe, J. Pfeiffer, *LoRA-Squeeze: Simple and Effective
# Post-Tuning and In-Tuning Compression of LoRA Modules*, arXiv:2602.10993.
#
# **Claim.** It is better to learn an expressive higher-rank LoRA and compress it than to learn the
# low-rank one directly: a rank-$r_{src}$ LoRA squeezed to $r_{tgt}$ by a (randomized) SVD of
# $s\,BA$ *often* matches or beats a LoRA trained at $r_{tgt}$, especially after a few
# fine-tuning steps at $r_{tgt}$ (Post-Squeeze), and squeezing gradually during training
# (In-Squeeze, rank annealing) gives the best size–quality trade-off.
#
# **What we reproduce, and how.** The paper fine-tunes Gemma-3 on 23 tasks; we use a task where the
# answer is known: a teacher–student regression of one linear layer $y = (W_0 + \Delta W^\star)x$
# (inputs $x\sim N(0, I)$ from a fixed seed, 5 % label noise) whose planted $\Delta W^\star$ has an
# exponentially decaying spectrum, so each target rank $r$ has an exact **Eckart–Young floor**
# $\|\Delta W^\star - [\Delta W^\star]_r\|_F/\|\Delta W^\star\|_F$ that no rank-$r$ update can beat.
# All variants are our `LoRA` inside `AdaptedLinear`, trained with full-batch Adam at one learning
# rate; the squeeze is `lowrank_theory.adapters.squeeze.squeeze_lora` (exact factored SVD, never
# forming $BA$). At each step budget $T$:
#
# | variant | what it is | Adam steps |
# |---|---|---|
# | `direct` | LoRA at $r_{tgt}$ | $T$ |
# | `source` | LoRA at $r_{src}$ | $T - T/6$ |
# | `post` | squeeze of `source` to $r_{tgt}$, no further training | $T - T/6$ |
# | `post_ft` | `post` + $T/6$ steps at $r_{tgt}$ | $T$ |
# | `anneal` | $r_{src}$, squeezed along `squeeze_schedule` in the first half, then trained at $r_{tgt}$ | $T$ |
#
# Two checks on the numbers: (1) the post-hoc squeeze error equals the Eckart–Young tail of the
# *trained* update, $\|s'B'A'-sBA\|_F = (\sum_{i>r_{tgt}}\sigma_i(sBA)^2)^{1/2}$, against an
# independent float64 SVD; (2) `post_ft` and `anneal` reach a test loss at most
# $1.05\,L_{direct} + 10^{-3}$ at every budget and target rank.

# %%
import os

from lowrank_theory.experiments import squeeze

SCALE = os.environ.get("LRT_SCALE", "full")  # "quick" | "full"
DEVICE = "cpu"
print(squeeze.SCALES[SCALE])

# %%
rows = squeeze.run(SCALE, device=DEVICE)
table = squeeze.summary(rows)
print(f"{'budget':>6} {'variant':8} {'rank':>4} {'test loss':>10} {'ΔW error':>9} {'EY floor':>9}")
for r in table:
    print(f"{r['budget']:6d} {r['variant']:8} {r['rank']:4d} {r['test_loss']:10.4f} {r['delta_error']:9.4f} "
          f"{r['floor']:9.4f}")

# %%
print("post-hoc squeeze error vs Eckart–Young tail of the trained source update:")
for r in rows:
    if r["variant"] == "post":
        print(f"  seed {r['seed']} budget {r['budget']:5d} r_tgt {r['rank']:3d}: "
              f"‖ΔW_sq − ΔW_src‖ = {r['squeeze_error']:.12f}   tail = {r['ey_tail']:.12f}")

# %%
os.makedirs("figures", exist_ok=True)
squeeze.plot(rows, "figures/06_lora_squeeze")

# %% [markdown]
# **Reading.**
#
# * **Smallest budget (leftmost panel).** Direct training at $r_{tgt}$ has not converged: its $\Delta W$ error is
#   well above the floor (at full scale, 60 steps: 0.03–0.17 above it), while every squeeze variant
#   sits almost on it (within 0.0002–0.006 for $r_{tgt} \le 8$). The rank-$r_{src}$ source learns its
#   leading singular directions first (the incremental learning of factorized models), so even a
#   source that is far from $\Delta W^\star$ overall has the right top-$r_{tgt}$ part, and the
#   squeeze keeps exactly that part. When $r_{tgt}$ approaches $r_{src}$ (full scale, 16 of 32) the
#   source's unconverged tail is inside the kept part; then plain `post` falls behind and `anneal` is
#   the best variant, as the paper reports for In-Squeeze. This is the paper's effect, in a setting
#   where it is measured against the optimum.
# * **Large budget (rightmost panel).** Everything trained at $r_{tgt}$ — `direct`, `post_ft`, `anneal` —
#   ends at the same point: the best rank-$r_{tgt}$ fit of the *training* data. The squeeze variants
#   are not worse, as claimed, but they are not better either: here the rank-$r$ problem is benign
#   and Adam solves it. `post` (no fine-tuning) is slightly *closer* to the floor than the three:
#   truncating the near-interpolating source drops the noise that a rank-$r$ fit of the noisy,
#   finite training set absorbs, and fine-tuning at $r_{tgt}$ walks back to that fit. So on this
#   task the paper's "especially with a few fine-tuning steps" does not hold at a large budget;
#   its "post-hoc compression often outperforms direct training" does.
# * **Squeeze = Eckart–Young.** The squeeze error matches the singular-value tail of the trained
#   update to ~1e-15 relative: `squeeze_lora` computes the optimal rank-$r_{tgt}$ truncation without forming
#   the $m\times n$ product.

# %%
problems = squeeze.check(rows)
assert not problems, problems
small = min(r["budget"] for r in table)
gaps = {r["rank"]: r["test_loss"] for r in table if r["budget"] == small and r["variant"] == "direct"}
best_sq = {k: min(r["test_loss"] for r in table if r["budget"] == small and r["rank"] == k
                  and r["variant"] in ("post", "post_ft", "anneal")) for k in gaps}
assert all(best_sq[k] <= gaps[k] for k in gaps), (best_sq, gaps)
print("claim holds: squeezing reaches a target-rank loss at least as good as direct training; "
      "post-hoc squeeze error = Eckart–Young tail")
