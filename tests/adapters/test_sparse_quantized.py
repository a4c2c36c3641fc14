"""SLTrain and LQ-LoRA against the contract, dense NumPy references and the decomposition's error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.quantized import LQLoRA
from lowrank_theory.adapters.sparse import SLTrain, sparse_support_size
from lowrank_theory.linalg import quantize_nf4, quantize_uniform
from tests.adapters.contract import AdapterContract, make_base, randomize_
from tests.conftest import tol

TOL64 = tol(torch.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ----------------------------------------------------------------------------- contract
class TestSLTrain(AdapterContract):
    name = "sltrain"
    cfg = {"rank": 3, "alpha": 6.0, "density": 0.1, "seed": 5}


class TestSLTrainDense(AdapterContract):
    name = "sltrain"
    cfg = {"rank": 2, "density": 1.0, "seed": 6}  # every entry in the support


class _LQContract(AdapterContract):
    name = "lq_lora"

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, Q = LQLoRA.from_weight(base.weight.detach(), **self.cfg)
        with torch.no_grad():
            base.weight.copy_(Q)
        return ad, base


class TestLQLoRANF4(_LQContract):
    cfg = {"rank": 3, "iters": 3}


class TestLQLoRAUniform(_LQContract):
    cfg = {"rank": 2, "bits": 3, "quantizer": "uniform", "iters": 3, "block_size": 16}


# ----------------------------------------------------------------------------- SLTrain
def test_sltrain_support_and_sparse_part_match_numpy():
    m, n, density = 13, 17, 0.2
    ad = SLTrain(m, n, rank=2, density=density, seed=3).double()
    randomize_(ad, 1)
    nnz = int(np.floor(density * m * n))
    rows, cols, vals = ad.rows.numpy(), ad.cols.numpy(), _np(ad.values)
    assert ad.nnz == nnz == vals.size == sparse_support_size(m, n, density)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == nnz  # distinct positions
    S = np.zeros((m, n))
    S[rows, cols] = vals
    x = torch.randn(2, 4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(_np(ad.sparse_apply(x)), _np(x) @ S.T, **TOL64)
    L = ad.scale * _np(ad.B) @ _np(ad.A)
    np.testing.assert_allclose(_np(ad.delta_weight()), L + S, **TOL64)
    np.testing.assert_allclose(_np(ad(x)), _np(x) @ (L + S).T, **TOL64)


def test_sltrain_support_regenerated_from_seed_and_not_saved():
    a = SLTrain(10, 12, rank=2, density=0.3, seed=11)
    b = SLTrain(10, 12, rank=2, density=0.3, seed=11)
    c = SLTrain(10, 12, rank=2, density=0.3, seed=12)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
    assert not (torch.equal(a.rows, c.rows) and torch.equal(a.cols, c.cols))
    assert set(a.state_dict()) == {"A", "B", "values"}
    fresh = SLTrain(10, 12, rank=2, density=0.3)  # seed drawn and recorded
    again = SLTrain(10, 12, **fresh.config())
    assert torch.equal(fresh.rows, again.rows) and torch.equal(fresh.cols, again.cols)


def test_sltrain_uniform_init_is_papers_pretraining_init():
    ad = SLTrain(8, 25, rank=2, density=0.5, seed=0, sparse_init="uniform")
    v = ad.values.detach()
    assert float(v.abs().max()) <= 1 / 25**0.5 and float(v.abs().min()) > 0
    assert float(ad.delta_weight().norm()) > 0


def test_sltrain_bad_inputs():
    with pytest.raises(ValueError, match="density"):
        SLTrain(8, 8, density=0.0)
    with pytest.raises(ValueError, match="density"):
        SLTrain(8, 8, density=1.5)
    with pytest.raises(ValueError, match="density"):
        SLTrain(4, 4, rank=1, density=0.05, seed=0)  # 0.8 entries
    with pytest.raises(ValueError, match="sparse_init"):
        SLTrain(8, 8, sparse_init="normal")
    with pytest.raises(ValueError, match="seed"):
        SLTrain(8, 8, seed=-1)


# ----------------------------------------------------------------------------- LQ-LoRA
def _lowrank_plus_noise(m, n, r, seed):
    g = np.random.default_rng(seed)
    W = g.standard_normal((m, r)) @ g.standard_normal((r, n)) + 0.05 * g.standard_normal((m, n))
    return torch.from_numpy(W / np.sqrt(n))


@pytest.mark.parametrize("cfg", [{"quantizer": "nf4"}, {"quantizer": "uniform", "bits": 3, "block_size": 32}])
def test_lq_lora_layer_stays_within_decomposition_error(cfg):
    m, n, r = 24, 40, 4
    W0 = _lowrank_plus_noise(m, n, r, 0)
    ad, Q = LQLoRA.from_weight(W0, rank=r, iters=5, **cfg)
    err = ad.decomposition_errors[-1]
    E = _np(W0) - (_np(Q) + _np(ad.B) @ _np(ad.A))
    # the reported error is the Frobenius error of the returned split
    np.testing.assert_allclose(np.linalg.norm(E), err, rtol=1e-10)
    # Q is really quantized: nonzero residual against W0, and the split beats plain quantization
    q_plain = quantize_nf4(W0) if cfg["quantizer"] == "nf4" else quantize_uniform(W0, 3, block_size=32)
    assert 0 < err < float((W0 - q_plain).norm())
    assert float((Q - W0).norm()) > err
    base = torch.nn.Linear(n, m).double()
    with torch.no_grad():
        base.weight.copy_(W0)
    orig = torch.nn.Linear(n, m).double()
    orig.load_state_dict(base.state_dict())
    with torch.no_grad():
        base.weight.copy_(Q)
    layer = AdaptedLinear(base, ad)
    X = torch.randn(50, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gap = float((layer(X) - orig(X)).norm())
    # ‖X Eᵀ‖_F <= ‖X‖_2 ‖E‖_2 <= ‖X‖_2 ‖E‖_F, and the bound is not vacuous (gap > 0)
    assert 0 < gap <= float(torch.linalg.matrix_norm(X, 2)) * err * (1 + 1e-10)
    assert [n for n, p in ad.named_parameters() if p.requires_grad] == ["A", "B"]


def test_lq_lora_half_weight_and_create_without_weight():
    W = _lowrank_plus_noise(16, 20, 2, 1).to(torch.bfloat16)
    ad, Q = LQLoRA.from_weight(W, rank=2, iters=2)
    assert Q.dtype == torch.bfloat16 and ad.A.dtype == torch.bfloat16
    assert float((W.float() - Q.float() - ad.B.float() @ ad.A.float()).norm()) < float((W.float()).norm()) * 0.2
    plain = adapters.create("lq_lora", 6, 9, rank=2, seed=0)
    assert plain.scale == 1.0 and float(plain.delta_weight().abs().max()) == 0.0


def test_lq_lora_bad_inputs():
    with pytest.raises(ValueError, match="quantizer"):
        LQLoRA(8, 8, quantizer="int3")
    with pytest.raises(ValueError, match="bits"):
        LQLoRA(8, 8, bits=3, quantizer="nf4")
    with pytest.raises(ValueError, match="bits"):
        LQLoRA(8, 8, bits=1, quantizer="uniform")
    with pytest.raises(ValueError, match="iters"):
        LQLoRA(8, 8, iters=0)
    with pytest.raises(ValueError, match="W"):
        LQLoRA.from_weight(torch.full((4, 4), float("inf")), rank=1)
    with pytest.raises(ValueError, match="W"):
        LQLoRA.from_weight(torch.randn(2, 3, 4), rank=1)
    with pytest.raises(ValueError, match="rank"):
        LQLoRA.from_weight(torch.randn(4, 6), rank=5)
