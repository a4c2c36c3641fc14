r"""Figure: LoRA-SB (arXiv:2411.19557) -- initialize from the first full-fine-tuning update, vs random init.

Task: the teacher–student task of :func:`~lowrank_theory.training.tasks.teacher_student_task` on the
real all-MiniLM-L6-v2 (offline; the first ``n_layers`` blocks at quick scale, :mod:`._minilm`): the
teacher is the pretrained model with a planted rank-``planted_rank`` update :math:`\Delta W^\star`
(:math:`\|\Delta W^\star\|_F = 0.3\|W_0\|_F` by default) in the last block's attention value and
output projections; the student is the pretrained model plus adapters on those two layers, trained
on real English sentences to reproduce the teacher's last hidden states.  The loss is normalized:
1 for the unadapted student on the training set.

Variants (each trained with AdamW, linear decay, the learning rate picked per variant from
``lrs`` by the *final full training-set loss*; the adapters of one variant share their rank):

* ``lora_sb`` -- LoRA-SB: :math:`\Delta W = BRA`, :math:`B, A` frozen.  With :math:`G` the
  gradient of the loss at :math:`W_0` summed over the first ``init_samples`` training examples
  and :math:`\Delta_1 = -\eta_0\operatorname{sign}(G)` (the first step of full fine-tuning with Adam,
  as the authors' code computes it), :math:`B R_0 A = [\Delta_1]_r` (truncated SVD:
  :meth:`~lowrank_theory.adapters.svd_based.LoRASB.from_gradient`).  :math:`\eta_0` = ``init_lr``
  is the *full*-fine-tuning rate (1e-4, the rate of
  :func:`~lowrank_theory.training.real_updates.real_finetune_delta`); the frozen weight is kept,
  so the model starts from :math:`W_0 + [\Delta_1]_r`, as in the authors' code.
* ``lora_xs`` -- the same architecture, frames from the SVD of :math:`W_0`, :math:`R = 0`
  (LoRA-XS's own init, arXiv:2405.17604).
* ``random`` -- the same architecture, seeded Haar-random orthonormal frames, :math:`R = 0`.
* ``lora`` -- standard LoRA of rank ``lora_rank`` (Kaiming :math:`A`, :math:`B = 0`).

The :math:`r\times r` core variants get the rank that matches LoRA's parameter count,
:math:`r = \lfloor\sqrt{r_{lora}(m + n)}\rfloor` (78 for rank 8 on 384×384), as the paper compares at
comparable or smaller budgets.  Two ablations run at ``lora_sb``'s selected rate:
``sb_frames`` (frames from :math:`\Delta_1`, :math:`R_0 = 0`: the subspace without the jump) and
``sb_train_lr`` (:math:`\eta_0` = the training rate, the authors' code taken literally).

Equal steps.  The init costs ``init_passes = ceil(init_samples / batch_size)`` gradient
evaluations; claims compare ``lora_sb`` after :math:`t` steps with the baselines after
:math:`t + \text{init\_passes}` steps (equal gradient evaluations), which is stricter than equal
optimizer steps.

Claims checked (:func:`check`):

1. The init is the Eckart–Young truncation of the first update: per planted layer
   :math:`\|BR_0A - \Delta_1\|_F = (\sum_{i>r}\sigma_i(\Delta_1)^2)^{1/2}` with :math:`\sigma_i` from an
   independent float64 NumPy SVD, to ``1e-4`` relative to :math:`\|\Delta_1\|_F` (float32 SVD of a
   384×384 matrix is accurate to ~1e-6 relative; the slack keeps the check about the math).
2. Every variant without an update init starts at the unadapted student's test loss
   (:math:`\Delta W = 0`), to ``1e-5`` relative.
3. Early in training (steps :math:`1 \le t \le` ``early_steps``, mean over seeds, selected rates) the
   update-initialized ``lora_sb`` has a lower test loss than ``lora_xs`` and ``random`` at equal
   gradient evaluations.

Reported, not asserted: ``lora_sb`` against standard ``lora`` (which trains its frames), the
ablations, and the lower envelope over the learning-rate grid.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters.svd_based import LoRASB
from ._evidence import Evidence, problems
from ._minilm import minilm
from ._plot import figure_legend, plt, save
from ._regression import intra_op_threads

NAME = "init_from_update"
TITLE = "LoRA-SB: initialization from the first full-fine-tuning update vs random init"
CLAIM = ("Initializing the LoRA-XS architecture from the truncated SVD of the first full-fine-tuning update "
         "(LoRA-SB) gives a lower teacher–student test loss early in training than LoRA-XS's and random "
         "orthonormal frames at equal gradient evaluations; the init is the Eckart–Young truncation of that update.")

PAPERS = (("LoRA-SB", "2411.19557"), ("LoRA-XS", "2405.17604"))
NOTEBOOK = "notebooks/04_lorasb_init.py"
PROOFS = ("proofs/04-lorasb-subspace.md", "proofs/01-eckart-young-mirsky.md")
ENGINE = "torch float32 on --device, real MiniLM (ignores --backend)"

#: swept over the learning-rate grid
VARIANTS = ("lora_sb", "lora_xs", "random", "lora")
#: run at lora_sb's selected learning rate
ABLATIONS = ("sb_frames", "sb_train_lr")
#: claim 3 compares lora_sb with these (same architecture, other inits)
BASELINES = ("lora_xs", "random")

SCALES = {
    "quick": dict(n_layers=2, planted_rank=4, relative_norm=0.3, n_train=64, n_test=32, max_length=12,
                  batch_size=16, steps=24, lrs=[3e-3, 1e-2], lora_rank=8, init_samples=16, init_lr=1e-4,
                  warmup_steps=3, early_steps=8, eval_every=4, seeds=[0]),
    "full": dict(n_layers=6, planted_rank=4, relative_norm=0.3, n_train=256, n_test=64, max_length=16,
                 batch_size=16, steps=120, lrs=[1e-3, 3e-3, 1e-2, 3e-2], lora_rank=8, init_samples=32,
                 init_lr=1e-4, warmup_steps=12, early_steps=20, eval_every=10, seeds=[0, 1, 2]),
}

#: claim 1 (relative to ‖Δ1‖_F, float32 adapters) and claim 2 (relative) tolerances
INIT_RTOL = 1e-4
START_RTOL = 1e-5


# ============================================================================ pieces
def core_rank(lora_rank: int, d_out: int, d_in: int) -> int:
    r"""Rank :math:`\lfloor\sqrt{r_{lora}(m+n)}\rfloor` of an :math:`r\times r` core with LoRA's parameter count."""
    return min(math.isqrt(lora_rank * (d_out + d_in)), d_out, d_in)


def first_update_gradients(model: nn.Module, task, n_samples: int, batch_size: int) -> dict[str, torch.Tensor]:
    r"""Gradient :math:`G = \sum_b \partial L_b/\partial W` at :math:`W_0` of every target layer of ``task``.

    The loss of batch :math:`b` is the task's mean over its examples; batches are the first
    ``n_samples`` training examples in order.  ``model`` is not changed (its parameters'
    ``requires_grad`` flags are restored).

    Returns
    -------
    dict of str to Tensor
        ``{layer name: G}``, shape (d_out, d_in), the weight's dtype.
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    weights = {n: model.get_submodule(n).weight for n in task.targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    dev = next(iter(weights.values())).device
    try:
        for i in range(0, n_samples, batch_size):
            batch = {k: v[i : min(i + batch_size, n_samples)].to(dev) for k, v in task.train.items()}
            task.loss_fn(model, batch).backward()
        return {n: w.grad.detach().clone() for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def _inject(model: nn.Module, task, variant: str, cfg: dict, seed: int, grads: dict | None,
            init_lr: float) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` with ``variant``'s adapters on the task's targets; init rows for LoRA-SB."""
    from ..training.injection import inject, prepare

    model = copy.deepcopy(model)
    W = model.get_submodule(task.targets[0]).weight
    r_core = core_rank(cfg["lora_rank"], *W.shape)
    init_rows = []
    if variant in ("lora_sb", "sb_frames", "sb_train_lr"):
        plan = prepare(model, "lora_sb", task.targets, rank=r_core, layer_seeds=True, seed=seed)
        for name in task.targets:
            base = model.get_submodule(name).weight
            ad, _ = LoRASB.from_gradient(grads[name], r_core, base_weight=base.detach(), lr=init_lr, sign=True)
            if variant == "sb_frames":
                with torch.no_grad():
                    ad.R.zero_()
            else:
                init_rows.append(_init_row(name, ad, grads[name], init_lr, r_core))
            plan.adapters[name] = ad
        plan.apply()
    elif variant == "lora_xs":
        inject(model, "lora_xs", task.targets, rank=r_core, layer_seeds=True, seed=seed)
    elif variant == "random":
        inject(model, "lora_sb", task.targets, rank=r_core, layer_seeds=True, seed=seed)
    elif variant == "lora":
        inject(model, "lora", task.targets, rank=cfg["lora_rank"], layer_seeds=True, seed=seed)
    else:
        raise ValueError(f"variant must be one of {VARIANTS + ABLATIONS}, got {variant!r}")
    return model, init_rows


def _init_row(name: str, ad: LoRASB, grad: torch.Tensor, lr: float, rank: int) -> dict:
    """Claim 1's numbers: ‖BR0A − Δ1‖_F and the Eckart–Young tail of Δ1 from a float64 NumPy SVD."""
    delta1 = -lr * np.sign(grad.detach().cpu().double().numpy())
    S = np.linalg.svd(delta1, compute_uv=False)
    with torch.no_grad():
        got = ad.delta_weight().detach().cpu().double().numpy()
    return dict(layer=name, rank=rank, init_error=float(np.linalg.norm(got - delta1)),
                ey_tail=float(np.sqrt(np.sum(S[rank:] ** 2))), update_norm=float(np.linalg.norm(S)))


class _EvalAt:
    """Trainer callback: test loss and ΔW error after the listed steps."""

    def __init__(self, task, steps: set[int]) -> None:
        self.task, self.steps, self.points = task, steps, []

    def record(self, model: nn.Module, step: int) -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            ev = self.task.eval_fn(model, self.task.test)
        model.train(was)
        self.points.append((step, ev["loss"], ev.get("delta_error", float("nan"))))

    def after_step(self, trainer: Any) -> None:
        if trainer.step in self.steps:
            self.record(trainer.model, trainer.step)


def _eval_steps(cfg: dict, shift: int) -> set[int]:
    """Every step of the early window, then every ``eval_every`` steps, each also ``shift`` before and
    after (so update-initialized and zero-initialized runs meet at equal gradient evaluations)."""
    grid = set(range(0, cfg["steps"] + 1, cfg["eval_every"])) | {cfg["steps"]}
    out = set(range(0, cfg["early_steps"] + shift + 1)) | grid
    out |= {g + d for g in grid for d in (-shift, shift)}
    return {t for t in out if 0 <= t <= cfg["steps"]}


def _train(model: nn.Module, task, cfg: dict, lr: float, seed: int, device: str, steps: set[int]) -> tuple:
    from ..training.trainer import TrainConfig, Trainer

    ev = _EvalAt(task, steps)
    ev.record(model, 0)
    conf = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=lr, lr_schedule="linear",
                       warmup_steps=cfg["warmup_steps"], progress=False, device=device, seed=seed,
                       log_every=cfg["steps"])
    Trainer(model, task.train, task.loss_fn, config=conf, callbacks=[ev]).fit()
    model.eval()
    with torch.no_grad():
        train_loss = task.eval_fn(model, task.train)["loss"]
    return ev.points, train_loss


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ============================================================================ run
UPDATE_INIT = ("lora_sb", "sb_frames", "sb_train_lr")


def _one_seed(cfg: dict, seed: int, device: str) -> list[dict]:
    from ..training.tasks import teacher_student_task

    shift = math.ceil(cfg["init_samples"] / cfg["batch_size"])
    steps = _eval_steps(cfg, shift)
    model, tok = minilm(cfg["n_layers"])
    task = teacher_student_task(model.to(device), tok, "lowrank", rank=cfg["planted_rank"],
                                relative_norm=cfg["relative_norm"], n_train=cfg["n_train"], n_test=cfg["n_test"],
                                max_length=cfg["max_length"], seed=seed)
    grads = first_update_gradients(task.model, task, cfg["init_samples"], cfg["batch_size"])
    runs: dict[tuple[str, float], tuple] = {}
    rows: list[dict] = []

    def one(variant: str, lr: float, init_lr: float) -> None:
        net, init_rows = _inject(task.model, task, variant, cfg, seed, grads, init_lr)
        rank, params = _rank_of(net), _params(net)
        points, train_loss = _train(net, task, cfg, lr, seed, device, steps)
        if not any(k[0] == variant for k in runs):  # the init is the same for every rate: report it once
            rows.extend(dict(kind="init", seed=seed, variant=variant, **r) for r in init_rows)
        runs[(variant, lr)] = (points, train_loss, rank, params)

    for v in VARIANTS:
        for lr in cfg["lrs"]:
            one(v, lr, cfg["init_lr"])
    best = {v: min(cfg["lrs"], key=lambda lr, v=v: runs[(v, lr)][1]) for v in VARIANTS}
    one("sb_frames", best["lora_sb"], cfg["init_lr"])
    one("sb_train_lr", best["lora_sb"], best["lora_sb"])
    best.update(sb_frames=best["lora_sb"], sb_train_lr=best["lora_sb"])
    for (v, lr), (points, train_loss, rank, params) in runs.items():
        off = shift if v in UPDATE_INIT else 0
        for step, loss, derr in points:
            rows.append(dict(kind="curve", seed=seed, variant=v, lr=lr, selected=lr == best[v], rank=rank,
                             params=params, step=step, cost=step + off, test_loss=loss, delta_error=derr,
                             final_train_loss=train_loss, early_steps=cfg["early_steps"]))
    return rows


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    """Rows of two kinds.

    ``kind="curve"``: ``(seed, variant, lr, selected, rank, params, step, cost, test_loss,
    delta_error, final_train_loss, early_steps)`` -- ``cost = step (+ init_passes for update
    inits)``; ``selected`` marks the variant's rate (lowest final training loss).
    ``kind="init"``: ``(seed, variant, layer, rank, init_error, ey_tail, update_norm)`` (claim 1).
    ``backend`` is ignored (training is torch, float32).
    """
    cfg = SCALES[scale]
    rows: list[dict] = []
    # MiniLM steps on one thread: on this project's loaded 2-core CPU a 2-block forward+backward
    # (batch 16, 12 tokens) took 0.05 s with 1 torch thread and 0.38 s with 2
    with intra_op_threads(1 if str(device) == "cpu" else None):
        for s in cfg["seeds"]:
            rows.extend(_one_seed(cfg, seed + s, device))
    return rows


def _rank_of(model: nn.Module) -> int:
    from ..training.injection import adapted_layers

    return int(next(iter(adapted_layers(model).values())).adapter.rank)


# ============================================================================ claims
def curves(rows: list[dict], *, selected: bool = True) -> dict[str, dict[int, float]]:
    """``{variant: {step: mean test loss over seeds}}`` at the selected rates (or the envelope over rates).

    With ``selected=False`` each point is the mean over seeds of the *lowest* test loss over the
    learning-rate grid at that step (the envelope: every variant at its best rate for that step).
    """
    out: dict[str, dict[int, float]] = {}
    cur = [r for r in rows if r["kind"] == "curve"]
    for v in dict.fromkeys(r["variant"] for r in cur):
        sel = [r for r in cur if r["variant"] == v and (r["selected"] or not selected)]
        per: dict[int, dict[int, float]] = {}
        for r in sel:
            d = per.setdefault(r["step"], {})
            d[r["seed"]] = min(d.get(r["seed"], math.inf), r["test_loss"])
        out[v] = {t: float(np.mean(list(d.values()))) for t, d in sorted(per.items())}
    return out


def shifts(rows: list[dict]) -> dict[str, int]:
    """Gradient evaluations spent on each variant's init (``cost - step``)."""
    return {r["variant"]: r["cost"] - r["step"] for r in rows if r["kind"] == "curve"}


PAPER_INIT = "LoRA-SB: the init is the optimal low-rank approximation of the first update (theorem)"
PAPER_EARLY = "LoRA-SB: comprehensively outperforms LoRA-XS (LLM benchmarks, abstract)"


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the claim is checked on (see :mod:`._evidence`); :func:`check` is their failures."""
    out = []
    for r in rows:
        if r["kind"] == "init":
            out.append(Evidence("the init is the Eckart–Young truncation of the first update",
                                f"seed {r['seed']}, {r['variant']}, {r['layer']}", r["init_error"], "==", r["ey_tail"],
                                INIT_RTOL * r["update_norm"], quantity="‖BR0A − Δ1‖_F", against="(Σ_{i>r} σ_i²)^½",
                                tol_text=f"{INIT_RTOL:g} · ‖Δ1‖_F (float32 SVD)", paper=PAPER_INIT,
                                message=f"seed {r['seed']} {r['variant']} {r['layer']}: ‖BR0A − Δ1‖ = "
                                        f"{r['init_error']:.6g} != Eckart–Young tail {r['ey_tail']:.6g}"))
    cur = [r for r in rows if r["kind"] == "curve"]
    for s in sorted({r["seed"] for r in cur}):
        start = [r for r in cur if r["seed"] == s and r["step"] == 0 and r["variant"] not in ("lora_sb", "sb_train_lr")]
        if start:
            ref = start[0]["test_loss"]
            worst = max(start, key=lambda r: abs(r["test_loss"] - ref))
            out.append(Evidence("variants without an update init start at the unadapted loss", f"seed {s}",
                                worst["test_loss"], "==", ref, START_RTOL * abs(ref),
                                quantity=f"start loss of {worst['variant']}", against=f"of {start[0]['variant']}",
                                tol_text=f"{START_RTOL:g} relative",
                                message=f"seed {s}: zero-init variants start at different losses "
                                        f"{sorted({(r['variant'], round(r['test_loss'], 8)) for r in start})}"))
    c, sh = curves(rows), shifts(rows)
    if "lora_sb" not in c:
        out.append(Evidence("LoRA-SB is below LoRA-XS's and random frames early on", "rows", 0, ">", 0,
                            message="no lora_sb rows"))
        return out
    early = sorted(t for t in c["lora_sb"] if 1 <= t <= _early_steps(rows))
    for b in BASELINES:
        part = f"LoRA-SB's test loss is below {b}'s early on (equal gradient evaluations)"
        if b not in c:
            out.append(Evidence(part, "rows", 0, ">", 0, message=f"no {b} rows"))
            continue
        for t in early:
            tb = t + sh["lora_sb"] - sh.get(b, 0)
            if tb not in c[b]:
                out.append(Evidence(part, f"step {t}", math.nan, "<", math.nan,
                                    message=f"{b} has no evaluation at step {tb} (equal cost to lora_sb step {t})"))
            else:
                out.append(Evidence(part, f"lora_sb step {t} vs {b} step {tb}", c["lora_sb"][t], "<", c[b][tb],
                                    quantity="LoRA-SB test loss", against=f"{b} test loss",
                                    paper=PAPER_EARLY if b == "lora_xs" else "",
                                    message=f"step {t}: lora_sb test loss {c['lora_sb'][t]:.4g} not below {b} "
                                            f"{c[b][tb]:.4g} at step {tb} (equal gradient evaluations)"))
    if "lora" in c:
        pts = compare(rows, "lora_sb", "lora")
        if pts:
            t, la, lb = pts[-1]
            out.append(Evidence("LoRA-SB ends at or below standard LoRA (same parameters)", f"lora_sb step {t}", la,
                                "<=", lb, quantity="LoRA-SB final test loss", against="LoRA test loss",
                                paper="LoRA-SB: exceeds standard LoRA with 27–90x fewer parameters (abstract)",
                                asserted=False))
    return out


def check(rows: list[dict]) -> list[str]:
    """The claim's problems on ``rows`` (empty: it holds): the failing asserted :func:`evidence`."""
    return problems(evidence(rows))


def _early_steps(rows: list[dict]) -> int:
    return max((int(r["early_steps"]) for r in rows if r["kind"] == "curve"), default=0)


def compare(rows: list[dict], a: str = "lora_sb", b: str = "lora", *, selected: bool = True) -> list[tuple]:
    """``(t, loss_a(t), loss_b(t + shift))`` at equal gradient evaluations, for every step both have."""
    c, sh = curves(rows, selected=selected), shifts(rows)
    out = []
    for t in sorted(c.get(a, {})):
        tb = t + sh.get(a, 0) - sh.get(b, 0)
        if tb in c.get(b, {}):
            out.append((t, c[a][t], c[b][tb]))
    return out


def overtaken_at(rows: list[dict], a: str = "lora_sb", b: str = "lora", *, selected: bool = True) -> int | None:
    """First step of ``a`` from which ``b`` stays below ``a`` to the end (None: ``a`` is below at the end)."""
    pts = compare(rows, a, b, selected=selected)
    t_over = None
    for t, la, lb in reversed(pts):
        if lb < la:
            t_over = t
        else:
            break
    return t_over


def summary(rows: list[dict]) -> list[dict]:
    """Per variant at its selected rate: rate, rank, params, test loss at a few steps (mean over seeds)."""
    c = curves(rows)
    cur = [r for r in rows if r["kind"] == "curve" and r["selected"]]
    out = []
    for v, pts in c.items():
        one = next(r for r in cur if r["variant"] == v)
        steps = sorted(pts)
        picks = sorted({steps[0], steps[min(2, len(steps) - 1)], steps[len(steps) // 2], steps[-1]})
        out.append(dict(variant=v, lr=one["lr"], rank=one["rank"], params=one["params"],
                        init_passes=one["cost"] - one["step"], **{f"loss@{t}": pts[t] for t in picks},
                        final_train_loss=float(np.mean([r["final_train_loss"] for r in cur if r["variant"] == v
                                                        and r["step"] == 0]))))
    return out


STYLE = {"lora_sb": ("tab:red", "-", "o"), "sb_frames": ("tab:orange", ":", "v"),
         "sb_train_lr": ("tab:pink", "-.", "x"),
         "lora_xs": ("tab:blue", "-", "s"), "random": ("tab:gray", "--", "^"), "lora": ("k", "--", "D")}


def plot(rows: list[dict], path) -> list:
    """Left: test loss vs gradient evaluations at the selected rates; right: the envelope over the rate grid.

    The y-axis is fitted to the variants that start at or near the unadapted loss; ``sb_train_lr``
    (which starts far above) is clipped, with its first and last losses in the legend.
    """
    sh = shifts(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3), sharey=True, layout="constrained")
    top = 1.0
    for ax, selected, title in ((axes[0], True, "selected learning rate"),
                                (axes[1], False, "best rate per step (envelope)")):
        for v, pts in curves(rows, selected=selected).items():
            c, ls, mk = STYLE.get(v, ("tab:green", "-", "P"))
            ys = list(pts.values())
            label = v
            if v == "sb_train_lr":
                label = f"{v} ({ys[0]:.3g} → {ys[-1]:.3g}, clipped)"
            else:
                top = max(top, max(ys))
            ax.plot([t + sh.get(v, 0) for t in pts], ys, color=c, ls=ls, marker=mk, ms=3.5, lw=1.2, label=label,
                    mfc="none" if v in ("random", "sb_frames") else c)
        ax.set_xlabel("gradient evaluations (steps + init passes)")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0.0, 1.05 * top)
    axes[0].set_ylabel("test loss (1 = unadapted)")
    figure_legend(fig, axes)
    fig.suptitle(TITLE, fontsize=10)
    return save(fig, path)
