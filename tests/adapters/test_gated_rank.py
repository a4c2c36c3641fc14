"""CoDyRA (gated_rank.py) and TriAdaptLoRA (triangular.py): the public checker, and each method's own math.

References are independent: NumPy float64 sums of rank-1 terms for CoDyRA's update, a block-by-block NumPy
assembly of TriAdaptLoRA's core, and a re-statement of the stored code's epoch counters for the threshold.
Tolerances: float64 results that are one matrix product apart agree to 1e-12 relative (a few hundred ulps of
sums of at most ~30 terms of size O(1)); where no arithmetic differs, equality is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters.gated_rank import CoDyRA, codyra_gate_update, codyra_threshold
from lowrank_theory.adapters.triangular import TriAdaptLoRA, triangular_indices
from lowrank_theory.testing import parametrize_with_checks, registered_factory

REL = 1e-12  # float64, one product apart (see the module docstring)

FACTORIES = {
    "codyra-r3": registered_factory("codyra", rank=3),
    "codyra-uniform": registered_factory("codyra", rank=4, gate_init="uniform", alpha=2.0),
    "triadaptlora-r3": registered_factory("triadaptlora", rank=3),
    "triadaptlora-blocks": registered_factory("triadaptlora", rank=4, blocks=(1, 2, 1), alpha=8.0),
}


@parametrize_with_checks(FACTORIES)
def test_adapter_contract(check):
    check()


def _randomized(ad: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return ad


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ============================================================================ CoDyRA
@given(m=st.integers(2, 10), n=st.integers(2, 10), data=st.data())
def test_codyra_delta_is_the_sum_of_gated_rank_one_terms(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    ad = _randomized(CoDyRA(m, n, rank=r, alpha=3.0).double(), data.draw(st.integers(0, 999)))
    A, B, g = (t.detach().numpy() for t in (ad.A, ad.B, ad.gate))
    ref = sum((3.0 / r) * g[i] * np.outer(B[:, i], A[i]) for i in range(r))
    assert _rel(ad.delta_weight().detach(), ref) <= REL


def test_codyra_identity_at_init_and_count():
    ad = CoDyRA(7, 5, rank=3)
    assert ad.num_trainable == 3 * (7 + 5 + 1) == CoDyRA.param_count(7, 5, rank=3)
    assert torch.count_nonzero(ad.delta_weight()) == 0
    assert torch.equal(ad.gate, torch.ones(3))
    u = CoDyRA(7, 5, rank=5, gate_init="uniform", seed=3)
    assert float(u.gate.detach().abs().max()) <= 0.05 and float(u.gate.detach().abs().min()) > 0


@given(kappa=st.floats(0.0, 2.0), seed=st.integers(0, 999))
def test_gate_rules_match_their_formulas(kappa, seed):
    g = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = g.numpy()
    soft = np.sign(v) * np.maximum(np.abs(v) - kappa, 0.0)
    push = np.where(np.abs(v) > kappa, v + np.sign(v) * kappa, 0.0)
    assert np.array_equal(codyra_gate_update(g, kappa, "soft").numpy(), soft)
    assert np.array_equal(codyra_gate_update(g, kappa, "hard_push").numpy(), push)


@given(m=st.integers(2, 12), n=st.integers(2, 12), kappa=st.floats(0.05, 1.5), data=st.data())
def test_pruning_after_the_threshold_keeps_outputs(m, n, kappa, data):
    r = data.draw(st.integers(1, min(m, n)))
    ad = _randomized(CoDyRA(m, n, rank=r).double(), data.draw(st.integers(0, 999)))
    rule = data.draw(st.sampled_from(["soft", "hard_push"]))
    zeros = ad.threshold_(kappa, rule)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y0, dw0 = ad(x).detach().clone(), ad.delta_weight().detach().clone()
    kept = ad.prune_zero_gates()
    assert ad.rank == r - zeros == kept.numel() and ad.num_trainable == ad.rank * (m + n + 1)
    assert bool((ad.gate != 0).all())
    assert _rel(ad(x).detach(), y0) <= REL if y0.norm() > 0 else torch.count_nonzero(ad(x)) == 0
    assert _rel(ad.delta_weight().detach(), dw0) <= REL if dw0.norm() > 0 else True
    # the pruned adapter rebuilds from its config with the same scale (alpha follows the rank)
    fresh = adapters.create("codyra", m, n, **ad.config()).double()
    fresh.load_state_dict(ad.state_dict())
    assert torch.equal(fresh(x), ad(x))


def test_prune_all_gates_gives_an_empty_adapter():
    ad = _randomized(CoDyRA(6, 4, rank=3).double(), 0)
    ad.threshold_(1e6)
    ad.prune_zero_gates()
    assert ad.rank == 0 and ad.num_trainable == 0
    assert torch.count_nonzero(ad(torch.ones(2, 4, dtype=torch.float64))) == 0


def _stored_code_kappas(epochs: int, max_kappa: float, dense_ratio: float) -> list[float]:
    """The stored code's counters, re-stated: kappa used in each epoch (0 while dense)."""
    dense_epoch = int(epochs * dense_ratio)
    sparse_epochs = epochs - dense_epoch - 1
    current, out = 0, []
    for _ in range(epochs):
        if dense_epoch > 0:
            out.append(0.0)
        else:
            k = max_kappa
            if sparse_epochs > 0:
                k *= min(current / sparse_epochs, 1)
            out.append(k)
        if dense_epoch > 0:  # next_epoch() at the end of the epoch
            dense_epoch -= 1
        else:
            current += 1
    return out


@pytest.mark.parametrize("epochs,ratio", [(20, 0.5), (10, 0.0), (7, 0.3), (1, 0.0), (2, 0.5), (3, 0.9)])
def test_threshold_schedule_matches_the_stored_counters(epochs, ratio):
    got = [codyra_threshold(t, epochs, 5e-3, ratio) for t in range(epochs)]
    assert got == pytest.approx(_stored_code_kappas(epochs, 5e-3, ratio), rel=0, abs=1e-18)
    assert got[-1] == pytest.approx(5e-3) and all(b >= a for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("call,match", [
    (lambda: codyra_threshold(5, 5, 1e-3), "t must be"),
    (lambda: codyra_threshold(-1, 5, 1e-3), "t must be"),
    (lambda: codyra_threshold(0, 0, 1e-3), "total must be"),
    (lambda: codyra_threshold(0, 5, -1.0), "max_kappa"),
    (lambda: codyra_threshold(0, 5, 1e-3, 1.0), "dense_ratio"),
    (lambda: codyra_gate_update(torch.ones(3), -0.1), "kappa"),
    (lambda: codyra_gate_update(torch.ones(3), 0.1, "hard"), "rule"),
    (lambda: codyra_gate_update(torch.ones(2, 2), 0.1), "g must be a 1-D"),
    (lambda: codyra_gate_update(torch.tensor([1.0, float("nan")]), 0.1), "g"),
    (lambda: CoDyRA(4, 4, rank=5), "rank"),
    (lambda: CoDyRA(4, 4, rank=2, gate_init="normal"), "gate_init"),
])
def test_codyra_bad_arguments_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ============================================================================ TriAdaptLoRA
def _core_reference(L: np.ndarray, U: np.ndarray, blocks) -> np.ndarray:
    """Assemble C = L + U block by block, as the stored code zero-pads C_row / C_col and sums them."""
    r = sum(blocks)
    Lm, Um = np.zeros((r, r)), np.zeros((r, r))
    pl = pu = 0
    s = 0
    for b in blocks:
        s0, s = s, s + b
        Lm[s0:s, :s] = L[pl:pl + b * s].reshape(b, s)
        Um[:s, s0:s] = U[pu:pu + s * b].reshape(s, b)
        pl, pu = pl + b * s, pu + s * b
    return Lm + Um


@given(blocks=st.lists(st.integers(1, 3), min_size=1, max_size=4), seed=st.integers(0, 999))
def test_triadapt_core_and_delta_match_the_block_assembly(blocks, seed):
    r = sum(blocks)
    m, n = r + 3, r + 2
    ad = _randomized(TriAdaptLoRA(m, n, rank=r, blocks=blocks, alpha=2.0).double(), seed)
    C = _core_reference(ad.L.detach().numpy(), ad.U.detach().numpy(), blocks)
    assert np.array_equal(ad.core().detach().numpy(), C)  # each entry is one sum L_ij + U_ij
    ref = (2.0 / r) * ad.B.detach().numpy() @ C @ ad.A.detach().numpy()
    assert _rel(ad.delta_weight().detach(), ref) <= REL
    assert ad.num_trainable == TriAdaptLoRA.param_count(m, n, rank=r, blocks=blocks)
    assert ad.num_trainable == sum(p.numel() for p in ad.parameters())
    # the closed form r(m+n) + r^2 + sum b^2 equals the stored code's block shapes, summed
    assert ad.L.numel() == sum(b * s for b, s in zip(blocks, np.cumsum(blocks)))


def test_triangular_indices_cover_the_core_once_off_the_diagonal_blocks():
    blocks = (2, 1, 3)
    il, iu = triangular_indices(blocks)
    hits = np.bincount(torch.cat([il, iu]).numpy(), minlength=36).reshape(6, 6)
    diag = np.zeros((6, 6), dtype=bool)
    s = 0
    for b in blocks:
        diag[s:s + b, s:s + b] = True
        s += b
    assert (hits[diag] == 2).all() and (hits[~diag] == 1).all()  # L and U both own the diagonal blocks


@given(seed=st.integers(0, 999), add=st.integers(1, 3))
def test_growth_preserves_the_update_and_the_old_entries(seed, add):
    ad = _randomized(TriAdaptLoRA(9, 8, rank=3, blocks=(2, 1)).double(), seed)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y0, dw0 = ad(x).detach().clone(), ad.delta_weight().detach().clone()
    old = {k: getattr(ad, k).detach().clone() for k in ("A", "B", "L", "U")}
    remaps = ad.grow_(add, seed=11)
    assert ad.rank == 3 + add and ad.blocks == (2, 1, add)
    assert _rel(ad(x).detach(), y0) <= REL and _rel(ad.delta_weight().detach(), dw0) <= REL
    for old_t, new_t, dim, index in remaps:
        kept = index >= 0
        assert torch.equal(new_t.detach().index_select(dim, torch.nonzero(kept).flatten()),
                           old_t.detach().index_select(dim, index[kept]))
    assert torch.equal(ad.A[:3], old["A"]) and torch.equal(ad.B[:, :3], old["B"])
    assert torch.count_nonzero(ad.B[:, 3:]) == 0
    rebuilt = adapters.create("triadaptlora", 9, 8, **ad.config()).double()
    rebuilt.load_state_dict(ad.state_dict())
    assert torch.equal(rebuilt(x), ad(x))


def test_new_block_is_trainable_but_the_stored_all_zero_init_is_a_saddle():
    """Our init: the new columns of B get the gradient G A_newᵀ ≠ 0.  Negative control, the stored code's
    init (B = 0 and C = 0): every gradient is exactly zero, so training could not start."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    ad = TriAdaptLoRA(5, 6, rank=2).double()
    ad.grow_(1, seed=3)
    ((ad(x) - y) ** 2).sum().backward()
    assert float(ad.B.grad[:, 2].abs().sum()) > 0 and float(ad.B.grad[:, :2].abs().sum()) > 0
    stored = TriAdaptLoRA(5, 6, rank=2).double()
    with torch.no_grad():
        stored.L.zero_()
    ((stored(x) - y) ** 2).sum().backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in stored.parameters())


def test_normalized_core_norm_is_the_frobenius_norm_over_blocks():
    ad = _randomized(TriAdaptLoRA(8, 8, rank=4, blocks=(1, 3)).double(), 5)
    C = _core_reference(ad.L.detach().numpy(), ad.U.detach().numpy(), (1, 3))
    assert ad.normalized_core_norm() == pytest.approx(np.linalg.norm(C) / 2, rel=1e-14)
    assert TriAdaptLoRA(6, 6, rank=3).normalized_core_norm() == pytest.approx(np.sqrt(3.0))  # C = I


@pytest.mark.parametrize("call,match", [
    (lambda: TriAdaptLoRA(6, 6, rank=3, blocks=(1, 1)), "blocks must sum"),
    (lambda: TriAdaptLoRA(6, 6, rank=3, blocks=(0, 3)), "blocks"),
    (lambda: TriAdaptLoRA(6, 6, rank=7), "rank"),
    (lambda: TriAdaptLoRA(6, 6, rank=3).grow_(0), "add must be"),
    (lambda: TriAdaptLoRA(6, 6, rank=3).grow_(4), "add=4 would exceed"),
    (lambda: triangular_indices(()), "blocks"),
])
def test_triadapt_bad_arguments_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
