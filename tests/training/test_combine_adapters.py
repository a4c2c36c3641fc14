"""combine_adapters against PEFT's add_weighted_adapter on the same model, for every deterministic type.

Both models start from the same base and the same LoRA factors (PEFT's copied into ours); after combining,
only the new adapter is active and the outputs must agree.  Float64 throughout (PEFT builds some merged
weights with ``torch.tensor(list)``, so its default dtype is set to float64 here); tolerance 1e-9 relative:
the SVD-based types agree to the round-off of two LAPACK SVDs of the same matrix, the others to 1e-14.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from lowrank_theory.testing import check_adapter
from lowrank_theory.training import (
    active_adapters,
    adapted_layers,
    combine_adapters,
    inject,
    load_adapters,
    save_adapters,
    set_adapter,
)

DETERMINISTIC = ("svd", "linear", "cat", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
WEIGHTS = (0.7, -0.4)


@pytest.fixture(autouse=True)
def float64_default():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


def base_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 12))


def x():
    return torch.randn(5, 20, generator=torch.Generator().manual_seed(2))


def pair():
    """PEFT's model with adapters default and b (factors moved off init), and ours holding the same factors."""
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = base_model()
    inject(ours, "lora", targets=["0", "2"], rank=2, alpha=4.0)
    inject(ours, "lora", targets=["0", "2"], adapter_name="b", rank=2, alpha=6.0)
    for lname, layer in adapted_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(lname)
        with torch.no_grad():
            for an in ("default", "b"):
                layer.adapters[an].A.copy_(pl.lora_A[an].weight)
                layer.adapters[an].B.copy_(pl.lora_B[an].weight)
    return theirs, ours


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_combine_equals_peft_add_weighted_adapter(kind):
    theirs, ours = pair()
    kw = {"density": 0.5} if kind in ("ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd") else {}
    theirs.add_weighted_adapter(["default", "b"], list(WEIGHTS), "combo", combination_type=kind, **kw)
    theirs.set_adapter("combo")
    combine_adapters(ours, ["default", "b"], WEIGHTS, new_name="combo", combination_type=kind, **kw)
    assert "combo" not in active_adapters(ours)  # added inactive, as PEFT does
    set_adapter(ours, "combo")
    torch.testing.assert_close(ours(x()), theirs(x()), rtol=1e-9, atol=1e-12)


def test_cat_is_the_exact_weighted_sum_of_updates():
    _, ours = pair()
    combine_adapters(ours, ["default", "b"], WEIGHTS, new_name="c", combination_type="cat")
    for layer in adapted_layers(ours).values():
        want = sum(w * layer.adapters[n].delta_weight() for n, w in zip(("default", "b"), WEIGHTS))
        assert layer.adapters["c"].rank == 4
        torch.testing.assert_close(layer.adapters["c"].delta_weight(), want, rtol=1e-12, atol=1e-14)


def test_dare_types_keep_the_expected_fraction_and_are_seeded():
    _, ours = pair()
    combine_adapters(ours, ["default", "b"], WEIGHTS, new_name="d1", combination_type="dare_linear_svd",
                     density=0.5, seed=4)
    combine_adapters(ours, ["default", "b"], WEIGHTS, new_name="d2", combination_type="dare_linear_svd",
                     density=0.5, seed=4)
    for layer in adapted_layers(ours).values():
        torch.testing.assert_close(layer.adapters["d1"].delta_weight(), layer.adapters["d2"].delta_weight(),
                                   rtol=0, atol=0)


def test_combined_adapter_passes_the_checker_and_saves():
    _, ours = pair()
    combine_adapters(ours, ["default", "b"], WEIGHTS, new_name="combo", svd_rank=3)
    layer = adapted_layers(ours)["0"]

    def factory(d_out, d_in, dtype):
        lay = copy.deepcopy(layer)
        lay.set_adapter("combo")
        return lay.to(dtype)

    report = check_adapter(factory, shapes=[(16, 20)], raise_on_failure=False,
                           skip=["identity_at_init", "state_dict_roundtrip", "deterministic_defaults"])
    assert report.passed, str(report)


def test_combined_adapter_round_trips_through_a_checkpoint(tmp_path):
    _, ours = pair()
    combine_adapters(ours, ["default", "b"], WEIGHTS, new_name="combo", svd_rank=3)
    set_adapter(ours, "combo")
    y = ours(x()).detach()
    save_adapters(ours, tmp_path, adapter_name="combo")
    fresh = base_model()
    load_adapters(fresh, tmp_path, inject=True, adapter_name="combo")
    torch.testing.assert_close(fresh(x()), y, rtol=1e-12, atol=1e-14)


def test_bad_arguments_change_nothing():
    _, ours = pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for kw, match in (({"names": ["default", "zz"]}, "names"), ({"weights": (1.0,)}, "weights"),
                      ({"new_name": "b"}, "new_name"), ({"combination_type": "mean"}, "combination_type")):
        args = {"names": ["default", "b"], "weights": WEIGHTS, "new_name": "n", **kw}
        with pytest.raises(ValueError, match=match):
            combine_adapters(ours, args["names"], args["weights"], new_name=args["new_name"],
                             **({"combination_type": kw["combination_type"]} if "combination_type" in kw else {}))
    inject(ours, "vera", targets="0", adapter_name="v", rank=4)
    with pytest.raises(TypeError, match="not plain LoRA"):
        combine_adapters(ours, ["default", "v"], WEIGHTS, new_name="n")
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items() if k in before)
    assert "n" not in adapted_layers(ours)["0"].adapters
