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
# # Learning-rate sensitivity of LoRA variants
#
# **Papers.** H. He et al., *A Unified Study of LoRA Variants: Taxonomy, Review, Codebase, and
# Empirical Evaluation* (LoRAFactory), arXiv:2601.22708; *Learning Rate Matters: Vanilla LoRA May
# Suffice for LLM Fine-tuning*, arXiv:2602.04998. Variants: rsLoRA (arXiv:2312.03732), DoRA
# (2402.09353), PiSSA (2404.02948), LoRA+ (2402.12354).
#
# **Claim.** LoRA and its variants are far more sensitive to the learning rate than to the other
# hyperparameters; different variants prefer different rates; and once each variant gets its own
# tuned rate, their best scores are close (2602.04998: within 1–2 %), with plain LoRA matching or
# beating most of them. Comparisons at one shared rate therefore say more about the rate than
# about the method.
#
# **Task and protocol.** Which standard-library module does a docstring come from (5 classes,
# fixed split: 569 train / 181 test), with the real all-MiniLM-L6-v2 (offline; its first 2 blocks
# at quick scale) and a linear head on mean-pooled states. We first fit the head on the frozen
# model (a linear probe: L-BFGS, small $\ell_2$ penalty) and freeze it; then each variant's adapters
# (rank 4 on the query and value projections of every block at quick scale) are trained with
# AdamW at every rate of a grid (10 % warm-up, linear decay). The adapters' rate is then the *only*
# rate, so a score change comes from the variant or its rate, not from a head learning alongside.
# LoRA+ trains $B$ at 16× the swept rate of $A$. The best rate per variant is chosen on the test
# split, as both studies report the best score over their grids.

# %%
import os

from lowrank_theory.experiments import lr_sensitivity as exp

SCALE = os.environ.get("LRT_SCALE", "full")  # "quick" | "full"
DEVICE = "cpu"
print(exp.SCALES[SCALE])

# %%
rows = exp.run(SCALE, device=DEVICE)
acc, loss = exp.grid(rows), exp.grid(rows, "test_loss")
lrs = sorted({lr for d in acc.values() for lr in d})
print("test accuracy (test loss) per learning rate")
print(f"{'variant':10s} " + " ".join(f"{lr:>15.0e}" for lr in lrs))
for v, d in acc.items():
    print(f"{v:10s} " + " ".join(f"{d[lr]:7.3f} ({loss[v][lr]:5.3f})" for lr in lrs))
print()
for r in exp.summary(rows):
    print(f"{r['variant']:10s} best lr {r['best_lr']:7.0e}  accuracy {r['best_accuracy']:.3f}  test loss "
          f"{r['best_test_loss']:.3f}  range over rates {r['accuracy_range']:.3f}  at LoRA's rate "
          f"{r['accuracy_at_lora_lr']:.3f}")
print(f"\nspread of the tuned accuracies: {exp.spread(rows):.3f}")

# %%
os.makedirs("figures", exist_ok=True)
exp.plot(rows, "figures/08_lr_sensitivity")

# %% [markdown]
# **Reading** (quick scale, numbers above; the last cell asserts the claims).
#
# * **The rate matters far more than the variant.** Over the grid 3e-3…1e-1 each variant's test
#   accuracy moves by 0.10 (DoRA) to 0.72 (LoRA): too high a rate wrecks the pretrained features
#   (LoRA 0.18 at 1e-1, below the 0.19 majority class). Once each variant has its own rate the five
#   best accuracies lie within 0.033 of each other (0.873–0.906; 6 of 181 test examples). Judged by
#   test loss instead, the tuned variants are closer still (lowest losses 0.327–0.341, a spread of
#   0.014).
# * **The best rate differs.** LoRA, DoRA and PiSSA peak at 3e-2, rsLoRA and LoRA+ at 1e-2. The
#   shifts have simple causes: rsLoRA's scale $\alpha/\sqrt r$ is $\sqrt r = 2$ times LoRA's, and
#   LoRA+ moves $B$ 16 times faster, so both reach a given step size at a lower rate. Reusing LoRA's
#   tuned rate 3e-2 for every variant would have "shown" LoRA+ to be useless (0.23) and rsLoRA
#   to be 4 points worse than LoRA — differences that vanish with a tuned rate.
# * **Robustness differs too.** DoRA degrades least at the largest rate (0.81 at 1e-1 vs 0.18–0.41
#   for the others): its magnitude vector renormalizes every row of $W_0 + sBA$, which bounds how far
#   a too-large step can move the layer's output.
# * **LoRA, tuned, is at the top by accuracy** (0.906, tied with DoRA), as the unified study
#   reports — but by test loss it is last of the five (0.341 vs PiSSA's 0.327), so "matches" is
#   the fair word at this size, not "beats". By loss the best rates also agree more (1e-2 for four
#   variants, 3e-3 for LoRA+): accuracy on 181 examples is a coarse score. All tuned variants beat
#   the linear probe alone (0.867 accuracy, 0.363 loss) only modestly: 30 steps on two blocks. The
#   full scale (6 blocks, query/key/value/output, rank 8, 150 steps, a 7-rate grid, 2 seeds) is
#   where the adapters have more to do.

# %%
problems = exp.check(rows)
assert not problems, problems
b = exp.best(rows)
print("claim holds: tuned variants within", round(exp.spread(rows), 4), "accuracy; best rates",
      {v: lr for v, (lr, _, _) in b.items()})
