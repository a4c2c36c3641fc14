r"""Figure: learning-rate sensitivity of LoRA variants on a real text task (arXiv:2601.22708, 2602.04998).

Task: which standard-library module a docstring comes from
(:func:`~lowrank_theory.training.tasks.classification_task` on
:func:`~lowrank_theory.training.data.docstring_dataset`, 5 classes, fixed split) with the real
all-MiniLM-L6-v2 (offline; the first ``n_layers`` blocks at quick scale, :mod:`._minilm`) and a
linear head on mean-pooled hidden states.

Protocol (linear probe, then adapter tuning -- LP-FT, arXiv:2202.10054): the head is first fitted
on the frozen model's pooled features (L-BFGS on the cross-entropy with an :math:`\ell_2` penalty
``probe_wd``), then frozen; each variant's adapters on the ``targets`` projections of every block
are trained with AdamW (linear decay after 10 % warm-up) at every rate of ``lrs``.  The adapters'
learning rate is then the only learning rate, so what changes the score is the variant and its
rate -- not a head learning at the same rate.  Variants (rank ``rank``, :math:`\alpha = r`):

* ``lora`` -- :math:`s = \alpha/r = 1`;
* ``rslora`` -- rank-stabilized LoRA, :math:`s = \alpha/\sqrt r` (arXiv:2312.03732);
* ``dora`` -- weight-decomposed LoRA, trained magnitude (arXiv:2402.09353);
* ``pissa`` -- LoRA initialized from the top-r SVD of :math:`W_0` (residual base, arXiv:2404.02948);
* ``lora_plus`` -- LoRA with :math:`\eta_B = 16\,\eta_A` (LoRA+, arXiv:2402.12354), the rule
  ``"lora+"`` of :func:`~lowrank_theory.training.optim.make_optimizer`; the swept rate is :math:`\eta_A`.

Scores: test accuracy (the papers' metric; ties between rates broken by the lower test loss) and
test loss.  A run whose loss becomes non-finite is scored as the majority-class predictor
(accuracy ``majority_baseline``, loss :math:`+\infty`).  The best rate of a variant is chosen on the
test split, as both studies report the best score over their grids.

Claims checked (:func:`check`, on accuracies averaged over seeds):

1. Close once tuned: the spread of the variants' best accuracies is at most ``CLOSE_ATOL`` (5 points
   at our test-set size of 181, where one example is 0.55 points; 2602.04998 reports 1--2 % on
   LLM benchmarks).
2. The rate matters more than the variant: for every variant, the accuracy range over the rate grid
   is at least ``SENS_FACTOR`` = 2 times that spread.
3. The best rate is not the same for every variant (at least two distinct best rates).

Reported, not asserted: the linear-probe baseline, each variant's accuracy at LoRA's best rate
(the usual shortcut of reusing one rate), and where LoRA ranks once tuned (the unified study:
"with proper hyperparameter configurations, LoRA consistently matches or surpasses the performance
of most of its variants").
"""

from __future__ import annotations

import copy
import math

import numpy as np
from torch import nn

from ._minilm import docstring_tasks
from ._plot import plt, save
from ._probe import linear_probe, pooled_features  # noqa: F401  (re-exported for the notebook and tests)
from ._regression import intra_op_threads

NAME = "lr_sensitivity"
TITLE = "Learning-rate sensitivity of LoRA variants (docstring classification, MiniLM)"
CLAIM = ("Once each LoRA variant gets its own tuned learning rate, their best test accuracies are close "
         "(within 5 points), the rate moves each variant's accuracy at least twice as much as the choice of "
         "variant does, and the best rate differs between variants.")

VARIANTS = ("lora", "rslora", "dora", "pissa", "lora_plus")

SCALES = {
    "quick": dict(n_layers=2, targets=["query", "value"], rank=4, steps=30, batch_size=16, max_length=16,
                  lrs=[3e-3, 1e-2, 3e-2, 1e-1], probe_wd=1e-3, lora_plus_ratio=16.0, seeds=[0]),
    "full": dict(n_layers=6, targets=["query", "key", "value", "attention.output.dense"], rank=8, steps=150,
                 batch_size=16, max_length=24, lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], probe_wd=1e-3,
                 lora_plus_ratio=16.0, seeds=[0, 1]),
}

#: claim 1 (accuracy points as a fraction) and claim 2 (factor)
CLOSE_ATOL = 0.05
SENS_FACTOR = 2.0


# ============================================================================ pieces
def _targets(task, suffixes: list[str]) -> list[str]:
    out = [t for t in task.targets if t.endswith(tuple("." + s for s in suffixes))]
    if not out:
        raise ValueError(f"targets {suffixes} match no linear layer of the task's model")
    return out


def _inject(model: nn.Module, variant: str, targets: list[str], rank: int, seed: int) -> str:
    """Put ``variant``'s adapters into ``model``; return the optimizer rule."""
    from ..training.injection import inject

    kw = dict(rank=rank, layer_seeds=True, seed=seed)
    if variant in ("lora", "lora_plus"):
        inject(model, "lora", targets, **kw)
    elif variant == "rslora":
        inject(model, "lora", targets, rslora=True, **kw)
    elif variant in ("dora", "pissa"):
        inject(model, variant, targets, **kw)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return "lora+" if variant == "lora_plus" else "adamw"


def _train_one(task, variant: str, lr: float, cfg: dict, targets: list[str], seed: int, device: str) -> dict:
    from ..training.trainer import TrainConfig, Trainer

    model = copy.deepcopy(task.model)
    rule = _inject(model, variant, targets, cfg["rank"], seed)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kw = {"ratio": cfg["lora_plus_ratio"]} if rule == "lora+" else {}
    conf = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=lr, rule=rule, rule_kwargs=kw,
                       lr_schedule="linear", warmup_steps=max(1, cfg["steps"] // 10), progress=False, device=device,
                       seed=seed, log_every=cfg["steps"])
    trainer = Trainer(model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=conf)
    try:
        out = trainer.fit()
    except FloatingPointError:
        return dict(params=params, diverged=True, train_loss=math.inf, test_loss=math.inf,
                    test_accuracy=task.info["majority_baseline"])
    ev = out["eval"]
    diverged = not math.isfinite(ev["loss"])
    return dict(params=params, diverged=diverged, train_loss=out["train_loss"],
                test_loss=ev["loss"] if not diverged else math.inf,
                test_accuracy=ev["accuracy"] if not diverged else task.info["majority_baseline"])


# ============================================================================ run
def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    """Rows ``(seed, variant, lr, rank, params, diverged, train_loss, test_loss, test_accuracy,
    majority_baseline)``; one ``variant="probe"`` row per seed (``lr = 0``: the frozen head alone).

    ``backend`` is ignored (training is torch, float32).
    """
    cfg = SCALES[scale]
    rows: list[dict] = []
    # MiniLM steps on one thread: on this project's loaded 2-core CPU a 2-block forward+backward
    # (batch 16) took 0.05-0.14 s with 1 torch thread and 0.3-0.4 s with 2
    with intra_op_threads(1 if str(device) == "cpu" else None):
        for s, task in docstring_tasks(cfg["n_layers"], cfg["max_length"], cfg["seeds"], device, seed):
            base = dict(seed=s, rank=cfg["rank"], majority_baseline=task.info["majority_baseline"])
            rows.append(dict(variant="probe", lr=0.0, params=0, diverged=False, **base,
                             **linear_probe(task, cfg["probe_wd"])))
            targets = _targets(task, cfg["targets"])
            for v in VARIANTS:
                for lr in cfg["lrs"]:
                    rows.append(dict(variant=v, lr=lr, **base, **_train_one(task, v, lr, cfg, targets, s, device)))
    return rows


# ============================================================================ claims
def grid(rows: list[dict], key: str = "test_accuracy") -> dict[str, dict[float, float]]:
    """``{variant: {lr: mean of key over seeds}}`` (the probe excluded)."""
    out: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r["variant"] != "probe":
            out.setdefault(r["variant"], {}).setdefault(r["lr"], []).append(r[key])
    return {v: {lr: float(np.mean(x)) for lr, x in sorted(d.items())} for v, d in out.items()}


def best(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """``{variant: (best lr, accuracy, test loss)}``: highest mean accuracy, ties to the lower test loss."""
    acc, loss = grid(rows), grid(rows, "test_loss")
    return {v: max(((lr, a, loss[v][lr]) for lr, a in d.items()), key=lambda t: (t[1], -t[2]))
            for v, d in acc.items()}


def spread(rows: list[dict]) -> float:
    """Max minus min of the variants' best accuracies."""
    b = [a for _, a, _ in best(rows).values()]
    return max(b) - min(b) if b else math.nan


def check(rows: list[dict]) -> list[str]:
    problems = []
    acc = grid(rows)
    missing = [v for v in VARIANTS if v not in acc]
    if missing:
        return [f"no rows for {missing}"]
    lrs = {tuple(d) for d in acc.values()}
    if len(lrs) != 1 or len(next(iter(lrs))) < 2:
        problems.append(f"every variant needs the same grid of >= 2 rates, got {sorted(lrs)}")
    b, sp = best(rows), spread(rows)
    if not sp <= CLOSE_ATOL:
        problems.append(f"tuned variants are not close: best accuracies "
                        f"{ {v: round(a, 4) for v, (_, a, _) in b.items()} } spread {sp:.4f} > {CLOSE_ATOL}")
    for v, d in acc.items():
        rng = max(d.values()) - min(d.values())
        if not (rng >= SENS_FACTOR * sp and rng > 0):
            problems.append(f"{v}: accuracy range over the rates {rng:.4f} < {SENS_FACTOR} x variant spread {sp:.4f}")
    if len({lr for lr, _, _ in b.values()}) < 2:
        problems.append(f"every variant has the same best rate {next(iter(b.values()))[0]:g}")
    return problems


def summary(rows: list[dict]) -> list[dict]:
    """Per variant: best rate, its accuracy and loss, the accuracy range over rates, and the accuracy
    at LoRA's best rate; plus the probe (mean over seeds)."""
    acc, b = grid(rows), best(rows)
    lora_lr = b["lora"][0] if "lora" in b else None
    out = []
    for v, d in acc.items():
        lr, a, loss = b[v]
        out.append(dict(variant=v, best_lr=lr, best_accuracy=a, best_test_loss=loss,
                        accuracy_range=max(d.values()) - min(d.values()),
                        accuracy_at_lora_lr=d.get(lora_lr, math.nan), diverged=sum(
                            r["diverged"] for r in rows if r["variant"] == v)))
    probe = [r for r in rows if r["variant"] == "probe"]
    if probe:
        out.append(dict(variant="probe", best_lr=0.0, best_accuracy=float(np.mean([r["test_accuracy"] for r in probe])),
                        best_test_loss=float(np.mean([r["test_loss"] for r in probe])), accuracy_range=0.0,
                        accuracy_at_lora_lr=math.nan, diverged=0))
    return out


def plot(rows: list[dict], path) -> list:
    """Test accuracy and test loss against the learning rate, one line per variant; the probe dashed."""
    acc, loss, b = grid(rows), grid(rows, "test_loss"), best(rows)
    probe = [r for r in rows if r["variant"] == "probe"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v, d in acc.items():
        lrs = list(d)
        (line,) = axes[0].plot(lrs, list(d.values()), marker="o", ms=4, label=v)
        axes[0].plot([b[v][0]], [b[v][1]], marker="*", ms=12, color=line.get_color())
        ys = [loss[v][lr] for lr in lrs]
        axes[1].plot(lrs, [y if math.isfinite(y) else np.nan for y in ys], marker="o", ms=4, color=line.get_color())
    if probe:
        for ax, key in ((axes[0], "test_accuracy"), (axes[1], "test_loss")):
            ax.axhline(float(np.mean([r[key] for r in probe])), color="0.5", ls="--", lw=1, label="linear probe")
        axes[0].axhline(probe[0]["majority_baseline"], color="0.7", ls=":", lw=1, label="majority class")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (LoRA+: rate of A)")
    axes[1].set_yscale("log")
    axes[0].set_ylabel("test accuracy (★ = best rate)")
    axes[1].set_ylabel("test loss")
    axes[0].legend(fontsize=7)
    fig.suptitle(TITLE, fontsize=10)
    return save(fig, path)
