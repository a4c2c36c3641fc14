"""The papers' own formulas for LoRA-GGPO (``training.perturb.GGPO``) and ALLoRA (``training.optim.ALLoRA``),
pinned against dense float64 references built here without adapter code.

What each paper states (abstracts; GGPO also through the ``ggpo_sigma``/``ggpo_beta`` implementation merged into
kohya-ss/sd-scripts, see perturb.py):

* GGPO: a random perturbation of each output row i of the merged weight, sized
  :math:`\\sigma\\lVert W_{i,:}\\rVert + \\beta\\lVert\\hat G_{i,:}\\rVert^2` (weight norm and gradient norm),
  evaluated in the training forward with no gradient flowing into it;
* ALLoRA: per-parameter (and per-sample) gradients scaled by a coefficient inversely proportional to the parameters'
  :math:`\\ell_2` norm, :math:`1/\\sqrt{\\lVert\\theta_{i,:}\\rVert^2 + 1/\\eta^2}` per row, no dropout, no scaling
  factor.

Tolerances: float64's 1e-10 (tests/conftest.py) for deterministic identities; statistical ones say their size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_theory.linalg.random import derive_seed
from lowrank_theory.training import inject
from lowrank_theory.training.optim import ALLoRA, lora_adapters, prepare_allora
from lowrank_theory.training.perturb import GGPO, merged_row_norms, step_row_norms
from tests.conftest import tol

TOL = tol("float64")


def _model(seed: int = 0, alpha: float = 3.0, zero_B: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    inject(m, "lora", targets=["0", "2"], rank=2, alpha=alpha, seed=seed)
    if not zero_B:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for ad in lora_adapters(m).values():
                ad.B.copy_(0.4 * torch.randn(ad.B.shape, generator=g, dtype=torch.float64))
    return m


def _data(seed: int = 1, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)


def _dense_loss(m: nn.Module, Ws: dict[str, torch.Tensor], x, y):
    """The model's loss written densely from given weights (no adapter code)."""
    h = torch.tanh(x @ Ws["0"].T + m[0].base.bias)
    return (((h @ Ws["2"].T + m[2].base.bias) - y) ** 2).mean()


def _merged(m) -> dict[str, torch.Tensor]:
    return {n: m.get_submodule(n).base.weight.detach() + ad.scale * ad.B.detach() @ ad.A.detach()
            for n, ad in lora_adapters(m).items()}


# ============================================================================ GGPO
def test_ggpo_row_norms_are_the_dense_ones():
    """The r×r-Gram formulas for ‖(W0 + sBA)_i‖ and ‖s(B g_A + g_B A)_i‖ equal the dense row norms."""
    g = torch.Generator().manual_seed(3)
    W0, B, A = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((9, 7), (9, 3), (3, 7)))
    gA, gB = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    s = 0.7
    np.testing.assert_allclose(merged_row_norms(W0, B, A, s).numpy(), np.linalg.norm((W0 + s * B @ A).numpy(), axis=1),
                               **TOL)
    np.testing.assert_allclose(step_row_norms(gA, gB, B, A, s).numpy(),
                               np.linalg.norm((s * (B @ gA + gB @ A)).numpy(), axis=1), **TOL)


def test_ggpo_row_energy_is_the_papers_scale_squared():
    """E‖ε_i‖² = (σ‖W_i‖ + β‖Ĝ_i‖²)² per output row, with Ĝ = s²(BBᵀG + GAᵀA) from the dense gradient G.
    400 draws: the sample mean of ‖ε_i‖²/scale_i² (a χ²_n/n average, n = 8) has relative std 0.025; 5 std allowed."""
    m, (x, y) = _model(5), _data(2)
    sigma, beta = 0.3, 2.0
    gg = GGPO(m, sigma=sigma, beta=beta, seed=4)
    Ws = {k: v.clone().requires_grad_(True) for k, v in _merged(m).items()}
    _dense_loss(m, Ws, x, y).backward()
    m.zero_grad()
    ((m(x) - y) ** 2).mean().backward()
    gg.update()
    name, ad = "0", lora_adapters(m)["0"]
    A, B, s, G = ad.A.detach(), ad.B.detach(), ad.scale, Ws["0"].grad
    Ghat = s**2 * (B @ B.T @ G + G @ A.T @ A)
    scale = sigma * Ws["0"].detach().norm(dim=1) + beta * Ghat.norm(dim=1) ** 2
    ratios = []
    for _ in range(400):
        eps = gg.perturbation(name)
        ratios.append((eps.norm(dim=1) ** 2 / scale**2).numpy())
        gg.draw += 1  # a fresh draw with the same norms
    mean = np.mean(ratios, axis=0)
    assert np.all(np.abs(mean - 1) < 5 * math.sqrt(2 / 8 / 400)), mean


def test_ggpo_factor_gradients_are_those_of_the_perturbed_dense_loss():
    """With the hooks on, autograd's g_A, g_B are s Bᵀ G_ε and s G_ε Aᵀ, G_ε = ∂L/∂W at W0 + sBA + ε, for every
    layer: the perturbation moves the point where the gradient is taken and receives no gradient itself.  (This
    failed for layer "0" before the fix in perturb.py: x εᵀ computed on a detached x dropped ε from the backward
    pass into the layers below.)"""
    m, (x, y) = _model(6), _data(3)
    gg = GGPO(m, sigma=0.5, beta=0.0, seed=9).attach()
    gg.update()
    eps = {n: gg.perturbation(n) for n in ("0", "2")}
    Ws = {n: (w + eps[n]).clone().requires_grad_(True) for n, w in _merged(m).items()}
    _dense_loss(m, Ws, x, y).backward()
    m.train()
    m.zero_grad()
    ((m(x) - y) ** 2).mean().backward()
    for n, ad in lora_adapters(m).items():
        G = Ws[n].grad
        np.testing.assert_allclose(ad.A.grad.numpy(), (ad.scale * ad.B.detach().T @ G).numpy(), **TOL)
        np.testing.assert_allclose(ad.B.grad.numpy(), (ad.scale * G @ ad.A.detach().T).numpy(), **TOL)
    # negative control: the unperturbed gradient differs (the perturbation is not a no-op)
    W_plain = {n: w.clone().requires_grad_(True) for n, w in _merged(m).items()}
    _dense_loss(m, W_plain, x, y).backward()
    ad = lora_adapters(m)["0"]
    assert not np.allclose(ad.B.grad.numpy(), (ad.scale * W_plain["0"].grad @ ad.A.detach().T).numpy(), rtol=1e-3)
    gg.detach()


def test_ggpo_noise_is_a_function_of_seed_draw_and_layer():
    m = _model(7)
    gg = GGPO(m, sigma=0.2, beta=0.1, seed=13)
    gg.update()
    a = gg.perturbation("2")
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(derive_seed(13, gg.draw, "2")))
    np.testing.assert_allclose(a.numpy(), (gg.row_scales("2")[:, None].float() * z).double().numpy(), rtol=1e-6)
    assert torch.equal(a, gg.perturbation("2"))  # the same on every call (and every DDP rank)


# ============================================================================ ALLoRA
def _sgd_step_reference(theta: np.ndarray, grad: np.ndarray, lr: float, eta: float) -> np.ndarray:
    return theta - lr * grad / np.sqrt((theta**2).sum(axis=1, keepdims=True) + 1 / eta**2)


def test_allora_per_sample_scaling_equals_the_batch_step():
    """'Per sample and per parameter gradients' scaled by a coefficient of the parameters: the mean of the n scaled
    per-sample gradients is the scaled batch gradient, so ALLoRA's batch step is the paper's per-sample rule."""
    m, (x, y), lr, eta = _model(8), _data(4, n=6), 0.1, 1.5
    ads = lora_adapters(m)
    before = {n: (ad.A.detach().clone(), ad.B.detach().clone()) for n, ad in ads.items()}
    per_sample = {n: [torch.zeros_like(before[n][0]), torch.zeros_like(before[n][1])] for n in ads}
    for i in range(len(x)):
        m.zero_grad()
        ((m(x[i:i + 1]) - y[i:i + 1]) ** 2).mean().backward()
        for n, ad in ads.items():
            for k, (p, th) in enumerate(((ad.A, before[n][0]), (ad.B, before[n][1]))):
                c = 1 / torch.sqrt(th.square().sum(dim=1, keepdim=True) + 1 / eta**2)
                per_sample[n][k] += c * p.grad / len(x)
    opt = ALLoRA(m, lr=lr, eta_row=eta, base="sgd")
    opt.zero_grad()
    ((m(x) - y) ** 2).mean().backward()
    opt.step()
    for n, ad in ads.items():
        np.testing.assert_allclose(ad.A.detach().numpy(), (before[n][0] - lr * per_sample[n][0]).numpy(), **TOL)
        np.testing.assert_allclose(ad.B.detach().numpy(), (before[n][1] - lr * per_sample[n][1]).numpy(), **TOL)


def test_allora_coefficient_is_inversely_proportional_to_the_row_norm():
    """c(θ) = 1/√(‖θ_i‖² + 1/η²): c·‖θ_i‖ → 1 for large rows (inverse proportionality), c = η at θ_i = 0 (B's escape
    from zero at rate η·lr).  Negative control: a third-party variant 1/√(‖θ_i‖ + 1/η²) (unsquared norm) gives
    c·‖θ_i‖ = √‖θ_i‖ → ∞, not inversely proportional."""
    eta = 2.0
    theta = torch.zeros(4, 5, dtype=torch.float64)
    theta[1, 0], theta[2, 0], theta[3, 0] = 10.0, 1e3, 1e6
    c = ALLoRA.row_coefficients(theta, eta)[:, 0].numpy()
    norms = np.array([0.0, 10.0, 1e3, 1e6])
    np.testing.assert_allclose(c, 1 / np.sqrt(norms**2 + 1 / eta**2), **TOL)
    assert c[0] == pytest.approx(eta)
    np.testing.assert_allclose(c[1:] * norms[1:], 1.0, rtol=2e-3)
    unsquared = 1 / np.sqrt(norms[1:] + 1 / eta**2)
    assert unsquared[-1] * norms[-1] > 900


def test_allora_is_scaling_free_after_prepare():
    """After prepare_allora (s = 1, no dropout) two models that differ only in LoRA's α train identically: the rule
    removes the scaling hyper-parameter, as the paper says."""
    runs = []
    for alpha in (1.0, 16.0):
        m, (x, y) = _model(9, alpha=alpha, zero_B=True), _data(5)
        prepare_allora(m)
        opt = ALLoRA(m, lr=0.05, eta_row=1.0, base="sgd")
        for _ in range(5):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        runs.append({n: (ad.A.detach().clone(), ad.B.detach().clone()) for n, ad in lora_adapters(m).items()})
    for n in runs[0]:
        for a, b in zip(runs[0][n], runs[1][n], strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), **TOL)
    # negative control: without prepare_allora the scale α/r changes the trajectory
    outs = []
    for alpha in (1.0, 16.0):
        m, (x, y) = _model(9, alpha=alpha, zero_B=True), _data(5)
        opt = ALLoRA(m, lr=0.05, eta_row=1.0, base="sgd")
        for _ in range(5):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        outs.append(lora_adapters(m)["0"].B.detach().clone())
    assert not torch.allclose(outs[0], outs[1], rtol=1e-3)


def test_allora_sgd_step_matches_the_dense_formula_on_both_factors():
    m, (x, y), lr, eta = _model(10), _data(6), 0.07, 0.8
    Ws = {k: v.clone().requires_grad_(True) for k, v in _merged(m).items()}
    _dense_loss(m, Ws, x, y).backward()
    before = {n: (ad.A.detach().clone(), ad.B.detach().clone(), ad.scale) for n, ad in lora_adapters(m).items()}
    opt = ALLoRA(m, lr=lr, eta_row=eta, base="sgd")
    opt.zero_grad()
    ((m(x) - y) ** 2).mean().backward()
    opt.step()
    for n, ad in lora_adapters(m).items():
        A, B, s = before[n]
        G = Ws[n].grad
        ref_A = _sgd_step_reference(A.numpy(), (s * B.T @ G).numpy(), lr, eta)
        ref_B = _sgd_step_reference(B.numpy(), (s * G @ A.T).numpy(), lr, eta)
        np.testing.assert_allclose(ad.A.detach().numpy(), ref_A, **TOL)
        np.testing.assert_allclose(ad.B.detach().numpy(), ref_B, **TOL)
