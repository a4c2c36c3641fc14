"""LoLDU: the adapter contract plus checks against SciPy's pivoted LU in float64."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.ldu import LoLDU
from tests.adapters.contract import AdapterContract, make_base, randomize_
from tests.conftest import tol

F64 = tol(torch.float64)


def _scipy_ldu(W: torch.Tensor):
    """(P L, D, U) of W = P L diag(D) U from SciPy's getrf (independent of our linalg.ldu)."""
    P, L, U = scipy.linalg.lu(W.detach().double().numpy())
    D = np.diag(U).copy()
    return P @ L, D, U / D[:, None]


class TestLoLDUCreate(AdapterContract):
    name = "loldu"
    cfg = {"rank": 3, "alpha": 2.0}


class TestLoLDUFromWeightZeros(AdapterContract):
    name = "loldu"
    cfg = {"rank": 3, "alpha": 2.0}

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, W = LoLDU.from_weight(base.weight, init="zeros", **self.cfg)
        assert W is base.weight
        return ad, base


class TestLoLDUFromWeightLDU(AdapterContract):
    """The paper's init: z = D_r and the base becomes the residual, so base + ΔW = W0."""

    name = "loldu"
    cfg = {"rank": 3, "alpha": 1.0}

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        self._W0 = base.weight.detach().clone()
        ad, W = LoLDU.from_weight(base.weight, **self.cfg)
        with torch.no_grad():
            base.weight.copy_(W)
        return ad, base

    def test_identity_at_init(self):
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in, randomize=False)
            x = self._x(d_in)
            torch.testing.assert_close(layer(x), x @ self._W0.T + layer.bias, **F64)
            torch.testing.assert_close(layer.weight + layer.adapter.delta_weight(), self._W0, **F64)


@pytest.mark.parametrize("shape", [(12, 20), (17, 9), (7, 7)])
def test_dense_formula_matches_scipy_lu(shape):
    W = make_base(*shape).weight.detach()
    r, alpha = 3, 1.5
    ad, residual = LoLDU.from_weight(W, rank=r, alpha=alpha)
    PL, D, U = _scipy_ldu(W)
    # frozen factors: the first r columns of P L and the first r rows of U (pivot order)
    np.testing.assert_allclose(ad.PL.numpy(), PL[:, :r], **F64)
    np.testing.assert_allclose(ad.U.numpy(), U[:r], **F64)
    np.testing.assert_allclose(ad.z.detach().numpy(), D[:r], **F64)
    sigma0 = alpha / r
    np.testing.assert_allclose(residual.numpy(), W.numpy() - sigma0 * (PL[:, :r] * D[:r]) @ U[:r], **F64)
    randomize_(ad, seed=9)
    z, sigma = ad.z.detach().numpy(), float(ad.sigma)
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), sigma * (PL[:, :r] * z) @ U[:r], **F64)


def test_full_rank_ldu_init_scales_the_whole_weight():
    W = make_base(8, 5).weight.detach()
    ad, residual = LoLDU.from_weight(W, rank=5, alpha=2.0)
    # r = min(m, n): P L diag(D) U is all of W, so ΔW0 = σ0 W and the residual is (1 − σ0) W
    torch.testing.assert_close(ad.delta_weight().detach(), 0.4 * W, **F64)
    torch.testing.assert_close(residual, 0.6 * W, **F64)


@settings(max_examples=15)
@given(st.integers(2, 14), st.integers(2, 14), st.data())
def test_ldu_init_preserves_the_layer(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    W = torch.from_numpy(np.random.default_rng(7 * m + n).standard_normal((m, n)))
    ad, residual = LoLDU.from_weight(W, rank=r, alpha=float(data.draw(st.floats(0.1, 4.0))))
    np.testing.assert_allclose((residual + ad.delta_weight()).detach().numpy(), W.numpy(), rtol=0, atol=1e-12)
    # P L_r: after undoing the row permutation, unit lower trapezoidal
    perm = np.argmax(scipy.linalg.lu(W.numpy())[0], axis=0)  # row i of L sits at row perm[i] of P L
    L = ad.PL.numpy()[perm]
    np.testing.assert_allclose(np.triu(L[:r], 1), 0, atol=0)
    np.testing.assert_allclose(np.diag(L[:r]), 1, **F64)
    assert np.abs(L).max() <= 1 + 1e-12


def test_gradients_of_z_and_sigma_match_dense_formula():
    base = make_base(9, 6)
    ad, _ = LoLDU.from_weight(base.weight, rank=3, init="zeros")
    randomize_(ad, seed=4)
    layer = AdaptedLinear(base, ad)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 6, generator=g, dtype=torch.float64)
    ((layer(X) - 1.0) ** 2).sum().backward()
    dW = (base.weight + ad.delta_weight()).detach().requires_grad_(True)
    ((X @ dW.T + base.bias - 1.0) ** 2).sum().backward()
    core = np.diag(ad.PL.numpy().T @ dW.grad.numpy() @ ad.U.numpy().T)  # diag(L_rᵀ Pᵀ G U_rᵀ)
    np.testing.assert_allclose(ad.z.grad.numpy(), float(ad.sigma) * core, **F64)
    assert float(ad.sigma.grad) == pytest.approx(float(core @ ad.z.detach().numpy()), rel=1e-10)


def test_create_factors_are_seeded_ldu_of_a_gaussian():
    a = adapters.create("loldu", 10, 4, rank=2, seed=3)
    b = adapters.create("loldu", 10, 4, rank=2, seed=3)
    torch.testing.assert_close(a.PL, b.PL, rtol=0, atol=0)
    assert float(a.delta_weight().abs().max()) == 0.0
    assert a.num_trainable == LoLDU.param_count(10, 4, rank=2) == 3


def test_bad_inputs_name_the_argument():
    W = make_base(6, 5).weight.detach()
    with pytest.raises(ValueError, match="init"):
        LoLDU.from_weight(W, rank=2, init="svd")
    with pytest.raises(ValueError, match="rank"):
        LoLDU.from_weight(W, rank=6)
    with pytest.raises(ValueError, match="W contains NaN"):
        LoLDU.from_weight(W * float("nan"), rank=2)
    with pytest.raises(ValueError, match="alpha"):
        adapters.create("loldu", 6, 5, rank=2, alpha=float("nan"))
    with pytest.raises(ValueError, match="zero pivot"):  # no LDU with a unit-diagonal U exists
        LoLDU.from_weight(torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64), rank=1)
