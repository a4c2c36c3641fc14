"""The adapter contract, written once; each method's test class subclasses it.

A subclass sets ``name`` and ``cfg`` (and ``shapes`` if the method restricts sizes) and,
for methods built from the frozen weight, overrides :meth:`AdapterContract.make`.
Every invariant of ``design.md`` ("Adapter") is then checked for that method:
identity at init, structured forward == dense formula, merge/unmerge/disable,
parameter count, gradients only on adapter tensors, gradcheck, half precision,
safetensors state round trip and bad-input errors.

Tolerances come from ``tests/conftest.py`` (float64: 1e-10 relative -- every path is a
short chain of products/FFTs of O(1) numbers, so round-off is ~1e-14).
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear, Adapter
from tests.conftest import tol


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
    #: (d_out, d_in) pairs used by the deterministic tests; include non-square, non-2^k.
    shapes: ClassVar[list[tuple[int, int]]] = [(12, 20), (17, 9)]
    #: hypothesis draws sizes in [lo, hi]
    size_range: ClassVar[tuple[int, int]] = (4, 24)
    #: False for methods that cannot run in fp16 on CPU (e.g. FFT paths); bf16 still tried.
    half_ok: ClassVar[bool] = True
    #: gradcheck on the trainable parameters (float64, small sizes)
    gradcheck_ok: ClassVar[bool] = True

    # ------------------------------------------------------------------ hooks
    def make(self, d_out: int, d_in: int, dtype=torch.float64, seed: int = 0):
        """Return ``(adapter, base_layer)`` ready to wrap.  Default: ``create`` + random base."""
        base = make_base(d_out, d_in, dtype, seed)
        ad = adapters.create(self.name, d_out, d_in, **self.cfg).to(dtype)
        return ad, base

    def cfg_for_count(self) -> dict[str, Any]:
        return dict(self.cfg)

    # ------------------------------------------------------------------ helpers
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

    def test_identity_at_init(self):
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in, randomize=False)
            if not type(layer.adapter).identity_at_init:
                pytest.skip(f"{self.name} is not identity at init by design")
            dw = layer.adapter.delta_weight(layer.weight) if layer.adapter.needs_base else layer.adapter.delta_weight()
            assert float(dw.detach().abs().max()) <= 1e-12 * max(1.0, float(layer.weight.abs().max()))
            x = self._x(d_in)
            torch.testing.assert_close(layer(x), layer.base(x), **tol(torch.float64))

    def _check_forward_matches_dense(self, d_out, d_in):
        layer = self._layer(d_out, d_in)
        ad = layer.adapter
        x = self._x(d_in)
        W0 = layer.weight
        dw = ad.delta_weight(W0) if ad.needs_base else ad.delta_weight()
        assert dw.shape == (d_out, d_in)
        assert float(dw.detach().norm()) > 0, "randomized adapter should have ΔW ≠ 0"
        dense = x @ (W0 + dw).T + layer.bias
        assert relerr(layer(x), dense) < 1e-10
        if not ad.multiplicative:
            structured = ad(x, W0) if ad.needs_base else ad(x)
            assert relerr(structured, x @ dw.T) < 1e-10

    def test_forward_matches_dense(self):
        for d_out, d_in in self.shapes:
            self._check_forward_matches_dense(d_out, d_in)

    def test_forward_matches_dense_hypothesis(self):
        lo, hi = self.size_range

        @settings(max_examples=8)
        @given(st.integers(lo, hi), st.integers(lo, hi))
        def check(d_out, d_in):
            self._check_forward_matches_dense(d_out, d_in)

        check()

    def test_merge_unmerge_disable(self):
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in)
            x = self._x(d_in)
            W0 = layer.weight.detach().clone()
            b0 = None if layer.bias is None else layer.bias.detach().clone()
            y = layer(x)
            with layer.disable_adapter():
                torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
            layer.merge()
            assert layer.merged
            assert relerr(layer(x), y) < 1e-10
            layer.unmerge()
            assert not layer.merged
            assert relerr(layer.weight, W0) < 1e-12
            if b0 is not None:
                assert relerr(layer.bias, b0) < 1e-12
            assert relerr(layer(x), y) < 1e-10

    def test_param_count(self):
        for d_out, d_in in self.shapes:
            layer = self._layer(d_out, d_in, randomize=False)
            expected = type(layer.adapter).param_count(d_out, d_in, **self.cfg_for_count())
            assert layer.adapter.num_trainable == expected

    def test_only_adapter_trainable_and_grads_flow(self):
        d_out, d_in = self.shapes[0]
        layer = self._layer(d_out, d_in)
        assert not any(p.requires_grad for p in layer.base.parameters())
        loss = layer(self._x(d_in)).pow(2).sum()
        loss.backward()
        trainable = [p for p in layer.adapter.parameters() if p.requires_grad]
        assert trainable, "an adapter must have trainable parameters"
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trainable)
        assert all(p.grad is None for p in layer.base.parameters())

    def test_gradcheck(self):
        if not self.gradcheck_ok:
            pytest.skip(f"{self.name}: parameters are not differentiable inputs")
        d_out, d_in = 6, 5
        layer = self._layer(d_out, d_in)
        params = [p for p in layer.adapter.parameters() if p.requires_grad]
        x = self._x(d_in, batch=(2,))

        names = [n for n, p in layer.named_parameters() if p.requires_grad]

        def f(*ps):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

        inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
    def test_half_precision_merge(self, half):
        if half == torch.float16 and not self.half_ok:
            pytest.skip(f"{self.name}: fp16 not supported on CPU for this method")
        d_out, d_in = self.shapes[0]
        ref = self._layer(d_out, d_in, dtype=torch.float32)
        low = self._layer(d_out, d_in, dtype=torch.float32)
        low.load_state_dict(ref.state_dict())
        low = low.to(half)
        x = self._x(d_in, dtype=torch.float32)
        y_ref = ref(x)
        y_low = low(x.to(half))
        assert y_low.dtype == half
        assert torch.isfinite(y_low).all()
        assert relerr(y_low.float(), y_ref) < 10 * tol(half)["rtol"]
        ref.merge()
        low.merge()
        assert relerr(low.weight.float(), ref.weight) < tol(half)["rtol"]

    def test_state_dict_safetensors_roundtrip(self):
        d_out, d_in = self.shapes[0]
        a = self._layer(d_out, d_in, seed=0)
        b = self._layer(d_out, d_in, seed=0, randomize=False)
        blob = st_save({k: v.contiguous() for k, v in a.adapter.state_dict().items()})
        b.adapter.load_state_dict(st_load(io.BytesIO(blob).getvalue()))
        x = self._x(d_in)
        torch.testing.assert_close(b(x), a(x), **tol(torch.float64))

    def test_bad_sizes(self):
        cls = adapters.get(self.name)
        with pytest.raises((ValueError, TypeError)):
            cls(0, 8, **self.cfg)
        with pytest.raises((ValueError, TypeError)):
            cls(8, -3, **self.cfg)

    def test_wrong_input_width(self):
        d_out, d_in = self.shapes[0]
        layer = self._layer(d_out, d_in)
        ad = layer.adapter
        bad = self._x(d_in + 1)
        with pytest.raises(ValueError, match="d_in"):
            ad(bad, layer.weight) if ad.needs_base else ad(bad)
