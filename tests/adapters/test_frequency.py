"""FourierFT, LoCA and QWHA against the contract, NumPy/SciPy references and their fast paths.

References are independent of our code: ``numpy.fft.ifft2`` (FourierFT's dense formula),
``scipy.fft.idctn(norm="ortho")`` (LoCA's), an explicit Sylvester Hadamard matrix built by
``scipy.linalg.hadamard`` (QWHA's).  Tolerance: ``tol(float64)`` (1e-10 relative) for every
float64 comparison -- each path is one or two FFT-sized transforms of O(1) numbers, whose
round-off is ~1e-15 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters import frequency, loca_locations
from lowrank_theory.adapters.frequency import random_locations
from tests.adapters.contract import AdapterContract, relerr
from tests.conftest import tol

TOL64 = tol(torch.float64)


# ----------------------------------------------------------------------------- contract
class TestFourierFT(AdapterContract):
    name = "fourierft"
    cfg = {"n_frequency": 16, "scaling": 150.0, "seed": 3}


class TestFourierFTZeroInit(AdapterContract):
    name = "fourierft"
    cfg = {"n_frequency": 16, "scaling": 20.0, "init_weights": True, "random_loc_seed": 5}


class TestLoCA(AdapterContract):
    name = "loca"
    cfg = {"n_frequency": 16, "scale": 2.0}


class TestQWHA(AdapterContract):
    name = "qwha"
    cfg = {"n_frequency": 16, "scale": 1.5}


class TestQWHAInputAxis(AdapterContract):
    name = "qwha"
    cfg = {"n_frequency": 16, "axes": "input"}


# ----------------------------------------------------------------------------- helpers
def _randomized(name, m, n, c, seed=0, **cfg):
    ad = adapters.create(name, m, n, n_frequency=c, **cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return ad


def _values(ad) -> np.ndarray:
    return next(iter(ad.parameters())).detach().numpy()


def _np_spectrum(ad) -> np.ndarray:
    F = np.zeros((ad.d_out, ad.d_in))
    np.add.at(F, (ad.locations[:, 0].numpy(), ad.locations[:, 1].numpy()), _values(ad))
    return F


shapes = st.tuples(st.integers(1, 23), st.integers(1, 23))


# ----------------------------------------------------------------------------- dense formulas vs NumPy/SciPy
@settings(max_examples=25)
@given(shapes, st.data())
def test_fourierft_dense_matches_numpy_ifft2(shape, data):
    m, n = shape
    c = data.draw(st.integers(1, m * n))
    seed = data.draw(st.integers(0, 2**16))
    ad = _randomized("fourierft", m, n, c, random_loc_seed=seed, scaling=7.5)
    ref = np.fft.ifft2(_np_spectrum(ad)).real * 7.5
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), ref, **TOL64)


@settings(max_examples=25)
@given(shapes, st.data())
def test_loca_dense_matches_scipy_idctn(shape, data):
    m, n = shape
    c = data.draw(st.integers(1, m * n))
    ad = _randomized("loca", m, n, c, random_loc_seed=data.draw(st.integers(0, 2**16)), scale=0.7)
    ref = scipy.fft.idctn(_np_spectrum(ad), norm="ortho") * 0.7
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), ref, **TOL64)


def test_loca_duplicate_locations_add():
    """Two coefficients on one cell act as their sum, in the dense formula and the fast path."""
    locs = torch.tensor([[2, 3], [2, 3], [0, 1]])
    ad = adapters.create("loca", 5, 7, n_frequency=3, locations=locs).double()
    with torch.no_grad():
        ad.coefficients.copy_(torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64))
    F = np.zeros((5, 7))
    F[2, 3], F[0, 1] = 2.0, -1.0
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), scipy.fft.idctn(F, norm="ortho"), **TOL64)
    x = torch.randn(4, 7, dtype=torch.float64)
    assert relerr(ad(x), x @ ad.delta_weight().T) < TOL64["rtol"]


# ----------------------------------------------------------------------------- fast path vs dense
@settings(max_examples=25)
@given(shapes, st.sampled_from(["both", "input"]), st.data())
def test_qwha_dense_matches_scipy_hadamard(shape, axes, data):
    """ΔW = s [H_M^T F H_N]_{:m,:n} with SciPy's Sylvester Hadamard matrices (orthonormalized)."""
    m, n = shape
    M = 1 << (m - 1).bit_length() if axes == "both" else m
    N = 1 << (n - 1).bit_length()
    c = data.draw(st.integers(1, M * N))
    ad = _randomized("qwha", m, n, c, random_loc_seed=data.draw(st.integers(0, 2**16)), scale=1.3, axes=axes)
    assert (ad.M, ad.N) == (M, N)
    F = np.zeros((M, N))
    np.add.at(F, (ad.locations[:, 0].numpy(), ad.locations[:, 1].numpy()), _values(ad))
    HN = scipy.linalg.hadamard(N) / np.sqrt(N)
    full = (scipy.linalg.hadamard(M) / np.sqrt(M)).T @ F @ HN if axes == "both" else F @ HN
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), 1.3 * full[:m, :n], **TOL64)


@settings(max_examples=25)
@given(shapes, st.sampled_from(["fourierft", "loca", "qwha"]), st.data())
def test_fast_path_matches_dense(shape, name, data):
    m, n = shape
    c = data.draw(st.integers(1, m * n))  # <= M N for QWHA too
    batch = data.draw(st.sampled_from([(1,), (3,), (2, 4)]))
    ad = _randomized(name, m, n, c, seed=data.draw(st.integers(0, 100)))
    x = torch.randn(*batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = ad(x)
    assert y.shape == (*batch, m)
    assert relerr(y, x @ ad.delta_weight().T) < TOL64["rtol"]


@pytest.mark.parametrize("name", ["fourierft", "loca", "qwha"])
def test_forward_never_builds_dense_spectrum(name, monkeypatch):
    ad = _randomized(name, 12, 20, 9, **({} if name == "qwha" else {"path": "structured"}))
    x = torch.randn(3, 20, dtype=torch.float64)
    expected = x @ ad.delta_weight().T

    def forbidden(*a, **k):
        raise AssertionError("forward built a dense spectrum / ΔW")

    monkeypatch.setattr(frequency, "dense_spectrum", forbidden)
    monkeypatch.setattr(loca_locations, "dense_spectrum", forbidden)
    monkeypatch.setattr(torch.fft, "ifft2", forbidden)
    monkeypatch.setattr(ad, "delta_weight", forbidden)
    assert relerr(ad(x), expected) < TOL64["rtol"]


@pytest.mark.parametrize("name", ["fourierft", "loca", "qwha"])
def test_gradients_match_dense_autograd(name):
    """Grad wrt trainable values and wrt x through the fast path == autograd of the dense formula."""
    ad = _randomized(name, 9, 14, 11, seed=2)
    p = next(iter(ad.parameters()))
    x = torch.randn(5, 14, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 9, dtype=torch.float64)
    (gp_fast, gx_fast) = torch.autograd.grad((ad(x) * w).sum(), (p, x))
    (gp_dense, gx_dense) = torch.autograd.grad(((x @ ad.delta_weight().T) * w).sum(), (p, x))
    assert relerr(gp_fast, gp_dense) < TOL64["rtol"]
    assert relerr(gx_fast, gx_dense) < TOL64["rtol"]


def test_loca_coefficient_gradient_is_c_dot_products():
    r"""∂L/∂a_i = Σ_t (s C_m g_t)_{k_i} (C_n x_t)_{l_i}: SciPy DCTs of input and output gradient."""
    ad = _randomized("loca", 10, 13, 7, seed=4, scale=1.3)
    x = torch.randn(6, 13, dtype=torch.float64)
    g = torch.randn(6, 10, dtype=torch.float64)
    (ga,) = torch.autograd.grad((ad(x) * g).sum(), (ad.coefficients,))
    xh = scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)
    gh = 1.3 * scipy.fft.dct(g.numpy(), norm="ortho", axis=-1)
    k, l = ad.locations[:, 0].numpy(), ad.locations[:, 1].numpy()
    np.testing.assert_allclose(ga.numpy(), (gh[:, k] * xh[:, l]).sum(0), **TOL64)


# ----------------------------------------------------------------------------- init, state, sharing
def test_fourierft_init_conventions():
    zero = adapters.create("fourierft", 12, 20, n_frequency=30, init_weights=True)
    assert float(zero.delta_weight().detach().abs().max()) == 0.0
    a = adapters.create("fourierft", 12, 20, n_frequency=30, seed=1)
    b = adapters.create("fourierft", 12, 20, n_frequency=30, seed=1)
    torch.testing.assert_close(a.spectrum, b.spectrum, rtol=0, atol=0)
    assert float(a.delta_weight().detach().norm()) > 0  # PEFT's default: Gaussian spectrum, ΔW ≠ 0
    assert not type(a).identity_at_init
    assert list(a.state_dict()) == ["spectrum"]  # locations are regenerated from the seed


def test_fourierft_locations_shared_and_distinct():
    a = adapters.create("fourierft", 16, 24, n_frequency=50, random_loc_seed=9)
    b = adapters.create("fourierft", 16, 24, n_frequency=50, random_loc_seed=9)
    c = adapters.create("fourierft", 16, 24, n_frequency=50, random_loc_seed=10)
    assert torch.equal(a.locations, b.locations)
    assert not torch.equal(a.locations, c.locations)
    flat = a.locations[:, 0] * 24 + a.locations[:, 1]
    assert flat.unique().numel() == 50
    assert torch.equal(random_locations(16, 24, 50, 9), a.locations)


def test_loca_locations_persist_in_state_dict():
    a = adapters.create("loca", 8, 11, n_frequency=6, random_loc_seed=1).double()
    b = adapters.create("loca", 8, 11, n_frequency=6, random_loc_seed=2).double()
    assert set(a.state_dict()) == {"coefficients", "locations"}
    with torch.no_grad():
        a.coefficients.normal_()
    a.set_locations(torch.tensor([[7, 10], [0, 0], [3, 4], [3, 5], [1, 9], [6, 2]]))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.locations, b.locations)
    x = torch.randn(2, 11, dtype=torch.float64)
    torch.testing.assert_close(b(x), a(x), **TOL64)


def test_loca_identity_at_init_and_counts():
    ad = adapters.create("loca", 7, 9, n_frequency=20)
    assert float(ad.delta_weight().detach().abs().max()) == 0.0
    assert ad.num_trainable == 20 == type(ad).param_count(7, 9, n_frequency=20)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name", ["fourierft", "loca", "qwha"])
def test_bad_n_frequency(name):
    too_many = 33 if name == "qwha" else 21  # QWHA's spectrum is 4 x 8 (padded)
    with pytest.raises(ValueError, match="n_frequency"):
        adapters.create(name, 4, 5, n_frequency=too_many)
    with pytest.raises(ValueError, match="n_frequency"):
        adapters.create(name, 4, 5, n_frequency=0)
    with pytest.raises(TypeError, match="n_frequency"):
        adapters.create(name, 4, 5, n_frequency=3.0)


def test_bad_scales_and_axes():
    with pytest.raises(ValueError, match="scaling"):
        adapters.create("fourierft", 4, 5, n_frequency=3, scaling=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        adapters.create("loca", 4, 5, n_frequency=3, scale=float("inf"))
    with pytest.raises(ValueError, match="axes"):
        adapters.create("qwha", 4, 5, n_frequency=3, axes="output")


@pytest.mark.parametrize(
    "locs, err",
    [
        (torch.tensor([[0, 0], [4, 1]]), ValueError),  # row 4 outside a 4-row spectrum
        (torch.tensor([[0, 0], [1, -1]]), ValueError),  # negative column
        (torch.tensor([[0, 0, 0], [1, 1, 1]]), ValueError),  # shape (2, 3)
        (torch.tensor([[0.0, 0.0], [1.0, 1.0]]), TypeError),  # float cells
        ([[0, 0], [1, 1]], TypeError),  # not a tensor
    ],
)
def test_bad_locations(locs, err):
    with pytest.raises(err, match="locations"):
        adapters.create("loca", 4, 5, n_frequency=2, locations=locs)


def test_locations_count_mismatch():
    with pytest.raises(ValueError, match="locations"):
        adapters.create("loca", 4, 5, n_frequency=3, locations=torch.tensor([[0, 0], [1, 1]]))
    ad = adapters.create("loca", 4, 5, n_frequency=2)
    with pytest.raises(ValueError, match="locations"):
        ad.set_locations(torch.tensor([[0, 0], [1, 9]]))


# ----------------------------------------------------------------------------- QWHA.from_weight
def _grid_quantizer(W, step=0.25):
    """An independent stand-in quantizer: round to a fixed grid."""
    return torch.round(W / step) * step


def _hadamard_design(ad, m, n):
    """Explicit (m n, c) design matrix of the chosen cells from SciPy's Hadamard matrices."""
    HN = scipy.linalg.hadamard(ad.N) / np.sqrt(ad.N)
    HM = scipy.linalg.hadamard(ad.M) / np.sqrt(ad.M) if ad.axes == "both" else np.eye(ad.M)
    cols = [np.outer(HM[:, k], HN[l, :])[:m, :n].ravel() * ad.scale for k, l in ad.locations.tolist()]
    return np.stack(cols, axis=1)


def test_qwha_from_weight_power_of_two_is_best_c_term():
    """No padding: the c largest WHT coefficients of E = W − Q(W), and Parseval's residual."""
    W = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ad, Q = frequency.QWHA.from_weight(W, 20, quantizer=_grid_quantizer)
    torch.testing.assert_close(Q, _grid_quantizer(W), rtol=0, atol=0)
    E = (W - Q).numpy()
    Ehat = (scipy.linalg.hadamard(8) / np.sqrt(8)) @ E @ (scipy.linalg.hadamard(16) / np.sqrt(16)).T
    top = np.argsort(-np.abs(Ehat).ravel())[:20]
    chosen = (ad.locations[:, 0] * 16 + ad.locations[:, 1]).numpy()
    assert set(chosen) == set(top)
    np.testing.assert_allclose(_values(ad), Ehat.ravel()[chosen], **TOL64)
    resid2 = float(((W - Q - ad.delta_weight().detach()) ** 2).sum())
    np.testing.assert_allclose(resid2, (E**2).sum() - (Ehat.ravel()[top] ** 2).sum(), **TOL64)


@pytest.mark.parametrize("axes", ["both", "input"])
def test_qwha_from_weight_padded_values_are_least_squares(axes):
    """Padding (12 x 20 -> 16 x 32): refined values == numpy.linalg.lstsq on the explicit design.

    Tolerance 1e-8: LSQR stops at atol=btol=1e-14 on a well-conditioned (cond < 10) problem.
    """
    W = torch.randn(12, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ad, Q = frequency.QWHA.from_weight(W, 40, quantizer=_grid_quantizer, scale=0.5, axes=axes)
    raw, _ = frequency.QWHA.from_weight(W, 40, quantizer=_grid_quantizer, scale=0.5, axes=axes, refine=False)
    assert torch.equal(ad.locations, raw.locations)
    E = (W - Q).numpy()
    A = _hadamard_design(ad, 12, 20)
    f = np.linalg.lstsq(A, E.ravel(), rcond=None)[0]
    np.testing.assert_allclose(_values(ad), f, rtol=1e-8, atol=1e-8)
    r_ref = np.linalg.norm(E)
    r_raw = float((W - Q - raw.delta_weight().detach()).norm())
    r_fit = float((W - Q - ad.delta_weight().detach()).norm())
    assert r_fit < r_raw < r_ref


def test_qwha_from_weight_layer_compensates_quantization():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 12).double()
    W0 = lin.weight.detach().clone()
    ad, Q = frequency.QWHA.from_weight(W0.float(), 60, quantizer=_grid_quantizer)
    assert ad.values.dtype == torch.float32 and Q.dtype == torch.float32
    with torch.no_grad():
        lin.weight.copy_(Q)
    layer = adapters.AdaptedLinear(lin, ad.double())
    x = torch.randn(6, 20, dtype=torch.float64)
    y0 = x @ W0.T + lin.bias
    err_q = float((layer.base(x) - y0).norm())
    err_adapted = float((layer(x) - y0).norm())
    assert err_adapted < 0.9 * err_q


@pytest.mark.parametrize("quantizer, kw", [("nf4", {}), ("uniform", {"bits": 3, "block_size": 16})])
def test_qwha_from_weight_linalg_quantizers(quantizer, kw):
    from lowrank_theory import linalg

    W = torch.randn(12, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ad, Q = frequency.QWHA.from_weight(W, 30, quantizer=quantizer, **kw)
    ref = linalg.quantize_nf4(W) if quantizer == "nf4" else linalg.quantize_uniform(W, 3, block_size=16)
    torch.testing.assert_close(Q, ref, rtol=0, atol=0)
    assert float((W - Q).norm()) > 0
    assert float((W - Q - ad.delta_weight().detach()).norm()) < 0.95 * float((W - Q).norm())


def test_qwha_from_weight_bad_inputs():
    W = torch.randn(4, 6, dtype=torch.float64)
    bad = W.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="W"):
        frequency.QWHA.from_weight(bad, 3, quantizer=_grid_quantizer)
    with pytest.raises(ValueError, match="W"):
        frequency.QWHA.from_weight(W[0], 3, quantizer=_grid_quantizer)
    with pytest.raises(TypeError, match="W"):
        frequency.QWHA.from_weight(W.numpy(), 3, quantizer=_grid_quantizer)
    with pytest.raises(ValueError, match="quantizer"):
        frequency.QWHA.from_weight(W, 3, quantizer="int3")
    with pytest.raises(ValueError, match="quantizer"):
        frequency.QWHA.from_weight(W, 3, quantizer=lambda w: w[:2])
    with pytest.raises(ValueError, match="quantizer"):
        frequency.QWHA.from_weight(W, 3, quantizer=lambda w: w * float("inf"))
    with pytest.raises(ValueError, match="n_frequency"):
        frequency.QWHA.from_weight(W, 4 * 8 + 1, quantizer=_grid_quantizer)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["fourierft", "loca", "qwha"])
def test_fast_path_on_cuda(name):
    """The fast path on a CUDA device: float64 equals the dense formula; half inputs run in float32."""
    ad = _randomized(name, 24, 40, 50, seed=3).cuda()
    x = torch.randn(3, 7, 40, dtype=torch.float64, device="cuda")
    assert relerr(ad(x), x @ ad.delta_weight().T) < TOL64["rtol"]
    y16 = ad.half()(x.half())
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    assert relerr(y16.double(), x @ ad.double().delta_weight().T) < 10 * tol(torch.float16)["rtol"]
