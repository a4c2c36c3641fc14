"""Cross-checks against PEFT 0.21: every combination type of ``add_weighted_adapter`` and every merge of
``peft.utils.merge_utils``.

Deterministic types give the same factors (or, for the SVD types, the same product B @ A, the factors being
unique only up to the sign of each singular pair) at float64 round-off, and the same merged model output.
The DARE types draw masks from torch's global generator, so they are compared in distribution: the keep
fraction and the rescale, the mean over many seeds against the unbiased expectation, and PEFT's mean and
second moment against ours (two-sample z-scores).

PEFT builds its merge weights with ``torch.tensor(list)``, i.e. in torch's *default* dtype; :func:`peft_float64`
sets it to float64 while PEFT builds models and merges (and only then), otherwise PEFT's weights carry a float32
rounding (relative 6e-8) that our float64 path does not have.
"""

from __future__ import annotations

import contextlib
import typing
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_theory.merging import (
    COMBINATION_TYPES,
    combine_lora,
    dare_linear,
    dare_ties,
    magnitude_prune,
    task_arithmetic,
    ties,
)
from tests.conftest import tol

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import merge_utils as mu  # noqa: E402

F64 = tol(torch.float64)
#: Monte-Carlo tolerance: 5 standard errors.  Each test checks at most a few hundred z-scores; the two-sided 5σ
#: false-alarm rate of one is 6e-7 and the seeds are fixed, so a failure means a real difference.
Z_MAX = 5.0
DETERMINISTIC = ("svd", "linear", "cat", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
DENSITY = 0.6
WEIGHTS = [0.7, -0.4, 1.3]


@contextlib.contextmanager
def peft_float64():
    """torch's default dtype float64, PEFT's warnings silenced, for the duration of a PEFT call."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_dtype(old)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(12, 10)
        self.lin2 = nn.Linear(10, 9)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


def _peft_model(ranks: tuple[int, int, int], alphas=(6.0, 2.0, 3.0)):
    """A float64 toy with three random (non-zero) LoRA adapters ``a, b, c`` on both layers."""
    torch.manual_seed(0)
    with peft_float64():
        base = Toy()
        cfgs = [LoraConfig(r=r, lora_alpha=a, target_modules=["lin1", "lin2"], init_lora_weights=False)
                for r, a in zip(ranks, alphas)]
        model = get_peft_model(base, cfgs[0], adapter_name="a")
        model.add_adapter("b", cfgs[1])
        model.add_adapter("c", cfgs[2])
    return model


@pytest.fixture(scope="module", params=[(3, 3, 3), (2, 3, 4)], ids=["equal-ranks", "mixed-ranks"])
def peft_model(request):
    return request.param, _peft_model(request.param)


def _layers(model):
    return {"lin1": model.base_model.model.lin1, "lin2": model.base_model.model.lin2}


def _ours(layer, combination_type, **kw):
    factors = [(layer.lora_B[k].weight.detach(), layer.lora_A[k].weight.detach()) for k in "abc"]
    return combine_lora(factors, WEIGHTS, combination_type, scalings=[layer.scaling[k] for k in "abc"], **kw)


def _peft_merge(model, combination_type, name="m", **kw):
    with peft_float64():
        model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, name, combination_type=combination_type, **kw)
    out = {k: (lay.lora_B[name].weight.detach().clone(), lay.lora_A[name].weight.detach().clone(), lay.scaling[name])
           for k, lay in _layers(model).items()}
    return out


def _kw(combination_type):
    return {} if combination_type in ("svd", "linear", "cat") else {"density": DENSITY}


# ----------------------------------------------------------------------------- deterministic types
@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_types_equal_peft(peft_model, combination_type):
    ranks, model = peft_model
    if combination_type in ("linear", "ties", "magnitude_prune") and len(set(ranks)) > 1:
        with pytest.raises(ValueError, match="equal ranks"):
            _ours(_layers(model)["lin1"], combination_type, **_kw(combination_type))
        return
    got = _peft_merge(model, combination_type, **_kw(combination_type))
    try:
        for name, layer in _layers(model).items():
            B_p, A_p, scale = got[name]
            B, A = _ours(layer, combination_type, **_kw(combination_type))
            assert scale == 1.0 and B.shape == B_p.shape and A.shape == A_p.shape
            torch.testing.assert_close(B @ A, B_p @ A_p, **F64)
            if not combination_type.endswith("svd"):  # the factors themselves, not only their product
                torch.testing.assert_close(B, B_p, **F64)
                torch.testing.assert_close(A, A_p, **F64)
        # the merged model's output: PEFT's active merged adapter against W0 + B @ A written into a copy
        x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        model.set_adapter("m")
        with torch.no_grad():
            y_peft = model(x)
            ref = Toy().double()
            for name, layer in _layers(model).items():
                B, A = _ours(layer, combination_type, **_kw(combination_type))
                getattr(ref, name).weight.copy_(layer.base_layer.weight + B @ A)
                getattr(ref, name).bias.copy_(layer.base_layer.bias)
            torch.testing.assert_close(ref(x), y_peft, **F64)
    finally:
        model.set_adapter("a")
        model.delete_adapter("m")


def test_cat_and_svd_ranks_follow_peft(peft_model):
    ranks, model = peft_model
    for ct, want in (("cat", sum(ranks)), ("svd", max(ranks)), ("ties_svd", max(ranks))):
        got = _peft_merge(model, ct, **_kw(ct))
        try:
            B, A = _ours(_layers(model)["lin2"], ct, **_kw(ct))
            assert got["lin2"][0].shape[1] == B.shape[1] == A.shape[0] == want
        finally:
            model.delete_adapter("m")


def test_one_adapter_is_always_linear():
    """PEFT switches to "linear" for a single adapter, whatever the type; so do we."""
    model = _peft_model((3, 3, 3))
    lay = _layers(model)["lin1"]
    with peft_float64():
        model.add_weighted_adapter(["b"], [1.7], "one", combination_type="ties", density=0.2)
    B, A = combine_lora([(lay.lora_B["b"].weight.detach(), lay.lora_A["b"].weight.detach())], [1.7], "ties",
                        scalings=[lay.scaling["b"]], density=0.2)
    torch.testing.assert_close(B, lay.lora_B["one"].weight.detach(), **F64)
    torch.testing.assert_close(A, lay.lora_A["one"].weight.detach(), **F64)
    # the factor-wise "linear" of one adapter is that adapter exactly: sqrt(w s)^2 = w s
    torch.testing.assert_close(B @ A, 1.7 * lay.scaling["b"] * lay.lora_B["b"].weight @ lay.lora_A["b"].weight,
                               **F64)


def test_combination_types_are_peft_s():
    hints = typing.get_type_hints(peft.tuners.lora.LoraModel.add_weighted_adapter)
    assert typing.get_args(hints["combination_type"]) == COMBINATION_TYPES


# ----------------------------------------------------------------------------- merge_utils, deterministic
def _tensors(shape=(9, 8), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_merge_utils_deterministic(sign, density):
    ts = _tensors()
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    torch.testing.assert_close(task_arithmetic(ts, WEIGHTS), mu.task_arithmetic(ts, w), **F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at density 1 (no pruning)
        torch.testing.assert_close(magnitude_prune(ts, WEIGHTS, density), mu.magnitude_prune(ts, w, density), **F64)
        torch.testing.assert_close(ties(ts, WEIGHTS, density, majority_sign_method=sign),
                                   mu.ties(ts, w, density, sign), **F64)
        # float32 inputs: both compute in float32; the same entries are kept, values within float32 round-off
        t32 = [t.float() for t in ts]
        torch.testing.assert_close(ties(t32, WEIGHTS, density, majority_sign_method=sign),
                                   mu.ties(t32, w.float(), density, sign), **tol(torch.float32))


# ----------------------------------------------------------------------------- DARE: distributions
N_SEEDS = 600


def test_dare_keep_fraction_and_rescale_match_peft():
    """One task vector, weight 1: every output entry is 0 or τ/ρ (PEFT's and ours), and the kept fraction is ρ."""
    (t,) = _tensors(shape=(20, 15), k=1)
    ones = torch.ones(1, dtype=torch.float64)
    kept = {"peft": [], "ours": []}
    for s in range(200):
        torch.manual_seed(s)
        outs = {"peft": mu.dare_linear([t], ones, DENSITY), "ours": dare_linear([t], [1.0], DENSITY, seed=s)}
        for who, out in outs.items():
            on = out != 0
            torch.testing.assert_close(out[on], t[on] / DENSITY, **F64)  # the rescale 1/ρ, exactly
            kept[who].append(on.double().mean().item())
    n = 200 * t.numel()
    se = np.sqrt(DENSITY * (1 - DENSITY) / n)  # binomial standard error of a keep fraction over n entries
    for who, k in kept.items():
        assert abs(np.mean(k) - DENSITY) < Z_MAX * se, who
    # two-sample: PEFT's keep fraction and ours agree
    assert abs(np.mean(kept["peft"]) - np.mean(kept["ours"])) < Z_MAX * se * np.sqrt(2)


def _zscores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sample z-scores of entrywise means (independent samples on axis 0)."""
    se = np.sqrt(a.var(axis=0, ddof=1) / a.shape[0] + b.var(axis=0, ddof=1) / b.shape[0])
    return (a.mean(axis=0) - b.mean(axis=0)) / np.where(se > 0, se, 1.0)


@pytest.mark.parametrize("which", ["dare_linear", "dare_ties"])
def test_dare_merges_match_peft_in_distribution(which):
    ts = _tensors(shape=(6, 5))
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    peft_fn, ours_fn = (mu.dare_linear, dare_linear) if which == "dare_linear" else (mu.dare_ties, dare_ties)
    P, O = [], []
    for s in range(N_SEEDS):
        torch.manual_seed(s)
        P.append(peft_fn(ts, w, DENSITY).numpy())
        O.append(ours_fn(ts, WEIGHTS, DENSITY, seed=s).numpy())
    P, O = np.stack(P), np.stack(O)
    assert np.max(np.abs(_zscores(P, O))) < Z_MAX  # first moments agree
    assert np.max(np.abs(_zscores(P**2, O**2))) < Z_MAX  # second moments agree
    if which == "dare_linear":  # unbiased: the mean is task arithmetic, the variance Σ w² τ² (1-ρ)/ρ known
        mean = task_arithmetic(ts, WEIGHTS).numpy()
        var = sum(wi**2 * t.numpy() ** 2 for wi, t in zip(WEIGHTS, ts)) * (1 - DENSITY) / DENSITY
        for X in (P, O):
            assert np.max(np.abs((X.mean(axis=0) - mean) / np.sqrt(var / N_SEEDS))) < Z_MAX
    # negative control: the same test tells PEFT at density 0.6 from ours at 0.4 (power of the check)
    O_wrong = np.stack([ours_fn(ts, WEIGHTS, 0.4, seed=s).numpy() for s in range(N_SEEDS)])
    assert np.max(np.abs(_zscores(P**2, O_wrong**2))) > Z_MAX


@pytest.mark.parametrize("combination_type", RANDOM)
def test_random_types_match_peft_in_distribution(combination_type):
    """add_weighted_adapter's DARE types: the merged ΔW = B @ A has the same entrywise mean and second moment."""
    n = 150
    model = _peft_model((3, 3, 3))
    lay = _layers(model)["lin1"]
    P, O = [], []
    for s in range(n):
        torch.manual_seed(s)
        got = _peft_merge(model, combination_type, name="r", density=DENSITY)["lin1"]
        model.delete_adapter("r")
        P.append((got[0] @ got[1]).numpy())
        B, A = _ours(lay, combination_type, density=DENSITY, seed=s)
        O.append((B @ A).numpy())
    P, O = np.stack(P), np.stack(O)
    assert np.max(np.abs(_zscores(P, O))) < Z_MAX
    assert np.max(np.abs(_zscores(P**2, O**2))) < Z_MAX
    # and the randomness is real: different seeds give different merges in both
    assert np.ptp(P[:, 0, 0]) > 0 and np.ptp(O[:, 0, 0]) > 0
