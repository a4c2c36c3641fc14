"""LoRA-XS, LoRA-SB and SVFit: the adapter contract plus checks against NumPy's float64 SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.svd_based import LoRASB, LoRAXS, SVFit
from lowrank_theory.theory.gradients import lorasb_step
from tests.adapters.contract import AdapterContract, make_base, randomize_, relerr
from tests.conftest import tol

F64 = tol(torch.float64)


def _np_svd(W: torch.Tensor):
    return np.linalg.svd(W.detach().double().numpy(), full_matrices=False)


def _best_rank(W: torch.Tensor, r: int) -> np.ndarray:
    U, S, Vh = _np_svd(W)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _gradient(W: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """dL/dW of a least-squares loss at W (an independent dense autograd computation)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(32, W.shape[1], generator=g, dtype=W.dtype)
    Y = torch.randn(32, W.shape[0], generator=g, dtype=W.dtype)
    Wv = W.detach().clone().requires_grad_(True)
    ((X @ Wv.T - Y) ** 2).sum().backward()
    return Wv.grad


# ----------------------------------------------------------------------------- contracts
class TestLoRAXSCreate(AdapterContract):
    name = "lora_xs"
    cfg = {"rank": 3, "alpha": 6.0}


class TestLoRAXSFromWeight(AdapterContract):
    name = "lora_xs"
    cfg = {"rank": 3, "alpha": 6.0}

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, W = LoRAXS.from_weight(base.weight, **self.cfg)
        assert W is base.weight
        return ad.to(dtype), base


class TestLoRASBCreate(AdapterContract):
    name = "lora_sb"
    cfg = {"rank": 3}


class TestLoRASBFromGradient(AdapterContract):
    """The paper's init: the base is unchanged and the layer starts at W0 + [−ηG]_r."""

    name = "lora_sb"
    cfg = {"rank": 3}
    lr = 0.05

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        G = _gradient(base.weight.double()).to(dtype)
        ad, W = LoRASB.from_gradient(G, 3, base_weight=base.weight, lr=self.lr)
        assert W is base.weight
        return ad.to(dtype), base

    def test_identity_at_init(self):
        # Not identity by design: ΔW at init is the best rank-r approximation of the first update.
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in, randomize=False)
            target = _best_rank(-self.lr * _gradient(layer.weight), 3)
            np.testing.assert_allclose(layer.adapter.delta_weight().detach().numpy(), target, **F64)
            x = self._x(d_in)
            want = x @ (layer.weight + torch.from_numpy(target)).T + layer.bias
            torch.testing.assert_close(layer(x), want, **F64)


class TestLoRASBKeepOutput(AdapterContract):
    """``keep_output=True``: the base becomes W0 − BR0A, so the layer equals the frozen one at init."""

    name = "lora_sb"
    cfg = {"rank": 2}

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        self._W0 = base.weight.detach().clone()
        ad, W = LoRASB.from_gradient(_gradient(base.weight), 2, base_weight=base.weight, lr=0.1, keep_output=True)
        with torch.no_grad():
            base.weight.copy_(W)
        return ad.to(dtype), base

    def test_identity_at_init(self):
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in, randomize=False)
            x = self._x(d_in)
            torch.testing.assert_close(layer(x), x @ self._W0.T + layer.bias, **F64)
            torch.testing.assert_close(layer.weight + layer.adapter.delta_weight(), self._W0, **F64)


class TestSVFitCreate(AdapterContract):
    name = "svfit"
    cfg = {"rank": 4}


class TestSVFitFromWeight(AdapterContract):
    name = "svfit"
    cfg = {"rank": 4}

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, _ = SVFit.from_weight(base.weight, **self.cfg)
        return ad.to(dtype), base


# ----------------------------------------------------------------------------- LoRA-XS
@pytest.mark.parametrize("shape", [(12, 20), (17, 9)])
def test_lora_xs_frames_match_numpy_svd(shape):
    W = make_base(*shape).weight.detach()
    r, alpha = 4, 2.0
    ad, _ = LoRAXS.from_weight(W, rank=r, alpha=alpha)
    U, S, _ = _np_svd(W)
    B, A = ad.B.numpy(), ad.A.numpy()
    # Sign-invariant statements of B = U_r and A = S_r V_r^T:
    np.testing.assert_allclose(B.T @ B, np.eye(r), **F64)
    np.testing.assert_allclose(B @ B.T, U[:, :r] @ U[:, :r].T, **F64)
    np.testing.assert_allclose(A @ A.T, np.diag(S[:r] ** 2), **F64)
    np.testing.assert_allclose(B @ A, _best_rank(W, r), **F64)
    # the dense update is s B R A (NumPy float64 products of the stored factors)
    randomize_(ad, seed=5)
    R = ad.R.detach().numpy()
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), alpha / r * B @ R @ A, **F64)


@settings(max_examples=15)
@given(st.integers(2, 16), st.integers(2, 16), st.data())
def test_lora_xs_update_stays_in_frames(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    W = torch.from_numpy(np.random.default_rng(m * 31 + n).standard_normal((m, n)))
    ad, _ = LoRAXS.from_weight(W, rank=r)
    randomize_(ad, seed=r)
    dW = ad.delta_weight().detach().numpy()
    B = ad.B.numpy()
    Vr = _np_svd(W)[2][:r]
    # column space in span(U_r), row space in span(V_r)
    np.testing.assert_allclose(dW - B @ (B.T @ dW), 0, atol=1e-10)
    np.testing.assert_allclose(dW - (dW @ Vr.T) @ Vr, 0, atol=1e-10)


def test_lora_xs_create_frames_are_orthonormal_and_seeded():
    a = adapters.create("lora_xs", 11, 7, rank=3, seed=4)
    b = adapters.create("lora_xs", 11, 7, rank=3, seed=4)
    c = adapters.create("lora_xs", 11, 7, rank=3, seed=5)
    torch.testing.assert_close(a.B, b.B, rtol=0, atol=0)
    assert not torch.allclose(a.B, c.B)
    np.testing.assert_allclose(a.B.double().T @ a.B.double(), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(a.A.double() @ a.A.double().T, np.eye(3), atol=1e-6)


def test_frames_are_persistent_and_reload():
    W = make_base(9, 13).weight.detach()
    ad, _ = LoRAXS.from_weight(W, rank=3)
    randomize_(ad)
    assert set(ad.state_dict()) == {"R", "B", "A"}
    clone = adapters.create("lora_xs", 9, 13, **ad.config()).double()
    clone.load_state_dict(ad.state_dict())
    torch.testing.assert_close(clone.delta_weight(), ad.delta_weight(), rtol=0, atol=0)


def test_half_precision_weight_is_decomposed_in_float32():
    W = make_base(10, 6, dtype=torch.float32).weight.detach()
    ad, _ = LoRAXS.from_weight(W.to(torch.bfloat16), rank=2)
    assert ad.B.dtype == torch.bfloat16 and ad.R.dtype == torch.bfloat16
    ref, _ = LoRAXS.from_weight(W, rank=2)
    Wb = W.to(torch.bfloat16).double()
    np.testing.assert_allclose((ad.B.double() @ ad.A.double()).numpy(), _best_rank(Wb, 2), rtol=0, atol=3e-2)
    assert relerr(ad.B.float() @ ad.A.float(), ref.B @ ref.A) < 2e-2


# ----------------------------------------------------------------------------- LoRA-SB
@pytest.mark.parametrize("sign", [False, True])
def test_lora_sb_init_is_best_rank_r_of_update(sign):
    base = make_base(14, 11)
    G = _gradient(base.weight)
    lr, r = 0.3, 4
    ad, _ = LoRASB.from_gradient(G, r, base_weight=base.weight, lr=lr, sign=sign)
    update = -lr * (torch.sign(G) if sign else G)
    BRA = ad.delta_weight().detach().numpy()
    np.testing.assert_allclose(BRA, _best_rank(update, r), **F64)
    # Eckart–Young: the error is exactly the tail of NumPy's singular values
    tail = np.linalg.svd(update.numpy(), compute_uv=False)[r:]
    assert np.linalg.norm(update.numpy() - BRA) ** 2 == pytest.approx(float((tail**2).sum()), rel=1e-10)
    # R is the diagonal of the top singular values, B and A orthonormal
    S = np.linalg.svd(update.numpy(), compute_uv=False)[:r]
    np.testing.assert_allclose(ad.R.detach().numpy(), np.diag(S), **F64)
    np.testing.assert_allclose(ad.B.T @ ad.B, np.eye(r), **F64)
    np.testing.assert_allclose(ad.A @ ad.A.T, np.eye(r), **F64)


def test_lora_sb_gradient_steps_stay_in_BXA():
    base = make_base(12, 10)
    ad, _ = LoRASB.from_gradient(_gradient(base.weight), 3, base_weight=base.weight, lr=0.1)
    layer = AdaptedLinear(base, ad)
    B, A = ad.B.numpy(), ad.A.numpy()
    dW0 = ad.delta_weight().detach().numpy()
    g = torch.Generator().manual_seed(11)
    X = torch.randn(16, 10, generator=g, dtype=torch.float64)
    Y = torch.randn(16, 12, generator=g, dtype=torch.float64)
    eta = 0.05
    for _ in range(3):
        ad.zero_grad()
        ((layer(X) - Y) ** 2).sum().backward()
        # dense reference gradient with respect to the full merged weight
        Wfull = (base.weight + ad.delta_weight()).detach().requires_grad_(True)
        ((X @ Wfull.T + base.bias - Y) ** 2).sum().backward()
        GW = Wfull.grad
        np.testing.assert_allclose(ad.R.grad.numpy(), B.T @ GW.numpy() @ A.T, **F64)
        before = ad.delta_weight().detach()
        with torch.no_grad():
            ad.R -= eta * ad.R.grad
        moved = (ad.delta_weight().detach() - before).numpy()
        # the SGD step on R is −η P_B G P_A (theory.gradients.lorasb_step), inside {B X A}
        np.testing.assert_allclose(moved, -eta * lorasb_step(GW.numpy(), B, A), **F64)
    total = ad.delta_weight().detach().numpy() - dW0
    assert np.linalg.norm(total) > 0
    np.testing.assert_allclose(total - B @ (B.T @ total) @ A.T @ A, 0, atol=1e-10)


# ----------------------------------------------------------------------------- SVFit
@pytest.mark.parametrize("shape", [(12, 20), (17, 9)])
def test_svfit_matches_numpy_and_can_remove_top_spectrum(shape):
    W = make_base(*shape).weight.detach()
    r = 3
    ad, _ = SVFit.from_weight(W, rank=r)
    randomize_(ad, seed=2)
    U, S, Vh = _np_svd(W)
    delta = ad.delta.detach().numpy()
    # U_r diag(δ) V_r^T is invariant under joint sign flips, so NumPy's SVD is a direct reference
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), (U[:, :r] * delta) @ Vh[:r], **F64)
    with torch.no_grad():
        ad.delta.copy_(-torch.from_numpy(S[:r]))  # W' = W0 − [W0]_r: only the tail of the spectrum is left
    merged = ad.merged_weight(W)
    np.testing.assert_allclose(np.linalg.svd(merged.numpy(), compute_uv=False)[: len(S) - r], S[r:], **F64)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument():
    W = make_base(6, 5).weight.detach()
    with pytest.raises(ValueError, match="W contains NaN"):
        LoRAXS.from_weight(torch.full((6, 5), float("nan"), dtype=torch.float64), rank=2)
    with pytest.raises(ValueError, match="W must be a 2-D"):
        SVFit.from_weight(W[0], rank=1)
    with pytest.raises(TypeError, match="W must be a floating"):
        LoRAXS.from_weight(torch.ones(6, 5, dtype=torch.int64), rank=2)
    with pytest.raises(ValueError, match="rank"):
        LoRAXS.from_weight(W, rank=6)
    with pytest.raises(ValueError, match="alpha"):
        adapters.create("lora_xs", 6, 5, rank=2, alpha=float("inf"))
    with pytest.raises(ValueError, match="seed"):
        adapters.create("svfit", 6, 5, rank=2, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        adapters.create("svfit", 6, 5, rank=2, seed=1.5)
    G = _gradient(W)
    with pytest.raises(ValueError, match="grad must have base_weight's shape"):
        LoRASB.from_gradient(G[:, :4], 2, base_weight=W)
    with pytest.raises(ValueError, match="lr"):
        LoRASB.from_gradient(G, 2, base_weight=W, lr=0.0)
    with pytest.raises(ValueError, match="grad is identically zero"):
        LoRASB.from_gradient(torch.zeros_like(W), 2, base_weight=W)
    with pytest.raises(ValueError, match="grad contains NaN"):
        LoRASB.from_gradient(G * float("inf"), 2, base_weight=W)
