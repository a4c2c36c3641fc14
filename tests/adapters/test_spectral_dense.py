"""The dense path of FourierFT and LoCA (``path="dense"``) and the ``"auto"`` choice between paths.

The reference for every comparison is the structured path of the same adapter with the same
parameters (itself checked against NumPy/SciPy in ``test_frequency.py``) or autograd of the dense
formula ``x (W0 + ΔW)ᵀ + b`` built from ``delta_weight``.  Tolerance: float64 ``tol`` (1e-10
relative): both paths are a few FFT-sized transforms and one product of O(1) numbers, round-off
~1e-15.  Half precision: the merged weight is rounded to bf16 once (relative 2^-8 = 3.9e-3 per
entry), so the layer output is compared with ``10 * tol(bfloat16)``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters import spectral_dense
from lowrank_theory.adapters.layer import AdaptedLinear
from lowrank_theory.adapters.spectral_dense import prefers_dense
from tests.adapters.contract import AdapterContract, relerr
from tests.conftest import tol

TOL64 = tol(torch.float64)["rtol"]


class TestFourierFTDensePath(AdapterContract):
    name = "fourierft"
    cfg = {"n_frequency": 16, "scaling": 150.0, "seed": 3, "path": "dense"}


class TestLoCADensePath(AdapterContract):
    name = "loca"
    cfg = {"n_frequency": 16, "scale": 2.0, "path": "dense"}


def _layer(name, m, n, c, path, seed=0, bias=True, dtype=torch.float64):
    torch.manual_seed(seed)
    base = torch.nn.Linear(n, m, bias=bias).to(dtype)
    scale = {"scale": 1.7} if name == "loca" else {"scaling": 20.0}  # not 1: a dropped scale must show
    ad = adapters.create(name, m, n, n_frequency=c, path=path, **scale).to(dtype)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn_like(p))
    return AdaptedLinear(base, ad)


def _run(layer, x, gy, learn_locations=False, freeze=False):
    ad = layer.adapter
    if learn_locations:
        ad.learn_locations = True
    if freeze:
        ad.requires_grad_(False)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(gy)
    coef = next(iter(ad.parameters()))
    loc = ad.location_grad.clone() if hasattr(ad, "location_grad") else None
    return y.detach(), x.grad, coef.grad, loc


@settings(max_examples=20)
@given(st.sampled_from(["fourierft", "loca"]), st.integers(1, 17), st.integers(1, 17), st.data())
def test_dense_path_equals_structured_path(name, m, n, data):
    c = data.draw(st.integers(1, m * n))
    batch = data.draw(st.sampled_from([(1,), (4,), (2, 3)]))
    bias = data.draw(st.booleans())
    x = torch.randn(*batch, n, dtype=torch.float64)
    gy = torch.randn(*batch, m, dtype=torch.float64)
    ref = _run(_layer(name, m, n, c, "structured", bias=bias), x, gy, learn_locations=name == "loca")
    got = _run(_layer(name, m, n, c, "dense", bias=bias), x, gy, learn_locations=name == "loca")
    for a, b in zip(got, ref):
        if b is not None:
            assert relerr(a, b) < TOL64
    # and the output is the merged-weight formula
    layer = _layer(name, m, n, c, "dense", bias=bias)
    W = layer.weight + layer.adapter.delta_weight()
    expect = x @ W.T + (layer.bias if bias else 0.0)
    assert relerr(layer(x), expect) < TOL64


def test_location_estimate_with_frozen_coefficients_matches_structured():
    """LoCA's location phase (coefficients frozen, probe only): the same location_grad on both paths."""
    x, gy = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    ref = _run(_layer("loca", 9, 11, 13, "structured"), x, gy, learn_locations=True, freeze=True)
    got = _run(_layer("loca", 9, 11, 13, "dense"), x, gy, learn_locations=True, freeze=True)
    assert got[2] is None and ref[2] is None
    assert ref[3].abs().max() > 0  # a non-trivial estimate
    assert relerr(got[3], ref[3]) < TOL64
    assert relerr(got[1], ref[1]) < TOL64


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_dense_path_coefficient_gradient_matches_dense_autograd(name):
    """Against autograd through ``delta_weight`` of ``x (W0 + ΔW)ᵀ`` -- not through our backward."""
    layer = _layer(name, 10, 14, 23, "dense", seed=4)
    coef = next(iter(layer.adapter.parameters()))
    x = torch.randn(6, 14, dtype=torch.float64)
    w = torch.randn(6, 10, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((layer(x) * w).sum(), (coef,))
    dense = x @ (layer.weight + layer.adapter.delta_weight()).T
    (g_ref,) = torch.autograd.grad((dense * w).sum(), (coef,))
    assert relerr(g_fast, g_ref) < TOL64


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_dense_path_unfrozen_base_gets_its_gradient(name):
    layer = _layer(name, 6, 8, 9, "dense")
    layer.base.requires_grad_(True)
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    (layer(x) * w).sum().backward()
    assert relerr(layer.base.weight.grad, w.T @ x) < TOL64
    assert relerr(layer.base.bias.grad, w.sum(0)) < TOL64


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_dense_path_bf16_weight_float32_coefficient_gradient(name):
    ref = _layer(name, 32, 48, 40, "structured", dtype=torch.float32)
    low = _layer(name, 32, 48, 40, "dense", dtype=torch.float32)
    low.load_state_dict(ref.state_dict())
    low.base.to(torch.bfloat16)
    x = torch.randn(64, 48)
    y_ref, y_low = ref(x), low(x.to(torch.bfloat16))
    assert y_low.dtype == torch.bfloat16
    assert relerr(y_low.float(), y_ref) < 10 * tol(torch.bfloat16)["rtol"]
    g = torch.randn(64, 32)
    (ga_ref,) = torch.autograd.grad((y_ref * g).sum(), next(iter(ref.adapter.parameters())))
    coef = next(iter(low.adapter.parameters()))
    (ga_low,) = torch.autograd.grad((y_low.float() * g).sum(), coef)
    assert ga_low.dtype == torch.float32
    # x and g are rounded to bf16 before the float32 transforms: error ~ 2^-8 relative
    assert relerr(ga_low, ga_ref) < 10 * tol(torch.bfloat16)["rtol"]


# ----------------------------------------------------------------------------- the "auto" choice
def test_prefers_dense_threshold():
    # T (m log2 m + n log2 n + 2c) >= m n (log2(mn) + 1): 312 tokens at 384 x 384, c = 1000
    assert not prefers_dense(311, 384, 384, 1000)
    assert prefers_dense(312, 384, 384, 1000)
    assert prefers_dense(10**6, 8, 8, 1) and not prefers_dense(1, 4096, 4096, 1000)


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_auto_runs_the_path_the_rule_picks(name, monkeypatch):
    m = n = 16
    c = 20
    small = next(t for t in range(1, 10**4) if not prefers_dense(t + 1, m, n, c))  # below the threshold
    large = next(t for t in range(1, 10**4) if prefers_dense(t, m, n, c))
    assert small < large
    calls = []
    real = spectral_dense.spectral_dense_linear

    def spy(*a, **k):
        calls.append(a[1].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(spectral_dense, "spectral_dense_linear", spy)
    auto = _layer(name, m, n, c, "auto")
    fixed = _layer(name, m, n, c, "structured")
    for tokens in (small, large):
        x = torch.randn(tokens, n, dtype=torch.float64)
        assert relerr(auto(x), fixed(x)) < TOL64
    assert calls == [large]


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_bad_path_is_named(name):
    with pytest.raises(ValueError, match="path"):
        adapters.create(name, 8, 8, n_frequency=4, path="fast")


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_path_survives_the_config(name):
    ad = adapters.create(name, 8, 8, n_frequency=4, path="dense")
    again = adapters.create(name, 8, 8, **ad.config())
    assert again.path == "dense"


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_dense_path_on_cuda(name):
    x, gy = torch.randn(7, 40, dtype=torch.float64), torch.randn(7, 24, dtype=torch.float64)
    ref = _run(_layer(name, 24, 40, 50, "structured"), x, gy)
    got = _run(_layer(name, 24, 40, 50, "dense").cuda(), x.cuda(), gy.cuda())
    for a, b in zip(got[:3], ref[:3]):
        assert relerr(a.cpu(), b) < TOL64


@pytest.mark.parametrize("name", ["fourierft", "loca"])
def test_backward_in_token_chunks_equals_one_chunk(name, monkeypatch):
    """The coefficient gradient (and LoCA's location estimate) is a sum over tokens, taken over
    chunks of at most ``_CHUNK_BYTES`` of float32 rows so the backward's memory does not grow with
    T: seven chunks give the one-chunk result (float64 tol; only the order of a sum changes)."""
    x, gy = torch.randn(2, 13, 40, dtype=torch.float64), torch.randn(2, 13, 24, dtype=torch.float64)
    loc = name == "loca"
    one = _run(_layer(name, 24, 40, 50, "dense"), x, gy, learn_locations=loc)
    monkeypatch.setattr(spectral_dense, "_CHUNK_BYTES", 4 * 40 * 4)  # 4 float32 rows of width 40
    assert len(spectral_dense.token_chunks(26, 40)) == 7
    assert spectral_dense.token_chunks(0, 40) == [slice(0, 0)]
    many = _run(_layer(name, 24, 40, 50, "dense"), x, gy, learn_locations=loc)
    for a, b in zip(many, one):
        if b is None:
            assert a is None
        else:
            assert relerr(a, b) < TOL64
    if loc:
        assert float(one[3].abs().max()) > 0  # the location estimate was accumulated and compared
