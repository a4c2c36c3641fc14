"""The fused LoRA layer (adapters/fused.py) against the unfused three-module computation.

Reference: ``F.linear(x, W0, b) + s (x Aᵀ) Bᵀ`` evaluated by autograd in float64; the fused node
writes its backward by hand, so output and the gradients for x, A, B are all compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.fused import lora_linear
from lowrank_theory.adapters.lowrank import LoRA
from tests.conftest import tol


def _case(m, n, r, lead, bias, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=dtype)
    b = torch.randn(m, generator=g, dtype=dtype) if bias else None
    A = torch.randn(r, n, generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(m, r, generator=g, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, n, generator=g, dtype=dtype, requires_grad=True)
    gy = torch.randn(*lead, m, generator=g, dtype=dtype)
    return W, b, A, B, x, gy


def _grads(fn, x, A, B, gy):
    y = fn()
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), gy)
    return y.detach(), gx, gA, gB


@given(m=st.integers(1, 9), n=st.integers(1, 9), r=st.integers(1, 4), lead=st.sampled_from([(5,), (2, 3), (1, 1, 4)]),
       bias=st.booleans(), scale=st.floats(0.1, 4.0), seed=st.integers(0, 999))
def test_fused_matches_unfused_output_and_gradients(m, n, r, lead, bias, scale, seed):
    W, b, A, B, x, gy = _case(m, n, r, lead, bias, seed)
    fused = _grads(lambda: lora_linear(x, W, b, A, B, scale), x, A, B, gy)
    ref = _grads(lambda: F.linear(x, W, b) + scale * (x @ A.T) @ B.T, x, A, B, gy)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, **tol(torch.float64))


def test_adapted_linear_uses_the_fused_node_and_matches_the_dense_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    ad = LoRA(10, 12, rank=3, alpha=6.0).double()
    with torch.no_grad():
        ad.B.normal_()
    layer = AdaptedLinear(base, ad)
    x = torch.randn(4, 7, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoRALinearBackward"  # the fused node ran (a failing guard would not)
    ref = F.linear(x, base.weight + ad.scale * ad.B @ ad.A, base.bias)
    torch.testing.assert_close(y, ref, **tol(torch.float64))
    layer.merge()
    torch.testing.assert_close(layer(x), ref, **tol(torch.float64))


def test_fallbacks_where_the_fused_node_does_not_apply():
    torch.manual_seed(1)
    # active dropout in training: the unfused path (the fused node has no dropout)
    ad = LoRA(6, 5, rank=2, dropout=0.5)
    layer = AdaptedLinear(nn.Linear(5, 6), ad).train()
    assert ad.fused_output(torch.randn(3, 5), layer.weight, layer.bias) is None
    layer.eval()
    assert ad.fused_output(torch.randn(3, 5), layer.weight, layer.bias) is not None
    # mixed dtypes (fp32 adapter on a bf16 base) go through the unfused path
    ad32 = LoRA(6, 5, rank=2)
    assert ad32.fused_output(torch.randn(3, 5, dtype=torch.bfloat16), layer.weight.bfloat16(), None) is None
    # a trainable base weight is not handled by the fused node
    w = torch.randn(6, 5, requires_grad=True)
    assert ad32.fused_output(torch.randn(3, 5), w, None) is None
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(3, 5), w, None, ad32.A, ad32.B, 1.0)


def test_bad_shapes_are_named():
    W = torch.randn(6, 5)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear(torch.randn(3, 4), W, None, torch.randn(2, 5), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear(torch.randn(3, 5), W, None, torch.randn(2, 5), torch.randn(6, 3), 1.0)


def test_bf16_fused_is_as_accurate_as_unfused_against_float64():
    W, b, A, B, x, _gy = _case(64, 48, 8, (32,), True, 3)
    ref = F.linear(x, W, b) + 0.5 * (x @ A.T) @ B.T
    lo = [t.detach().bfloat16() for t in (x, W, b, A, B)]
    fused = lora_linear(lo[0], lo[1], lo[2], lo[3], lo[4], 0.5).double()
    unfused = (F.linear(lo[0], lo[1], lo[2]) + 0.5 * (lo[0] @ lo[3].T) @ lo[4].T).double()
    e_f = (fused - ref).norm() / ref.norm()
    e_u = (unfused - ref).norm() / ref.norm()
    # both round the inputs to bf16 (rel. 2^-9) and the output once or twice: each within bf16 tolerance,
    # and the fused one (one rounding of the sum fewer) no worse than twice the unfused error
    assert e_f < tol(torch.bfloat16)["rtol"] and e_f <= 2 * e_u


@pytest.mark.parametrize("bias", [True, False])
def test_dora_fused_path_matches_its_unfused_layer_output(bias):
    from lowrank_theory.adapters.multiplicative import DoRA

    torch.manual_seed(2)
    base = nn.Linear(9, 7, bias=bias).double()
    ad = DoRA(7, 9, rank=3).double()
    with torch.no_grad():
        ad.B.normal_()
    layer = AdaptedLinear(base, ad)
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 7, dtype=torch.float64)
    params = [x, ad.A, ad.B, ad.magnitude]

    y = layer(x)
    assert ad.fused_output(x, layer.weight, layer.bias) is not None  # the fused path is the one that ran
    fused = (y, *torch.autograd.grad(y, params, gy))
    y_ref = ad.layer_output(x, base(x), layer.weight, layer.bias)  # the unfused path
    ref = (y_ref, *torch.autograd.grad(y_ref, params, gy))
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, **tol(torch.float64))
    # and both equal the dense definition W' = diag(g/‖W0 + sBA‖_row)(W0 + sBA)
    V = base.weight + ad.scale * ad.B @ ad.A
    dense = F.linear(x, (ad.magnitude / V.norm(dim=1))[:, None] * V, base.bias)
    torch.testing.assert_close(y, dense, **tol(torch.float64))
