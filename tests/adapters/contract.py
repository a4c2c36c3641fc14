"""The adapter contract, run by :mod:`lowrank_theory.testing`'s public checker; each method's test class subclasses it.

A subclass sets ``name`` and ``cfg`` (and ``shapes`` if the method restricts sizes) and, for methods built
from the frozen weight, overrides :meth:`AdapterContract.make`.  Every check of
``lowrank_theory.testing.CHECKS`` (identity at init, structured forward == dense formula, merge, unmerge,
disable, safe merge, half precision, state and config round trips, determinism, parameter count,
gradients, gradcheck, bad inputs) then runs on that configuration, one test per check -- the same
checker users run on their own adapters.  The helpers below are shared by the method-specific tests.

Tolerances come from :mod:`lowrank_theory.testing.tolerances` (float64: 1e-10 relative).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear, Adapter
from lowrank_theory.testing import CHECKS, AdaptedLinearView, check_adapter
from lowrank_theory.testing.strategies import shapes as shape_strategy


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / max(‖b‖, tiny), in float64."""
    a, b = a.double(), b.double()
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


def randomize_(adapter: Adapter, seed: int = 0, scale: float = 0.3) -> Adapter:
    """Move every trainable parameter away from its init so ΔW ≠ 0 (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return adapter


def adapted_layer(name: str, cfg: dict, d_in: int, d_out: int, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> AdaptedLinear:
    """A frozen ``nn.Linear(d_in, d_out)`` (seed 0) with adapter ``name`` built for it (from its
    weight when the method needs one) and moved off its identity init, so a dropped term shows."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    cls = adapters.get(name)
    if cls.needs_base and hasattr(cls, "from_weight"):
        ad = cls.from_weight(base.weight.detach(), **cfg)[0]
    else:
        ad = cls(d_out, d_in, **cfg)
    ad = ad.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ad.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return AdaptedLinear(base, ad)


def make_base(d_out: int, d_in: int, dtype=torch.float64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 1.0 / d_in**0.5)
        lin.bias.normal_(0, 0.1)
    return lin


class AdapterContract:
    """Abstract contract test; pytest collects subclasses named ``Test*``."""

    name: ClassVar[str] = ""
    cfg: ClassVar[dict[str, Any]] = {}
    #: (d_out, d_in) pairs used by the checks; include non-square, non-2^k.
    shapes: ClassVar[list[tuple[int, int]]] = [(12, 20), (17, 9)]
    #: hypothesis draws sizes in [lo, hi] for the forward check
    size_range: ClassVar[tuple[int, int]] = (4, 24)

    # ------------------------------------------------------------------ hooks
    def make(self, d_out: int, d_in: int, dtype=torch.float64, seed: int = 0):
        """Return ``(adapter, base_layer)`` ready to wrap.  Default: ``create`` + random base."""
        base = make_base(d_out, d_in, dtype, seed)
        ad = adapters.create(self.name, d_out, d_in, **self.cfg).to(dtype)
        return ad, base

    def factory(self):
        """``factory(d_out, d_in, dtype)`` for the checker: :meth:`make`'s layer, with the weights it was
        built from (the same seeded base) as the reference of identity at init."""

        def build(d_out, d_in, dtype):
            original = make_base(d_out, d_in, dtype)
            ad, base = self.make(d_out, d_in, dtype)
            return AdaptedLinearView(AdaptedLinear(base, ad), (original.weight.detach(), original.bias.detach()))

        build.__name__ = f"{type(self).__name__}({self.name})"
        return build

    # ------------------------------------------------------------------ helpers for method-specific tests
    def _layer(self, d_out, d_in, dtype=torch.float64, seed=0, randomize=True):
        ad, base = self.make(d_out, d_in, dtype, seed)
        if randomize:
            randomize_(ad, seed + 1)
        return AdaptedLinear(base, ad)

    @staticmethod
    def _x(d_in, dtype=torch.float64, seed=7, batch=(3, 5)):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*batch, d_in, generator=g, dtype=torch.float64).to(dtype)

    # ------------------------------------------------------------------ tests
    def test_registered(self):
        assert self.name in adapters.names()

    @pytest.mark.parametrize("check", list(CHECKS))
    def test_invariant(self, check):
        result = check_adapter(self.factory(), checks=[check], shapes=self.shapes, raise_on_failure=False)[check]
        if result.status == "skipped":
            pytest.skip(result.message)
        assert result.status == "passed", f"{check}: {result.message} {result.numbers}"

    def test_forward_matches_dense_hypothesis(self):
        lo, hi = self.size_range

        @settings(max_examples=8)
        @given(shape_strategy(lo, hi))
        def check(shape):
            res = check_adapter(self.factory(), checks=["forward_matches_dense"], shapes=[shape],
                                raise_on_failure=False)["forward_matches_dense"]
            assert res.status == "passed", f"{shape}: {res.message}"

        check()

    def test_bad_sizes(self):
        cls = adapters.get(self.name)
        with pytest.raises((ValueError, TypeError)):
            cls(0, 8, **self.cfg)
        with pytest.raises((ValueError, TypeError)):
            cls(8, -3, **self.cfg)
