"""Every check of ``lowrank_theory.testing`` fails on an adapter or layer broken in exactly its way.

Each broken class below is a one-line mutation of LoRA or of ``AdaptedLinear`` (the kind of bug the check
exists for).  The test asserts that the check reports ``failed`` on it, and that the same check passes on
the unbroken LoRA -- so a check that could not fail, or that fails on good code, is caught here.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.lowrank import LoRA
from lowrank_theory.testing import CHECKS, check_adapter, seeded_linear


def lora(cls=LoRA, **cfg):
    """A factory of ``cls`` (rank 2, α = 6, so the scale 3 is not 1) over a seeded base."""
    cfg = {"rank": 2, "alpha": 6.0, **cfg}

    def factory(d_out, d_in, dtype):
        return cls(d_out, d_in, **cfg).to(dtype)

    return factory


def layer(cls, adapter_cls=LoRA):
    """A factory of the broken layer ``cls`` around a LoRA."""

    def factory(d_out, d_in, dtype):
        return cls(seeded_linear(d_out, d_in, dtype), adapter_cls(d_out, d_in, rank=2, alpha=6.0).to(dtype))

    return factory


# ----------------------------------------------------------------------------- broken adapters
class NonZeroInit(LoRA):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        with torch.no_grad():
            self.B.fill_(0.1)  # claims identity at init, is not


class DroppedScale(LoRA):
    def forward(self, x, base_weight=None):
        self._check_input(x)
        return (x @ self.A.T) @ self.B.T  # forgets s = α/r


class DoubleMerge(LoRA):
    def _merge(self, base_weight):
        return base_weight + 2 * self.delta_weight().to(base_weight.dtype)


class HalfUnmerge(LoRA):
    def _unmerge(self, merged_weight):
        return merged_weight - 0.5 * self.delta_weight().to(merged_weight.dtype)


class HalfPrecisionDelta(LoRA):
    """The merge this issue found: ΔW in the adapter's fp16/bf16 dtype (no float32 working dtype).

    The host runs every merge in ``merge_dtype``; this mutant answers the adapter's own dtype there,
    so an fp16/bf16 adapter computes ΔW and the sum in fp16/bf16.
    """

    def merge_dtype(self, base_weight):
        return self.B.dtype


class HalfPrecisionSum(LoRA):
    """ΔW rounded to the half base dtype before the sum (a float32 adapter on a bf16 base)."""

    def merge_dtype(self, base_weight):
        return base_weight.dtype


class ForgetsB(LoRA):
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "B")


class LosesAlpha(LoRA):
    def config(self):
        cfg = super().config()
        cfg.pop("alpha")  # what CompLoRA did with its basis
        return cfg


class OffByOne(LoRA):
    @classmethod
    def param_count(cls, d_out, d_in, rank=8, **_):
        return rank * (d_out + d_in) + 1


class _TwiceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class WrongBackward(LoRA):
    def forward(self, x, base_weight=None):
        self._check_input(x)
        return self.scale * ((x @ _TwiceGrad.apply(self.A).T) @ self.B.T)


# ----------------------------------------------------------------------------- broken layers
class ReMerging(AdaptedLinear):
    def merge(self, *, safe=True):
        self._merged = []  # forgets that it merged: a second merge adds ΔW again
        super().merge(safe=safe)


class NoChangeCheck(AdaptedLinear):
    def _check_unchanged(self):
        return None


class DisableIgnoresMerge(AdaptedLinear):
    """The bug this issue found: disabled while merged returned the merged output."""

    def forward(self, x):
        if self.disabled:
            return self.base(x)
        return super().forward(x)


class DisableResetsFalse(AdaptedLinear):
    """Leaving a nested disable block re-enabled the adapter inside the outer one."""

    from contextlib import contextmanager

    @contextmanager
    def disable_adapter(self):
        self.disabled = True
        try:
            yield self
        finally:
            self.disabled = False


class UnsafeMerge(AdaptedLinear):
    def merge(self, *, safe=True):
        super().merge(safe=False)


class LeakyBase(AdaptedLinear):
    def __init__(self, base, adapter):
        super().__init__(base, adapter)
        self.base.weight.requires_grad_(True)


class UncheckedInput(AdaptedLinear):
    def forward(self, x):
        ad = self.adapter
        return self.base(x) + ad.scale * ((x @ ad.A.T) @ ad.B.T)


BROKEN = {
    "identity_at_init": [lora(NonZeroInit)],
    "forward_matches_dense": [lora(DroppedScale)],
    "merge_matches_forward": [lora(DoubleMerge)],
    "merge_idempotent": [layer(ReMerging)],
    "unmerge_restores": [lora(HalfUnmerge)],
    "unmerge_refuses_changed": [layer(NoChangeCheck)],
    "disable_gives_base": [layer(DisableIgnoresMerge), layer(DisableResetsFalse)],
    "safe_merge_refuses_nonfinite": [layer(UnsafeMerge)],
    "half_merge_ulp": [lora(HalfPrecisionDelta), lora(HalfPrecisionSum)],
    "state_dict_roundtrip": [lora(ForgetsB)],
    "config_roundtrip": [lora(LosesAlpha)],
    "deterministic_defaults": [lora(seed=None)],
    "only_adapter_trainable": [layer(LeakyBase)],
    "param_count": [lora(OffByOne)],
    "gradcheck": [lora(WrongBackward)],
    "bad_inputs": [layer(UncheckedInput)],
}


def test_every_check_has_a_negative_control():
    assert set(BROKEN) == set(CHECKS)


@pytest.mark.parametrize(("check", "factory"), [(c, f) for c, fs in BROKEN.items() for f in fs],
                         ids=[f"{c}-{i}" for c, fs in BROKEN.items() for i in range(len(fs))])
def test_check_fails_on_its_broken_adapter(check, factory):
    report = check_adapter(factory, checks=[check], raise_on_failure=False)
    assert report[check].status == "failed", str(report)


@pytest.mark.parametrize("check", list(CHECKS))
def test_check_passes_on_lora(check):
    report = check_adapter(lora(), checks=[check], raise_on_failure=False)
    assert report[check].status == "passed", str(report)


def test_half_precision_controls_fail_by_more_than_one_ulp():
    """The failure is a real rounding error, not a 1-ulp double rounding: the mutants are ≥ 2 ulp off."""
    for factory in BROKEN["half_merge_ulp"]:
        nums = check_adapter(factory, checks=["half_merge_ulp"], raise_on_failure=False)["half_merge_ulp"].numbers
        assert max(v for k, v in nums.items() if k.endswith("_ulps")) >= 2, nums
