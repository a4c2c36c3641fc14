"""VeRA, RandLoRA and Uni-LoRA against PEFT 0.21 on a tiny two-layer model (CPU, float64).

For each method PEFT's ``get_peft_model`` adapts a tall (14 x 10) and a wide (6 x 14) layer;
we build our adapters for the same layers, check what must agree *without copying* (VeRA's
frozen pair from the same seed, every init, Uni-LoRA's normalization of PEFT's indices), then
copy PEFT's tensors into ours, move PEFT's trainable tensors off their init, copy them too,
and compare ΔW and the model outputs.

Tolerance: both sides compute in float64 from identical float64 numbers and differ only in
the order of a few short sums and products of O(1) values, so ``tol(float64)`` (1e-10
relative, see tests/conftest.py) is met with orders of magnitude to spare.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.projection import UniLoRA, UniLoRAShared
from lowrank_theory.adapters.random_basis import RandLoRA, VeRA
from tests.conftest import tol

peft = pytest.importorskip("peft")

F64 = tol(torch.float64)
NAMES = ("up", "down")
LARGEST = (14, 14)  # elementwise max of (d_out, d_in) over the two layers: PEFT's shared-basis size


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 14)
        self.down = nn.Linear(14, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def build(config, make_adapter):
    """PEFT model and our copy of it, both float64; ``make_adapter(name, peft_layer) -> Adapter``."""
    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base).double()
    pm = peft.get_peft_model(base, config).double()
    pairs = {}
    for name in NAMES:
        p_layer = getattr(pm.base_model.model, name)
        ad = make_adapter(name, p_layer)
        wrapped = AdaptedLinear(getattr(ours, name), ad.double())
        setattr(ours, name, wrapped)
        pairs[name] = (p_layer, wrapped.adapter)
    return pm, ours, pairs


def perturb_(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype))


def x_batch():
    return torch.randn(4, 3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def check_same_model(pm, ours, pairs, delta_of_ours=lambda ad: ad.delta_weight()):
    for p_layer, ad in pairs.values():
        torch.testing.assert_close(delta_of_ours(ad), p_layer.get_delta_weight("default"), **F64)
    x = x_batch()
    torch.testing.assert_close(ours(x), pm(x), **F64)


# ----------------------------------------------------------------------------- VeRA
def test_vera_matches_peft():
    cfg = peft.VeraConfig(r=4, target_modules=list(NAMES), projection_prng_key=7, d_initial=0.3)
    pm, ours, pairs = build(
        cfg, lambda _, pl: VeRA(pl.out_features, pl.in_features, rank=4, seed=7, d_initial=0.3, basis_shape=LARGEST)
    )
    x = x_batch()
    with pm.disable_adapter():
        y_base = pm(x)
    torch.testing.assert_close(ours(x), y_base, rtol=0, atol=0)  # identity at init, both
    for p_layer, ad in pairs.values():
        # same seed -> the same frozen pair, bit for bit (no copy)
        assert torch.equal(ad.vera_A, p_layer.vera_A["default"][:, : ad.d_in])
        assert torch.equal(ad.vera_B, p_layer.vera_B["default"][: ad.d_out, :])
        assert torch.equal(ad.b, p_layer.vera_lambda_b["default"])
        assert torch.equal(ad.d, p_layer.vera_lambda_d["default"])
        perturb_([p_layer.vera_lambda_b["default"], p_layer.vera_lambda_d["default"]], seed=ad.d_out)
        with torch.no_grad():
            ad.b.copy_(p_layer.vera_lambda_b["default"])
            ad.d.copy_(p_layer.vera_lambda_d["default"])
    check_same_model(pm, ours, pairs)


# ----------------------------------------------------------------------------- RandLoRA
def copy_randlora_(ad: RandLoRA, p_layer) -> None:
    """Write PEFT's bases and scalings into ours.

    PEFT: A (r, 1, p_max), B (q_max, N_max, r), λ (r, N), γ (N, p); its term for basis i
    pairs column k·N + i of the flattened B slice with row k of A (see RandLoRA's docstring),
    so our B_i[:, k] = B_flat[:, k·N + i]; λ is stored transposed.
    """
    p, q, N, r = min(ad.d_out, ad.d_in), max(ad.d_out, ad.d_in), ad.num_bases, ad.rank
    A = p_layer.randlora_A["default"][:, 0, :p]
    B_flat = p_layer.randlora_B["default"][:q, :N, :].reshape(q, N * r)
    with torch.no_grad():
        ad.randlora_A.copy_(A[None])
        ad.randlora_B.copy_(B_flat.reshape(q, r, N).permute(0, 2, 1))
        ad.lam.copy_(p_layer.randlora_lambda["default"].T)
        ad.gamma.copy_(p_layer.randlora_gamma["default"])


@pytest.mark.parametrize("sparse", [False, True])
def test_randlora_matches_peft(sparse):
    cfg = peft.RandLoraConfig(
        r=4, target_modules=list(NAMES), projection_prng_key=3, randlora_alpha=12, sparse=sparse
    )
    basis = "sparse" if sparse else "dense"
    pm, ours, pairs = build(
        cfg,
        lambda _, pl: RandLoRA(pl.out_features, pl.in_features, rank=4, alpha=12, basis=basis, basis_shape=LARGEST),
    )
    for p_layer, ad in pairs.values():
        assert ad.num_bases == p_layer.num_bases
        assert ad.scale == pytest.approx(p_layer.scaling["default"])
        # same init (no copy): λ = 0, γ = 1/p
        torch.testing.assert_close(ad.lam, p_layer.randlora_lambda["default"].T, rtol=0, atol=0)
        torch.testing.assert_close(ad.gamma, p_layer.randlora_gamma["default"], **tol(torch.float32))
        perturb_([p_layer.randlora_lambda["default"], p_layer.randlora_gamma["default"]], seed=ad.d_out)
        copy_randlora_(ad, p_layer)
    check_same_model(pm, ours, pairs)


# ----------------------------------------------------------------------------- Uni-LoRA
def test_unilora_matches_peft():
    cfg = peft.UniLoraConfig(r=2, theta_d_length=16, proj_seed=5, target_modules=list(NAMES))
    shared = UniLoRAShared(16, seed=5)
    pm, ours, pairs = build(cfg, lambda _, pl: UniLoRA(pl.out_features, pl.in_features, rank=2, shared=shared))
    p_layers = [pairs[n][0] for n in NAMES]  # PEFT's module order == our attach order
    indices = torch.cat(
        [torch.cat([pl.unilora_indices_A["default"].flatten(), pl.unilora_indices_B["default"].flatten()])
         for pl in p_layers]
    )
    assert indices.numel() == shared.D == 2 * (14 + 10) + 2 * (6 + 14)
    shared.finalize(indices=indices)
    # our 1/sqrt(n_j) from PEFT's indices equals PEFT's own scales (no copy)
    scales = torch.cat(
        [torch.cat([pl.unilora_scales_A["default"].flatten(), pl.unilora_scales_B["default"].flatten()])
         for pl in p_layers]
    )
    torch.testing.assert_close(shared.values.double(), scales.double(), **tol(torch.float32))
    theta = pm.base_model.unilora_theta_d["default"]
    assert float(theta.detach().abs().max()) <= shared.init_bound  # same init law U(-0.02, 0.02)
    perturb_([theta], seed=2)
    with torch.no_grad():
        shared.theta_d.copy_(theta)
        # PEFT keeps its scales in float32 (cast from the base weight's dtype at injection); use its numbers
        shared.values.copy_(scales)
    check_same_model(pm, ours, pairs)
