"""The LoRA-Squeeze experiment at a tiny size: its claims hold, its rows are consistent, and a
wrong compressor (keep the first r factor columns instead of the top-r SVD) is caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_theory.adapters.lowrank import LoRA
from lowrank_theory.experiments import squeeze
from tests.experiments import run_tiny

TINY = dict(m=12, n=10, beta=0.4, r_src=4, targets=[1, 2], budgets=[40], ft_frac=1 / 4, events=2,
            anneal_frac=0.5, n_train=48, noise=0.05, lr=3e-2, seeds=[0])


@pytest.fixture(scope="module")
def rows():
    return run_tiny(squeeze, TINY)


def test_claims_hold(rows):
    assert squeeze.check(rows) == []


def test_rows_are_consistent(rows):
    variants = {(r["variant"], r["rank"]) for r in rows}
    expected = {("source", TINY["r_src"])} | {(v, k) for v in ("direct", "post", "post_ft", "anneal")
                                              for k in TINY["targets"]}
    assert variants == expected
    m, n = TINY["m"], TINY["n"]
    for r in rows:
        assert r["params"] == r["rank"] * (m + n)  # LoRA's count: the squeeze really changed the rank
        assert 0.0 <= r["floor"] < 1.0
        if r["variant"] == "anneal":
            assert r["schedule"][-1] == r["rank"] and r["schedule"] == sorted(r["schedule"], reverse=True)
    # the floor is Eckart–Young of the planted ΔW*: rank 1 keeps less than rank 2
    fl = {r["rank"]: r["floor"] for r in rows if r["variant"] == "direct"}
    assert fl[1] > fl[2]


def test_check_resolves_a_small_eckart_young_gap(rows):
    # float64 squeeze is exact to ~1e-15 relative; a 1e-6 relative error must be reported
    posts = [r for r in rows if r["variant"] == "post"]
    assert all(abs(r["squeeze_error"] - r["ey_tail"]) <= 1e-12 * r["source_norm"] for r in posts)
    bad = [dict(r) for r in rows]
    post = next(r for r in bad if r["variant"] == "post")
    post["squeeze_error"] += 1e-6 * post["source_norm"]
    assert any("Eckart–Young tail" in p for p in squeeze.check(bad))


def _first_columns(adapter: LoRA, target_rank: int, **_) -> LoRA:
    """A plausible but wrong compressor: keep the first r columns of B and rows of A."""
    out = LoRA(adapter.d_out, adapter.d_in, rank=target_rank).to(adapter.B)
    with torch.no_grad():
        out.B.copy_(adapter.scale * adapter.B[:, :target_rank] / out.scale)
        out.A.copy_(adapter.A[:target_rank])
    return out


def test_negative_control_wrong_compressor_is_caught(monkeypatch):
    monkeypatch.setitem(squeeze.SCALES, "tiny", TINY)
    monkeypatch.setattr(squeeze, "squeeze_lora", _first_columns)
    problems = squeeze.check(squeeze.run("tiny"))
    assert any("Eckart–Young tail" in p for p in problems), problems


def test_negative_control_worse_variant_is_caught(rows):
    bad = [dict(r) for r in rows]
    for r in bad:
        if r["variant"] == "post_ft":
            direct = next(d for d in rows if d["variant"] == "direct" and d["rank"] == r["rank"])
            r["test_loss"] = 1.2 * direct["test_loss"] + 0.01
    problems = squeeze.check(bad)
    assert len(problems) == len(TINY["targets"]) and all("post_ft" in p for p in problems)
    assert np.isfinite([r["test_loss"] for r in rows]).all()
