r"""The adapter invariants, one small named function each.

Every check takes a :class:`Subject` (a factory plus the shapes to try), returns the numbers it measured
when the invariant holds, raises :class:`CheckFailed` (with those numbers) when it does not, and
:class:`CheckSkipped` when it does not apply (a method that is not identity at init, a layer without a
registry config).  :func:`~lowrank_theory.testing.check_adapter` runs them all and reports every failure.

Notation: :math:`W_0, b_0` the frozen weight and bias, :math:`W', b'` the merged ones, :math:`y(x)` the
adapted layer's output.  Comparisons are relative, :math:`\|a - b\|_F / \|b\|_F`, in float64 unless a
check says otherwise; the tolerances are in :mod:`~lowrank_theory.testing.tolerances`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .tolerances import MERGE_ULPS, TOL, ulp_distance
from .views import LayerView, as_view, trainable_tensors

__all__ = ["CHECKS", "CheckFailed", "CheckSkipped", "Subject", "relerr"]

F64 = TOL["float64"]["rtol"]


class CheckFailed(AssertionError):
    """An invariant does not hold; ``numbers`` holds what was measured."""

    def __init__(self, message: str, **numbers: Any) -> None:
        super().__init__(message)
        self.numbers = numbers


class CheckSkipped(Exception):
    """The check does not apply to this adapter (the reason is the message)."""


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """:math:`\\|a - b\\|_F / \\|b\\|_F` in float64 (``\\|a - b\\|_F`` when ``b = 0``)."""
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else num


@dataclass
class Subject:
    """The adapter under test: ``factory(d_out, d_in, dtype)`` and the shapes to build it at."""

    factory: Callable[[int, int, torch.dtype], Any]
    shapes: tuple[tuple[int, int], ...] = ((12, 20), (17, 9))
    half_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    name: str = "adapter"
    extras: dict[str, Any] = field(default_factory=dict)

    def build(self, d_out: int, d_in: int, dtype: torch.dtype = torch.float64, *, perturb: bool = True,
              seed: int = 0) -> LayerView:
        """A fresh layer; with ``perturb`` its trainable tensors are moved off their init (seeded), so
        every term of the update is non-zero and a dropped one shows."""
        view = as_view(self.factory(d_out, d_in, dtype), d_out, d_in, dtype, seed)
        if perturb:
            perturb_(view, seed + 1)
        return view


def perturb_(view: LayerView, seed: int, scale: float = 0.3) -> LayerView:
    """Add ``scale · N(0, 1)`` (drawn in float64 from ``seed``) to every trainable tensor of ``view``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_tensors(view):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.add_((scale * noise).to(device=p.device, dtype=p.dtype))
    return view


def _x(view: LayerView, dtype: torch.dtype | None = None, **kw: Any) -> torch.Tensor:
    return view.example_input(dtype or view.stored_weights()[0].dtype, **kw)


def _snapshot(view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = view.stored_weights()
    return w.detach().clone(), None if b is None else b.detach().clone()


def _same_bits(view: LayerView, snap: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    w, b = view.stored_weights()
    return torch.equal(w, snap[0]) and (b is None or torch.equal(b, snap[1]))


# ============================================================================ the checks
def check_identity_at_init(s: Subject) -> dict:
    """Identity at init, where the method says so: the adapted layer equals the layer it was built from
    (:math:`x W_0^\\top + b_0`; for inits that re-express the base, such as PiSSA's residual, the original
    :math:`W_0`)."""
    worst = 0.0
    for d_out, d_in in s.shapes:
        v = s.build(d_out, d_in, perturb=False)
        if not v.identity_at_init:
            raise CheckSkipped(f"{v.name} is not identity at init by design")
        x = _x(v)
        w, b = v.initial_weights or v.stored_weights()
        worst = max(worst, relerr(v(x), v.functional(x, w, b)))
    if worst > F64:
        raise CheckFailed(f"the layer is not the base layer at init: relative output error {worst:.3g} > {F64:g}",
                          relerr=worst)
    return {"relerr": worst}


def check_forward_matches_dense(s: Subject) -> dict:
    """The structured forward equals the dense formula :math:`x W'^\\top + b'` in float64."""
    worst, smallest_update = 0.0, float("inf")
    for d_out, d_in in s.shapes:
        v = s.build(d_out, d_in)
        x = _x(v)
        w0, _ = v.stored_weights()
        w1, b1 = v.dense_weights()
        smallest_update = min(smallest_update, relerr(w1, w0))
        worst = max(worst, relerr(v(x), v.functional(x, w1, b1)))
    if smallest_update == 0.0:
        raise CheckFailed("a perturbed adapter still has ΔW = 0: its trainable tensors do not reach the update")
    if worst > F64:
        raise CheckFailed(f"forward differs from x W'ᵀ + b': relative error {worst:.3g} > {F64:g}", relerr=worst)
    return {"relerr": worst, "min_relative_update": smallest_update}


def check_merge_matches_forward(s: Subject) -> dict:
    """After ``merge()`` the layer computes what it computed before (float64)."""
    worst = 0.0
    for d_out, d_in in s.shapes:
        v = s.build(d_out, d_in)
        x = _x(v)
        y = v(x).detach()
        v.merge(safe=True)
        worst = max(worst, relerr(v(x), y))
        w, b = v.stored_weights()
        worst = max(worst, relerr(v.functional(x, w, b), y))
    if worst > F64:
        raise CheckFailed(f"merged output differs from the unmerged one: relative error {worst:.3g}", relerr=worst)
    return {"relerr": worst}


def check_merge_idempotent(s: Subject) -> dict:
    """A second ``merge()`` changes nothing (bit for bit)."""
    v = s.build(*s.shapes[0])
    v.merge(safe=True)
    snap = _snapshot(v)
    v.merge(safe=True)
    if not _same_bits(v, snap):
        raise CheckFailed("merging twice changed the weights again", relerr=relerr(v.stored_weights()[0], snap[0]))
    return {}


def check_unmerge_restores(s: Subject) -> dict:
    """``unmerge()`` restores :math:`W_0, b_0` and the unadapted-then-adapted output (float64)."""
    worst_w, worst_y = 0.0, 0.0
    for d_out, d_in in s.shapes:
        v = s.build(d_out, d_in)
        x = _x(v)
        snap = _snapshot(v)
        y = v(x).detach()
        v.merge(safe=True)
        v.unmerge()
        w, b = v.stored_weights()
        worst_w = max(worst_w, relerr(w, snap[0]), 0.0 if b is None else relerr(b, snap[1]))
        worst_y = max(worst_y, relerr(v(x), y))
    if worst_w > F64 or worst_y > F64:
        raise CheckFailed(f"unmerge does not restore W0 (relative error {worst_w:.3g}) or the output ({worst_y:.3g})",
                          relerr_weight=worst_w, relerr_output=worst_y)
    return {"relerr_weight": worst_w, "relerr_output": worst_y}


def check_unmerge_refuses_changed(s: Subject) -> dict:
    """``unmerge()`` after the adapter changed while merged raises ``ValueError`` and writes nothing."""
    v = s.build(*s.shapes[0])
    v.merge(safe=True)
    snap = _snapshot(v)
    params = list(trainable_tensors(v))
    if not params:
        raise CheckSkipped("the adapter has no trainable tensor to change")
    # What an optimizer step after merge() does: every trainable tensor moves, by a seeded random step
    # (a constant shift of one tensor is invisible to some parametrizations, e.g. a skew-symmetric Q - Q^T).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    try:
        v.unmerge()
    except ValueError:
        if not _same_bits(v, snap):
            raise CheckFailed("unmerge raised but had already changed the weights") from None
        return {}
    w0_err = relerr(v.stored_weights()[0], snap[0])
    raise CheckFailed("unmerge after the adapter changed did not raise ValueError: W0 was silently not restored",
                      weight_change=w0_err)


def check_disable_gives_base(s: Subject) -> dict:
    """Inside ``disable`` the layer is the base layer: unmerged, merged, and with nested blocks."""
    v = s.build(*s.shapes[0])
    x = _x(v)
    w0, b0 = _snapshot(v)
    base = v.functional(x, w0, b0)
    y = v(x).detach()
    with v.disable():
        unmerged = relerr(v(x), base)
        with v.disable():
            pass
        nested = relerr(v(x), base)  # leaving the inner block must keep the outer one disabled
    after = relerr(v(x), y)
    v.merge(safe=True)
    with v.disable():
        merged = relerr(v(x), base)
    after_merged = relerr(v(x), y)
    nums = dict(unmerged=unmerged, nested=nested, merged=merged, after=after, after_merged=after_merged)
    if unmerged > F64 or nested > F64 or merged > F64:
        raise CheckFailed(f"disabled output is not the base output (unmerged {unmerged:.3g}, nested {nested:.3g}, "
                          f"merged {merged:.3g})", **nums)
    if after > F64 or after_merged > F64:
        raise CheckFailed("the adapter is not back after the disable block", **nums)
    return nums


def check_safe_merge_refuses_nonfinite(s: Subject) -> dict:
    """A safe merge of a non-finite ΔW raises ``ValueError`` and leaves the weights bit-identical."""
    v = s.build(*s.shapes[0])
    snap = _snapshot(v)
    params = list(trainable_tensors(v))
    if not params:
        raise CheckSkipped("the adapter has no trainable tensor")
    with torch.no_grad():
        for p in params:
            p.view(-1)[0] = float("nan")
    try:
        v.merge(safe=True)
    except ValueError:
        if not _same_bits(v, snap):
            raise CheckFailed("the refused merge changed the weights") from None
        return {}
    raise CheckFailed("merge(safe=True) wrote a non-finite update into the weights",
                      finite=bool(torch.isfinite(v.stored_weights()[0]).all()))


def _half_merge(s: Subject, dtype: torch.dtype, mixed: bool) -> tuple[int, float]:
    d_out, d_in = s.shapes[0]
    v = s.build(d_out, d_in, dtype=torch.float32)
    x = _x(v)
    y32 = v(x).detach()
    v.cast(dtype, torch.float32 if mixed else dtype)
    y = v(x.to(dtype)).detach()
    fwd = relerr(y.float(), y32) if y.dtype == dtype and bool(torch.isfinite(y).all()) else float("inf")
    # reference: the very same stored values (weights, trainable tensors, frozen buffers), held exactly in
    # float32 (every fp16/bf16 value is a float32 value), merged there and rounded once to the half dtype
    ref = s.build(d_out, d_in, dtype=torch.float32, perturb=False)
    ref.cast(torch.float32, torch.float32)
    mine, theirs = v.all_tensors(), ref.all_tensors()
    with torch.no_grad():
        for k, t in mine.items():
            theirs[k].copy_(t.float() if t.is_floating_point() else t)
        for dst, src in zip(ref.stored_weights(), v.stored_weights()):
            if src is not None:
                dst.copy_(src.float())
    want = ref.dense_weights()[0].to(dtype)
    v.merge(safe=True)
    got = v.stored_weights()[0]
    return int(ulp_distance(got, want).max()), fwd


def check_half_merge_ulp(s: Subject) -> dict:
    """fp16/bf16 layers (a half adapter, and a float32 adapter on a half base): the forward runs in the half
    dtype, is finite and within 10x the dtype's tolerance of the float32 layer, and the merge is within 1 ulp
    of the float32-accumulated :math:`W_0 + \\Delta W` (ΔW and the sum computed in float32 from the same
    half-precision values, rounded once) -- so no term is rounded to the half dtype before the sum."""
    nums: dict[str, Any] = {}
    bad = {}
    for dtype in s.half_dtypes:
        for mixed in (False, True):
            key = f"{str(dtype).removeprefix('torch.')}{'_f32adapter' if mixed else ''}"
            ulps, fwd = _half_merge(s, dtype, mixed)
            nums[f"{key}_ulps"], nums[f"{key}_forward_relerr"] = ulps, fwd
            if ulps > MERGE_ULPS:
                bad[f"{key} merge"] = f"{ulps} ulp"
            if not fwd <= 10 * TOL[str(dtype).removeprefix("torch.")]["rtol"]:
                bad[f"{key} forward"] = f"relative error {fwd:.3g} to the float32 layer"
    if bad:
        raise CheckFailed(f"half precision: {bad} (merges may be off by at most {MERGE_ULPS} ulp)", **nums)
    return nums


def check_state_dict_roundtrip(s: Subject) -> dict:
    """The adapter's state saved through safetensors loads into a fresh build, which then computes the same."""
    d_out, d_in = s.shapes[0]
    a = s.build(d_out, d_in)
    b = s.build(d_out, d_in, perturb=False)
    blob = st_save({k: t.detach().contiguous() for k, t in a.adapter_state().items()})
    b.load_adapter_state(st_load(io.BytesIO(blob).getvalue()))
    x = _x(a)
    err = relerr(b(x), a(x))
    if err > F64:
        raise CheckFailed(f"a fresh adapter loaded with the saved state computes differently: {err:.3g}", relerr=err)
    return {"relerr": err}


def check_config_roundtrip(s: Subject) -> dict:
    """``create(name, d_out, d_in, **config())`` plus the saved state rebuilds an adapter that computes the same."""
    v = s.build(*s.shapes[0])
    r = v.rebuild()
    if r is None:
        raise CheckSkipped("the layer has no registry config to rebuild from")
    x = _x(v)
    err = relerr(r(x), v(x))
    if err > F64:
        raise CheckFailed(f"the adapter rebuilt from config() computes differently: {err:.3g}", relerr=err)
    return {"relerr": err}


def check_deterministic_defaults(s: Subject) -> dict:
    """Two constructions with the same arguments are equal (frozen random tensors and inits included)."""
    d_out, d_in = s.shapes[0]
    a, b = s.build(d_out, d_in, perturb=False), s.build(d_out, d_in, perturb=False)
    ta, tb = a.all_tensors(), b.all_tensors()
    diff = sorted(k for k in set(ta) | set(tb)
                  if k not in ta or k not in tb or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]))
    if diff:
        raise CheckFailed(f"two constructions differ in {diff[:5]}: a default draws from a global or fresh RNG",
                          differing=len(diff))
    return {"tensors": len(ta)}


def check_only_adapter_trainable(s: Subject) -> dict:
    """Only adapter tensors require grad; a backward pass reaches them and no base tensor."""
    v = s.build(*s.shapes[0])
    base = v.base_parameters()
    leaking = [n for n, p in base if p.requires_grad]
    if leaking:
        raise CheckFailed(f"base parameters require grad: {leaking}")
    params = list(trainable_tensors(v))
    if not params:
        raise CheckFailed("the adapter has no trainable tensor")
    for p in params:
        p.grad = None
    v(_x(v)).pow(2).sum().backward()
    reached = sum(1 for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))
    got_grad = [n for n, p in base if p.grad is not None]
    if reached == 0 or got_grad:
        raise CheckFailed(f"gradients reach {reached} of {len(params)} adapter tensors and base tensors {got_grad}",
                          reached=reached)
    return {"trainable_tensors": len(params), "with_gradient": reached}


def check_param_count(s: Subject) -> dict:
    """The closed-form ``param_count`` equals the number of trainable scalars held."""
    nums = {}
    for d_out, d_in in s.shapes:
        v = s.build(d_out, d_in, perturb=False)
        want = v.expected_param_count()
        if want is None:
            raise CheckSkipped("the layer declares no closed-form parameter count")
        have = sum(p.numel() for p in trainable_tensors(v))
        nums[f"{d_out}x{d_in}"] = have
        if have != want:
            raise CheckFailed(f"param_count says {want} for {d_out}x{d_in} but the adapter trains {have}",
                              expected=want, held=have)
    return nums


def check_gradcheck(s: Subject) -> dict:
    """Autograd's gradient of the output with respect to the adapter's tensors matches finite differences."""
    v = s.build(*min(s.shapes, key=lambda sh: sh[0] * sh[1]))
    if not v.exact_gradient:
        raise CheckSkipped(f"{v.name}'s gradient is not the forward's derivative by design (e.g. a detached norm)")
    params = list(trainable_tensors(v))
    names = [n for n, p in v.module.named_parameters() if any(p is q for q in params)]
    if not names:
        raise CheckSkipped("no trainable tensor is a parameter of the layer module")
    x = _x(v, seed=11)

    def f(*ps):
        return torch.func.functional_call(v.module, dict(zip(names, ps)), (x,))

    inputs = tuple(dict(v.module.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)
    try:
        ok = torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False)
    except RuntimeError as exc:
        raise CheckFailed(f"gradcheck could not run: {exc}") from None
    if not ok:
        raise CheckFailed("autograd's gradient differs from finite differences (eps 1e-6, atol 1e-5, rtol 1e-4)")
    return {"tensors": len(inputs)}


def _bad_inputs(v: LayerView) -> dict[str, Any]:
    d_in = v.d_in
    dt = v.stored_weights()[0].dtype
    other = torch.float32 if dt == torch.float64 else torch.float64
    good = v.example_input(dt)
    return {
        "list": [0.0] * d_in,
        "numpy array": np.zeros(tuple(good.shape)),
        "int tensor": torch.zeros(good.shape, dtype=torch.int64),
        "bool tensor": torch.zeros(good.shape, dtype=torch.bool),
        "complex tensor": torch.zeros(good.shape, dtype=torch.complex128),
        f"{str(other).removeprefix('torch.')} on a {str(dt).removeprefix('torch.')} layer": good.to(other),
        "wrong shape": v.wrong_shape_input(dt),
        "0-d tensor": torch.tensor(1.0, dtype=dt),
    }


def check_bad_inputs(s: Subject) -> dict:
    """Bad forward inputs give ``TypeError``/``ValueError`` naming ``x``; an empty batch gives an empty output."""
    v = s.build(*s.shapes[0])
    unclear = {}
    for what, bad in _bad_inputs(v).items():
        try:
            v(bad)
        except (TypeError, ValueError) as exc:
            if not re.search(r"\bx\b", str(exc)):
                unclear[what] = f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:
            unclear[what] = f"{type(exc).__name__}: {str(exc)[:80]}"
            continue
        unclear[what] = "accepted"
    empty, want = v.empty_input(v.stored_weights()[0].dtype)
    try:
        out = v(empty)
        if tuple(out.shape) != want:
            unclear["empty batch"] = f"output shape {tuple(out.shape)}"
    except Exception as exc:
        unclear["empty batch"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    if unclear:
        raise CheckFailed(f"{len(unclear)} bad inputs without a clear TypeError/ValueError naming x: {unclear}",
                          unclear=len(unclear))
    return {"cases": len(_bad_inputs(v)) + 1}


#: Every check, by name, in the order they run.
CHECKS: dict[str, Callable[[Subject], dict]] = {
    "identity_at_init": check_identity_at_init,
    "forward_matches_dense": check_forward_matches_dense,
    "merge_matches_forward": check_merge_matches_forward,
    "merge_idempotent": check_merge_idempotent,
    "unmerge_restores": check_unmerge_restores,
    "unmerge_refuses_changed": check_unmerge_refuses_changed,
    "disable_gives_base": check_disable_gives_base,
    "safe_merge_refuses_nonfinite": check_safe_merge_refuses_nonfinite,
    "half_merge_ulp": check_half_merge_ulp,
    "state_dict_roundtrip": check_state_dict_roundtrip,
    "config_roundtrip": check_config_roundtrip,
    "deterministic_defaults": check_deterministic_defaults,
    "only_adapter_trainable": check_only_adapter_trainable,
    "param_count": check_param_count,
    "gradcheck": check_gradcheck,
    "bad_inputs": check_bad_inputs,
}
