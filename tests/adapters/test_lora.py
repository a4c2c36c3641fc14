"""LoRA against the contract, plus its scale conventions."""

from __future__ import annotations

import pytest

from lowrank_theory import adapters
from tests.adapters.contract import AdapterContract


class TestLoRA(AdapterContract):
    name = "lora"
    cfg = {"rank": 3, "alpha": 6.0}


class TestRsLoRA(AdapterContract):
    name = "lora"
    cfg = {"rank": 4, "alpha": 8.0, "rslora": True}


def test_scales():
    assert adapters.create("lora", 10, 10, rank=4, alpha=8).scale == pytest.approx(2.0)
    assert adapters.create("lora", 10, 10, rank=4, alpha=8, rslora=True).scale == pytest.approx(4.0)


def test_rank_too_large():
    with pytest.raises(ValueError, match="rank"):
        adapters.create("lora", 5, 7, rank=6)
