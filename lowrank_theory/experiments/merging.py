r"""Figure: merging LoRA task vectors of docstring sub-tasks on MiniLM, one merge method at a time.

Task: the docstring classification task split into sub-tasks by module (:data:`TASKS`, three modules each), on
the real all-MiniLM-L6-v2 (offline; the first ``n_layers`` blocks at quick scale).  Each sub-task has its own head,
fitted by a linear probe on the frozen pretrained features and frozen; a LoRA (rank ``rank`` on the ``targets``
projections of every block, AdamW with linear decay) is trained per sub-task, and its
:math:`\Delta W_t = sB_tA_t` per layer is the task vector.  Every merge is evaluated the same way
(:class:`._merge_tasks.MergeEvaluator`): :math:`W_0 + \Delta W_{\text{merged}}` written into one pretrained
backbone, each sub-task scored with its own head.  Settings (the scaling :math:`\lambda` from ``lams``) are chosen
per method on the *merge set* (the first ``merge_set`` training examples of each sub-task), never on the test set.

Methods (:mod:`lowrank_theory.merging`; TIES, magnitude pruning and PCB rank and normalize over the whole
flattened model, as their authors do):

* ``pretrained`` (:math:`W_0`), ``individual:<t>`` (one task vector; on its own sub-task: the fine-tuned model);
* ``average`` (:math:`\frac1T\sum_t\Delta W_t`, the fixed interpolation rule) and ``task_arithmetic``
  (:math:`\lambda\sum_t\Delta W_t`);
* ``ties`` (density ``ties_density``), ``magnitude_prune`` (``prune_density``), ``pcb`` (ratio ``pcb_ratio``);
* ``dare_linear`` / ``dare_ties`` at the :math:`\lambda` chosen for task arithmetic / TIES, for every density of
  ``dare_densities`` (drop rate :math:`p = 1 - \rho`);
* ``cat`` (concatenated factors, exact: must equal task arithmetic) and ``svd`` (per layer the best rank-``rank``
  approximation of the task-arithmetic merge, from the factors); ``peft_linear`` (PEFT's factor-wise "linear":
  merging the :math:`B_t` and the :math:`A_t` separately adds cross terms, ``proofs/19-merging-factored-merges.md``);
* ``m2n2`` -- M2N2 on the fine-tuned models (whole adapted weights :math:`W_0 + \Delta W_t`, SLERP crossover
  with split points, the paper's setting), fitness = per-example correctness on the merge set, ``m2n2_steps``
  children; its best member is evaluated on the test set.

Must hold (:func:`check` fails otherwise): each fine-tuned model beats the pretrained model on its own sub-task;
task arithmetic of one task vector with weight 1 *is* that task's model (same ΔW, the same test accuracy, which
agrees with the adapter's own forward to within one example); ``cat`` equals task arithmetic and ``svd`` at rank
:math:`\sum_t r_t` equals it (float32 round-off).

The papers' claims, recorded as ``holds`` / ``partly`` / ``does not hold`` in ``kind="claim"`` rows (not failing
the run: at our scale a claim may simply not hold, and the rows say so): PCB ≥ TIES ≥ task arithmetic (PCB,
arXiv:2410.02396; TIES, arXiv:2306.01708); DARE keeps the accuracy of task arithmetic at drop rate 0.9 (within
``DARE_ATOL``; arXiv:2311.03099); M2N2 finds a better merge than a fixed rule (arXiv:2508.16204).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..merging import cat as cat_factors
from ..merging import (
    combine_lora,
    dare_linear,
    dare_ties,
    m2n2,
    magnitude_prune,
    merge_state_dicts,
    pcb,
    svd,
    task_arithmetic,
    ties,
)
from ._evidence import Evidence, problems
from ._merge_tasks import MergeEvaluator, build_subtasks, train_lora
from ._plot import plt, save
from ._regression import intra_op_threads

NAME = "merging"
TITLE = "Merging LoRA task vectors of docstring sub-tasks (MiniLM): task arithmetic, TIES, DARE, PCB, M2N2"
CLAIM = ("On LoRA task vectors of docstring sub-tasks, PCB ≥ TIES ≥ task arithmetic; DARE keeps task arithmetic's "
         "accuracy at drop rate 0.9; M2N2's evolved merge beats a fixed merging rule.  Recorded as holds / partly / "
         "does not hold; the run fails only on what must hold (one task vector merged alone is that task's model; "
         "cat and full-rank svd are exact).")

PAPERS = (("Parameter Competition Balancing for Model Merging", "2410.02396"),
          ("TIES-Merging: Resolving Interference When Merging Models", "2306.01708"),
          ("Editing Models with Task Arithmetic", "2212.04089"),
          ("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", "2311.03099"),
          ("Competition and Attraction Improve Model Fusion", "2508.16204"))
NOTEBOOK = "notebooks/11_merging.py"
PROOFS = ("proofs/19-merging-factored-merges.md",)
ENGINE = "torch float32 on --device, real MiniLM (ignores --backend)"

#: sub-task name -> standard-library modules (classes); pure-Python modules with 120+ docstrings each
TASKS = {
    "A": ("asyncio", "email", "logging"),
    "B": ("_pydecimal", "xml", "unittest"),
    "C": ("multiprocessing", "http", "mailbox"),
}
FIXED_RULES = ("average", "task_arithmetic", "ties", "magnitude_prune", "pcb", "dare_linear", "dare_ties")
GRID_METHODS = ("task_arithmetic", "ties", "magnitude_prune", "pcb")
VERDICTS = ("holds", "partly", "does not hold")
#: DARE "keeps the accuracy": within 2 points of task arithmetic's mean test accuracy (about 2 examples per
#: sub-task at quick scale)
DARE_ATOL = 0.02

SCALES = {
    "quick": dict(n_layers=1, tasks=["A", "B"], targets=["query", "value"], rank=4, steps=30, batch_size=16,
                  max_length=16, lr=3e-2, probe_wd=1e-2, shots=4, merge_set=16, lams=[0.5, 1.0, 1.5],
                  ties_density=0.2, prune_density=0.2, pcb_ratio=0.1, dare_densities=[0.5, 0.1, 0.01],
                  dare_seeds=1, m2n2_steps=16, seeds=[0]),
    "full": dict(n_layers=6, tasks=["A", "B", "C"], targets=["query", "key", "value", "attention.output.dense"],
                 rank=8, steps=150, batch_size=16, max_length=24, lr=1e-2, probe_wd=1e-2, shots=4, merge_set=24,
                 lams=[0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0], ties_density=0.2, prune_density=0.2, pcb_ratio=0.1,
                 dare_densities=[0.5, 0.3, 0.1, 0.05, 0.01], dare_seeds=3, m2n2_steps=200, seeds=[0, 1]),
}


# ============================================================================ merges of dicts
def _merged(fn, deltas: list[dict], *args, **kw) -> dict:
    return merge_state_dicts(fn, deltas, *args, scope="global", **kw)


def _per_layer(subs, fn) -> dict:
    """``{layer: fn([(B_t, A_t) for each task]) -> (B, A)}`` as dense ΔW = B @ A (384-wide layers)."""
    out = {}
    for k in subs[0].factors:
        B, A = fn([s.factors[k] for s in subs])
        out[k] = B @ A
    return out


def _rel(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))
    den = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return num / den if den > 0 else num


# ============================================================================ run
def _rows_for(ev, seed, method, deltas, subs, lam=math.nan, density=math.nan, test=True, merge=True,
              **extra) -> list[dict]:
    """Rows (one per sub-task, plus "mean") of one merge: the merge set where a choice reads it (``merge``), the
    test split for the reported settings (``test``); NaN otherwise."""
    merge_acc = ev.accuracies(deltas, "merge") if merge else [math.nan] * len(subs)
    test_acc = ev.accuracies(deltas, "test") if test else [math.nan] * len(subs)
    rows = [dict(kind="accuracy", seed=seed, method=method, lam=lam, density=density, task=s.name,
                 merge_accuracy=m, test_accuracy=t, selected=test, **extra)
            for s, m, t in zip(subs, merge_acc, test_acc)]
    rows.append(dict(kind="accuracy", seed=seed, method=method, lam=lam, density=density, task="mean",
                     merge_accuracy=float(np.mean(merge_acc)), test_accuracy=float(np.mean(test_acc)),
                     selected=test, **extra))
    return rows


def _scaled(d: dict, lam: float) -> dict:
    return {k: lam * v for k, v in d.items()}


def _grid(ev, seed, method, unit, subs, lams, density=math.nan) -> tuple[list[dict], float]:
    """Rows of ``λ · unit`` for every λ on the merge set, then the test split at the best λ (first on ties).

    Every grid method is linear in a common weight λ (task arithmetic and magnitude pruning trivially, TIES with
    PEFT's weighting and PCB because λ only multiplies the task vectors in their final weighted sum), so the merge
    is computed once with weight 1 and scaled."""
    rows = []
    for lam in lams:
        rows += _rows_for(ev, seed, method, _scaled(unit, lam), subs, lam=lam, density=density, test=False)
    means = [r for r in rows if r["task"] == "mean"]
    best = max(means, key=lambda r: r["merge_accuracy"])["lam"]
    rows = [r for r in rows if r["lam"] != best]
    rows += _rows_for(ev, seed, method, _scaled(unit, best), subs, lam=best, density=density)
    return rows, best


def _run_seed(cfg: dict, seed: int, device: str) -> list[dict]:
    t0 = time.perf_counter()
    subs = build_subtasks({n: TASKS[n] for n in cfg["tasks"]}, cfg["n_layers"], cfg["max_length"],
                          shots=cfg["shots"], merge_set=cfg["merge_set"], probe_wd=cfg["probe_wd"], seed=seed,
                          device=device)
    for i, s in enumerate(subs):
        train_lora(s, cfg["targets"], cfg, seed * 1000 + i, device)
    t_train = time.perf_counter() - t0
    ev = MergeEvaluator(subs, cfg["n_layers"], device)
    deltas = [s.deltas for s in subs]
    keys = list(subs[0].deltas)
    T = len(subs)
    ones = [1.0] * T
    rows: list[dict] = []
    rows += _rows_for(ev, seed, "pretrained", None, subs)
    for s in subs:
        rows += _rows_for(ev, seed, f"individual:{s.name}", s.deltas, subs)
    unit = {"task_arithmetic": _merged(task_arithmetic, deltas, ones),
            "ties": _merged(ties, deltas, ones, cfg["ties_density"]),
            "magnitude_prune": _merged(magnitude_prune, deltas, ones, cfg["prune_density"]),
            "pcb": _merged(pcb, deltas, ones, cfg["pcb_ratio"])}
    rows += _rows_for(ev, seed, "average", _scaled(unit["task_arithmetic"], 1.0 / T), subs, lam=1.0 / T)
    lam = {}
    dens = dict(task_arithmetic=math.nan, ties=cfg["ties_density"], magnitude_prune=cfg["prune_density"],
                pcb=cfg["pcb_ratio"])
    for m in GRID_METHODS:
        grid_rows, lam[m] = _grid(ev, seed, m, unit[m], subs, cfg["lams"], dens[m])
        rows += grid_rows
    for d in cfg["dare_densities"]:
        for m, fn in (("dare_linear", dare_linear), ("dare_ties", dare_ties)):
            base = "task_arithmetic" if m == "dare_linear" else "ties"
            runs = [_rows_for(ev, seed, m, _merged(fn, deltas, [lam[base]] * T, d, seed=seed * 100 + k), subs,
                              lam=lam[base], density=d, merge=False) for k in range(cfg["dare_seeds"])]
            for group in zip(*runs):  # mean over mask seeds, one row per task
                r = dict(group[0])
                r["merge_accuracy"] = float(np.mean([g["merge_accuracy"] for g in group]))
                r["test_accuracy"] = float(np.mean([g["test_accuracy"] for g in group]))
                rows.append(r)
    ws = [lam["task_arithmetic"]] * T
    ta = _scaled(unit["task_arithmetic"], ws[0])
    cat = _per_layer(subs, lambda f: cat_factors(f, ws))
    rows += _rows_for(ev, seed, "cat", cat, subs, lam=ws[0], merge=False)
    r_total = sum(s.factors[keys[0]][1].shape[0] for s in subs)
    full = _per_layer(subs, lambda f: svd(f, r_total, ws))
    rows += _rows_for(ev, seed, "svd", _per_layer(subs, lambda f: svd(f, cfg["rank"], ws)), subs, lam=ws[0],
                      density=float(cfg["rank"]), merge=False)
    factorwise = _per_layer(subs, lambda f: combine_lora(f, ws, "linear"))
    rows += _rows_for(ev, seed, "peft_linear", factorwise, subs, lam=ws[0], merge=False)
    # M2N2 on the fine-tuned models (whole adapted weights), fitness: merge-set correctness on every sub-task
    seeds_full = [{k: ev.W0[k] + s.deltas[k] for k in keys} for s in subs]
    res = m2n2(seeds_full, lambda p: np.concatenate(ev.scores(p, "merge", full=True)), steps=cfg["m2n2_steps"],
               archive_size=2 * T, seed=seed)
    best = {k: res.best[k] - ev.W0[k] for k in keys}
    rows += _rows_for(ev, seed, "m2n2", best, subs, m2n2_evaluations=T + len(res.history))
    # what must hold, as numbers
    checks = []
    for s in subs:
        alone = _merged(task_arithmetic, [s.deltas], [1.0])
        same = max(float((alone[k] - s.deltas[k]).abs().max()) for k in keys)
        acc = next(r["test_accuracy"] for r in rows if r["method"] == f"individual:{s.name}" and r["task"] == s.name)
        checks += [dict(kind="check", seed=seed, name=f"single_task_delta_diff:{s.name}", value=same),
                   dict(kind="check", seed=seed, name=f"adapter_forward_accuracy:{s.name}",
                        value=s.adapter_test_accuracy, written=acc, n_test=int(s.task.test["labels"].shape[0])),
                   dict(kind="check", seed=seed, name=f"probe_merge_accuracy:{s.name}",
                        value=float(s.probe["test_accuracy"]))]
    checks += [dict(kind="check", seed=seed, name="cat_vs_task_arithmetic", value=_rel(cat, ta)),
               dict(kind="check", seed=seed, name="svd_full_rank_vs_task_arithmetic", value=_rel(full, ta)),
               dict(kind="check", seed=seed, name="peft_linear_vs_task_arithmetic", value=_rel(factorwise, ta)),
               dict(kind="check", seed=seed, name="m2n2_best_merge_score", value=float(res.scores.mean(axis=1).max()),
                    seeds=[next(r["merge_accuracy"] for r in rows if r["method"] == f"individual:{s.name}"
                                and r["task"] == "mean") for s in subs]),
               dict(kind="check", seed=seed, name="seconds", value=time.perf_counter() - t0, train=t_train,
                    evaluations=ev.evaluations)]
    return rows + checks


def run(scale: str = "quick", *, backend: str = "numpy", device: str = "cpu", seed: int = 0) -> list[dict]:
    """Rows of three kinds: ``kind="accuracy"`` (seed, method, lam, density, task or "mean", merge_accuracy,
    test_accuracy, selected), ``kind="check"`` (the numbers of what must hold) and ``kind="claim"`` (one per paper
    claim: claim, verdict, detail).  ``backend`` is ignored (training is torch, float32)."""
    cfg = SCALES[scale]
    rows: list[dict] = []
    with intra_op_threads(1 if str(device) == "cpu" else None):
        for s in cfg["seeds"]:
            rows += _run_seed(cfg, seed + s, device)
    return rows + claims(rows)


# ============================================================================ claims
def table(rows: list[dict], split: str = "test_accuracy") -> dict[str, dict[str, float]]:
    """``{method: {task: accuracy}}`` of the selected settings, averaged over seeds (DARE: one entry per density,
    ``dare_linear@0.1``)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.get("kind") != "accuracy" or not r["selected"]:
            continue
        m = r["method"] if r["method"] not in ("dare_linear", "dare_ties") else f"{r['method']}@{r['density']:g}"
        acc.setdefault(m, {}).setdefault(r["task"], []).append(r[split])
    return {m: {t: float(np.mean(v)) for t, v in d.items()} for m, d in acc.items()}


def claims(rows: list[dict]) -> list[dict]:
    """One ``kind="claim"`` row per paper claim with its verdict on the mean test accuracies (over seeds)."""
    tab = {m: d["mean"] for m, d in table(rows).items()}
    out = []
    pcb_, ties_, ta = tab["pcb"], tab["ties"], tab["task_arithmetic"]
    n = int(pcb_ >= ties_) + int(ties_ >= ta)
    verdict = VERDICTS[2 - n]
    note = ""
    if pcb_ == ties_ == ta:  # satisfied only as equalities: the sub-tasks do not separate the methods
        verdict, note = "partly", " (all equal: no separation at this scale)"
    out.append(dict(kind="claim", claim="PCB >= TIES >= task arithmetic", verdict=verdict,
                    detail=f"PCB {pcb_:.3f}, TIES {ties_:.3f}, task arithmetic {ta:.3f}{note}"))
    dare = {float(k.split("@")[1]): v for k, v in tab.items() if k.startswith("dare_linear@")}
    ok = {d: ta - v <= DARE_ATOL for d, v in dare.items()}
    if any(ok[d] for d in ok if d <= 0.1 + 1e-12):
        verdict = "holds"
    elif any(ok[d] for d in ok if d <= 0.5 + 1e-12):
        verdict = "partly"
    else:
        verdict = "does not hold"
    out.append(dict(kind="claim", claim="DARE keeps task arithmetic's accuracy at drop rate 0.9", verdict=verdict,
                    detail=", ".join(f"p={1 - d:g}: {v:.3f}" for d, v in sorted(dare.items(), reverse=True))
                    + f" (task arithmetic {ta:.3f}, tolerance {DARE_ATOL})"))
    fixed = {m: tab[m] for m in tab if m in FIXED_RULES or m.split("@")[0] in FIXED_RULES}
    best_rule = max(fixed, key=fixed.get)
    mm, avg = tab["m2n2"], tab["average"]
    verdict = "holds" if mm >= fixed[best_rule] else ("partly" if mm >= avg else "does not hold")
    out.append(dict(kind="claim", claim="M2N2 finds a better merge than a fixed rule", verdict=verdict,
                    detail=f"M2N2 {mm:.3f}, average {avg:.3f}, best fixed rule {best_rule} {fixed[best_rule]:.3f}"))
    return out


def evidence(rows: list[dict]) -> list[Evidence]:
    """The comparisons the run is judged on (see :mod:`._evidence`): what must hold is asserted, the papers'
    claims are reported beside them (a claim that does not hold at this scale makes the run hold partly)."""
    out: list[Evidence] = []
    acc = [r for r in rows if r.get("kind") == "accuracy"]
    want = {"pretrained", "average", "task_arithmetic", "ties", "magnitude_prune", "pcb", "dare_linear", "dare_ties",
            "cat", "svd", "peft_linear", "m2n2"}
    have = {r["method"] for r in acc}
    out.append(Evidence("every method was run", "methods", len(want & have), "==", len(want),
                        quantity="methods with rows", against="methods", message=f"no rows for {sorted(want - have)}"))
    if not acc:
        return out

    def bad(x: float, required: bool) -> bool:
        return (required or not math.isnan(x)) and not 0.0 <= x <= 1.0

    n_bad = sum(bad(r["merge_accuracy"], False) or bad(r["test_accuracy"], r["selected"]) for r in acc)
    out.append(Evidence("accuracies are probabilities", "all rows", n_bad, "==", 0,
                        quantity="accuracies outside [0, 1]", against="0",
                        message=f"{n_bad} accuracies outside [0, 1]"))
    for seed in sorted({r["seed"] for r in acc}):
        sel = [r for r in acc if r["seed"] == seed]
        for t in sorted({r["task"] for r in sel} - {"mean"}):
            own = next(r["test_accuracy"] for r in sel if r["method"] == f"individual:{t}" and r["task"] == t)
            pre = next(r["test_accuracy"] for r in sel if r["method"] == "pretrained" and r["task"] == t)
            out.append(Evidence("each fine-tuned adapter beats the pretrained model on its own sub-task",
                                f"seed {seed}, sub-task {t}", own, ">", pre, quantity="fine-tuned accuracy",
                                against="pretrained accuracy",
                                message=f"seed {seed}: the fine-tuned model of {t} ({own:.3f}) does not beat the "
                                        f"pretrained model ({pre:.3f}) on its own sub-task"))
    for r in (r for r in rows if r.get("kind") == "check"):
        name, v, case = r["name"], r["value"], f"seed {r['seed']}, {r['name']}"
        if name.startswith("single_task_delta_diff"):
            out.append(Evidence("one task vector merged alone is that task's model", case, v, "==", 0.0,
                                quantity="max |merged - task vector|", against="0 (exact)",
                                message=f"seed {r['seed']}: one task vector merged alone is not that task vector "
                                        f"({name} {v})"))
        elif name.startswith("adapter_forward_accuracy"):
            out.append(Evidence("W0 + ΔW written into the backbone computes what the adapter computes", case,
                                abs(v - r["written"]), "<=", 1.0 / r["n_test"], tol=1e-12,
                                quantity="|accuracy difference|", against="one test example",
                                tol_text="one example: float32 rounding can flip a tie",
                                message=f"seed {r['seed']}: {name}: the adapter's forward ({v:.3f}) and W0 + ΔW "
                                        f"written into the backbone ({r['written']:.3f}) disagree by more than one "
                                        f"example"))
        elif name == "cat_vs_task_arithmetic":
            out.append(Evidence("cat of the LoRA factors is task arithmetic, exactly", case, v, "<=", 1e-5,
                                quantity="relative difference", against="float32 round-off",
                                tol_text="float32 products of the same factors",
                                message=f"seed {r['seed']}: cat differs from task arithmetic by {v:.2e} (relative)"))
        elif name == "svd_full_rank_vs_task_arithmetic":
            out.append(Evidence("the full-rank svd merge is task arithmetic", case, v, "<=", 1e-4,
                                quantity="relative difference", against="float32 round-off",
                                tol_text="float32 QR + SVD of the r×r core",
                                message=f"seed {r['seed']}: full-rank svd differs from task arithmetic by {v:.2e} "
                                        f"(relative)"))
    verdicts = [r for r in rows if r.get("kind") == "claim"]
    n_ok = sum(r.get("verdict") in VERDICTS for r in verdicts)
    out.append(Evidence("each paper claim has a verdict row", "claim rows",
                        n_ok if len(verdicts) == 3 else -1, "==", 3, quantity="claim rows with a verdict", against="3",
                        message=f"expected three claim rows with a verdict in {VERDICTS}, got {verdicts}"))
    tab = {m: d["mean"] for m, d in table(rows).items()}
    if {"pcb", "ties", "task_arithmetic"} <= set(tab):
        paper = "PCB-merging (2410.02396): PCB > TIES > task arithmetic on every benchmark it reports"
        out.append(Evidence("PCB >= TIES >= task arithmetic", "PCB vs TIES", tab["pcb"], ">=", tab["ties"],
                            quantity="PCB mean accuracy", against="TIES", paper=paper, asserted=False))
        out.append(Evidence("PCB >= TIES >= task arithmetic", "TIES vs task arithmetic", tab["ties"], ">=",
                            tab["task_arithmetic"], quantity="TIES mean accuracy", against="task arithmetic",
                            paper=paper, asserted=False))
    dare_09 = tab.get("dare_linear@0.1")
    if dare_09 is not None and "task_arithmetic" in tab:
        out.append(Evidence("DARE keeps task arithmetic's accuracy at drop rate 0.9", "dare_linear, p = 0.9",
                            tab["task_arithmetic"] - dare_09, "<=", DARE_ATOL, quantity="accuracy lost to dropping",
                            against="allowed loss", tol_text="2 points (about 2 examples per sub-task)",
                            paper="DARE (2311.03099): drop rates up to 0.9 (0.99 for large models) keep accuracy",
                            asserted=False))
    fixed = {m: v for m, v in tab.items() if m in FIXED_RULES or m.split("@")[0] in FIXED_RULES}
    if "m2n2" in tab and fixed:
        best_rule = max(fixed, key=fixed.get)
        out.append(Evidence("M2N2 finds a better merge than a fixed rule", f"best fixed rule: {best_rule}",
                            tab["m2n2"], ">=", fixed[best_rule], quantity="M2N2 mean accuracy",
                            against=f"{best_rule} mean accuracy",
                            paper="M2N2 (2508.16204): evolved merges beat fixed merging rules", asserted=False))
    return out


def check(rows: list[dict]) -> list[str]:
    """What must hold: the failing asserted :func:`evidence` (the papers' claims are reported, not checked)."""
    return problems(evidence(rows))


def summary(rows: list[dict]) -> list[dict]:
    """The selected settings, one row per method: test accuracy per sub-task and mean, merge-set mean, λ."""
    tab, merge = table(rows), table(rows, "merge_accuracy")
    lams = {}
    for r in rows:
        if r.get("kind") == "accuracy" and r["selected"] and r["task"] == "mean":
            m = r["method"] if r["method"] not in ("dare_linear", "dare_ties") else f"{r['method']}@{r['density']:g}"
            lams[m] = r["lam"]
    return [dict(method=m, lam=lams.get(m, math.nan), merge_mean=merge[m]["mean"],
                 **{f"test_{t}": v for t, v in d.items()}) for m, d in tab.items()]


def plot(rows: list[dict], path) -> list:
    """Test accuracy per sub-task of each method's selected setting; DARE's accuracy against the drop rate."""
    tab = table(rows)
    tasks = [t for t in next(iter(tab.values())) if t != "mean"]
    order = ["pretrained", *sorted(m for m in tab if m.startswith("individual:")), "average", "task_arithmetic",
             "ties", "magnitude_prune", "pcb", "cat", "svd", "peft_linear", "m2n2"]
    order = [m for m in order if m in tab]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw=dict(width_ratios=[3, 1]))
    x = np.arange(len(order))
    w = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        axes[0].bar(x + (i - (len(tasks) - 1) / 2) * w, [tab[m][t] for m in order], w, label=f"sub-task {t}")
    axes[0].plot(x, [tab[m]["mean"] for m in order], "k*", ms=9, label="mean")
    axes[0].set_xticks(x, order, rotation=35, ha="right", fontsize=8)
    axes[0].set_ylabel("test accuracy (own head)")
    lowest = min(v for m in order for v in tab[m].values())
    axes[0].set_ylim(max(0.0, lowest - 0.1), 1.0)
    axes[0].legend(fontsize=7)
    for m, style in (("dare_linear", "o-"), ("dare_ties", "s--")):
        pts = sorted((1 - float(k.split("@")[1]), v["mean"]) for k, v in tab.items() if k.startswith(m + "@"))
        if pts:
            axes[1].plot([p for p, _ in pts], [a for _, a in pts], style, label=m)
    axes[1].axhline(tab["task_arithmetic"]["mean"], color="0.4", ls=":", label="task arithmetic")
    axes[1].set_xlabel("DARE drop rate p")
    axes[1].set_ylabel("mean test accuracy")
    axes[1].legend(fontsize=7)
    fig.suptitle(TITLE, fontsize=10)
    return save(fig, path)
