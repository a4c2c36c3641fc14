"""Check of proofs/09-unilora-isometry.md: Uni-LoRA's projection has PᵀP = I, preserves norms, inner
products and distances, and the gradient in θ_d is Pᵀ of the gradient in θ_D.

Library objects: ``linalg.isometric_projection`` (its dense form, ``apply`` and ``adjoint``),
``linalg.IsometricProjection`` and the ``unilora`` adapter (``UniLoRAShared``) under torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters.projection import UniLoRAShared
from lowrank_theory.linalg import IsometricProjection, isometric_projection
from tests.conftest import tol

TOL = tol("float64")


@st.composite
def sizes(draw):
    d = draw(st.integers(1, 40))
    D = draw(st.integers(d, 200))
    return D, d, draw(st.integers(0, 2**31 - 1))


@given(sizes())
def test_isometry(args):
    D, d, seed = args
    P = isometric_projection(D, d, seed)
    Pd = P.to_dense()
    assert np.count_nonzero(Pd, axis=1).tolist() == [1] * D  # one non-zero per row
    np.testing.assert_allclose(Pd.T @ Pd, np.eye(d), **TOL)  # PᵀP = I
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal(d), rng.standard_normal(d)
    Px, Py = P.apply(x), P.apply(y)
    np.testing.assert_allclose(Px, Pd @ x, **TOL)
    assert np.linalg.norm(Px) == pytest.approx(np.linalg.norm(x), rel=1e-12)  # norms
    assert Px @ Py == pytest.approx(x @ y, rel=1e-10, abs=1e-12)  # inner products (hence angles)
    assert np.linalg.norm(Px - Py) == pytest.approx(np.linalg.norm(x - y), rel=1e-12)  # distances
    g = rng.standard_normal(D)
    np.testing.assert_allclose(P.adjoint(g), Pd.T @ g, **TOL)  # adjoint = Pᵀ
    np.testing.assert_allclose(P.adjoint(P.apply(x)), x, **TOL)  # left inverse


def test_gradient_in_theta_d_is_adjoint_of_gradient_in_theta_D():
    """Chain rule through the adapter: ∇_{θ_d} L = Pᵀ ∇_{θ_D} L, and PPᵀ is the projection on range(P)."""
    torch.manual_seed(0)
    shared = UniLoRAShared(d=30, seed=3, init_bound=0.3).double()
    layers = [adapters.create("unilora", 6, 5, rank=2, shared=shared).double(),
              adapters.create("unilora", 4, 7, rank=3, shared=shared).double()]
    P = shared.finalize()
    x1, x2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 7, dtype=torch.float64)

    def loss_from(l1, l2):
        return (l1(x1) ** 2).sum() + (l2(x2).sin()).sum()

    loss_from(*layers).backward()
    g_d = shared.theta_d.grad.clone()
    # the same loss as a function of θ_D directly (a leaf), then pulled back by the library's adjoint
    theta_D = shared.theta_D().detach().clone().requires_grad_(True)
    out = 0.0
    for lay, x in zip(layers, (x1, x2)):
        th = theta_D[lay.offset: lay.offset + lay.numel]
        rn = lay.rank * lay.d_in
        A, B = th[:rn].view(lay.rank, lay.d_in), th[rn:].view(lay.d_out, lay.rank)
        y = lay.scale * ((x @ A.T) @ B.T)
        out = out + ((y**2).sum() if lay is layers[0] else y.sin().sum())
    out.backward()
    np.testing.assert_allclose(g_d.numpy(), P.adjoint(theta_D.grad.numpy()), **TOL)
    Pd = P.to_dense()
    step_D = Pd @ g_d.numpy()  # the θ_D-space step induced by a θ_d step
    proj = Pd @ Pd.T @ theta_D.grad.numpy()
    np.testing.assert_allclose(step_D, proj, **TOL)  # = orthogonal projection of the full gradient


def test_negative_control_empty_column_breaks_isometry():
    """Weaken 'every column hit' (i.i.d. draws as in the authors' code can leave one empty)."""
    with pytest.raises(ValueError, match="empty"):
        IsometricProjection(np.array([0, 0, 2, 2]), d=3)
    # the same assignment with column 1 dropped from d: PᵀP would have a zero on its diagonal
    idx = np.array([0, 0, 2, 2])
    Pd = np.zeros((4, 3))
    Pd[np.arange(4), idx] = 1 / np.sqrt(2)
    assert np.linalg.matrix_rank(Pd.T @ Pd) == 2


def test_negative_control_uniform_scale_is_not_isometric():
    """Weaken '1/√n_j with the group's own size': one global scale √(d/D) fails when group sizes differ."""
    P = isometric_projection(50, 7, seed=1)
    assert len(set(P.counts.tolist())) > 1
    Pd = np.zeros((50, 7))
    Pd[np.arange(50), P.indices] = np.sqrt(7 / 50)
    assert np.linalg.norm(Pd.T @ Pd - np.eye(7)) > 0.1
