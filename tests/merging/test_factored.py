"""``cat`` and ``svd`` of LoRA factors: exactness, Eckart–Young optimality, no dense m×n tensor, half precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_theory.linalg import truncated_svd
from lowrank_theory.merging import cat, combine_lora, svd
from tests.adapters.test_lowrank_family import ShapeRecorder
from tests.conftest import tol

F64 = tol(torch.float64)
M, N, RANKS = 37, 29, (2, 3, 4)  # no rank or rank sum equals m or n, so an (m, n) tensor is unmistakable


def _factors(bk=None, seed=0, ranks=RANKS):
    g = np.random.default_rng(seed)
    pairs = [(g.standard_normal((M, r)), g.standard_normal((r, N))) for r in ranks]
    return pairs if bk is None else [(bk.asarray(B), bk.asarray(A)) for B, A in pairs]


def _dense(pairs, weights):
    return sum(w * B @ A for (B, A), w in zip(pairs, weights))


def test_cat_is_exact_and_adds_ranks(bk):
    pairs, w = _factors(), [0.5, -1.5, 2.0]
    B, A = cat(_factors(bk), w)
    assert B.shape == (M, sum(RANKS)) and A.shape == (sum(RANKS), N)
    np.testing.assert_allclose(bk.to_numpy(B @ A), _dense(pairs, w), **F64)
    assert np.linalg.matrix_rank(bk.to_numpy(B @ A)) == sum(RANKS)  # generic factors: the rank really adds up


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_svd_is_the_truncated_svd_of_the_weighted_sum(bk, rank):
    pairs, w = _factors(seed=1), [1.0, 0.3, -0.7]
    B, A = svd(_factors(bk, seed=1), rank, w)
    dense = _dense(pairs, w)
    U, S, Vh = np.linalg.svd(dense)
    np.testing.assert_allclose(bk.to_numpy(B @ A), (U[:, :rank] * S[:rank]) @ Vh[:rank], **F64)
    # Eckart–Young: the error is the tail of the spectrum, and B carries the singular values (PEFT's split)
    err = np.linalg.norm(dense - bk.to_numpy(B @ A)) ** 2
    # (float64 reconstruction error ~1e-15·‖Σ‖ enters squared: atol 1e-24·‖Σ‖² where the tail is 0, at full rank)
    np.testing.assert_allclose(err, np.sum(S[rank:] ** 2), rtol=1e-9, atol=1e-24 * np.sum(S**2))
    np.testing.assert_allclose(np.linalg.norm(bk.to_numpy(B), axis=0), S[:rank], **F64)
    np.testing.assert_allclose(bk.to_numpy(A @ A.T), np.eye(rank), **F64)
    # full rank Σ r_t recovers the sum exactly: cat and svd agree
    Bf, Af = svd(_factors(bk, seed=1), sum(RANKS), w)
    np.testing.assert_allclose(bk.to_numpy(Bf @ Af), dense, **F64)


def test_svd_negative_control_other_truncations_are_worse():
    pairs, w = _factors(seed=2), [1.0, 1.0, 1.0]
    dense = _dense(pairs, w)
    B, A = svd(pairs, 3, w)
    best = np.linalg.norm(dense - B @ A)
    g = np.random.default_rng(0)
    for _ in range(20):  # random rank-3 perturbations of the optimum never do better
        dB = 1e-3 * g.standard_normal(B.shape)
        assert np.linalg.norm(dense - (B + dB) @ A) > best
    # the largest single adapter, a natural cheap rule, is worse than the rank-3 optimum
    assert np.linalg.norm(dense - pairs[2][0] @ pairs[2][1][:, :]) > best


def test_no_dense_product_is_formed():
    pairs = [(torch.from_numpy(B), torch.from_numpy(A)) for B, A in _factors(seed=3)]
    with ShapeRecorder() as rec:
        outs = [svd(pairs, 3, [1.0, 2.0, -1.0]), cat(pairs, [1.0, 2.0, -1.0]),
                combine_lora(pairs, [1.0, 2.0, -1.0], "svd", svd_rank=5)]
    assert (M, N) not in rec.shapes and (N, M) not in rec.shapes
    assert [tuple(B.shape) + tuple(A.shape) for B, A in outs] == [(M, 3, 3, N), (M, 9, 9, N), (M, 5, 5, N)]
    assert (M, 3) in rec.shapes and (3, N) in rec.shapes  # the recorder does see what is formed
    with ShapeRecorder() as rec:  # negative control: the dense path is caught
        combine_lora(pairs, [1.0, 2.0, -1.0], "ties_svd", svd_rank=3, density=0.5)
    assert (M, N) in rec.shapes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_are_merged_in_float32(dtype):
    pairs = [(torch.from_numpy(B).to(dtype), torch.from_numpy(A).to(dtype)) for B, A in _factors(seed=4)]
    ref32 = [(B.float(), A.float()) for B, A in pairs]
    B, A = svd(pairs, 4, [1.0, 0.5, 2.0])
    assert B.dtype == A.dtype == dtype
    B32, A32 = svd(ref32, 4, [1.0, 0.5, 2.0])
    # computed in float32, then each output factor rounded once to the half dtype (unit round-off u): the
    # product's relative Frobenius error is at most about 2u; 4u leaves a factor 2 of margin
    u = torch.finfo(dtype).eps / 2
    rel = torch.linalg.matrix_norm(B.float() @ A.float() - B32 @ A32) / torch.linalg.matrix_norm(B32 @ A32)
    assert rel < 4 * u
    Bc, Ac = cat(pairs, [1.0, 0.5, 2.0])
    assert Bc.dtype == Ac.dtype == dtype and torch.equal(Bc, torch.cat([b for b, _ in pairs], dim=1))
    assert torch.equal(Ac[:2], pairs[0][1])  # weight 1: the first block of A is untouched


def test_truncated_svd_reference_agrees_with_numpy():
    """The *_svd types use linalg.truncated_svd; its product is NumPy's truncation."""
    X = np.random.default_rng(6).standard_normal((M, N))
    U, S, Vh = truncated_svd(X, 5)
    u, s, vh = np.linalg.svd(X)
    np.testing.assert_allclose((U * S) @ Vh, (u[:, :5] * s[:5]) @ vh[:5], **F64)
