"""Bad input gets a clear TypeError / ValueError naming the argument, before any work, and inputs are never modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_theory.merging import (
    cat,
    combine_lora,
    dare_linear,
    dare_ties,
    m2n2,
    magnitude_prune,
    merge_state_dicts,
    pcb,
    svd,
    task_arithmetic,
    ties,
    trim,
    unflatten,
)

A = np.ones((3, 4))
B = 2 * np.ones((3, 4))

MERGES = {
    "task_arithmetic": lambda tvs, w=None, **kw: task_arithmetic(tvs, w),
    "ties": lambda tvs, w=None, density=0.5: ties(tvs, w, density),
    "magnitude_prune": lambda tvs, w=None, density=0.5: magnitude_prune(tvs, w, density),
    "dare_linear": lambda tvs, w=None, density=0.5: dare_linear(tvs, w, density, seed=0),
    "dare_ties": lambda tvs, w=None, density=0.5: dare_ties(tvs, w, density, seed=0),
    "pcb": lambda tvs, w=None, density=0.5: pcb(tvs, w, density),
}


@pytest.mark.parametrize("name", list(MERGES))
def test_task_vector_errors(name):
    f = MERGES[name]
    with pytest.raises(ValueError, match="at least one array"):
        f([])
    with pytest.raises(TypeError, match="sequence"):
        f(A)  # a single array, not a list of them
    with pytest.raises(TypeError, match="sequence"):
        f({"a": A})
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*task_vectors\[1\] has shape \(4, 3\)"):
        f([A, np.ones((4, 3))])
    with pytest.raises(TypeError, match=r"dtype float64.*float32"):
        f([A, B.astype(np.float32)])
    with pytest.raises(TypeError, match="numpy arrays"):
        f([A, torch.ones(3, 4, dtype=torch.float64)])
    with pytest.raises(TypeError, match="float32 or float64"):
        f([A, np.ones((3, 4), dtype=np.int64)])
    with pytest.raises(ValueError, match=r"task_vectors\[1\] contains NaN"):
        f([A, np.full((3, 4), np.nan)])
    with pytest.raises(ValueError, match=r"one entry per task vector \(2\), got 3"):
        f([A, B], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be finite"):
        f([A, B], [1.0, float("inf")])
    with pytest.raises(TypeError, match=r"weights\[0\] must be a real number"):
        f([A, B], ["1", 2.0])


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "dare_linear", "dare_ties", "pcb"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval(name, density):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        MERGES[name]([A, B], None, density)


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_density_is_required_and_real(name):
    with pytest.raises(TypeError, match="density must be a real number"):
        MERGES[name]([A, B], None, None)
    with pytest.raises(TypeError, match="density must be a real number"):
        MERGES[name]([A, B], None, "0.5")


def test_other_settings():
    with pytest.raises(ValueError, match="majority_sign_method"):
        ties([A, B], None, 0.5, majority_sign_method="mass")
    with pytest.raises(ValueError, match="majority_sign_method"):
        dare_ties([A, B], None, 0.5, majority_sign_method="mass")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        dare_linear([A, B], None, 0.5, seed=-1)
    with pytest.raises(ValueError, match=r"clip_ratio must be in \[0, 0.5\)"):
        pcb([A, B], None, 0.5, clip_ratio=0.5)
    with pytest.raises(ValueError, match="eps"):
        pcb([A, B], None, 0.5, eps=0.0)
    with pytest.raises(TypeError, match="x must be a NumPy"):
        trim([1.0, 2.0], 0.5)


def test_inputs_are_not_modified():
    g = np.random.default_rng(0)
    tvs = [g.standard_normal((5, 4)) for _ in range(3)]
    copies = [t.copy() for t in tvs]
    for f in MERGES.values():
        f(tvs, [1.0, -1.0, 0.5])
    t_tvs = [torch.from_numpy(t.copy()) for t in copies]
    for f in MERGES.values():
        f(t_tvs, [1.0, -1.0, 0.5])
    for t, c, tt in zip(tvs, copies, t_tvs):
        np.testing.assert_array_equal(t, c)
        np.testing.assert_array_equal(tt.numpy(), c)


# ----------------------------------------------------------------------------- factors
def _pair(m=5, r=2, n=4):
    return np.ones((m, r)), np.ones((r, n))


def test_factor_errors():
    for f in (lambda fs: cat(fs), lambda fs: svd(fs, 1)):
        with pytest.raises(ValueError, match="at least one"):
            f([])
        with pytest.raises(TypeError, match="must be a pair"):
            f([np.ones((5, 2))])
        with pytest.raises(ValueError, match="must share r"):
            f([(np.ones((5, 2)), np.ones((3, 4)))])
        with pytest.raises(ValueError, match=r"describe an \(5, 4\) update"):
            f([_pair(), _pair(m=6)])
        with pytest.raises(TypeError, match="dtype"):
            f([_pair(), (np.ones((5, 2), dtype=np.float32), np.ones((2, 4), dtype=np.float32))])
        with pytest.raises(ValueError, match="NaN"):
            f([(np.full((5, 2), np.nan), np.ones((2, 4)))])
    with pytest.raises(ValueError, match=r"min\(5, 4, 4\)"):
        svd([_pair(), _pair()], 5)
    with pytest.raises(TypeError, match="rank must be an int"):
        svd([_pair()], 1.0)


def test_combine_lora_errors():
    with pytest.raises(ValueError, match="combination_type must be one of"):
        combine_lora([_pair(), _pair()], [1.0, 1.0], "average")
    with pytest.raises(TypeError, match="density"):
        combine_lora([_pair(), _pair()], [1.0, 1.0], "ties")
    with pytest.raises(ValueError, match="needs equal ranks"):
        combine_lora([_pair(r=2), _pair(r=3)], [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="svd_rank"):
        combine_lora([_pair(), _pair()], [1.0, 1.0], "ties_svd", density=0.5, svd_rank=9)
    with pytest.raises(TypeError, match="weights must be"):
        combine_lora([_pair()], None, "linear")
    with pytest.raises(ValueError, match=r"scalings.*one entry per task vector \(2\)"):
        combine_lora([_pair(), _pair()], [1.0, 1.0], "cat", scalings=[1.0])


# ----------------------------------------------------------------------------- state dicts, m2n2
def test_state_dict_errors():
    with pytest.raises(ValueError, match="scope must be"):
        merge_state_dicts(task_arithmetic, [{"a": A}], scope="layer")
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        merge_state_dicts(task_arithmetic, [{"a": A, "b": B}, {"a": A}])
    with pytest.raises(ValueError, match="another order"):
        merge_state_dicts(task_arithmetic, [{"a": A, "b": B}, {"b": B, "a": A}])
    with pytest.raises(ValueError, match=r"\[1\]\['a'\] must have shape"):
        merge_state_dicts(task_arithmetic, [{"a": A}, {"a": np.ones(3)}])
    with pytest.raises(TypeError, match="mapping"):
        merge_state_dicts(task_arithmetic, [A])
    with pytest.raises(ValueError, match="vector must have shape"):
        from lowrank_theory.merging.state import flatten

        _, spec = flatten({"a": A})
        unflatten(np.ones(5), spec)


def test_m2n2_errors():
    seeds = [{"w": A}, {"w": B}]
    ok = lambda p: np.ones(3)  # noqa: E731
    with pytest.raises(TypeError, match="callable"):
        m2n2(seeds, "score", steps=1)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        m2n2(seeds, ok, steps=-1)
    with pytest.raises(ValueError, match="at least the number of seed models"):
        m2n2(seeds * 2, ok, steps=1, archive_size=3)
    with pytest.raises(ValueError, match="interpolation"):
        m2n2(seeds, ok, steps=1, interpolation="cubic")
    with pytest.raises(ValueError, match="non-negative"):
        m2n2(seeds, lambda p: -np.ones(3), steps=1)
    with pytest.raises(ValueError, match="1-D"):
        m2n2(seeds, lambda p: np.ones((2, 2)), steps=1)
    calls = iter([np.ones(3), np.ones(4)])
    with pytest.raises(ValueError, match="3 scores every time"):
        m2n2(seeds, lambda p: next(calls), steps=1)
    with pytest.raises(TypeError, match="per-example scores"):
        m2n2(seeds, lambda p: object(), steps=1)
