"""PiSSA, MiLoRA, Block-LoRA, Comp-LoRA and S2-LoRA: the contract plus each method's own math.

References are independent of the code under test: NumPy float64 SVDs and dense formulas, and
PEFT's own PiSSA initialisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.lowrank import LoRA, MiLoRA, PiSSA
from lowrank_theory.adapters.lowrank_variants import BlockLoRA, CompLoRA, S2LoRA, S2LoRAShared, coefficient_l1_penalty
from tests.adapters.contract import AdapterContract, make_base, randomize_, relerr
from tests.conftest import tol

F64 = tol(torch.float64)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (to prove a dense product is never formed)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _svd64(W: torch.Tensor):
    return np.linalg.svd(W.detach().double().numpy(), full_matrices=False)


# ----------------------------------------------------------------------------- contracts
class TestPiSSACreate(AdapterContract):
    """The weight-free path: an empty shell with LoRA's init (ΔW = 0)."""

    name = "pissa"
    cfg = {"rank": 3, "alpha": 6.0}


class _FromWeight(AdapterContract):
    """Adapters built by ``from_weight``: ΔW ≠ 0 at init, yet the layer equals the original one."""

    cls: type = PiSSA

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, residual = self.cls.from_weight(base.weight.detach(), **self.cfg)
        with torch.no_grad():
            base.weight.copy_(residual)
        return ad.to(dtype), base

    def test_identity_at_init(self):
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in, randomize=False)
            original = make_base(d_out, d_in)  # same seed: the weight before from_weight
            dw = layer.adapter.delta_weight()
            assert float(dw.norm()) > 1e-3 * float(original.weight.norm()), "from_weight must set ΔW ≠ 0"
            x = self._x(d_in)
            torch.testing.assert_close(layer(x), original(x), **F64)


class TestPiSSAFromWeight(_FromWeight):
    name = "pissa"
    cfg = {"rank": 3, "alpha": 6.0}
    cls = PiSSA


class TestMiLoRAFromWeight(_FromWeight):
    name = "milora"
    cfg = {"rank": 2, "alpha": 1.0}
    cls = MiLoRA


class TestBlockLoRA(AdapterContract):
    name = "block_lora"
    cfg = {"rank": 4, "num_blocks": 2, "alpha": 8.0}


class TestCompLoRA(AdapterContract):
    name = "comp_lora"
    cfg = {"rank": 2, "alpha": 3.0}
    k = 2

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, W = CompLoRA.from_weight(base.weight.detach(), k=self.k, **self.cfg)
        assert W is base.weight.detach() or torch.equal(W, base.weight)
        return ad.to(dtype), base


class TestS2LoRA(AdapterContract):
    name = "s2_lora"
    cfg = {"rank": 3, "alpha": 6.0}


# ----------------------------------------------------------------------------- PiSSA / MiLoRA
def test_pissa_matches_peft():
    """Same factors (up to the SVD's sign), same residual, same outputs as PEFT's ``init_lora_weights='pissa'``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lin = nn.Linear(13, 10)  # PEFT initialises PiSSA in float32 only
    W0 = lin.weight.detach().clone()
    x = torch.randn(4, 13)
    y0 = lin(x).detach()
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa")
    pm = get_peft_model(nn.Sequential(lin), cfg)
    layer = pm.base_model.model[0]
    pB, pA = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    ours, residual = PiSSA.from_weight(W0, rank=3, alpha=6.0)
    f32 = tol(torch.float32)
    signs = torch.sign((ours.B * pB).sum(0))
    torch.testing.assert_close(ours.B.detach(), pB * signs, **f32)
    torch.testing.assert_close(ours.A.detach(), pA * signs[:, None], **f32)
    torch.testing.assert_close(residual, layer.base_layer.weight.detach(), **f32)
    base = nn.Linear(13, 10)
    with torch.no_grad():
        base.weight.copy_(residual)
        base.bias.copy_(lin.bias)
    ours_out = AdaptedLinear(base, ours)(x)
    torch.testing.assert_close(ours_out, pm(x), **f32)
    torch.testing.assert_close(ours_out, y0, **f32)


@pytest.mark.parametrize("cls, which", [(PiSSA, "top"), (MiLoRA, "bottom")])
@settings(max_examples=10)
@given(m=st.integers(3, 16), n=st.integers(3, 16), data=st.data())
def test_svd_init_against_numpy(cls, which, m, n, data):
    """s·BA is the top/bottom-r SVD part, the residual the rest, and BᵀB = AAᵀ = diag(σ_K / s)."""
    r = data.draw(st.integers(1, min(m, n)))
    alpha = data.draw(st.sampled_from([1.0, 2.5, 7.0]))
    W = torch.from_numpy(np.random.default_rng(m * 100 + n).standard_normal((m, n)))
    ad, residual = cls.from_weight(W, rank=r, alpha=alpha)
    U, S, Vh = _svd64(W)
    K = slice(0, r) if which == "top" else slice(len(S) - r, len(S))
    part = (U[:, K] * S[K]) @ Vh[K]
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), part, **F64)
    np.testing.assert_allclose(residual.numpy(), W.numpy() - part, **F64)
    B, A = ad.B.detach().numpy(), ad.A.detach().numpy()
    np.testing.assert_allclose(B.T @ B, np.diag(S[K] / ad.scale), **F64)
    np.testing.assert_allclose(A @ A.T, np.diag(S[K] / ad.scale), **F64)


def test_pissa_randomized_and_dtypes():
    W = torch.from_numpy(np.random.default_rng(0).standard_normal((30, 20)) @ np.diag(0.5 ** np.arange(20)))
    exact, _ = PiSSA.from_weight(W, rank=4)
    fast, res = PiSSA.from_weight(W, rank=4, n_iter=4, seed=1)
    assert relerr(fast.delta_weight(), exact.delta_weight()) < 1e-8  # fast spectral decay: range captured
    assert relerr(res + fast.delta_weight(), W) < 1e-12
    ad16, res16 = PiSSA.from_weight(W.to(torch.bfloat16), rank=4)
    assert ad16.B.dtype == torch.float32 and res16.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="n_iter"):
        MiLoRA.from_weight(W, rank=2, n_iter=2)


@pytest.mark.parametrize("cls", [PiSSA, MiLoRA])
def test_svd_init_bad_input(cls):
    W = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank"):
        cls.from_weight(W, rank=6)
    with pytest.raises(ValueError, match="alpha"):
        cls.from_weight(W, rank=2, alpha=-1.0)
    with pytest.raises(ValueError, match="W must be a 2-D"):
        cls.from_weight(torch.randn(2, 3, 4), rank=1)
    with pytest.raises(ValueError, match="NaN"):
        cls.from_weight(W.clone().fill_(float("nan")), rank=1)
    with pytest.raises(TypeError, match="floating"):
        cls.from_weight(torch.ones(4, 4, dtype=torch.int64), rank=1)


# ----------------------------------------------------------------------------- Block-LoRA
@settings(max_examples=15)
@given(m=st.integers(2, 20), n=st.integers(2, 20), rb=st.integers(1, 4), k=st.integers(1, 4), seed=st.integers(0, 99))
def test_block_lora_is_a_rank_r_over_k_lora(m, n, rb, k, seed):
    """[B_1 … B_k]·[A; …; A] (the literal block product) = (Σ B_i)·A = a LoRA of rank r/k."""
    r = rb * k
    if r > min(m, n):
        return
    ad = randomize_(BlockLoRA(m, n, rank=r, num_blocks=k, alpha=3.0, seed=seed).double(), seed)
    B, A = ad.B.detach().numpy(), ad.A.detach().numpy()
    dense = ad.scale * B @ np.vstack([A] * k)
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), dense, **F64)
    assert np.linalg.matrix_rank(dense, tol=1e-9 * max(1.0, np.abs(dense).max())) <= rb
    lora = LoRA(m, n, rank=rb, alpha=ad.scale * rb).double()
    with torch.no_grad():
        lora.B.copy_(torch.from_numpy(B.reshape(m, k, rb).sum(axis=1)))
        lora.A.copy_(ad.A)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(ad.delta_weight(), lora.delta_weight(), **F64)
    torch.testing.assert_close(ad(x), lora(x), **F64)
    assert ad.num_trainable == m * r + n * rb


def test_block_lora_bad_input():
    with pytest.raises(ValueError, match="num_blocks must divide rank"):
        BlockLoRA(10, 10, rank=4, num_blocks=3)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockLoRA(10, 10, rank=4, num_blocks=0)
    with pytest.raises(ValueError, match="rank"):
        BlockLoRA(5, 7, rank=6, num_blocks=2)


# ----------------------------------------------------------------------------- Comp-LoRA
@settings(max_examples=15)
@given(m=st.integers(4, 18), n=st.integers(2, 18), data=st.data())
def test_comp_lora_update_avoids_top_subspace(m, n, data):
    k = data.draw(st.integers(1, min(m, n)))
    if k + 1 > m:
        return
    r = data.draw(st.integers(1, min(n, m - k)))
    W = torch.from_numpy(np.random.default_rng(m + 31 * n).standard_normal((m, n)))
    ad, W_back = CompLoRA.from_weight(W, rank=r, k=k, alpha=2.0)
    assert W_back is W
    randomize_(ad, k)
    U = _svd64(W)[0][:, :k]
    dw = ad.delta_weight().detach().numpy()
    ref = (np.eye(m) - U @ U.T) @ (ad.scale * ad.B.detach().numpy() @ ad.A.detach().numpy())
    np.testing.assert_allclose(dw, ref, **F64)
    assert np.abs(U.T @ dw).max() <= 1e-12 * max(1.0, np.abs(dw).max())


def test_comp_lora_forward_never_forms_projector():
    m, n = 37, 23
    ad, _ = CompLoRA.from_weight(torch.randn(m, n, dtype=torch.float64), rank=3, k=5)
    randomize_(ad)
    x = torch.randn(4, n, dtype=torch.float64)
    with ShapeRecorder() as rec:
        y = ad(x)
    assert (m, m) not in rec.shapes and (m, n) not in rec.shapes
    torch.testing.assert_close(y, x @ ad.delta_weight().T, **F64)


def test_comp_lora_bad_input():
    W = torch.randn(8, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k \+ rank"):
        CompLoRA.from_weight(W, rank=3, k=6)
    with pytest.raises(ValueError, match="k must satisfy"):
        CompLoRA.from_weight(W, rank=1, k=7)
    with pytest.raises(ValueError, match="orthonormal"):
        CompLoRA(8, 6, rank=2, basis=torch.ones(8, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="basis must have shape"):
        CompLoRA(8, 6, rank=2, basis=torch.eye(7, 2, dtype=torch.float64))
    plain = CompLoRA(8, 6, rank=2)  # no basis: k = 0, a LoRA
    assert plain.k == 0
    randomize_(plain)
    torch.testing.assert_close(plain.delta_weight(), plain.scale * plain.B @ plain.A)


# ----------------------------------------------------------------------------- S2-LoRA
def test_s2_lora_sharing():
    m, n, r = 9, 14, 4
    shared = S2LoRAShared(m, n, r, seed=0).double()
    a1, a2 = S2LoRA(m, n, r, shared=shared).double(), S2LoRA(m, n, r, shared=shared).double()
    with torch.no_grad():
        a1.coef.copy_(torch.tensor([1.0, 0.0, -2.0, 0.5]))
        a2.coef.copy_(torch.tensor([0.0, 3.0, 1.0, 0.0]))
    assert a1.shared.B is a2.shared.B and a1.shared.A is a2.shared.A
    both = nn.ModuleList([a1, a2])
    assert sum(p.numel() for p in both.parameters()) == r * (m + n) + 2 * r
    before = [a.delta_weight().detach().clone() for a in (a1, a2)]
    x = torch.randn(5, n, dtype=torch.float64)
    (a1(x).pow(2).sum() + a2(x).pow(2).sum()).backward()
    with torch.no_grad():
        for p in shared.parameters():
            p -= 0.1 * p.grad
    for a, old in zip((a1, a2), before):
        new = a.delta_weight().detach().numpy()
        assert np.abs(new - old.numpy()).max() > 1e-6
        ref = a.scale * (shared.B.detach().numpy() * a.coef.detach().numpy()) @ shared.A.detach().numpy()
        np.testing.assert_allclose(new, ref, **F64)


def test_s2_lora_l1_penalty():
    ads = [randomize_(S2LoRA(6, 5, 3, seed=i).double(), i) for i in range(3)]
    pen = coefficient_l1_penalty(ads)
    assert float(pen) == pytest.approx(sum(np.abs(a.coef.detach().numpy()).sum() for a in ads), rel=1e-12)
    pen.backward()
    for a in ads:
        torch.testing.assert_close(a.coef.grad, torch.sign(a.coef.detach()))
    with pytest.raises(TypeError, match="S2LoRA"):
        coefficient_l1_penalty([LoRA(6, 5, 2)])
    with pytest.raises(ValueError, match="at least one"):
        coefficient_l1_penalty([])


def test_s2_lora_bad_shared():
    with pytest.raises(ValueError, match="shared must be sized"):
        S2LoRA(6, 5, 3, shared=S2LoRAShared(6, 5, 2))
    with pytest.raises(TypeError, match="shared"):
        S2LoRA(6, 5, 3, shared=nn.Linear(5, 6))
    with pytest.raises(ValueError, match="rank"):
        adapters.create("s2_lora", 4, 9, rank=5)
