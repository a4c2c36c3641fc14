"""Training rules against dense references.

The reference for every rule is the gradient :math:`G = \\partial L/\\partial W` of the *merged*
weight :math:`W = W_0 + sBA`, obtained by autograd on a float64 dense copy of the model (no
adapter code involved), and projectors built here with NumPy's QR.  A rule is then checked by
the weight change its step induces: e.g. LoRA-Pro's first-order change must be the tangent
projection :math:`P_BG + GP_A - P_BGP_A` of that G.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.theory.gradients import lorapro_gradients
from lowrank_theory.training import inject
from lowrank_theory.training.optim import ALLoRA, lora_adapters, lora_plus_param_groups, make_optimizer, prepare_allora
from lowrank_theory.training.optim_projected import AltLoRA, LoRAPro, equivalent_gradient
from lowrank_theory.training.perturb import GGPO
from tests.conftest import tol

TOL = tol(torch.float64)


# ---------------------------------------------------------------------------- fixtures / references
def tiny_model(seed: int = 0, rank: int = 2, zero_B: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    inject(m, "lora", targets=["0", "2"], rank=rank, alpha=3.0, seed=seed)
    if not zero_B:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for ad in lora_adapters(m).values():
                ad.B.copy_(0.5 * torch.randn(ad.B.shape, generator=g, dtype=torch.float64))
    return m


def batch(seed: int = 1, n: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def merged(model) -> dict[str, torch.Tensor]:
    """W0 + s B A per layer, float64, computed from the raw tensors."""
    out = {}
    for name, ad in lora_adapters(model).items():
        base = model.get_submodule(name).base
        out[name] = base.weight.detach().double() + ad.scale * ad.B.detach().double() @ ad.A.detach().double()
    return out


def dense_grads(model, x, y) -> dict[str, torch.Tensor]:
    """dL/dW of the merged weights, by autograd on an explicit dense forward (no adapter code)."""
    Ws = {k: v.clone().requires_grad_(True) for k, v in merged(model).items()}
    b0, b2 = model[0].base.bias.detach(), model[2].base.bias.detach()
    h = torch.tanh(x @ Ws["0"].T + b0)
    loss = (((h @ Ws["2"].T + b2) - y) ** 2).mean()
    loss.backward()
    return {k: v.grad.detach() for k, v in Ws.items()}


def proj_col(F: np.ndarray) -> np.ndarray:
    Q, _ = np.linalg.qr(F)
    return Q @ Q.T


def tangent_np(G, B, A):
    PB, PA = proj_col(B), proj_col(A.T)
    return PB @ G + G @ PA - PB @ G @ PA


def close(a, b, **kw):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(a, b, **{**TOL, **kw})


def factors(model):
    return {n: (ad.A.detach().clone(), ad.B.detach().clone(), ad.scale) for n, ad in lora_adapters(model).items()}


def one_step(model, opt, x, y):
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()


# ---------------------------------------------------------------------------- LoRA+
def test_lora_plus_sgd_step_matches_dense_formula():
    m, (x, y), lr, ratio = tiny_model(), batch(), 0.05, 4.0
    G, before = dense_grads(m, x, y), factors(m)
    opt = torch.optim.SGD(lora_plus_param_groups(m, lr=lr, ratio=ratio), lr=lr)
    one_step(m, opt, x, y)
    for name, ad in lora_adapters(m).items():
        A, B, s = before[name]
        # LoRA+: dA = -lr * s B^T G, dB = -(ratio lr) * s G A^T; the exact merged change follows.
        A1 = A - lr * s * B.T @ G[name]
        B1 = B - ratio * lr * s * G[name] @ A.T
        close(ad.A, A1)
        close(ad.B, B1)
        close(s * ad.B @ ad.A - s * B @ A, s * (B1 @ A1 - B @ A))


def test_lora_plus_groups_keep_ratio_under_a_scheduler():
    m = tiny_model()
    opt = torch.optim.AdamW(lora_plus_param_groups(m, lr=1e-3, ratio=16.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["lora_B"] == pytest.approx(16.0 * lrs["lora_A"])
    assert lrs["lora_A"] == pytest.approx(1e-3 * 0.125)


# ---------------------------------------------------------------------------- LoRA-Pro
@pytest.mark.parametrize("zero_B", [False, True])
def test_lorapro_sgd_weight_change_is_tangent_projection(zero_B):
    m, (x, y), lr = tiny_model(zero_B=zero_B), batch(), 0.01
    G, before = dense_grads(m, x, y), factors(m)
    opt = LoRAPro(m, lr=lr, mode="sgd")
    one_step(m, opt, x, y)
    for name, ad in lora_adapters(m).items():
        A, B, s = before[name]
        dA, dB = (A - ad.A.detach()) / lr, (B - ad.B.detach()) / lr  # the optimizer's factor directions
        first_order = s * (B @ dA + dB @ A)
        if zero_B:  # tangent space {YA}: the step is G P_A
            expect = G[name].numpy() @ proj_col(A.T.numpy())
        else:
            expect = tangent_np(G[name].numpy(), B.numpy(), A.numpy())
        close(first_order, expect)
        if not zero_B:  # and the pair is LoRA-Pro's Sylvester-optimal one for the true G
            ref = lorapro_gradients(G[name], B, A, s)
            close(dA, ref.g_A)
            close(dB, ref.g_B)


def test_lorapro_adamw_first_step_projects_adam_direction():
    m, (x, y), lr, eps = tiny_model(seed=3), batch(4), 1e-3, 1e-8
    G, before = dense_grads(m, x, y), factors(m)
    opt = LoRAPro(m, lr=lr, mode="adamw", eps=eps)
    one_step(m, opt, x, y)
    for name, ad in lora_adapters(m).items():
        A, B, s = before[name]
        E = tangent_np(G[name].numpy(), B.numpy(), A.numpy())
        D = E / (np.abs(E) + eps)  # Adam at t=1: m_hat / (sqrt(v_hat) + eps)
        dA, dB = (A - ad.A.detach()) / lr, (B - ad.B.detach()) / lr
        close(s * (B @ dA + dB @ A), tangent_np(D, B.numpy(), A.numpy()), rtol=1e-7, atol=1e-7)


@given(
    m=st.integers(3, 9), n=st.integers(3, 9), r=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
    s=st.floats(0.1, 4.0),
)
def test_equivalent_gradient_equals_tangent_projection(m, n, r, seed, s):
    rng = np.random.default_rng(seed)
    G, B, A = rng.standard_normal((m, n)), rng.standard_normal((m, r)), rng.standard_normal((r, n))
    t = [torch.from_numpy(v) for v in (G, B, A)]
    g_A, g_B = s * t[1].T @ t[0], s * t[0] @ t[2].T  # what autograd hands LoRA
    close(equivalent_gradient(g_A, g_B, t[1], t[2], s), tangent_np(G, B, A), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------- AltLoRA
def test_altlora_alternates_exact_projected_steps():
    m, (x, y), lr = tiny_model(seed=5), batch(6), 0.02
    opt = AltLoRA(m, lr=lr, beta=0.0, delta=0.0, first="B")
    for phase in ("B", "A", "B"):
        assert opt.phase() == phase
        G, before = dense_grads(m, x, y), factors(m)
        one_step(m, opt, x, y)
        for name, ad in lora_adapters(m).items():
            A, B, s = before[name]
            change = s * ad.B.detach() @ ad.A.detach() - s * B @ A  # exact: only one factor moved
            if phase == "B":
                assert torch.equal(ad.A.detach(), A)
                expect = -lr * G[name].numpy() @ proj_col(A.T.numpy())
            else:
                assert torch.equal(ad.B.detach(), B)
                expect = -lr * proj_col(B.numpy()) @ G[name].numpy()
            close(change, expect)


def test_altlora_momentum_is_transported_to_the_new_factor_space():
    m, (x, y), lr, beta = tiny_model(seed=6), batch(7), 0.01, 0.8
    opt = AltLoRA(m, lr=lr, beta=beta, delta=0.0, first="A", switch_every=2)
    one_step(m, opt, x, y)  # A-step 1 with B1
    name = "0"
    ad = lora_adapters(m)[name]
    s, B1 = ad.scale, ad.B.detach().clone()
    M1 = opt.state[ad.A]["momentum"].clone()
    with torch.no_grad():  # move B by hand: the momentum must follow
        ad.B.add_(0.3 * torch.randn(ad.B.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    B2 = ad.B.detach().clone()
    G2 = dense_grads(m, x, y)[name]
    A_before = ad.A.detach().clone()
    one_step(m, opt, x, y)  # A-step 2 with B2
    M2 = opt.state[ad.A]["momentum"]
    P2 = proj_col(B2.numpy())
    # weight-space momentum B M: the old one projected on col(B2), plus the new projected gradient
    expect = beta * P2 @ (B1 @ M1).numpy() + (1 - beta) * P2 @ G2.numpy() / s
    close(B2 @ M2, expect)
    close(A_before - ad.A.detach(), lr * M2 / (1 - beta**2))


# ---------------------------------------------------------------------------- ALLoRA
def test_allora_sgd_row_scaling_matches_dense_formula():
    m, (x, y), lr, eta = tiny_model(seed=2), batch(3), 0.05, 2.0
    G, before = dense_grads(m, x, y), factors(m)
    opt = ALLoRA(m, lr=lr, eta_row=eta, base="sgd")
    one_step(m, opt, x, y)
    for name, ad in lora_adapters(m).items():
        A, B, s = before[name]
        for theta, grad, new in ((A, s * B.T @ G[name], ad.A), (B, s * G[name] @ A.T, ad.B)):
            th, gr = theta.numpy(), grad.numpy()
            coef = 1.0 / np.sqrt((th**2).sum(axis=1, keepdims=True) + 1.0 / eta**2)
            close(new, th - lr * coef * gr)


def test_allora_adamw_first_step_and_prepare():
    m = tiny_model(seed=4, zero_B=True)
    prepare_allora(m)
    for ad in lora_adapters(m).values():
        assert ad.scale == 1.0 and ad.config()["alpha"] == ad.rank
    (x, y), lr, eta = batch(5), 1e-2, 3.0
    before = factors(m)
    grads = {}
    opt = ALLoRA(m, lr=lr, eta_row=eta, base="adamw", eps=1e-12)
    opt.zero_grad()
    loss_fn(m, x, y).backward()
    for name, ad in lora_adapters(m).items():
        grads[name] = (ad.A.grad.clone(), ad.B.grad.clone())
    opt.step()
    for name, ad in lora_adapters(m).items():
        A, B, _ = before[name]
        for theta, g, new in ((A, grads[name][0], ad.A), (B, grads[name][1], ad.B)):
            th = theta.numpy()
            coef = 1.0 / np.sqrt((th**2).sum(axis=1, keepdims=True) + 1.0 / eta**2)
            u = np.sign(g.numpy()) * (g.numpy() != 0)  # Adam at t=1 with eps -> 0
            close(new, th - lr * coef * u, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="before training"):
        prepare_allora(m)  # B is now non-zero


# ---------------------------------------------------------------------------- GGPO
def test_ggpo_perturbation_matches_dense_norms_and_noise():
    m, (x, y) = tiny_model(seed=8), batch(8)
    sigma, beta, seed = 0.2, 0.5, 11
    gg = GGPO(m, sigma=sigma, beta=beta, seed=seed).attach()
    G = dense_grads(m, x, y)
    W = merged(m)
    m.eval()  # the backward pass GGPO reads, at the unperturbed weights (hooks act in training mode only)
    m.zero_grad()
    loss_fn(m, x, y).backward()
    gg.update()
    from lowrank_theory.linalg.random import derive_seed

    for name, ad in lora_adapters(m).items():
        A, B, s = ad.A.detach(), ad.B.detach(), ad.scale
        Ghat = s**2 * (B @ B.T @ G[name] + G[name] @ A.T @ A)  # LoRA's weight-space step, dense
        scale = (sigma * W[name].norm(dim=1) + beta * Ghat.norm(dim=1) ** 2) / math.sqrt(ad.d_in)
        z = torch.randn(ad.d_out, ad.d_in, generator=torch.Generator().manual_seed(derive_seed(seed, 1, name)))
        close(gg.perturbation(name), scale[:, None] * z.double(), rtol=1e-6, atol=1e-9)  # z drawn in float32
    layer = m.get_submodule("0")
    eps = gg.perturbation("0")
    with torch.no_grad():
        ref = x @ (W["0"] + eps).T + layer.base.bias
    m.train()
    close(layer(x), ref, rtol=1e-9, atol=1e-9)
    m.eval()  # no perturbation outside training
    with torch.no_grad():
        close(layer(x), x @ W["0"].T + layer.base.bias)
    gg.detach()
    m.train()
    with torch.no_grad():
        close(layer(x), x @ W["0"].T + layer.base.bias)


# ---------------------------------------------------------------------------- factory and errors
@pytest.mark.parametrize("rule", ["adamw", "sgd", "lora+", "lorapro", "altlora", "allora"])
def test_every_rule_lowers_the_loss(rule):
    m, (x, y) = tiny_model(seed=12, zero_B=True), batch(12, n=32)
    opt = make_optimizer(m, rule, lr=0.2 if rule in ("sgd", "altlora") else 0.02)  # SGD-like rules: larger rate
    start = loss_fn(m, x, y).item()
    for _ in range(40):
        one_step(m, opt, x, y)
    assert loss_fn(m, x, y).item() < 0.9 * start


def test_bad_arguments():
    m = tiny_model()
    with pytest.raises(ValueError, match="rule must be one of"):
        make_optimizer(m, "adam-ish")
    with pytest.raises(ValueError, match="lr must be"):
        LoRAPro(m, lr=float("nan"))
    with pytest.raises(ValueError, match="mode must be"):
        LoRAPro(m, mode="sgdm")
    with pytest.raises(ValueError, match="switch_every"):
        AltLoRA(m, switch_every=0)
    with pytest.raises(ValueError, match="sigma"):
        GGPO(m, sigma=-1.0)
    plain = nn.Sequential(nn.Linear(3, 3))
    inject(plain, "vera", targets=["0"], rank=2)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        LoRAPro(plain)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        lora_plus_param_groups(plain, lr=1e-3)
