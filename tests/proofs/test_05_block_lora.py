"""Check of proofs/05-block-lora-rank.md: Block-LoRA with one shared down-projection is a LoRA of rank r/k.

What is true (and checked here against the library's ``BlockLoRA``):

* reachable set: {s(Σ_i B_i)A} = {M : rank M <= r/k}, the reachable set of a rank-r/k LoRA;
* parameters: m·r + n·r/k trainable scalars, (k−1)·m·r/k more than that LoRA, all redundant (the
  Jacobian has the LoRA's generic rank r_b(m + n − r_b));
* dynamics: under SGD or Adam, Block-LoRA with rate η is LoRA of rank r/k with rate k·η on B and η on A.

References: the dense block product [B_1 … B_k]·[A; …; A] (NumPy), the library's ``LoRA`` adapter, NumPy SVD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters.lowrank import LoRA
from lowrank_theory.adapters.lowrank_variants import BlockLoRA
from tests.conftest import tol

TOL = tol("float64")


def _rank(M: np.ndarray) -> int:
    s = np.linalg.svd(M, compute_uv=False)
    # relative cut-off 1e-10: float64 products of these O(1) factors carry round-off ~1e-15·σ_1
    return int(np.sum(s > 1e-10 * max(s[0], 1e-300)))


@st.composite
def configs(draw):
    m, n = draw(st.integers(2, 10)), draw(st.integers(2, 10))
    rb = draw(st.integers(1, min(m, n)))
    k = draw(st.integers(1, 4))
    r = rb * k
    if r > min(m, n):  # the library validates r <= min(m, n) (r is the nominal LoRA rank)
        k, r = 1, rb
    return m, n, r, k, draw(st.integers(0, 2**31 - 1)), draw(st.floats(0.5, 4.0))


def _randomized(m, n, r, k, seed, alpha) -> BlockLoRA:
    ad = adapters.create("block_lora", m, n, rank=r, num_blocks=k, alpha=alpha, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ad.B.copy_(torch.randn(ad.B.shape, generator=g, dtype=torch.float64))
        ad.A.copy_(torch.randn(ad.A.shape, generator=g, dtype=torch.float64))
    return ad


@given(configs())
def test_delta_is_the_block_product_and_has_rank_at_most_r_over_k(cfg):
    m, n, r, k, seed, alpha = cfg
    ad = _randomized(m, n, r, k, seed, alpha)
    B, A = ad.B.detach().numpy(), ad.A.detach().numpy()
    rb = r // k
    assert A.shape == (rb, n) and B.shape == (m, r)
    # the paper's block form: [B_1 … B_k] (m × r) times the k-fold stacked shared A (r × n)
    dense = (alpha / r) * B @ np.vstack([A] * k)
    dW = ad.delta_weight().detach().numpy()
    np.testing.assert_allclose(dW, dense, **TOL)
    assert _rank(dW) == min(rb, m, n)  # generic point: exactly r/k, never more
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    np.testing.assert_allclose(ad(x).detach().numpy(), x.numpy() @ dense.T, **TOL)  # forward = x ΔWᵀ


@given(configs())
def test_every_rank_r_over_k_matrix_is_reached_and_it_is_a_lora(cfg):
    """Surjectivity onto {rank <= r/k}: any such T is s(ΣB_i)A for B_1 = U S/s − Σ_{i>1} B_i, A = Vᵀ."""
    m, n, r, k, seed, alpha = cfg
    rb = r // k
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((m, rb)) @ rng.standard_normal((rb, n))
    ad = _randomized(m, n, r, k, seed, alpha)
    U, S, Vh = np.linalg.svd(T, full_matrices=False)
    B = ad.B.detach().numpy().copy()
    blocks = B.reshape(m, k, rb)  # column j = i·r_b + c of B belongs to block i (the library's layout)
    blocks[:, 0, :] = U[:, :rb] * S[:rb] / ad.scale - blocks[:, 1:, :].sum(axis=1)
    with torch.no_grad():
        ad.B.copy_(torch.from_numpy(blocks.reshape(m, r)))
        ad.A.copy_(torch.from_numpy(Vh[:rb]))
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), T, rtol=1e-9, atol=1e-9)
    # the same ΔW as a library LoRA of rank r/k with B = ΣB_i, A shared, equal scale
    lora = LoRA(m, n, rank=rb, alpha=ad.scale * rb).double()
    with torch.no_grad():
        lora.B.copy_(ad.summed_B())
        lora.A.copy_(ad.A)
    np.testing.assert_allclose(lora.delta_weight().detach().numpy(), ad.delta_weight().detach().numpy(), **TOL)


def test_negative_control_rank_r_target_is_out_of_reach():
    """A rank-r target (r = k·r_b) is not reachable: every Block-LoRA ΔW is at least the EYM tail away.

    The same target IS reached by a plain LoRA of rank r (unshared A_i): sharing is what caps the rank.
    """
    m, n, r, k = 9, 8, 4, 2
    rb = r // k
    rng = np.random.default_rng(0)
    T = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    sigma = np.linalg.svd(T, compute_uv=False)
    tail = float(np.sum(sigma[rb:] ** 2))
    assert tail > 1.0  # the target genuinely has rank r > r_b
    ad = adapters.create("block_lora", m, n, rank=r, num_blocks=k, seed=0).double()
    Tt = torch.from_numpy(T)
    opt = torch.optim.Adam(ad.parameters(), lr=0.05)
    with torch.no_grad():
        ad.B.normal_(generator=torch.Generator().manual_seed(1))
    for _ in range(600):
        opt.zero_grad()
        loss = ((ad.delta_weight() - Tt) ** 2).sum()
        loss.backward()
        opt.step()
    final = float(((ad.delta_weight().detach() - Tt) ** 2).sum())
    assert final >= tail * (1 - 1e-9)  # Eckart–Young: no rank-r_b matrix beats the tail
    assert final <= tail * 1.01  # and training does get to it (so the bound is the binding constraint)
    lora = LoRA(m, n, rank=r).double()
    U, S, Vh = np.linalg.svd(T, full_matrices=False)
    with torch.no_grad():
        lora.B.copy_(torch.from_numpy(U[:, :r] * S[:r] / lora.scale))
        lora.A.copy_(torch.from_numpy(Vh[:r]))
    np.testing.assert_allclose(lora.delta_weight().detach().numpy(), T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("m", "n", "r", "k"), [(12, 10, 4, 2), (8, 16, 6, 3), (10, 10, 8, 4), (7, 9, 3, 1)])
def test_parameter_count_and_redundancy(m, n, r, k):
    rb = r // k
    ad = _randomized(m, n, r, k, seed=3, alpha=float(r))
    assert ad.num_trainable == BlockLoRA.param_count(m, n, rank=r, num_blocks=k) == m * r + n * rb
    lora_count = LoRA.param_count(m, n, rank=rb)
    assert lora_count == (m + n) * rb == LoRA(m, n, rank=rb).num_trainable
    assert ad.num_trainable - lora_count == (k - 1) * m * rb  # the surplus: B's entries beyond one block

    eye = torch.eye(n, dtype=torch.float64)

    def f(B, A):  # ΔW as a function of the trainable tensors, through the adapter's own forward
        return torch.func.functional_call(ad, {"B": B, "A": A}, (eye,)).reshape(-1)

    JB, JA = torch.autograd.functional.jacobian(f, (ad.B.detach().clone(), ad.A.detach().clone()))
    J = torch.cat([JB.reshape(m * n, -1), JA.reshape(m * n, -1)], dim=1).numpy()
    dim = _rank(J)
    assert dim == rb * (m + n - rb)  # dimension of the rank-r_b manifold = LoRA(r_b)'s generic Jacobian rank
    # negative control: the parameter count over-states the dimension, by exactly the (k−1)·m·r_b redundant block
    # entries plus LoRA's own r_b² (B̄A = (B̄Z)(Z⁻¹A) for invertible Z)
    assert ad.num_trainable - dim == (k - 1) * m * rb + rb * rb > 0


def _train(module, lrs: dict, steps: int, opt_name: str, X, Y):
    groups = [{"params": [getattr(module, name)], "lr": lr} for name, lr in lrs.items()]
    opt = torch.optim.SGD(groups) if opt_name == "sgd" else torch.optim.Adam(groups)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((module(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        traj.append(module.delta_weight().detach().clone())
    return torch.stack(traj)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_equals_lora_with_k_times_the_rate_on_B(opt_name):
    """∂L/∂B_i = s G Aᵀ for every i, so ΣB_i moves k times as fast: LoRA(r/k) with rate kη on B."""
    m, n, r, k = 10, 8, 6, 3
    rb = r // k
    eta = 0.02 if opt_name == "sgd" else 0.01
    g = torch.Generator().manual_seed(5)
    X = torch.randn(32, n, dtype=torch.float64, generator=g)
    Y = torch.randn(32, m, dtype=torch.float64, generator=g)
    block = _randomized(m, n, r, k, seed=7, alpha=float(r))
    with torch.no_grad():
        block.B.mul_(0.1)
    lora = LoRA(m, n, rank=rb, alpha=block.scale * rb).double()
    with torch.no_grad():
        lora.B.copy_(block.summed_B())
        lora.A.copy_(block.A)
    lora_wrong = LoRA(m, n, rank=rb, alpha=block.scale * rb).double()
    lora_wrong.load_state_dict(lora.state_dict())
    t_block = _train(block, {"B": eta, "A": eta}, 40, opt_name, X, Y)
    t_lora = _train(lora, {"B": k * eta, "A": eta}, 40, opt_name, X, Y)
    np.testing.assert_allclose(t_block.numpy(), t_lora.numpy(), rtol=1e-9, atol=1e-11)
    # negative control: the same rate on B (ignoring the factor k) gives a different trajectory
    t_wrong = _train(lora_wrong, {"B": eta, "A": eta}, 40, opt_name, X, Y)
    assert float((t_wrong[-1] - t_block[-1]).norm()) > 1e-2 * float(t_block[-1].norm())


def test_negative_control_unshared_down_projections_reach_rank_r():
    """Weaken 'shared A': [B_1 … B_k]·[A_1; …; A_k] with independent A_i is a rank-r LoRA (rank r, not r/k)."""
    m, n, r, k = 9, 8, 4, 2
    rng = np.random.default_rng(4)
    B = rng.standard_normal((m, r))
    A_blocks = [rng.standard_normal((r // k, n)) for _ in range(k)]
    assert _rank(B @ np.vstack(A_blocks)) == r
    ad = _randomized(m, n, r, k, seed=4, alpha=float(r))
    assert _rank(ad.delta_weight().detach().numpy()) == r // k
