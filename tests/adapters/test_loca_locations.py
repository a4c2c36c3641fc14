"""LoCA's location learning: the finite-difference estimator, its sparse backward, the mover.

References: brute-force losses of actually moved coefficients (for a loss linear in ΔW the
first-order location estimate is exact, so the central difference must match it to round-off),
and autograd of the dense formula for the spectrum gradient.  Float64 tolerance: ``tol(float64)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters.frequency import loca_location_scores, loca_update_locations
from lowrank_theory.adapters.loca_locations import SparseSpectrumMatmul
from tests.conftest import tol

TOL64 = tol(torch.float64)


def _loca(m, n, locs, values, scale=1.0):
    ad = adapters.create("loca", m, n, n_frequency=len(locs), locations=torch.tensor(locs), scale=scale).double()
    with torch.no_grad():
        ad.coefficients.copy_(torch.as_tensor(values, dtype=torch.float64))
    return ad


@settings(max_examples=20)
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_scores_equal_brute_force_differences_of_a_linear_loss(m, n, data):
    """For L(ΔW) = <R, ΔW>, moving a_i one cell changes L by exactly a_i (G' - G): compare."""
    c = data.draw(st.integers(1, min(4, m * n)))
    cells = data.draw(st.lists(st.tuples(st.integers(0, m - 1), st.integers(0, n - 1)),
                               min_size=c, max_size=c, unique=True))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    values = torch.randn(c, dtype=torch.float64, generator=gen)
    R = torch.randn(m, n, dtype=torch.float64, generator=gen)
    ad = _loca(m, n, cells, values, scale=1.7)

    def loss(locs):
        ad.set_locations(torch.tensor(locs))
        return float((R * ad.delta_weight().detach()).sum())

    # G = ∂L/∂F from SciPy: ΔW = s C^T F C  =>  G = s C R C^T = s dctn(R)
    G = 1.7 * torch.from_numpy(scipy.fft.dctn(R.numpy(), norm="ortho"))
    scores = loca_location_scores(values, torch.tensor(cells), G)
    for i, (k, l) in enumerate(cells):
        for axis, (size, idx) in enumerate(((m, k), (n, l))):
            hi, lo = min(idx + 1, size - 1), max(idx - 1, 0)
            moved_hi = [list(p) for p in cells]
            moved_lo = [list(p) for p in cells]
            moved_hi[i][axis], moved_lo[i][axis] = hi, lo
            expected = (loss(moved_hi) - loss(moved_lo)) / max(hi - lo, 1)
            assert abs(float(scores[i, axis]) - expected) <= 1e-10 * (1 + abs(expected))


def test_backward_sink_equals_dense_estimate():
    """Scores accumulated by the sparse backward == scores from the dense autograd spectrum gradient."""
    torch.manual_seed(0)
    m, n, c = 11, 14, 8
    ad = adapters.create("loca", m, n, n_frequency=c, random_loc_seed=3, scale=0.9).double()
    with torch.no_grad():
        ad.coefficients.normal_()
    x = torch.randn(2, 5, n, dtype=torch.float64)
    target = torch.randn(2, 5, m, dtype=torch.float64)
    ad.learn_locations = True
    ad.coefficients.requires_grad_(False)  # the authors freeze coefficients in the location phase
    for _ in range(2):  # accumulates like gradients
        ((ad(x) - target) ** 2).sum().backward()
    ad.learn_locations = False
    # dense reference: F as a leaf, ΔW = s C_m^T F C_n with SciPy's orthonormal DCT matrices, G = F.grad
    F = ad.spectrum().detach().clone().requires_grad_(True)
    Cm = torch.from_numpy(scipy.fft.dct(np.eye(m), norm="ortho", axis=0))
    Cn = torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))
    dW = 0.9 * Cm.T @ F @ Cn
    ((x @ dW.T - target) ** 2).sum().backward()
    expected = 2 * loca_location_scores(ad.coefficients, ad.locations, F.grad)
    torch.testing.assert_close(ad.location_grad, expected, **TOL64)
    assert float(ad.location_grad.abs().max()) > 0


def test_sparse_spectrum_matmul_gradcheck():
    gen = torch.Generator().manual_seed(1)
    xhat = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.tensor([0, 2, 2, 4, 1])
    cols = torch.tensor([5, 0, 3, 3, 0])

    def f(xh, aa):
        return SparseSpectrumMatmul.apply(xh, aa, rows, cols, 5, None, None)

    assert torch.autograd.gradcheck(f, (xhat, a))
    dense = torch.zeros(5, 6, dtype=torch.float64).index_put((rows, cols), a.detach(), accumulate=True)
    torch.testing.assert_close(f(xhat, a), xhat @ dense.T, **TOL64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alternating_updates_recover_known_locations(seed):
    """ΔW* = s IDCT2(F*) with c known cells; start each coefficient one cell off: locations converge."""
    m, n, s = 16, 12, 1.5
    gen = torch.Generator().manual_seed(seed)
    true = [(1, 2), (5, 9), (9, 4), (14, 10), (0, 6)]  # pairwise >= 3 cells apart
    f_true = (1.0 + torch.rand(5, generator=gen, dtype=torch.float64)) * torch.tensor([1, -1, 1, -1, 1.0])
    offsets = [(1, 0), (0, -1), (-1, 0), (0, 1), (1, 0)]
    start = [(k + dk, l + dl) for (k, l), (dk, dl) in zip(true, offsets)]
    target = scipy.fft.idctn(
        torch.zeros(m, n, dtype=torch.float64).index_put(tuple(torch.tensor(true).T), f_true).numpy(), norm="ortho"
    ) * s
    target = torch.from_numpy(target)
    # inputs with orthogonal columns (X^T X = N I): the data loss is ½‖ΔW − ΔW*‖² N / N
    X = torch.linalg.qr(torch.randn(64, n, dtype=torch.float64, generator=gen))[0] * 8.0
    ad = _loca(m, n, start, 0.8 * f_true, scale=s)
    opt = torch.optim.SGD([ad.coefficients], lr=0.1 / s**2)

    def loss():
        return 0.5 * ((ad(X) - X @ target.T) ** 2).sum() / 64

    for _ in range(4):
        for _ in range(3):  # coefficient phase
            opt.zero_grad()
            loss().backward()
            opt.step()
        ad.learn_locations = True  # location phase
        ad.coefficients.grad = None
        loss().backward()
        ad.learn_locations = False
        loca_update_locations(ad)
        assert float(ad.location_grad.abs().max()) == 0.0  # reset
    assert sorted(map(tuple, ad.locations.tolist())) == sorted(true)
    opt = torch.optim.SGD([ad.coefficients], lr=0.5 / s**2)  # error halves per step on the right cells
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float((ad.delta_weight().detach() - target).norm() / target.norm()) < 1e-9


def test_update_is_rounded_clipped_descent_with_borders():
    ad = _loca(6, 7, [(2, 3), (0, 0), (5, 6), (3, 3)], [1.0, 1.0, 1.0, 1.0])
    scores = torch.tensor([[0.5, -0.2], [3.0, 0.1], [-1.0, 2.0], [1e-17, 0.0]], dtype=torch.float64)
    # r = -0.8 * clip(scores, 1): [[-.4, .16], [-.8, -.08], [.8, -.8], [~0, 0]]
    moved = loca_update_locations(ad, scores, lr=0.8)
    assert ad.locations.tolist() == [[2, 3], [0, 0], [5, 5], [3, 3]]  # row push at (0,0)/(5,·) clamped
    assert moved.tolist() == [False, False, True, False]
    torch.testing.assert_close(
        ad.location_residual,
        torch.tensor([[-0.4, 0.16], [0.0, -0.08], [0.0, 0.2], [-0.8e-17, 0.0]]).to(ad.location_residual),
    )
    moved = loca_update_locations(ad, scores, lr=0.8)  # residual -0.8 on row 0 -> one cell up
    assert ad.locations.tolist()[0] == [1, 3] and moved.tolist()[0]
    assert float(ad.location_residual[0, 0]) == pytest.approx(0.2)
    ad.set_locations(ad.locations)
    assert float(ad.location_residual.abs().max()) == 0.0


def test_bad_inputs_named():
    ad = _loca(4, 5, [(1, 1), (2, 2)], [1.0, 2.0])
    with pytest.raises(ValueError, match="scores"):
        loca_update_locations(ad, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="scores"):
        loca_update_locations(ad, torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="lr"):
        loca_update_locations(ad, torch.zeros(2, 2), lr=-1.0)
    with pytest.raises(ValueError, match="clip"):
        loca_update_locations(ad, torch.zeros(2, 2), clip=float("nan"))
    G = torch.zeros(4, 5, dtype=torch.float64)
    G[0, 0] = float("inf")
    with pytest.raises(ValueError, match="spectrum_grad"):
        loca_location_scores(ad.coefficients, ad.locations, G)
    with pytest.raises(ValueError, match="locations"):
        loca_location_scores(ad.coefficients, torch.tensor([[1, 1], [4, 0]]), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="coefficients"):
        loca_location_scores(torch.zeros(3), ad.locations, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="shape"):
        loca_location_scores(ad.coefficients, ad.locations, lambda r, c: r * 0.0)
