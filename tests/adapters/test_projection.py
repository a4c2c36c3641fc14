"""Uni-LoRA: the contract for a one-layer model, and a several-layer model checked against the
dense projection P (D x d): the layers' factors are slices of P θ_d, the gradient reaching θ_d is
Pᵀ times the gradient of the factors, and the projection is rebuilt identically from the seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.projection import UniLoRA, UniLoRAShared
from tests.adapters.contract import AdapterContract, make_base
from tests.conftest import tol

F64 = tol(torch.float64)


class TestUniLoRA(AdapterContract):
    # d = 32 <= D = r (m + n) for every size the contract draws (>= 4 (4 + 4)) and for its 6 x 5 gradcheck.
    name = "unilora"
    cfg = {"rank": 4, "d": 32, "seed": 3}


class TestUniLoRAScaled(AdapterContract):
    name = "unilora"
    cfg = {"rank": 2, "d": 16, "scale": 2.5, "init_bound": 0.1}


def test_create_with_d_64_as_in_the_brief():
    ad = adapters.create("unilora", 12, 20, rank=4, d=64)
    assert ad.num_trainable == 64 == UniLoRA.param_count(12, 20, rank=4, d=64)
    assert ad.shared.D == 4 * (12 + 20)


SHAPES = [(7, 12), (12, 7), (5, 9)]


def build_model(shapes, rank=3, d=20, seed=4):
    shared = UniLoRAShared(d, seed=seed)
    layers = [
        AdaptedLinear(make_base(m, n, seed=i), UniLoRA(m, n, rank=rank, shared=shared))
        for i, (m, n) in enumerate(shapes)
    ]
    return shared, torch.nn.ModuleList(layers).double()


def slices_of(theta_D: np.ndarray, shapes, rank):
    """Cut θ_D into (A, B) per layer: A (r x n) row-major, then B (m x r) row-major."""
    out, o = [], 0
    for m, n in shapes:
        A = theta_D[o : o + rank * n].reshape(rank, n)
        o += rank * n
        B = theta_D[o : o + m * rank].reshape(m, rank)
        o += m * rank
        out.append((A, B))
    assert o == theta_D.size
    return out


def test_layers_read_slices_of_P_theta_d():
    @settings(max_examples=10)
    @given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**20))
    def check(rank, d, seed):
        shared, layers = build_model(SHAPES, rank=rank, d=min(d, rank * 24), seed=seed)
        assert shared.D == sum(rank * (m + n) for m, n in SHAPES)
        assert [ly.adapter.offset for ly in layers] == [0, rank * 19, rank * 38]
        P = shared.finalize().to_dense()
        np.testing.assert_allclose(P.T @ P, np.eye(shared.d), **F64)  # isometry
        theta_D = P @ shared.theta_d.detach().numpy()
        np.testing.assert_allclose(shared.theta_D().detach().numpy(), theta_D, **F64)
        for ly, (A, B) in zip(layers, slices_of(theta_D, SHAPES, rank)):
            np.testing.assert_allclose(ly.adapter.delta_weight().detach().numpy(), B @ A, **F64)

    check()


def test_gradient_on_theta_d_is_Pt_times_gradient_of_factors():
    shapes, rank = SHAPES, 2
    shared, layers = build_model(shapes, rank=rank, d=17)
    P = shared.finalize().to_dense()
    xs = [
        torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i, (_, n) in enumerate(shapes)
    ]

    def loss(outs):
        return sum((o**2).sum() + o.sum() for o in outs)

    loss([ly(x) for ly, x in zip(layers, xs)]).backward()
    g_d = shared.theta_d.grad.numpy()

    # reference: leaf factors cut from a leaf θ_D, plain LoRA algebra, no gather
    theta_D = torch.tensor(P @ shared.theta_d.detach().numpy(), requires_grad=True)
    outs, o = [], 0
    for ly, x, (m, n) in zip(layers, xs, shapes):
        A = theta_D[o : o + rank * n].view(rank, n)
        B = theta_D[o + rank * n : o + rank * (n + m)].view(m, rank)
        o += rank * (m + n)
        outs.append(ly.base(x) + (x @ A.T) @ B.T)
    loss(outs).backward()
    np.testing.assert_allclose(g_d, P.T @ theta_D.grad.numpy(), **F64)
    assert float(np.abs(g_d).max()) > 0


def test_all_layers_train_one_vector():
    shared, layers = build_model(SHAPES)
    params = list(layers.parameters())
    trainable = [p for p in params if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is shared.theta_d
    assert sum(p.numel() for p in trainable) == shared.d


def test_projection_rebuilt_from_seed_and_checkpoint_holds_theta_d_only():
    shared, layers = build_model(SHAPES, seed=9)
    with torch.no_grad():
        shared.theta_d.normal_(generator=torch.Generator().manual_seed(1))
    x = [torch.randn(2, n, dtype=torch.float64) for _, n in SHAPES]
    ys = [ly(xi) for ly, xi in zip(layers, x)]
    sd = shared.state_dict()
    assert list(sd) == ["theta_d"]
    blob = st_save({k: v.contiguous() for k, v in sd.items()})

    shared2, layers2 = build_model(SHAPES, seed=9)
    shared2.load_state_dict(st_load(io.BytesIO(blob).getvalue()))
    for ly, xi, y in zip(layers2, x, ys):
        torch.testing.assert_close(ly(xi), y, rtol=0, atol=0)
    assert torch.equal(shared2.indices, shared.indices)
    shared3, _ = build_model(SHAPES, seed=10)
    shared3.finalize()
    assert not torch.equal(shared3.indices, shared.indices)


def test_not_identity_at_init_but_small():
    # θ_d ~ U(-b, b) and every value 1/sqrt(n_j) <= 1, so |A|, |B| <= b and |ΔW_ij| <= r b^2.
    rank, b = 4, 0.05
    ad = adapters.create("unilora", 9, 11, rank=rank, d=30, init_bound=b).double()
    dw = ad.delta_weight().detach()
    assert float(dw.abs().max()) > 0
    assert float(dw.abs().max()) <= rank * b**2
    assert float(ad.shared.theta_d.abs().max()) <= b


def test_attach_after_finalize_raises():
    shared, layers = build_model(SHAPES)
    layers[0](torch.randn(1, SHAPES[0][1], dtype=torch.float64))  # first use finalizes
    assert shared.finalized
    with pytest.raises(ValueError, match="attach"):
        UniLoRA(4, 4, rank=1, shared=shared)


def test_finalize_checks():
    with pytest.raises(ValueError, match="d must be <= D"):
        adapters.create("unilora", 5, 6, rank=1, d=12)  # D = 11
    shared = UniLoRAShared(3)
    with pytest.raises(ValueError, match="no layer"):
        shared.finalize()
    UniLoRA(2, 2, rank=1, shared=shared)  # D = 4
    with pytest.raises(ValueError, match="indices"):
        shared.finalize(indices=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        shared.finalize(indices=np.array([0, 1, 1, 0]))  # column 2 never used
    proj = shared.finalize(indices=np.array([2, 0, 1, 2]))
    np.testing.assert_allclose(proj.values, [2**-0.5, 1, 1, 2**-0.5])


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"d": 0}, ValueError, "d"),
        ({"d": 8.0}, TypeError, "d"),
        ({"seed": -3}, ValueError, "seed"),
        ({"init_bound": float("nan")}, ValueError, "init_bound"),
        ({"init_bound": -1.0}, ValueError, "init_bound"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"rank": 9}, ValueError, "rank"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"shared": "theta"}, TypeError, "shared"),
    ],
)
def test_bad_config(kwargs, exc, word):
    cfg = {"rank": 2, "d": 8, **kwargs}
    with pytest.raises(exc, match=word):
        adapters.create("unilora", 8, 10, **cfg)
