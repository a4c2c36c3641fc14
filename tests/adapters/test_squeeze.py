"""LoRA-Squeeze (arXiv:2602.10993): compress a trained LoRA without forming its dense update.

References: the Eckart–Young optimum of the dense ``s·B·A`` computed by NumPy's float64 SVD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.adapters.lowrank import LoRA
from lowrank_theory.adapters.squeeze import squeeze_lora, squeeze_schedule
from tests.conftest import tol


def _trained_lora(m: int, n: int, r: int, seed: int, dtype=torch.float64) -> LoRA:
    ad = LoRA(m, n, rank=r, alpha=2.0 * r).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ad.B.copy_(torch.randn(m, r, generator=g, dtype=dtype))
        ad.A.copy_(torch.randn(r, n, generator=g, dtype=dtype))
    return ad


def _eckart_young(dw: np.ndarray, k: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(dw, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@given(m=st.integers(3, 12), n=st.integers(3, 12), data=st.data())
def test_squeeze_is_the_eckart_young_optimum(m, n, data):
    r = data.draw(st.integers(1, min(m, n, 6)))
    k = data.draw(st.integers(1, r))
    seed = data.draw(st.integers(0, 10_000))
    src = _trained_lora(m, n, r, seed)
    dw = src.delta_weight().detach().numpy()
    out = squeeze_lora(src, k)
    assert out.rank == k and out.A.shape == (k, n) and out.B.shape == (m, k)
    got = out.delta_weight().detach().numpy()
    ref = _eckart_young(dw, k)
    # float64 SVDs of a matrix with entries O(r): agreement to a few hundred ulps of its norm
    assert np.linalg.norm(got - ref) <= 1e-9 * max(1.0, np.linalg.norm(dw))


def test_squeeze_to_source_rank_is_exact_and_alpha_does_not_change_delta():
    src = _trained_lora(9, 7, 4, 1)
    dw = src.delta_weight().detach()
    for alpha in (1.0, 4.0, 37.0):
        out = squeeze_lora(src, 4, alpha=alpha)
        assert out.scale == pytest.approx(alpha / 4)
        torch.testing.assert_close(out.delta_weight(), dw, rtol=1e-10, atol=1e-10)  # float64 round-off


def test_squeezed_error_is_the_discarded_singular_values_and_not_beaten():
    src = _trained_lora(16, 12, 6, 3)
    dw = src.delta_weight().detach().numpy()
    S = np.linalg.svd(dw, compute_uv=False)
    out = squeeze_lora(src, 3)
    err = np.linalg.norm(out.delta_weight().detach().numpy() - dw)
    assert err == pytest.approx(np.sqrt((S[3:] ** 2).sum()), rel=1e-9)
    # negative control: a naive truncation (keep the first 3 columns of B / rows of A) is worse
    naive = src.scale * (src.B[:, :3] @ src.A[:3]).detach().numpy()
    assert np.linalg.norm(naive - dw) > err * (1 + 1e-3)


def test_randomized_path_matches_exact_on_a_decaying_spectrum():
    m, n, r = 40, 30, 12
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = 2.0 ** -np.arange(r)
    src = LoRA(m, n, rank=r, alpha=r).double()
    with torch.no_grad():
        src.B.copy_(torch.from_numpy(U * s))
        src.A.copy_(torch.from_numpy(V.T))
    exact = squeeze_lora(src, 3).delta_weight().detach().numpy()
    rand = squeeze_lora(src, 3, randomized=True, oversample=2, n_iter=2, seed=0).delta_weight().detach().numpy()
    dw = src.delta_weight().detach().numpy()
    e_exact, e_rand = np.linalg.norm(exact - dw), np.linalg.norm(rand - dw)
    # HMT bound with q=2 power iterations on a 2^-k spectrum: the randomized error is within 1% of optimal
    assert e_exact <= e_rand <= 1.01 * e_exact
    # the same seed gives the same factors
    again = squeeze_lora(src, 3, randomized=True, oversample=2, n_iter=2, seed=0).delta_weight().detach().numpy()
    np.testing.assert_array_equal(rand, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_source_keeps_dtype_and_accuracy(dtype):
    src = _trained_lora(12, 10, 5, 7, dtype=torch.float64)
    low = LoRA(12, 10, rank=5, alpha=10.0).to(dtype)
    with torch.no_grad():
        low.B.copy_(src.B.to(dtype))
        low.A.copy_(src.A.to(dtype))
    out = squeeze_lora(low, 2)
    assert out.B.dtype == dtype and out.A.dtype == dtype
    ref = _eckart_young(low.delta_weight().detach().double().numpy(), 2)
    got = out.delta_weight().detach().double().numpy()
    # computed in float32, then the factors are rounded once to `dtype`: the product is off by a few
    # units of eps(dtype), inside the per-dtype tolerance of conftest (1 rounding of the output)
    assert np.linalg.norm(got - ref) <= tol(dtype)["rtol"] * np.linalg.norm(ref)


def test_squeeze_bad_input():
    src = _trained_lora(6, 5, 3, 0)
    with pytest.raises(TypeError, match="adapter"):
        squeeze_lora(torch.zeros(3, 3), 1)
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="target_rank"):
            squeeze_lora(src, bad)
    with pytest.raises(ValueError, match="alpha"):
        squeeze_lora(src, 2, alpha=-1.0)
    with pytest.raises(ValueError, match="oversample"):
        squeeze_lora(src, 2, randomized=True, oversample=-1)
    with torch.no_grad():
        src.A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        squeeze_lora(src, 2)


@given(r_src=st.integers(1, 64), data=st.data())
def test_schedule_is_monotone_and_ends_at_target(r_src, data):
    r_tgt = data.draw(st.integers(1, r_src))
    steps = data.draw(st.integers(1, 20))
    kind = data.draw(st.sampled_from(["linear", "geometric"]))
    ranks = squeeze_schedule(r_src, r_tgt, steps, kind=kind)
    assert len(ranks) == steps and ranks[-1] == r_tgt
    assert all(a >= b for a, b in zip(ranks, ranks[1:]))
    assert all(r_tgt <= v <= r_src for v in ranks)


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="r_tgt"):
        squeeze_schedule(4, 8, 3)
    with pytest.raises(ValueError, match="steps"):
        squeeze_schedule(8, 4, 0)
    with pytest.raises(ValueError, match="kind"):
        squeeze_schedule(8, 4, 2, kind="cosine")
