r"""Figure: where adaptive-rank methods put their ranks across MiniLM's layers and modules.

Task: the docstring classification task (:func:`~lowrank_theory.training.tasks.classification_task`,
5 standard-library modules) on the real all-MiniLM-L6-v2 (offline; the first ``n_layers`` blocks at
quick scale, :mod:`._minilm`), with the head fitted by a linear probe and frozen
(:func:`._probe.linear_probe`), so the adapters are the only trained parameters.  Every linear
layer of every block is adapted: ``q, k, v`` (attention projections), ``o`` (attention output),
``ffn_in`` and ``ffn_out`` (the feed-forward pair, 384→1536→384).  Three methods of the training
layer, each run through :class:`~lowrank_theory.training.trainer.Trainer` with its schedule as a
callback (AdamW, linear decay after 10 % warm-up, the rate ``lrs[method]``):

* ``adalora`` -- AdaLoRA (arXiv:2303.10512): :math:`s\,P\operatorname{diag}(\lambda)Q` at rank
  ``r0`` everywhere, triplets cut by sensitivity × uncertainty down to a global budget
  :math:`b^{(T)} = r_0 L/2` on the cubic schedule (:class:`~lowrank_theory.training.schedules.AdaLoRASchedule`,
  ``t_init = T/10``, ``t_final = T/5``);
* ``sora`` -- SoRA (arXiv:2311.11696): gated LoRA of rank ``r0``, proximal steps on the gates
  with :math:`\lambda` rising from ``lam0`` to ``lam_max`` over ``stages`` stages, zero gates cut
  (:class:`~lowrank_theory.training.schedules.SoRASchedule`); no explicit budget.  Here the
  schedule's gate step is plain SGD (``gate_step="sgd"``; its default is the authors' Adam
  step), :math:`g \leftarrow T_{\eta\lambda}(g - \eta\nabla_g L)`, so the loss decides which
  gates survive only where :math:`|\nabla_g L|` is comparable to :math:`\lambda`; the gate
  gradients are of order 1e-3 here, hence a large step
  :math:`\eta` = ``sora_lr`` = 3 with a small :math:`\lambda` (total threshold
  :math:`\eta\sum_t\lambda_t \approx 0.7` over the quick run, against gates drawn from
  :math:`\mathcal N(0, 1)`).  (With :math:`\eta = 0.1`, :math:`\lambda` = 0.05--0.2 we measured
  every final rank equal to the gradient-free control below: the allocation was the random init's.)
* ``increlora`` -- IncreLoRA (arXiv:2308.12043): rank 1 everywhere, one triplet added every
  ``interval`` steps (after a 10 % warm-up) to the module of highest score, up to the same budget
  :math:`r_0 L/2` as AdaLoRA (:class:`~lowrank_theory.training.increlora.IncreLoRASchedule`);
  ``interval`` is chosen so the budget is reachable.

Claims checked (:func:`check`):

1. Budgets are respected exactly: AdaLoRA's final total rank equals its target budget, IncreLoRA's
   equals ``max_total_rank``; SoRA ends at or below its initial total.
2. Allocations are non-uniform: every method ends with at least two different ranks.
3. The runs learned something: each method's test loss is below the linear probe's (the
   allocation is read from a run that moved, not from initialization noise alone).

Reported, not asserted: mean rank per module role and per block, against AdaLoRA's paper (which
reports more rank to the feed-forward matrices and to the top layers of DeBERTaV3); the agreement of
two seeds' allocations (Spearman correlation); and for SoRA, how many modules end with the rank
that pruning by the *initial* gate magnitudes alone would give (the gradient-free control: a gate
that only shrinks by the proximal threshold).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ._evidence import Evidence, problems
from ._minilm import KINDS, docstring_tasks, module_kind
from ._plot import plt, save
from ._probe import linear_probe
from ._regression import intra_op_threads

NAME = "rank_allocation"
TITLE = "Rank allocation of AdaLoRA, SoRA and IncreLoRA across MiniLM (docstring classification)"
CLAIM = ("After a short run on a real task, AdaLoRA and IncreLoRA end exactly at their rank budget and SoRA at "
         "or below its initial rank; all three allocate non-uniformly across MiniLM's blocks and modules.")

METHODS = ("adalora", "sora", "increlora")
PAPERS = (("AdaLoRA", "2303.10512"), ("SoRA", "2311.11696"), ("IncreLoRA", "2308.12043"))
NOTEBOOK = "notebooks/10_rank_allocation.py"
PROOFS = ("proofs/15-sora-proximal-step.md",)
ENGINE = "torch float32 on --device, real MiniLM (ignores --backend)"

SCALES = {
    "quick": dict(n_layers=2, r0=4, steps=60, batch_size=16, max_length=16, lrs=dict(adalora=1e-1, sora=1e-2,
                  increlora=1e-1), sora_lr=3.0, lam0=2e-3, lam_max=6e-3, stages=3, probe_wd=1e-3, seeds=[0, 1]),
    "full": dict(n_layers=6, r0=8, steps=300, batch_size=16, max_length=24, lrs=dict(adalora=3e-2, sora=1e-2,
                 increlora=3e-2), sora_lr=3.0, lam0=4e-4, lam_max=1.4e-3, stages=5, probe_wd=1e-3, seeds=[0, 1, 2]),
}


# ============================================================================ pieces
def increlora_interval(steps: int, warmup: int, to_add: int) -> int:
    """Largest growth interval whose events after ``warmup`` (one triplet each) reach the budget by ``steps``."""
    if to_add <= 0:
        return max(1, steps)
    return max(1, (steps - warmup) // (to_add + 1))


def _schedule(method: str, model: nn.Module, targets: list[str], cfg: dict, seed: int):
    """Inject ``method``'s adapters into ``targets``; return its schedule and its total-rank budget."""
    from ..training.injection import inject
    from ..training.schedules import AdaLoRASchedule, IncreLoRASchedule, SoRASchedule

    T, r0 = cfg["steps"], cfg["r0"]
    budget = r0 * len(targets) // 2
    if method == "adalora":
        inject(model, "adalora", targets, rank=r0, layer_seeds=True, seed=seed)
        return AdaLoRASchedule(model, T, target_budget=budget, t_init=T // 10, t_final=T // 5), budget
    if method == "sora":
        inject(model, "sora", targets, rank=r0, layer_seeds=True, seed=seed)
        sched = SoRASchedule(model, T, lr=cfg["sora_lr"], lam0=cfg["lam0"], lam_max=cfg["lam_max"],
                             num_stages=cfg["stages"], gate_step="sgd")
        return sched, r0 * len(targets)
    if method == "increlora":
        inject(model, "adalora", targets, rank=1, layer_seeds=True, seed=seed)
        warm = T // 10
        interval = increlora_interval(T, warm, budget - len(targets))
        return IncreLoRASchedule(model, max_total_rank=budget, interval=interval, warmup=warm, seed=seed), budget
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def sora_init_only_ranks(gates: dict[str, torch.Tensor], sched: Any) -> dict[str, int]:
    r"""Ranks SoRA would keep from its initial gates alone (zero loss gradient).

    With :math:`\nabla_g L_0 = 0` each proximal step shrinks :math:`|g|` by :math:`\eta\lambda_t`, so
    gate :math:`k` survives the run iff :math:`|g_{0,k}| > \eta\sum_{t=1}^{T}\lambda_{\text{stage}(t)}`.
    """
    shrink = sched.lr * sum(sched.lambdas[sched.stage(t)] for t in range(1, sched.total_steps + 1))
    return {n: int((g.abs() > shrink).sum()) for n, g in gates.items()}


def _one(method: str, task, cfg: dict, seed: int, device: str) -> dict:
    from ..training.trainer import TrainConfig, Trainer

    model = copy.deepcopy(task.model)
    sched, budget = _schedule(method, model, task.targets, cfg, seed)
    initial = sum(sched.ranks().values())
    gates = {n: m.adapter.gate.detach().clone() for n, m in sched.layers().items()} if method == "sora" else None
    T = cfg["steps"]
    conf = TrainConfig(steps=T, batch_size=cfg["batch_size"], lr=cfg["lrs"][method], lr_schedule="linear",
                       warmup_steps=max(1, T // 10), progress=False, device=device, seed=seed, log_every=T)
    out = Trainer(model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=conf,
                  callbacks=[sched]).fit()
    if hasattr(sched, "detach"):
        sched.detach()  # IncreLoRA's hooks
    ranks = {n.removeprefix("backbone."): r for n, r in sched.ranks().items()}
    init_only = None
    if gates is not None:
        init_only = {n.removeprefix("backbone."): r for n, r in sora_init_only_ranks(gates, sched).items()}
    return dict(ranks=ranks, budget=budget, initial=initial, test_loss=out["eval"]["loss"],
                test_accuracy=out["eval"]["accuracy"], init_only=init_only, events=len(sched.history))


# ============================================================================ run
def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    """Tidy rows, one per (seed, method, module): ``(seed, method, module, layer, kind, rank, r0, budget,
    initial_total, test_loss, test_accuracy, probe_test_loss, events[, init_only_rank])``.

    ``budget`` is the method's total-rank budget (SoRA: its initial total, an upper bound only);
    ``events`` the number of rank changes the schedule made.  ``backend`` is ignored (torch, float32).
    """
    cfg = SCALES[scale]
    rows: list[dict] = []
    # MiniLM steps on one thread: on this project's loaded 2-core CPU a 2-block forward+backward
    # (batch 16) took 0.05-0.14 s with 1 torch thread and 0.3-0.4 s with 2
    with intra_op_threads(1 if str(device) == "cpu" else None):
        for s, task in docstring_tasks(cfg["n_layers"], cfg["max_length"], cfg["seeds"], device, seed):
            probe = linear_probe(task, cfg["probe_wd"])
            for method in METHODS:
                res = _one(method, task, cfg, s, device)
                for name, r in res["ranks"].items():
                    layer, kind = module_kind(name)
                    row = dict(seed=s, method=method, module=name, layer=layer, kind=kind, rank=r, r0=cfg["r0"],
                               budget=res["budget"], initial_total=res["initial"], test_loss=res["test_loss"],
                               test_accuracy=res["test_accuracy"], probe_test_loss=probe["test_loss"],
                               events=res["events"])
                    if res["init_only"] is not None:
                        row["init_only_rank"] = res["init_only"][name]
                    rows.append(row)
    return rows


# ============================================================================ claims
def totals(rows: list[dict]) -> dict[tuple[int, str], dict[str, float]]:
    """``{(seed, method): {"total", "budget", "initial", "min", "max", "test_loss", "probe_test_loss"}}``."""
    out: dict[tuple[int, str], dict[str, float]] = {}
    for key in dict.fromkeys((r["seed"], r["method"]) for r in rows):
        sel = [r for r in rows if (r["seed"], r["method"]) == key]
        ranks = [r["rank"] for r in sel]
        out[key] = dict(total=sum(ranks), budget=sel[0]["budget"], initial=sel[0]["initial_total"],
                        min=min(ranks), max=max(ranks), test_loss=sel[0]["test_loss"],
                        probe_test_loss=sel[0]["probe_test_loss"], modules=len(sel))
    return out


PAPER_ADALORA = "AdaLoRA: more rank to the feed-forward matrices and to the top layers (DeBERTaV3)"


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the claim is checked on (see :mod:`._evidence`); :func:`check` is their failures."""
    out = []
    tot = totals(rows)
    for m in METHODS:
        if not any(k[1] == m for k in tot):
            out.append(Evidence("every method was run", m, 0, ">", 0, quantity="rows", against="0",
                                message=f"no rows for {m}"))
    for (s, m), t in tot.items():
        case = f"seed {s}, {m}"
        if m in ("adalora", "increlora"):
            out.append(Evidence("AdaLoRA and IncreLoRA end exactly at their rank budget", case, t["total"], "==",
                                t["budget"], quantity="total rank", against="budget",
                                message=f"seed {s} {m}: total rank {t['total']} != budget {t['budget']}"))
        if m == "sora":
            out.append(Evidence("SoRA ends at or below its initial rank", case, t["total"], "<=", t["initial"],
                                quantity="total rank", against="initial total",
                                paper="SoRA: 'even with 70% retained parameters' (abstract)",
                                message=f"seed {s} sora: total rank {t['total']} above its initial {t['initial']}"))
        out.append(Evidence("every method allocates non-uniformly", case, t["max"] - t["min"], ">", 0,
                            quantity="max − min module rank", against="0",
                            message=f"seed {s} {m}: uniform allocation (every module at rank {t['min']})"))
        out.append(Evidence("each run learned: test loss below the linear probe's", case, t["test_loss"], "<",
                            t["probe_test_loss"], quantity="test loss", against="probe test loss",
                            message=f"seed {s} {m}: test loss {t['test_loss']:.4g} not below the probe's "
                                    f"{t['probe_test_loss']:.4g}"))
    roles = by_role(rows).get("adalora")
    if roles:
        out.append(Evidence("AdaLoRA gives more rank to the feed-forward matrices", "mean rank over seeds",
                            roles["ffn"], ">", roles["attention"], quantity="FFN mean rank",
                            against="attention mean rank", paper=PAPER_ADALORA, asserted=False))
        if not math.isnan(roles["top"]):
            out.append(Evidence("AdaLoRA gives more rank to the top layers", "mean rank over seeds", roles["top"], ">",
                                roles["bottom"], quantity="top-half mean rank", against="bottom-half mean rank",
                                paper=PAPER_ADALORA, asserted=False))
    return out


def check(rows: list[dict]) -> list[str]:
    """The claim's problems on ``rows`` (empty: it holds): the failing asserted :func:`evidence`."""
    return problems(evidence(rows))


def heatmap(rows: list[dict], method: str) -> np.ndarray:
    """Mean rank over seeds, shape (blocks, 6): rows are blocks, columns :data:`KINDS`."""
    sel = [r for r in rows if r["method"] == method]
    L = 1 + max(r["layer"] for r in sel)
    acc = np.zeros((L, len(KINDS)))
    cnt = np.zeros((L, len(KINDS)))
    for r in sel:
        j = KINDS.index(r["kind"])
        acc[r["layer"], j] += r["rank"]
        cnt[r["layer"], j] += 1
    return acc / np.maximum(cnt, 1)


def by_role(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{method: {"attention": mean rank of q/k/v/o, "ffn": of ffn_in/ffn_out, "bottom": first half of
    the blocks, "top": second half, <kind>: mean rank}}`` (over seeds and modules)."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        h = heatmap(rows, m)
        L = h.shape[0]
        d = {k: float(h[:, j].mean()) for j, k in enumerate(KINDS)}
        d.update(attention=float(h[:, :4].mean()), ffn=float(h[:, 4:].mean()),
                 bottom=float(h[: L // 2].mean()) if L > 1 else math.nan,
                 top=float(h[(L + 1) // 2 :].mean()) if L > 1 else math.nan)
        out[m] = d
    return out


def seed_agreement(rows: list[dict]) -> dict[str, float]:
    """Per method, the mean Spearman correlation of the per-module ranks between pairs of seeds (nan: one seed
    or a constant allocation)."""
    from scipy.stats import spearmanr

    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["method"] == m})
        vecs = [[r["rank"] for r in sorted((r for r in rows if r["method"] == m and r["seed"] == s),
                                           key=lambda r: r["module"])] for s in seeds]
        cors = []
        for i in range(len(vecs)):
            for j in range(i + 1, len(vecs)):
                if np.ptp(vecs[i]) > 0 and np.ptp(vecs[j]) > 0:
                    cors.append(float(spearmanr(vecs[i], vecs[j]).statistic))
        out[m] = float(np.mean(cors)) if cors else math.nan
    return out


def sora_init_agreement(rows: list[dict]) -> float:
    """Share of SoRA's (seed, module) ranks equal to the gradient-free control's."""
    sel = [r for r in rows if r["method"] == "sora" and "init_only_rank" in r]
    return float(np.mean([r["rank"] == r["init_only_rank"] for r in sel])) if sel else math.nan


def plot(rows: list[dict], path) -> list:
    """One heatmap per method: blocks (rows, block 0 at the top, as in the model) × module roles
    (columns), mean final rank written in each cell."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    maps = [heatmap(rows, m) for m in methods]
    vmax = max(float(h.max()) for h in maps)
    L = maps[0].shape[0]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.9 * len(methods) + 0.8, 0.55 * L + 2.4), squeeze=False,
                             layout="constrained")
    tot = totals(rows)
    for ax, m, h in zip(axes[0], methods, maps):
        im = ax.imshow(h, origin="upper", cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        for i in range(h.shape[0]):
            for j in range(h.shape[1]):
                ax.text(j, i, f"{h[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="w" if h[i, j] < 0.6 * vmax else "k")
        ax.set_xticks(range(len(KINDS)), KINDS, fontsize=7)
        ax.set_yticks(range(h.shape[0]), [f"block {i}" for i in range(h.shape[0])] if ax is axes[0, 0] else [],
                      fontsize=7)
        t = [v for (s, mm), v in tot.items() if mm == m]
        ax.set_title(f"{m}: total {np.mean([x['total'] for x in t]):.0f} (budget {t[0]['budget']})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="final rank (mean over seeds)")
    fig.suptitle(TITLE, fontsize=10)
    return save(fig, path)
