"""Check of proofs/26-sketch-scatter-add.md: SketchTune's codebook gradient is the scatter-add (the adjoint of
the gather) of the weight gradient, and an SGD step moves each entry by its code-class sum.

All in float64; "agree" means relative error <= 1e-12 (two summation orders of the same finite sums, round-off
~1e-15); "off by order 1" means relative error > 0.1.
"""

from __future__ import annotations

import numpy as np
import torch

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.sketch import SketchTune, codebook_gradient, column_groups, gather_sketch
from lowrank_theory.testing import seeded_linear

TOL = 1e-12


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _layer(d_out=10, d_in=18, bits=2, groups=3, seed=0):
    base = seeded_linear(d_out, d_in, seed=seed)
    ad, W_hat = SketchTune.from_weight(base.weight.detach(), bits=bits, groups=groups, iters=5)
    with torch.no_grad():
        base.weight.copy_(W_hat)
        ad.codebook.add_(0.2 * torch.randn(ad.codebook.shape, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(seed + 1)))
    return AdaptedLinear(base, ad), ad


def _loss_grad(layer, ad, x, r):
    ad.codebook.grad = None
    loss = (torch.sin(layer(x)) * r).sum()
    loss.backward()
    # D = ∂L/∂W at W = Ŵ(S): the same loss through a dense leaf
    W = ad.sketched_weight().detach().clone().requires_grad_(True)
    (torch.sin(torch.nn.functional.linear(x, W, layer.base.bias)) * r).sum().backward()
    return ad.codebook.grad.detach().clone(), W.grad.detach()


def test_gradient_is_the_adjoint_scatter_add():
    layer, ad = _layer()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 18, generator=g, dtype=torch.float64)
    r = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)
    got, D = _loss_grad(layer, ad, x, r)
    # item 2: autograd's vjp of the plain gather S -> Ŵ(S) applied to D
    _, (vjp,) = torch.autograd.functional.vjp(lambda S: gather_sketch(S, ad.codes, ad.col_group),
                                              (ad.codebook.detach(),), D)
    assert _rel(got, vjp) <= TOL
    assert _rel(codebook_gradient(D, ad.codes, ad.col_group, 3, 4), vjp) <= TOL
    # item 3: <G(S), D> = <S, G*(D)> for random S, D
    S = torch.randn(10, 3, 4, generator=g, dtype=torch.float64)
    Dr = torch.randn(10, 18, generator=g, dtype=torch.float64)
    lhs = float((gather_sketch(S, ad.codes, ad.col_group) * Dr).sum())
    rhs = float((S * codebook_gradient(Dr, ad.codes, ad.col_group, 3, 4)).sum())
    assert abs(lhs - rhs) <= TOL * abs(lhs)


def test_unused_slots_get_zero_and_rows_do_not_mix():
    ad = SketchTune(6, 8, bits=2, groups=2)
    with torch.no_grad():
        ad.codes.copy_(torch.randint(1, 4, (6, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8))
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ad = ad.double()
    y = ad(x)
    y[:, 2].sum().backward()  # reads row 2 of ΔW only (linear: a non-zero gradient at ΔW = 0)
    grad = ad.codebook.grad
    assert torch.all(grad[:, :, 0] == 0)  # slot 0 is used by no entry
    others = torch.ones(6, dtype=torch.bool)
    others[2] = False
    assert torch.all(grad[others] == 0) and bool(grad[2].abs().sum() > 0)


def test_sgd_step_moves_each_entry_by_its_code_class_sum():
    layer, ad = _layer(seed=3)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 18, generator=g, dtype=torch.float64)
    r = torch.randn(6, 10, generator=g, dtype=torch.float64)
    grad, D = _loss_grad(layer, ad, x, r)
    before = layer.merged_weights()[0].clone()
    eta = 0.05
    with torch.no_grad():
        ad.codebook.sub_(eta * grad)
    step = (layer.merged_weights()[0] - before).numpy()
    codes, cg, Dn = ad.codes.numpy(), column_groups(18, 3).numpy(), D.numpy()
    want = np.zeros_like(Dn)
    for i in range(10):
        for j in range(18):
            same = (cg == cg[j]) & (codes[i] == codes[i, j])
            want[i, j] = -eta * Dn[i, same].sum()
    assert _rel(step, want) <= TOL
    W = layer.merged_weights()[0].numpy()
    for i in range(10):
        for h in range(3):
            assert len(np.unique(W[i, cg == h])) <= 4


def test_negative_control_per_entry_gradient_is_not_the_codebook_gradient():
    layer, ad = _layer(seed=5)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 18, generator=g, dtype=torch.float64)
    r = torch.randn(6, 10, generator=g, dtype=torch.float64)
    grad, D = _loss_grad(layer, ad, x, r)
    # break the shared-code assumption: the full fine-tuning step -ηD is not the codebook's step -ηGG*(D)
    GGD = gather_sketch(grad, ad.codes, ad.col_group)
    assert _rel(D, GGD) > 0.1
    # scatter with shuffled codes: a wrong gradient; the true codes agree
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    wrong = codebook_gradient(D, ad.codes[:, perm], ad.col_group, 3, 4)
    assert _rel(wrong, grad) > 0.1
    assert _rel(codebook_gradient(D, ad.codes, ad.col_group, 3, 4), grad) <= TOL
