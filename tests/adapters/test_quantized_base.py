"""Adapters over frozen quantized bases (issue #19, item 2): packed NF4 / int8, dequantized on the fly.

* Packing: :func:`quantize_weight` + :func:`dequantize_weight` reproduce the project's reference quantizers
  (``linalg.quantize_nf4`` and ``linalg.quantize_uniform(W, 8)``) **bit for bit**, for any shape and block
  size (hypothesis), and re-packing a dequantized weight gives the same codes.
* Storage: the packed NF4 weight is 0.28125 of the bf16 weight (4 bits + a float32 scale per 64), int8
  0.53125; no floating tensor of the weight's size lives anywhere on the adapted layer, before or after a step.
* Forward / backward equal ``x Ŵᵀ + b`` and ``∂y Ŵ`` with Ŵ = dequant(Q) (exactly: the same F.linear on the
  same floats).
* Every linear method: a step over a quantized base trains the adapter only, and the output and gradients
  equal those of the same adapter over a float base holding Ŵ (float64, relative 1e-12: only the float
  base's fused single-node paths sum in another order).
* The public checker on a few methods, merge checks skipped as designed (see ``QuantizedView``).
* Merge policy: refused (model bit-identical); ``requantize=True`` reports an error equal to the direct
  computation; unmerge / disable-while-merged refused afterwards.
* ``inject(..., quantize_base="nf4")`` on MiniLM: forward, backward, save and load of the adapters.
* LQ-LoRA and QWHA: the stored packed base is exactly the Q their init read.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.projection import UniLoRAShared
from lowrank_theory.adapters.quantized_base import (
    QuantizationError,
    QuantizedLinear,
    dequantize_weight,
    quantize_weight,
)
from lowrank_theory.linalg import nf4_codebook, quantize_nf4, quantize_uniform
from lowrank_theory.testing import AdaptedLinearView, check_adapter
from lowrank_theory.testing.checks import CheckSkipped
from lowrank_theory.testing.views import seeded_linear
from lowrank_theory.training import adapted_layers, inject, load_adapters, merge, save_adapters

#: float64 comparisons of two computations of the same math in a different summation order: round-off is
#: ~1e-15 relative; 1e-12 leaves margin and still fails on any difference of the base (NF4 error ~1e-1).
F64_REORDER = 1e-12

LINEAR = [n for n in adapters.names() if n != "flora_conv2d"]
#: small configurations for a 24x16 / 16x24 layer (the defaults are sized for wide layers)
SMALL = {
    "adalora": {"rank": 2}, "comp_lora": {"rank": 2}, "dora": {"rank": 2}, "fourierft": {"n_frequency": 20},
    "loca": {"n_frequency": 20}, "lora": {"rank": 2}, "lq_lora": {"rank": 2, "iters": 1}, "milora": {"rank": 2},
    "pissa": {"rank": 2}, "qwha": {"n_frequency": 20}, "randlora": {"rank": 2}, "sora": {"rank": 2},
    "unilora": {"rank": 2}, "vera": {"rank": 8},
}


def _ref(W: torch.Tensor, scheme: str, block_size: int) -> torch.Tensor:
    return quantize_nf4(W, block_size=block_size) if scheme == "nf4" else quantize_uniform(W, 8, block_size=block_size)


# ============================================================================ packing
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,block", [((24, 16), 64), ((37, 29), 64), ((5, 7), 3), ((1, 1), 64), ((8, 8), 1)])
def test_pack_roundtrip_is_the_reference_bit_for_bit(scheme, dtype, shape, block):
    W = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 3
    W.view(-1)[0] = 0.0  # exact zeros and ...
    if W.numel() >= 2 * block:
        W.view(-1)[block:2 * block] = 0.0  # ... an all-zero block (scale 0) are handled as the reference does
    codes, absmax = quantize_weight(W, scheme, block)
    assert codes.dtype == (torch.uint8 if scheme == "nf4" else torch.int8) and absmax.dtype == dtype
    deq = dequantize_weight(codes, absmax, shape, scheme, block)
    assert deq.dtype == dtype and torch.equal(deq, _ref(W, scheme, block))
    # idempotent: packing the dequantized weight gives the same codes and scales
    c2, a2 = quantize_weight(deq, scheme, block)
    assert torch.equal(c2, codes) and torch.equal(a2, absmax)


@given(m=st.integers(1, 40), n=st.integers(1, 40), block=st.integers(1, 80), seed=st.integers(0, 2**16),
       scheme=st.sampled_from(["nf4", "int8"]))
def test_pack_roundtrip_property(m, n, block, seed, scheme):
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    deq = dequantize_weight(*quantize_weight(W, scheme, block), (m, n), scheme, block)
    assert torch.equal(deq, _ref(W, scheme, block))


def test_nf4_layout_is_high_nibble_first_and_half_precision_quantizes_its_float32_values():
    code = torch.tensor(nf4_codebook(), dtype=torch.float32)
    idx = torch.tensor([3, 12, 15, 0, 7, 9])
    W = code[idx].reshape(2, 3)  # |max| = 1 in the block (code 15 is 1.0), so w/a is the level itself
    codes, absmax = quantize_weight(W, "nf4", 64)
    assert codes.tolist()[:3] == [(3 << 4) | 12, (15 << 4) | 0, (7 << 4) | 9] and absmax.tolist() == [1.0]
    assert codes.numel() == 32 and set(codes.tolist()[3:]) == {0x77}  # the padded block holds the code of 0.0
    Wb = torch.randn(9, 13, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = QuantizedLinear.from_weight(Wb)
    assert q.absmax.dtype == torch.float32
    assert torch.equal(q.dequantize(), quantize_nf4(Wb.float()).to(torch.bfloat16))


@pytest.mark.parametrize("bad,err", [
    (dict(W=torch.ones(2, 2, dtype=torch.int64)), TypeError),
    (dict(W=torch.tensor([[1.0, float("nan")]])), ValueError),
    (dict(W=torch.ones(0, 3)), ValueError),
    (dict(W=torch.ones(2, 2), scheme="nf3"), ValueError),
    (dict(W=torch.ones(2, 2), block_size=0), ValueError),
    (dict(W=torch.ones(2, 2), block_size=2.0), TypeError),
])
def test_quantize_rejects_bad_input(bad, err):
    with pytest.raises(err, match=r"W|scheme|block_size"):
        quantize_weight(**bad)


# ============================================================================ storage
def _float_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every floating tensor reachable on the module tree: parameters, buffers and plain attributes."""
    out = []
    for mname, m in module.named_modules():
        for k, v in [*m._parameters.items(), *m._buffers.items(), *vars(m).items()]:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out.append((f"{mname}.{k}", v))
    return out


@pytest.mark.parametrize("scheme,ratio", [("nf4", 0.28125), ("int8", 0.53125)])
def test_storage_ratio_and_no_float_copy_of_the_weight(scheme, ratio):
    lin = nn.Linear(384, 1536).to(torch.bfloat16)
    q = QuantizedLinear.from_linear(lin, scheme=scheme)
    measured = q.storage_bytes() / (lin.weight.numel() * lin.weight.element_size())
    assert measured == ratio  # (4 or 8 bits + 32 bits / 64) / 16 bits, N a multiple of 64
    assert measured <= (0.3 if scheme == "nf4" else 0.55)
    layer = AdaptedLinear(q, adapters.create("dora", 1536, 384, rank=4).to(torch.bfloat16))
    x = torch.randn(4, 384, dtype=torch.bfloat16)
    for stage in ("built", "after a step"):
        big = [(k, tuple(t.shape)) for k, t in _float_tensors(layer) if t.numel() >= 384 * 1536 // 8]
        assert big == [], (stage, big)
        layer(x).float().pow(2).sum().backward()


def test_to_dtype_moves_compute_dtype_and_keeps_the_scales():
    q = QuantizedLinear.from_linear(nn.Linear(20, 12))
    w32, absmax = q.dequantize(), q.absmax.clone()
    q.to(torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, absmax)
    assert torch.equal(q.dequantize(), w32.to(torch.bfloat16))
    q.double()
    assert q.dequantize().dtype == torch.float64 and torch.equal(q.dequantize(), w32.double())


# ============================================================================ forward / backward
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_forward_and_backward_are_the_dequantized_linear(scheme):
    lin = seeded_linear(24, 40, torch.float32)
    q = QuantizedLinear.from_linear(lin, scheme=scheme)
    W = _ref(lin.weight.detach(), scheme, 64)
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = q(x)
    assert torch.equal(y, torch.nn.functional.linear(x, W, lin.bias))
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ W, rtol=1e-6, atol=1e-6)  # float32, one product, no reordering beyond BLAS
    with pytest.raises(TypeError, match="x"):
        q(torch.randn(2, 40, dtype=torch.float64))


# ============================================================================ every linear method
def _config(name: str) -> dict:
    cfg = dict(SMALL.get(name, {}))
    if name == "unilora":
        cfg["shared"] = UniLoRAShared(64, seed=1)
    return cfg


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)).double().eval()


def _float_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized adapted model whose bases are float nn.Linear holding dequant(Q)."""
    twin = copy.deepcopy(model)
    for name, layer in adapted_layers(twin).items():
        q = layer.base
        lin = nn.Linear(q.in_features, q.out_features).double().requires_grad_(False)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())
            lin.bias.copy_(q.bias)
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent), attr, AdaptedLinear(lin, layer.adapter))
    return twin


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", LINEAR)
def test_every_method_trains_over_a_quantized_base_and_matches_the_float_base(name):
    model = inject(_mlp(), name, ["0", "2"], quantize_base="nf4", **_config(name))
    layers = adapted_layers(model)
    assert all(isinstance(layer.base, QuantizedLinear) for layer in layers.values())
    _perturb(model)
    twin = _float_twin(model)
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, y_ref = model(x), twin(x)
    assert _relerr(y, y_ref) < F64_REORDER, name
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = dict(twin.named_parameters())
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and _relerr(p.grad, ref[n].grad) < F64_REORDER, (name, n)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen == [], name  # gradients reach only the adapter
    packed = {n: (l.base.codes.clone(), l.base.absmax.clone()) for n, l in layers.items()}
    before = {n: p.detach().clone() for n, p in trainable}
    with torch.no_grad():
        for _, p in trainable:
            p.sub_(0.1 * p.grad)
    assert any(not torch.equal(p, before[n]) for n, p in trainable), name  # the step moved the adapter
    for n, layer in layers.items():  # ... and not the packed base
        assert torch.equal(layer.base.codes, packed[n][0]) and torch.equal(layer.base.absmax, packed[n][1])


# ============================================================================ the public checker
class QuantizedView(AdaptedLinearView):
    """The checker's view of an adapted layer over a quantized base.

    A merge into a quantized base is refused by design; this view checks that the library refuses it
    (ValueError, weights bit-identical) and then reports the merge-based check as skipped.
    """

    def merge(self, *, safe: bool) -> None:
        before = (self.module.base.codes.clone(), self.module.base.absmax.clone())
        with pytest.raises(ValueError, match="quantized"):
            self.module.merge(safe=safe)
        assert torch.equal(self.module.base.codes, before[0]) and torch.equal(self.module.base.absmax, before[1])
        raise CheckSkipped("merging into a quantized base is refused by design (merge(requantize=True) is lossy)")


def _quantized_factory(method: str, **cfg):
    def factory(d_out: int, d_in: int, dtype: torch.dtype) -> QuantizedView:
        q = QuantizedLinear.from_linear(seeded_linear(d_out, d_in, dtype))
        cls = adapters.get(method)
        if callable(getattr(cls, "from_weight", None)):  # DoRA's magnitude starts at the (dequantized) W0's norms
            ad, w = cls.from_weight(q.dequantize(), **cfg)
            assert torch.equal(w, q.dequantize())  # these methods keep the base
        else:
            ad = cls(d_out, d_in, **cfg)
        ad._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
        return QuantizedView(AdaptedLinear(q, ad))

    factory.__name__ = f"{method} over nf4"
    return factory


MERGE_CHECKS = {"merge_matches_forward", "merge_idempotent", "unmerge_restores", "unmerge_refuses_changed",
                "disable_gives_base", "safe_merge_refuses_nonfinite", "half_merge_ulp"}


@pytest.mark.parametrize("method,cfg", [("lora", {"rank": 2}), ("dora", {"rank": 2}), ("hut", {}),
                                        ("loca", {"n_frequency": 20})])
def test_public_checker_on_quantized_bases(method, cfg):
    report = check_adapter(_quantized_factory(method, **cfg), raise_on_failure=False)
    status = {r.check: r.status for r in report.results}
    assert not report.failures, str(report)
    assert {c for c, s in status.items() if s == "skipped"} >= MERGE_CHECKS
    assert status["forward_matches_dense"] == "passed", str(report)
    assert status["gradcheck"] == ("skipped" if method == "dora" else "passed")  # DoRA's detached norm, by design
    assert status["only_adapter_trainable"] == "passed" and status["state_dict_roundtrip"] == "passed"


# ============================================================================ merge policy
def _adapted(method="lora", scheme="nf4", dtype=torch.float32, **cfg) -> AdaptedLinear:
    q = QuantizedLinear.from_linear(seeded_linear(24, 40, dtype), scheme=scheme)
    cls, cfg = adapters.get(method), cfg or {"rank": 4}
    ad = cls.from_weight(q.dequantize(), **cfg)[0] if hasattr(cls, "from_weight") else cls(24, 40, **cfg)
    ad = ad.to(dtype)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
    return AdaptedLinear(q, ad)


def test_merge_into_quantized_base_is_refused_and_nothing_changes():
    layer = _adapted()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"quantized \(nf4\) base.*requantize=True"):
        layer.merge()
    assert not layer.merged
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    with pytest.raises(ValueError, match="quantized base only"):
        AdaptedLinear(seeded_linear(24, 40, torch.float32), adapters.create("lora", 24, 40)).merge(requantize=True)
    model = inject(_mlp(), "lora", ["0", "2"], quantize_base="int8", rank=2)
    _perturb(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="int8"):
        merge(model)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method,cfg", [("lora", {"rank": 4}), ("dora", {"rank": 4})])
def test_merge_with_requantize_reports_its_error(scheme, method, cfg):
    layer = _adapted(method, scheme, **cfg)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    W1, b1 = layer.merged_weights()  # dequant(Q) merged with the adapter, float32
    direct = QuantizedLinear.from_weight(W1, scheme=scheme)
    err = layer.merge(requantize=True)
    assert isinstance(err, QuantizationError) and err == layer.requantization_error
    assert err == QuantizationError.between(W1, direct.dequantize())
    assert torch.equal(layer.base.codes, direct.codes) and torch.equal(layer.base.dequantize(), direct.dequantize())
    assert 0 < err.relative < (0.15 if scheme == "nf4" else 0.01)  # NF4 ~0.1, int8 ~0.005 relative at 64 per block
    assert torch.equal(layer(x), torch.nn.functional.linear(x, direct.dequantize(), b1))
    assert layer.merge(requantize=True) is None  # nothing left to merge
    with pytest.raises(ValueError, match="not invertible"):
        layer.unmerge()
    with pytest.raises(ValueError, match="not invertible"), layer.disable_adapter():
        layer(x)


def test_disable_gives_the_quantized_base_output():
    layer = _adapted("dora", rank=4)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    with layer.disable_adapter():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.base.dequantize(), layer.base.bias))
    assert not torch.equal(layer(x), layer.base(x))


# ============================================================================ injection
def test_inject_quantize_base_validates_before_changing_the_model():
    model = _mlp()
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="quantize_base"):
        inject(model, "lora", ["0", "2"], quantize_base="nf3", rank=2)
    # LQ-LoRA's own quantizer (3-bit uniform) differs from the base's: refused in prepare
    with pytest.raises(ValueError, match="differently from the base"):
        inject(model, "lq_lora", ["0", "2"], quantize_base="nf4", quantizer="uniform", bits=3, rank=2, iters=1)
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _quantized_mlp() -> nn.Module:
    model = _mlp()
    for i in (0, 2):
        model[i] = QuantizedLinear.from_linear(model[i])
    return model


def test_inject_into_an_already_quantized_model():
    model = _quantized_mlp()
    packed = model[0].codes.clone()
    inject(model, "lora", "all-linear", rank=2)
    assert isinstance(model[0], AdaptedLinear) and isinstance(model[2].base, QuantizedLinear)
    assert torch.equal(model[0].base.codes, packed)
    with pytest.raises(ValueError, match="already quantized"):
        inject(_quantized_mlp(), "lora", ["0"], quantize_base="nf4", rank=2)
    # a from_weight method over a quantized base: its new base is packed in the base's own scheme
    model = inject(_quantized_mlp(), "lq_lora", ["2"], rank=2, iters=2)
    assert isinstance(model[2].base, QuantizedLinear) and model[2].base.scheme == "nf4"


@pytest.mark.parametrize("method,cfg,scheme", [
    ("lq_lora", {"rank": 2, "iters": 3}, "nf4"),
    ("lq_lora", {"rank": 2, "iters": 3, "quantizer": "uniform", "bits": 8}, "int8"),
    ("qwha", {"n_frequency": 40}, "nf4"),
])
def test_lq_lora_and_qwha_store_the_quantized_base_their_init_read(method, cfg, scheme):
    base = _mlp().float()
    W0 = base[0].weight.detach().clone()
    ad_ref, Q = adapters.get(method).from_weight(W0, **cfg)
    model = inject(base, method, ["0"], quantize_base=scheme, **cfg)
    layer = model[0]
    assert isinstance(layer.base, QuantizedLinear) and layer.base.scheme == scheme
    assert torch.equal(layer.base.dequantize(), Q)  # the packed base is exactly the Q the init read
    assert torch.equal(layer.adapter.delta_weight(), ad_ref.delta_weight())
    # the adapted layer approximates the original W0 as the init promised: Q + ΔW ≈ W0
    err_init = float((W0 - Q).norm())
    err_adapted = float((W0 - layer.merged_weights()[0]).norm())
    assert err_adapted < err_init
    if method == "lq_lora":
        assert err_adapted == pytest.approx(layer.adapter.decomposition_errors[-1], rel=1e-5)  # float32 sums


def test_minilm_quantized_inject_forward_backward_save_load(tmp_path):
    from tests.training import load_minilm, minilm_inputs

    base = load_minilm()  # loaded once; the three models below are copies
    model = inject(copy.deepcopy(base), "lora", ["query", "value"], quantize_base="nf4", rank=4)
    layers = adapted_layers(model)
    assert len(layers) == 12 and all(isinstance(layer.base, QuantizedLinear) for layer in layers.values())
    assert not any(isinstance(m, nn.Linear) and m.weight.shape == (384, 384) and "query" in n
                   for n, m in model.named_modules())  # the float query weights are gone
    _perturb_float(model)
    inputs = minilm_inputs()
    out = model(**inputs).last_hidden_state
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 24 and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    save_adapters(model, tmp_path)
    fresh = inject(copy.deepcopy(base), "lora", ["query", "value"], quantize_base="nf4", rank=4)
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, out.detach())
    # replaying the recorded injection on the float model: the record carries quantize_base
    replayed = load_adapters(base, tmp_path, inject=True)
    assert all(isinstance(layer.base, QuantizedLinear) for layer in adapted_layers(replayed).values())
    with torch.no_grad():
        assert torch.equal(replayed(**inputs).last_hidden_state, out.detach())


def _perturb_float(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


# ============================================================================ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_base_on_cuda(scheme):
    """Packing on the device gives the host's codes; a bf16 LoRA step over the packed base trains the adapter."""
    lin = seeded_linear(96, 64, torch.float32)
    host = QuantizedLinear.from_linear(lin, scheme=scheme)
    dev = QuantizedLinear.from_linear(lin.cuda(), scheme=scheme)
    assert torch.equal(dev.codes.cpu(), host.codes) and torch.equal(dev.absmax.cpu(), host.absmax)
    assert torch.equal(dev.dequantize().cpu(), host.dequantize())
    layer = AdaptedLinear(dev.to(torch.bfloat16), adapters.create("lora", 96, 64, rank=4).cuda().to(torch.bfloat16))
    assert layer.base.absmax.dtype == torch.float32 and layer.base.codes.is_cuda
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    assert layer.adapter.B.grad is not None and bool(layer.adapter.B.grad.abs().sum() > 0)
    assert x.grad.is_cuda and bool(torch.isfinite(x.grad).all())


def test_model_merge_with_a_quantized_layer_is_refused_before_any_layer_changes():
    model = _mlp()
    inject(model, "lora", ["0"], rank=2)  # a float layer
    inject(model, "lora", ["2"], rank=2, adapter_name="q", quantize_base="nf4")  # and a quantized one
    _perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['2'\] have a quantized \(nf4\) base"):
        merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    merge(model, requantize=True)
    layer = adapted_layers(model)["2"]
    assert adapted_layers(model)["0"].merged and layer.merged and layer.requantization_error.relative > 0


def test_dora_does_not_cache_the_norm_of_a_transient_dequantized_weight():
    layer = _adapted("dora", rank=2)
    ad = layer.adapter
    x = torch.randn(3, layer.d_in)
    layer(x)
    assert getattr(ad, "_w0_sq_cache", None) is None  # a dequantized W0 is a new tensor every forward
    float_layer = AdaptedLinear(nn.Linear(layer.d_in, layer.d_out), adapters.create("dora", layer.d_out, layer.d_in,
                                                                                  rank=2))
    float_layer(x)
    assert float_layer.adapter._w0_sq_cache is not None  # a stored weight is cached as before
