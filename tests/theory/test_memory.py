"""``peak_tensor_bytes``: exact on known allocations, fake equals real, and issue #8's memory target.

The target ("peak memory no higher than PEFT's for the same method") is checked at the issue's
compute-bound size, d = 4096 with 8192 tokens in bfloat16, by the fake-tensor count (no arithmetic,
so it runs on the CPU in milliseconds).  Byte counts are exact integers: no tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_theory.adapters.peers import PEFT_PEERS
from lowrank_theory.theory.memory import peak_tensor_bytes, step_peak_bytes
from tests.adapters.contract import adapted_layer

MiB = 1 << 20


def _known():
    a = torch.empty(MiB, dtype=torch.uint8)
    b = torch.empty(2 * MiB, dtype=torch.uint8)
    del a  # 3 MiB were alive together
    v = b[:10]  # a view: no new storage
    v.add_(1)  # in place: no new storage
    c = torch.empty(MiB, dtype=torch.uint8)  # 3 MiB again, not 4
    return b, c


@pytest.mark.parametrize("fake", [True, False])
def test_known_allocations_give_the_exact_peak(fake):
    assert peak_tensor_bytes(_known, fake=fake) == 3 * MiB


def test_negative_control_a_kept_tensor_raises_the_peak():
    def keep():
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        c = torch.empty(MiB, dtype=torch.uint8)
        return a, b, c

    assert peak_tensor_bytes(keep) == 4 * MiB


def test_existing_tensors_are_not_counted():
    w = torch.zeros(MiB, dtype=torch.uint8)
    assert peak_tensor_bytes(lambda: w.add_(1)) == 0  # in place on a tensor made outside
    assert peak_tensor_bytes(lambda: w + 1) == MiB


@pytest.mark.parametrize("name", ["lora", "dora", "fourierft"])
def test_fake_count_equals_the_real_count_for_a_training_step(name):
    cfg = {"n_frequency": 30, "path": "dense"} if name == "fourierft" else {"rank": 4}
    layer = adapted_layer(name, cfg, 48, 32)

    step_peak_bytes(layer, 64, 48, fake=False)  # steady state: caches a first call builds (DoRA's ‖W0‖² per row)
    real = step_peak_bytes(layer, 64, 48, fake=False)
    assert real > 64 * 48 * 4  # at least x's gradient
    assert step_peak_bytes(layer, 64, 48) == real
    for p in layer.parameters():
        p.grad = None


# ----------------------------------------------------------------------------- issue #8
D, TOKENS = 4096, 8192
class _One(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("method", list(PEFT_PEERS))
def test_peak_memory_is_no_higher_than_peft_at_the_issue_size(method):
    """LoCA's peer is PEFT's FourierFT (PEFT has no LoCA)."""
    peft = pytest.importorskip("peft")
    name, cfg, peft_cfg, _ = PEFT_PEERS[method]
    ours = adapted_layer(name, cfg, D, D, dtype=torch.bfloat16)
    theirs = peft.get_peft_model(_One(copy.deepcopy(ours.base)), peft_cfg(peft, ["proj"])).to(torch.bfloat16)
    mine, peers = (step_peak_bytes(m, TOKENS, D, dtype=torch.bfloat16) for m in (ours, theirs))
    assert 0 < mine <= peers, (method, mine / MiB, peers / MiB)


@pytest.mark.parametrize("name", ["dora", "loca"])
def test_a_fake_run_leaves_no_fake_tensor_in_a_cache(name):
    """DoRA caches ‖W0‖² per row and the DCT caches its twiddles; a shape-only run must fill neither
    with fake tensors, or the next real call would mix fake and real.  Sizes no other test uses, so
    the DCT cache is empty for them when the fake run comes first."""
    cfg = {"rank": 3} if name == "dora" else {"n_frequency": 20, "path": "dense"}
    layer = adapted_layer(name, cfg, 52, 36)

    assert step_peak_bytes(layer, 5, 52) > 0
    for p in layer.parameters():
        p.grad = None  # gradients accumulated by the fake run are fake (documented)
    y = layer(torch.ones(5, 52))
    y.sum().backward()
    assert type(y) is torch.Tensor and torch.isfinite(y).all()
    assert all(type(p.grad) is torch.Tensor for p in layer.parameters() if p.requires_grad)
