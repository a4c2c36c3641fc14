"""VeRA, NOLA and RandLoRA: the contract, plus each method's formula against a NumPy float64
reference written from the paper's equation, init, seed regeneration and bad inputs."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lowrank_theory import adapters
from lowrank_theory.adapters.random_basis import randlora_basis, vera_basis
from tests.adapters.contract import AdapterContract, randomize_
from tests.conftest import tol

F64 = tol(torch.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ----------------------------------------------------------------------------- contract
class TestVeRA(AdapterContract):
    name = "vera"
    cfg = {"rank": 5, "d_initial": 0.1, "seed": 3}


class TestVeRARankAboveMinDim(AdapterContract):
    # VeRA's r is a basis width, not a rank bound of the layer: r > min(m, n) is legal.
    name = "vera"
    cfg = {"rank": 30, "seed": 0, "basis_shape": (40, 33)}
    size_range = (4, 30)


class TestNOLA(AdapterContract):
    name = "nola"
    cfg = {"rank": 3, "num_basis_a": 7, "num_basis_b": 5, "alpha": 6.0, "seed": 1}


class TestRandLoRA(AdapterContract):
    name = "randlora"
    cfg = {"rank": 4, "alpha": 8.0, "seed": 2}


class TestRandLoRASparsePerBasisA(AdapterContract):
    name = "randlora"
    cfg = {"rank": 3, "alpha": 6.0, "basis": "sparse", "shared_a": False, "basis_shape": (24, 24)}


# ----------------------------------------------------------------------------- references
def vera_reference(ad) -> np.ndarray:
    """diag(b) B diag(d) A in float64 NumPy."""
    return np.diag(_np(ad.b)) @ _np(ad.vera_B) @ np.diag(_np(ad.d)) @ _np(ad.vera_A)


def nola_reference(ad) -> np.ndarray:
    """s (Σ_j β_j B_j)(A_0 + Σ_i α_i A_i), written as explicit sums."""
    A = _np(ad.a0).copy()
    for a_i, A_i in zip(_np(ad.alpha), _np(ad.bases_a)):
        A += a_i * A_i
    B = np.zeros((ad.d_out, ad.rank))
    for b_j, B_j in zip(_np(ad.beta), _np(ad.bases_b)):
        B += b_j * B_j
    return ad.scale * B @ A


def randlora_reference(ad) -> np.ndarray:
    """s Σ_i B_i diag(λ_i) A_i diag(γ_i), transposed when d_out < d_in (one term per basis)."""
    A, B = _np(ad.randlora_A), _np(ad.randlora_B)
    lam, gam = _np(ad.lam), _np(ad.gamma)
    M = sum(
        B[:, i, :] @ np.diag(lam[i]) @ A[i if A.shape[0] > 1 else 0] @ np.diag(gam[i]) for i in range(ad.num_bases)
    )
    M = ad.scale * M
    return M.T if ad.d_out < ad.d_in else M


@pytest.mark.parametrize(
    ("name", "cfg", "reference"),
    [
        ("vera", {"rank": 6, "seed": 4}, vera_reference),
        ("nola", {"rank": 2, "num_basis_a": 4, "num_basis_b": 9, "alpha": 3.0}, nola_reference),
        ("randlora", {"rank": 3, "alpha": 5.0}, randlora_reference),
        ("randlora", {"rank": 5, "alpha": 5.0, "shared_a": False, "basis": "very_sparse"}, randlora_reference),
    ],
)
def test_delta_weight_matches_paper_formula(name, cfg, reference):
    @settings(max_examples=10)
    @given(st.integers(5, 21), st.integers(5, 21), st.integers(0, 2**16))
    def check(d_out, d_in, seed):
        ad = randomize_(adapters.create(name, d_out, d_in, **cfg).double(), seed)
        np.testing.assert_allclose(_np(ad.delta_weight()), reference(ad), **F64)

    check()


# ----------------------------------------------------------------------------- init, seeds, storage
CONFIGS = [
    ("vera", {"rank": 4, "seed": 11}),
    ("nola", {"rank": 2, "num_basis_a": 6, "num_basis_b": 3, "seed": 11}),
    ("randlora", {"rank": 3, "seed": 11}),
    ("randlora", {"rank": 4, "seed": 11, "basis": "sparse", "shared_a": False}),
]


@pytest.mark.parametrize(("name", "cfg"), CONFIGS)
@pytest.mark.parametrize(("d_out", "d_in"), [(13, 7), (6, 11)])
def test_bases_regenerate_from_seed_after_state_dict_roundtrip(name, cfg, d_out, d_in):
    trained = randomize_(adapters.create(name, d_out, d_in, **cfg).double(), seed=5)
    sd = trained.state_dict()
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert set(sd) == trainable, "the state dict must hold only the trainable tensors"
    assert sum(v.numel() for v in sd.values()) == trained.num_trainable
    blob = st_save({k: v.contiguous() for k, v in sd.items()})

    fresh = adapters.create(name, d_out, d_in, **trained.config()).double()
    frozen = dict(trained.named_buffers())
    assert frozen, "random bases must be buffers"
    for key, buf in fresh.named_buffers():
        assert torch.equal(buf, frozen[key]), f"buffer {key} differs after regeneration from the seed"
    fresh.load_state_dict(st_load(io.BytesIO(blob).getvalue()))
    torch.testing.assert_close(fresh.delta_weight(), trained.delta_weight(), rtol=0, atol=0)

    other = adapters.create(name, d_out, d_in, **{**cfg, "seed": cfg["seed"] + 1}).double()
    assert any(not torch.equal(b, frozen[k]) for k, b in other.named_buffers()), "another seed, other bases"


@pytest.mark.parametrize(("name", "cfg"), CONFIGS)
def test_identity_at_init_and_which_gradient_starts(name, cfg):
    ad = adapters.create(name, 9, 14, **cfg).double()
    assert float(ad.delta_weight().abs().max()) == 0.0
    x = torch.randn(4, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ad(x).sum().backward()
    grads = {n: float(p.grad.abs().max()) for n, p in ad.named_parameters()}
    # The zero factor's partner must get a gradient (training can start); the other gets none.
    starts, still = {"vera": ("b", "d"), "nola": ("beta", "alpha"), "randlora": ("lam", "gamma")}[name]
    assert grads[starts] > 0.0
    assert grads[still] == 0.0


def test_vera_init_values_and_basis_bounds():
    ad = adapters.create("vera", 10, 7, rank=5, d_initial=0.25, seed=0)
    assert torch.equal(ad.b, torch.zeros(10))
    assert torch.equal(ad.d, torch.full((5,), 0.25))
    # Kaiming-uniform with gain sqrt(2): |A| <= sqrt(6 / fan_in) with fan_in = d_in (A) and r (B).
    assert float(ad.vera_A.abs().max()) <= math.sqrt(6 / 7)
    assert float(ad.vera_B.abs().max()) <= math.sqrt(6 / 5)


def test_vera_layers_slice_one_shared_pair():
    shape = (16, 19)
    big = adapters.create("vera", 16, 19, rank=4, seed=2, basis_shape=shape)
    small = adapters.create("vera", 9, 5, rank=4, seed=2, basis_shape=shape)
    A, B = vera_basis(2, 4, shape)
    assert torch.equal(big.vera_A, A) and torch.equal(big.vera_B, B)
    assert torch.equal(small.vera_A, A[:, :5]) and torch.equal(small.vera_B, B[:9, :])
    alone = adapters.create("vera", 9, 5, rank=4, seed=2)  # its own (smaller) pair: different numbers
    assert not torch.equal(alone.vera_A, small.vera_A)


def test_randlora_layers_slice_shared_bases():
    shape = (20, 12)
    a = adapters.create("randlora", 20, 12, rank=5, seed=1, basis_shape=shape)
    b = adapters.create("randlora", 7, 11, rank=5, seed=1, basis_shape=shape)
    A, B = randlora_basis(1, 5, shape, "dense", True)
    assert torch.equal(a.randlora_A.double(), A[:, :, :12].float().double())
    assert torch.equal(b.randlora_A.double(), A[:, :, :7].float().double())
    assert torch.equal(b.randlora_B.double(), B[:11, :2, :].float().double())


def test_nola_stores_seed_plus_k_plus_l_numbers():
    ad = adapters.create("nola", 30, 40, rank=4, num_basis_a=10, num_basis_b=6)
    assert {k: v.numel() for k, v in ad.state_dict().items()} == {"alpha": 10, "beta": 6}
    assert ad.config()["seed"] == 0
    assert ad.bases_a.shape == (10, 4, 40) and ad.bases_b.shape == (6, 30, 4) and ad.a0.shape == (4, 40)


# ----------------------------------------------------------------------------- RandLoRA specifics
def test_randlora_reaches_full_rank():
    """N = ceil(p / r) bases with generic scalings span rank p = min(m, n), even when r ∤ p."""

    @settings(max_examples=12)
    @given(st.integers(3, 18), st.integers(3, 18), st.integers(1, 5), st.integers(0, 2**16))
    def check(d_out, d_in, rank, seed):
        p = min(d_out, d_in)
        rank = min(rank, p)
        ad = randomize_(adapters.create("randlora", d_out, d_in, rank=rank, seed=seed % 97).double(), seed)
        assert ad.num_bases == math.ceil(p / rank)
        assert np.linalg.matrix_rank(_np(ad.delta_weight())) == p
        # a single basis (LoRA-like) stays at rank <= r
        with torch.no_grad():
            ad.lam[1:] = 0
        assert np.linalg.matrix_rank(_np(ad.delta_weight())) <= rank

    check()


def test_randlora_init_follows_peft():
    ad = adapters.create("randlora", 10, 25, rank=4)
    assert ad.scale == pytest.approx(20.0)  # default alpha = 20 r
    assert torch.equal(ad.lam, torch.zeros(3, 4))
    assert torch.equal(ad.gamma, torch.full((3, 10), 1 / 10))
    assert ad.randlora_B.shape == (25, 3, 4) and ad.randlora_A.shape == (1, 4, 10)


@pytest.mark.parametrize(("basis", "density"), [("sparse", 1 / 3), ("very_sparse", 1 / math.sqrt(40))])
def test_randlora_sparse_ternary_bases(basis, density):
    _, B = randlora_basis(0, 4, (40, 60), basis, True)
    vals = np.unique(B.numpy())
    np.testing.assert_allclose(vals, [-1 / math.sqrt(density), 0.0, 1 / math.sqrt(density)], rtol=1e-12)
    frac = float((B != 0).double().mean())
    sd = math.sqrt(density * (1 - density) / B.numel())
    assert abs(frac - density) < 5 * sd  # binomial: 5 sigma
    assert abs(float((B**2).mean()) - 1.0) < 0.2  # unit variance by construction


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("name", "cfg", "exc", "word"),
    [
        ("vera", {"rank": 0}, ValueError, "rank"),
        ("vera", {"rank": 2.5}, TypeError, "rank"),
        ("vera", {"d_initial": float("nan")}, ValueError, "d_initial"),
        ("vera", {"basis_shape": (5, 40)}, ValueError, "basis_shape"),
        ("vera", {"basis_shape": 40}, TypeError, "basis_shape"),
        ("vera", {"seed": -1}, ValueError, "seed"),
        ("vera", {"dropout": 1.0}, ValueError, "dropout"),
        ("nola", {"rank": 13}, ValueError, "rank"),
        ("nola", {"num_basis_a": 0}, ValueError, "num_basis_a"),
        ("nola", {"num_basis_b": -2}, ValueError, "num_basis_b"),
        ("nola", {"alpha": float("inf")}, ValueError, "alpha"),
        ("randlora", {"rank": 13}, ValueError, "rank"),
        ("randlora", {"rank": 4, "basis": "ternary"}, ValueError, "basis"),
        ("randlora", {"rank": 4, "shared_a": "yes"}, TypeError, "shared_a"),
        ("randlora", {"rank": 4, "alpha": float("nan")}, ValueError, "alpha"),
    ],
)
def test_bad_config(name, cfg, exc, word):
    with pytest.raises(exc, match=word):
        adapters.create(name, 12, 30, **cfg)
