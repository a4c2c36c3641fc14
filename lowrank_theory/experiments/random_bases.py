r"""Figure: random-basis adapters (VeRA, NOLA, RandLoRA, Uni-LoRA) vs LoRA at equal trainable parameters.

Two targets :math:`\Delta W^\star` (:func:`~lowrank_theory.theory.targets.make_target`, square
:math:`m = n`): ``flat`` (all singular values equal: full rank, every direction costs the same) and
``lowrank`` (rank ``k`` plus relative noise ``noise``).  For each trainable-parameter budget
:math:`p` two scores:

* ``expressivity`` -- the best relative error :math:`\min_\theta\|\Delta W(\theta)-\Delta W^\star\|_F
  /\|\Delta W^\star\|_F` with at most :math:`p` parameters
  (:func:`~lowrank_theory.theory.expressivity.best_error`: Eckart–Young for LoRA, alternating least
  squares for VeRA / NOLA / RandLoRA, L-BFGS for Uni-LoRA);
* ``trained`` -- the teacher–student regression of :mod:`._regression` (inputs :math:`N(0, I)`
  from a fixed seed, no label noise) trained with full-batch Adam through
  :class:`~lowrank_theory.adapters.AdaptedLinear` and the real adapters, with the configuration
  the expressivity solver chose at that budget (same rank / number of bases / coefficients); the
  peak learning rate is picked per method and budget from a small grid by the *train* loss; the
  row reports the test loss and :math:`\|\Delta W - \Delta W^\star\|_F/\|\Delta W^\star\|_F`.

Parameter counts: LoRA :math:`r(m+n)`; VeRA :math:`m + r`; NOLA :math:`k + l` (inner rank
``inner_rank``); RandLoRA :math:`N(r + n)`, :math:`N = \lceil n/r\rceil` (full rank); Uni-LoRA
:math:`d` (inner rank ``inner_rank``).  Every method uses at most :math:`p`.

Claims checked (:func:`check`), on the expressivity rows (exact or converged solvers):

1. Flat target: RandLoRA's error is below LoRA's at every budget where RandLoRA is feasible.
2. Low-rank target: LoRA's error is at most RandLoRA's (``1e-9`` slack) at every budget.
3. Sanity (a theorem): a trained LoRA never beats Eckart–Young,
   ``delta_error >= expressivity error - 1e-9``.

The trained rows are reported (and drawn) next to them, not asserted: they carry optimizer
effects (learning rate, step budget) that the claim is not about; the notebook says where they
agree.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import NullFormatter

from ..adapters import create
from ..adapters.projection import UniLoRA
from ..theory.expressivity import best_error
from ..theory.targets import make_target
from . import _regression as reg
from ._evidence import Evidence, problems
from ._plot import figure_legend, plt, save

NAME = "random_bases"
TITLE = "Random bases vs LoRA: error vs trainable parameters"
CLAIM = ("On a full-rank (flat-spectrum) target RandLoRA's full-rank update beats LoRA at equal parameter "
         "count; on a low-rank target LoRA is at least as good as RandLoRA.")

PAPERS = (("VeRA", "2310.11454"), ("NOLA", "2310.02556"), ("RandLoRA", "2502.00987"), ("Uni-LoRA", "2506.00799"))
NOTEBOOK = "notebooks/07_random_bases.py"
PROOFS = ("proofs/10-randlora-full-rank.md", "proofs/09-unilora-isometry.md", "proofs/01-eckart-young-mirsky.md")
ENGINE = "NumPy float64 solvers, torch float64 training (ignores --backend)"

METHODS = ("lora", "vera", "nola", "randlora", "unilora")

SCALES = {
    "quick": dict(m=24, budgets=[48, 96, 192], trained_budgets=[48, 192], k=3, noise=0.05, inner_rank=6,
                  steps=200, lrs=[1e-2, 1e-1], n_train=192, seeds=[0]),
    "full": dict(m=48, budgets=[96, 192, 384, 768], trained_budgets=[96, 192, 384, 768], k=4, noise=0.05,
                 inner_rank=8, steps=500, lrs=[1e-2, 3e-2, 1e-1, 3e-1], n_train=512, seeds=[0, 1]),
}

#: slack of claim 2 and 3 (errors are relative Frobenius norms in float64; ALS stops at relative decrease 1e-6)
ERR_ATOL = 1e-9


def _targets(cfg: dict, seed: int) -> dict:
    m = cfg["m"]
    return {"flat": make_target("flat", m, m, seed=seed),
            "lowrank": make_target("lowrank_noise", m, m, seed=seed, rank=cfg["k"], noise=cfg["noise"])}


def _adapter(method: str, m: int, config: dict, params: int, inner_rank: int, seed: int):
    """The adapter the expressivity solver's ``config`` describes (same rank / counts), seeded."""
    if method == "lora":
        return create("lora", m, m, rank=config["rank"], seed=seed)
    if method == "vera":
        return create("vera", m, m, rank=config["rank"], seed=seed)
    if method == "nola":
        return create("nola", m, m, rank=config["rank"], num_basis_a=config["k"], num_basis_b=config["l"],
                      seed=seed)
    if method == "randlora":
        return create("randlora", m, m, rank=config["rank"], seed=seed)
    if method == "unilora":
        return UniLoRA(m, m, rank=config["rank"], d=params, seed=seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _train_best(task, method: str, m: int, config: dict, params: int, cfg: dict, seed: int) -> dict:
    runs = []
    for lr in cfg["lrs"]:
        ad = _adapter(method, m, config, params, cfg["inner_rank"], seed)
        layer = reg.make_layer(task, ad)
        try:
            loss = reg.train(layer, task, cfg["steps"], lr)
        except ValueError:  # diverged at this learning rate: not a candidate
            continue
        runs.append(dict(lr=lr, train_loss=loss, test_loss=reg.relative_test_loss(layer, task),
                         delta_error=reg.delta_error(ad, task), params=ad.num_trainable))
    if not runs:
        raise ValueError(f"{method}: every learning rate in {cfg['lrs']} diverged")
    return reg.best_of(runs)


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    """Rows ``(part, seed, target, method, budget, params, error | test_loss, delta_error, lr, ...)``.

    ``part`` is ``"expressivity"`` (``error``, ``converged``) or ``"trained"`` (``test_loss``,
    ``delta_error``, ``lr``, ``train_loss``).  ``backend`` is ignored (the solvers are NumPy, the
    training torch float64).
    """
    cfg = SCALES[scale]
    m = cfg["m"]
    rows = []
    with reg.intra_op_threads(1 if str(device) == "cpu" else None):
        for s in cfg["seeds"]:
            s = seed + s
            for tname, target in _targets(cfg, s).items():
                task = None
                if cfg["trained_budgets"]:
                    delta = target.delta * np.sqrt(m)  # an update as large as W0 (‖W0‖_F ≈ √m)
                    task = reg.make_task(delta, n_train=cfg["n_train"], noise=0.0, seed=s, device=device)
                for method in METHODS:
                    for p in cfg["budgets"]:
                        res = best_error(method, target, p, seed=s, rank=cfg["inner_rank"])
                        rows.append(dict(part="expressivity", seed=s, target=tname, method=method, budget=p,
                                         params=res.params, error=res.error, converged=res.converged,
                                         config=dict(res.config)))
                        if task is None or p not in cfg["trained_budgets"] or res.params == 0:
                            continue
                        best = _train_best(task, method, m, res.config, res.params, cfg, s)
                        rows.append(dict(part="trained", seed=s, target=tname, method=method, budget=p,
                                         params=best["params"], test_loss=best["test_loss"],
                                         delta_error=best["delta_error"], train_loss=best["train_loss"],
                                         lr=best["lr"], expressivity_error=res.error))
    return rows


def _by(rows: list[dict], part: str, key: str) -> dict:
    """``{(target, method, budget): mean over seeds of key}`` for one part."""
    acc: dict = {}
    for r in rows:
        if r["part"] == part and (part != "expressivity" or r["params"] > 0):
            acc.setdefault((r["target"], r["method"], r["budget"]), []).append(r[key])
    return {k: float(np.mean(v)) for k, v in acc.items()}


PAPER_RAND = "RandLoRA: full-rank updates overcome LoRA's low-rank limit at equal parameters (abstract)"


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the claim is checked on (see :mod:`._evidence`); :func:`check` is their failures."""
    out = []
    err = _by(rows, "expressivity", "error")
    budgets = sorted({r["budget"] for r in rows if r["part"] == "expressivity"})
    n_flat = n_low = 0
    for p in budgets:
        lora_f, rand_f = err.get(("flat", "lora", p)), err.get(("flat", "randlora", p))
        if lora_f is not None and rand_f is not None:
            n_flat += 1
            out.append(Evidence("RandLoRA beats LoRA on the flat (full-rank) target", f"budget {p}", rand_f, "<",
                                lora_f, quantity="RandLoRA best error", against="LoRA best error", paper=PAPER_RAND,
                                message=f"flat target, budget {p}: RandLoRA {rand_f:.4f} does not beat LoRA "
                                        f"{lora_f:.4f}"))
        lora_l, rand_l = err.get(("lowrank", "lora", p)), err.get(("lowrank", "randlora", p))
        if lora_l is not None and rand_l is not None:
            n_low += 1
            out.append(Evidence("LoRA is at least as good as RandLoRA on the low-rank target", f"budget {p}", lora_l,
                                "<=", rand_l, ERR_ATOL, quantity="LoRA best error", against="RandLoRA best error",
                                tol_text="solver stopping tolerance", paper="Eckart–Young (proofs/01)",
                                message=f"low-rank target, budget {p}: LoRA {lora_l:.4f} worse than RandLoRA "
                                        f"{rand_l:.4f}"))
    out.append(Evidence("both targets have a budget where LoRA and RandLoRA are feasible", "all budgets",
                        min(n_flat, n_low), ">", 0, quantity="such budgets (fewer of the two targets)", against="0",
                        message="no budget where both LoRA and RandLoRA are feasible on both targets"))
    tr = {(r["target"], r["method"], r["budget"]): r["delta_error"] for r in rows if r["part"] == "trained"}
    for r in rows:
        if r["part"] == "trained" and r["method"] == "lora":
            out.append(Evidence("a trained LoRA never beats Eckart–Young", f"{r['target']}, budget {r['budget']}",
                                r["delta_error"], ">=", r["expressivity_error"], ERR_ATOL, quantity="trained ΔW error",
                                against="Eckart–Young error", tol_text="float64", paper="a theorem (proofs/01)",
                                message=f"{r['target']} budget {r['budget']}: trained LoRA {r['delta_error']:.6g} "
                                        f"below Eckart–Young {r['expressivity_error']:.6g}"))
    for (t, m, p), e in tr.items():
        if t == "flat" and m == "randlora" and ("flat", "lora", p) in tr:
            out.append(Evidence("trained with Adam, RandLoRA still beats LoRA on the flat target", f"budget {p}", e,
                                "<", tr[("flat", "lora", p)], quantity="trained RandLoRA ΔW error",
                                against="trained LoRA ΔW error", paper=PAPER_RAND, asserted=False))
    return out


def check(rows: list[dict]) -> list[str]:
    """The claim's problems on ``rows`` (empty: it holds): the failing asserted :func:`evidence`."""
    return problems(evidence(rows))


def table(rows: list[dict]) -> list[dict]:
    """One row per ``(target, method, budget)``: params, expressivity error, trained ΔW error and test loss
    (means over seeds; NaN where a part was not run or the method is infeasible)."""
    err = _by(rows, "expressivity", "error")
    par = _by(rows, "expressivity", "params")
    tde = _by(rows, "trained", "delta_error")
    tl = _by(rows, "trained", "test_loss")
    keys = dict.fromkeys((r["target"], r["method"], r["budget"]) for r in rows)
    return [dict(target=t, method=mth, budget=p, params=par.get((t, mth, p), 0.0),
                 error=err.get((t, mth, p), float("nan")), trained_delta_error=tde.get((t, mth, p), float("nan")),
                 trained_test_loss=tl.get((t, mth, p), float("nan"))) for t, mth, p in keys]


STYLE = {"lora": ("k", "o"), "vera": ("tab:green", "^"), "nola": ("tab:purple", "v"),
         "randlora": ("tab:red", "s"), "unilora": ("tab:blue", "D")}


def plot(rows: list[dict], path) -> list:
    """Left column: best (expressivity) error vs parameters; right: trained ΔW error; one row per target."""
    tab = table(rows)
    targets = list(dict.fromkeys(r["target"] for r in tab))
    fig, axes = plt.subplots(len(targets), 2, figsize=(9.5, 3.4 * len(targets) + 0.5), squeeze=False, sharex=True,
                             layout="constrained")
    for i, t in enumerate(targets):
        for mth, (c, mk) in STYLE.items():
            sel = sorted((r["params"], r["error"], r["trained_delta_error"]) for r in tab
                         if r["target"] == t and r["method"] == mth and r["params"] > 0)
            if not sel:
                continue
            ps, es, ts = zip(*sel)
            axes[i, 0].plot(ps, es, color=c, marker=mk, ms=4, label=mth)
            pts = [(p, v) for p, v in zip(ps, ts) if np.isfinite(v)]
            if pts:
                axes[i, 1].plot(*zip(*pts), color=c, marker=mk, ms=4, ls="--", label=f"_{mth}")
        axes[i, 0].set_title(f"{t}: best error (solver)", fontsize=9)
        axes[i, 1].set_title(f"{t}: trained (Adam) ΔW error", fontsize=9)
        ticks = sorted({r["budget"] for r in tab})
        for ax in axes[i]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("‖ΔW − ΔW*‖ / ‖ΔW*‖")
    for ax in axes[-1]:
        ax.set_xlabel("trainable parameters (budget; every method uses at most it)")
    figure_legend(fig, axes.ravel())
    fig.suptitle(TITLE, fontsize=10)
    return save(fig, path)
