"""The random-bases experiment at a tiny size: claims hold, counts agree between the solver and the
real adapters, LoRA's flat-target error matches its closed form, and swapped targets are caught."""

from __future__ import annotations

import math

import pytest

from lowrank_theory.adapters import get
from lowrank_theory.experiments import random_bases
from tests.experiments import run_tiny

TINY = dict(m=12, budgets=[24, 48], trained_budgets=[48], k=2, noise=0.05, inner_rank=3,
            steps=60, lrs=[1e-1], n_train=48, seeds=[0])


@pytest.fixture(scope="module")
def rows():
    return run_tiny(random_bases, TINY)


def test_claims_hold(rows):
    assert random_bases.check(rows) == []


def test_every_method_within_budget_and_trained_count_matches(rows):
    expr = {(r["target"], r["method"], r["budget"]): r for r in rows if r["part"] == "expressivity"}
    assert {k[1] for k in expr} == set(random_bases.METHODS)
    for r in expr.values():
        assert 0 <= r["params"] <= r["budget"]
    trained = [r for r in rows if r["part"] == "trained"]
    assert {(r["target"], r["method"]) for r in trained} == {(t, m) for t in ("flat", "lowrank")
                                                              for m in random_bases.METHODS}
    m = TINY["m"]
    for r in trained:
        e = expr[(r["target"], r["method"], r["budget"])]
        # the real adapter built from the solver's config trains exactly the solver's count,
        # and that count is the adapter's closed form
        assert r["params"] == e["params"]
        cfg = dict(e["config"])
        if r["method"] == "nola":
            cfg = dict(rank=cfg["rank"], num_basis_a=cfg["k"], num_basis_b=cfg["l"])
        if r["method"] == "unilora":
            cfg = dict(rank=cfg["rank"], d=e["params"])
        assert get(r["method"]).param_count(m, m, **cfg) == r["params"]
        assert 0.0 <= r["delta_error"] and math.isfinite(r["test_loss"])


def test_lora_flat_error_is_the_closed_form(rows):
    # flat spectrum: the best rank-r error is sqrt(1 - r/min(m, n)) (independent of the SVD code)
    m = TINY["m"]
    for r in rows:
        if r["part"] == "expressivity" and r["target"] == "flat" and r["method"] == "lora":
            rank = r["budget"] // (2 * m)
            assert r["error"] == pytest.approx(math.sqrt(1 - rank / m), rel=1e-10)


def test_negative_control_swapped_targets_fail(rows):
    swap = {"flat": "lowrank", "lowrank": "flat"}
    swapped = [dict(r, target=swap[r["target"]]) for r in rows]
    problems = random_bases.check(swapped)
    assert any("flat target" in p for p in problems) and any("low-rank target" in p for p in problems)


def test_negative_control_lora_beating_eckart_young_is_caught(rows):
    bad = [dict(r) for r in rows]
    r = next(r for r in bad if r["part"] == "trained" and r["method"] == "lora")
    r["delta_error"] = r["expressivity_error"] * 0.99
    assert any("below Eckart–Young" in p for p in random_bases.check(bad))
