r"""Put adapters into any ``nn.Module``: pick target layers by name, wrap them, freeze the rest.

:func:`inject` replaces every target ``nn.Linear`` (or GPT-2 ``Conv1D``) by
:class:`~lowrank_theory.adapters.AdaptedLinear` ``(base, adapter)``, so the adapted layer computes
:math:`y = W_0 x + b_0 + \Delta W x` (or the method's multiplicative form), and freezes every
parameter that does not belong to an adapter.  Targets follow PEFT's habits (exact name, dotted
suffix, ``"re:"`` full match, ``"all-linear"``; see :mod:`~lowrank_theory.training.targets`).

Work is done in two phases so that a failure leaves the model untouched: :func:`prepare` resolves
the names and builds every adapter (reading the frozen weights for methods with ``from_weight``)
without changing the model; :meth:`InjectionPlan.apply` then swaps the modules in, writes any new
base weight and freezes.  :func:`inject` is ``prepare(...).apply()``; checkpoint loading uses the
two phases to validate a file against the adapters it would build before touching anything.

Shared state.  A keyword in ``cfg`` is passed unchanged to every layer's constructor, so one
object given once (e.g. ``shared=UniLoRAShared(d=1024)``) is shared by all injected layers.
Adapter classes may also expose a classmethod ``make_shared(shapes, **cfg) -> dict`` that builds
model-level state from the list of target shapes ``[(d_out, d_in), ...]`` and returns extra
constructor keywords for every layer; and a class whose constructor takes ``basis_shape`` (VeRA,
RandLoRA: one frozen random pair sliced by every layer) gets the largest target shape when the
caller does not pass one.

Quantized bases.  ``quantize_base="nf4"`` (or ``"int8"``) stores each target's frozen weight as a
:class:`~lowrank_theory.adapters.quantized_base.QuantizedLinear` (QLoRA's block-wise NF4, or absmax
int8), built in :func:`prepare` from the weight the adapter is built over (after ``from_weight``
re-expressed it: PiSSA's residual, LQ-LoRA's and QWHA's quantized part); a model whose targets already
are ``QuantizedLinear`` modules is adapted as it is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import __version__, adapters
from ..adapters import AdaptedLinear, Adapter
from ..adapters.layer import DEFAULT_ADAPTER
from ..adapters.quantized_base import SCHEMES, QuantizationError, QuantizedLinear
from ..linalg.random import derive_seed
from .targets import Targets, find_targets, is_linear, to_json

__all__ = [
    "CONFIG_ATTR",
    "ORIGINAL_FLAGS_ATTR",
    "InjectionPlan",
    "adapted_layers",
    "freeze_non_adapter",
    "inject",
    "prepare",
    "unwrap_model",
]

#: Attribute of the model that holds the list of injection records (plain JSON-able dicts).
CONFIG_ATTR = "lowrank_adapter_config"
#: Attribute of the model holding ``[(parameter, requires_grad)]`` from before the first injection.
ORIGINAL_FLAGS_ATTR = "_lowrank_original_requires_grad"


# ============================================================================ helpers
def _weight_2d(base: nn.Module) -> torch.Tensor:
    """The base weight as (d_out, d_in): a transposed view for Conv1D, dequantized for QuantizedLinear, the
    stored one of an adapted layer."""
    if isinstance(base, AdaptedLinear):
        return base.weight
    if isinstance(base, QuantizedLinear):
        return base.dequantize()
    return base.weight if isinstance(base, nn.Linear) else base.weight.T


# ============================================================================ planning
@dataclass
class InjectionPlan:
    """Adapters built for a model but not yet put into it (see :func:`prepare`)."""

    model: nn.Module
    record: dict[str, Any]
    adapters: dict[str, Adapter]
    new_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Quantized base layers to put in place of the targets' bases (``quantize_base``, or a new
    #: weight from ``from_weight`` over an already quantized base).
    new_bases: dict[str, QuantizedLinear] = field(default_factory=dict)
    applied: bool = False

    def apply(self) -> nn.Module:
        """Swap the adapted layers in, write new base weights, freeze, record; return the model."""
        if self.applied:
            raise ValueError("this InjectionPlan was already applied")
        adapter_name = self.record.get("adapter_name", DEFAULT_ADAPTER)
        for name in self.adapters:  # the model may have changed since prepare()
            mod = self.model.get_submodule(name)
            if isinstance(mod, AdaptedLinear):  # adapted before or since prepare(): the adapter is added to it
                if adapter_name in mod.adapters or mod.merged or name in self.new_weights:
                    raise ValueError(f"layer {name!r} changed since prepare(): it holds {adapter_name!r}, is merged, "
                                     f"or holds adapters under a base weight this plan would rewrite")
            elif not is_linear(mod):
                raise ValueError(f"module {name!r} is no longer a Linear/Conv1D ({type(mod).__name__})")
        _remember_flags(self.model)
        with torch.no_grad():
            for name, ad in self.adapters.items():
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                base = getattr(parent, attr)
                if isinstance(base, AdaptedLinear):
                    base.add_adapter(adapter_name, ad)  # inactive until set_adapter(), as in PEFT
                    continue
                if name in self.new_bases:
                    base = self.new_bases[name]
                elif name in self.new_weights:
                    w = self.new_weights[name]
                    base.weight.copy_(w if isinstance(base, nn.Linear) else w.T)
                setattr(parent, attr, AdaptedLinear(base, ad, adapter_name=adapter_name))
        freeze_non_adapter(self.model)
        records = list(getattr(self.model, CONFIG_ATTR, None) or [])
        records.append(self.record)
        setattr(self.model, CONFIG_ATTR, records)
        self.applied = True
        return self.model


def _cast_floating(ad: Adapter, dtype: torch.dtype | None, device: torch.device,
                   shared: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] | None = None) -> Adapter:
    """Move ``ad`` to ``device`` and its floating tensors to ``dtype`` (Module.to(dtype) would also cast complex
    buffers to a real dtype).  A tensor that is a view of a contiguous tensor -- the frozen random pair VeRA and
    RandLoRA slice for every layer from one cached draw -- becomes the same view of one converted copy of that
    tensor, shared through ``shared`` by every adapter of an injection: converting each view on its own would
    give every layer a private copy of its slice (1.25 GiB for VeRA r=256 on Llama-3-8B in bf16, against the
    14 MiB of the one shared pair, measured by ``lowrank_theory.theory.llm_memory``)."""
    shared = {} if shared is None else shared

    def convert(t: torch.Tensor) -> torch.Tensor:
        to = dtype if dtype is not None and t.is_floating_point() else t.dtype
        base = t._base
        if base is None or not base.is_contiguous():
            return t.to(device=device, dtype=to)
        key = (id(base), to)
        if key not in shared:  # the base is kept with its copy, so its id is not reused while the dict lives
            shared[key] = (base, base.to(device=device, dtype=to))
        return shared[key][1].as_strided(t.size(), t.stride(), t.storage_offset() - base.storage_offset())

    return ad._apply(convert)


def _shared_kwargs(cls: type[Adapter], shapes: list[tuple[int, int]], cfg: dict[str, Any]) -> dict[str, Any]:
    maker = getattr(cls, "make_shared", None)
    extra: dict[str, Any] = {}
    if callable(maker):
        extra = dict(maker(shapes, **cfg))
    params = inspect.signature(cls.__init__).parameters
    if "basis_shape" in params and "basis_shape" not in cfg and "basis_shape" not in extra:
        extra["basis_shape"] = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    return extra


def prepare(
    model: nn.Module,
    method: str,
    targets: Targets = "all-linear",
    exclude: Targets | None = None,
    *,
    from_weight: bool | None = None,
    dtype: torch.dtype | None = None,
    layer_seeds: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    quantize_base: str | None = None,
    quant_block_size: int = 64,
    **cfg: Any,
) -> InjectionPlan:
    """Resolve targets and build every adapter without changing ``model`` (arguments as :func:`inject`)."""
    if quantize_base is not None and quantize_base not in SCHEMES:
        raise ValueError(f"quantize_base must be None or one of {SCHEMES}, got {quantize_base!r}")
    if isinstance(quant_block_size, bool) or not isinstance(quant_block_size, int) or quant_block_size < 1:
        raise ValueError(f"quant_block_size must be a positive int, got {quant_block_size!r}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a str (a registered adapter name), got {type(method).__name__}")
    cls = adapters.get(method)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if not isinstance(layer_seeds, bool):
        raise TypeError(f"layer_seeds must be a bool, got {type(layer_seeds).__name__}")
    if layer_seeds and not isinstance(cfg.get("seed"), int):
        raise ValueError(f"layer_seeds=True needs an int seed in the config, got seed={cfg.get('seed')!r}")
    use_fw = callable(getattr(cls, "from_weight", None)) if from_weight is None else bool(from_weight)
    if use_fw and not callable(getattr(cls, "from_weight", None)):
        raise ValueError(f"from_weight=True but adapter {method!r} has no from_weight constructor")
    names = find_targets(model, targets, exclude, adapter_name=adapter_name)
    bases = {n: model.get_submodule(n) for n in names}
    for n, b in bases.items():
        if isinstance(b, AdaptedLinear) and b.merged:
            raise ValueError(f"layer {n!r} is merged; unmerge(model) before adding adapter {adapter_name!r}")
    if quantize_base is not None:
        adapted = [n for n, b in bases.items() if isinstance(b, AdaptedLinear)]
        if adapted:
            raise ValueError(f"quantize_base={quantize_base!r} but targets {adapted[:3]} already hold adapters "
                             "defined on their current base; quantize a layer before its first adapter")
        already = [n for n, b in bases.items() if isinstance(b, QuantizedLinear)]
        if already:
            raise ValueError(f"quantize_base={quantize_base!r} but targets {already[:3]} are already quantized; "
                             "leave quantize_base=None to adapt a quantized model as it is")
    shapes = [tuple(_weight_2d(b).shape) for b in bases.values()]
    extra = _shared_kwargs(cls, shapes, cfg)
    built: dict[str, Adapter] = {}
    converted: dict = {}  # one converted copy of each tensor the adapters' buffers are views of
    new_weights: dict[str, torch.Tensor] = {}
    new_bases: dict[str, QuantizedLinear] = {}
    for name, base in bases.items():
        W = _weight_2d(base)
        d_out, d_in = W.shape
        kw = {**cfg, **extra}
        if layer_seeds:
            kw["seed"] = derive_seed(cfg["seed"], name)
        if use_fw:
            ad, W_new = cls.from_weight(W.detach(), **kw)
            if W_new is not None and W_new is not W and W_new.data_ptr() != W.data_ptr():
                if tuple(W_new.shape) != (d_out, d_in) or not bool(torch.isfinite(W_new).all()):
                    raise ValueError(
                        f"{method}.from_weight returned a base weight of shape {tuple(W_new.shape)} "
                        f"(expected {(d_out, d_in)}) or with NaN/Inf for {name!r}"
                    )
                if isinstance(base, AdaptedLinear):
                    raise ValueError(
                        f"{method}.from_weight rewrites the base weight of {name!r}, which holds adapters "
                        f"{list(base.adapters)} defined on the current one; add {method!r} to a layer without "
                        f"adapters, or with from_weight=False"
                    )
                new_weights[name] = W_new.detach().to(device=W.device, dtype=W.dtype)
        else:
            ad = cls(d_out, d_in, **kw)
        if not isinstance(ad, Adapter):
            raise TypeError(f"{method} built a {type(ad).__name__} for {name!r}, not an Adapter")
        built[name] = _cast_floating(ad, dtype or W.dtype, W.device, converted)
        if quantize_base is not None or (isinstance(base, QuantizedLinear) and name in new_weights):
            new_bases[name] = _quantized_base(cls, name, base, new_weights.pop(name, W), quantize_base,
                                              quant_block_size)
    record = {
        "method": method,
        "cfg": to_json({**cfg, **{k: v for k, v in extra.items() if k == "basis_shape"}}),
        "targets": to_json(targets),
        "exclude": to_json(exclude),
        "layers": names,
        "from_weight": use_fw,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "layer_seeds": layer_seeds,
        "adapter_name": adapter_name,
        "library_version": __version__,
    }
    if quantize_base is not None:
        record.update(quantize_base=quantize_base, quant_block_size=quant_block_size)
    return InjectionPlan(model, record, built, new_weights, new_bases)


def _quantized_base(cls: type[Adapter], name: str, base: nn.Module, W: torch.Tensor, scheme: str | None,
                    block_size: int) -> QuantizedLinear:
    """The packed base for ``W`` (the target's weight, or the one ``from_weight`` returned).

    A method whose init reads the quantization error (``quantizes_base``: LQ-LoRA, QWHA) returned an
    already quantized ``W``; its packing must reproduce it (up to one rounding of a half-precision
    compute dtype), else the stored base is not the one the init read and this raises ``ValueError``.
    """
    if isinstance(base, QuantizedLinear):
        scheme, block_size = base.scheme, base.block_size
    bias = base.bias.detach() if base.bias is not None else None
    q = QuantizedLinear.from_weight(W.detach(), bias, scheme=scheme, block_size=block_size)
    if getattr(cls, "quantizes_base", False):
        err = QuantizationError.between(W, q.dequantize())
        bound = 2 * torch.finfo(W.dtype).eps * float(W.detach().abs().max()) if W.dtype.itemsize < 4 else 0.0
        if err.max_abs > bound:
            raise ValueError(
                f"{cls.name}.from_weight quantized {name!r} differently from the base ({scheme}, block_size="
                f"{block_size}): repacking changes it by up to {err.max_abs:.3g}, so the stored base would not be "
                f"the one its init read. Give the method the same quantizer (quantizer='nf4' for 'nf4', "
                f"'uniform' with bits=8 for 'int8') and block_size={block_size}"
            )
    return q


def inject(
    model: nn.Module,
    method: str,
    targets: Targets = "all-linear",
    exclude: Targets | None = None,
    *,
    from_weight: bool | None = None,
    dtype: torch.dtype | None = None,
    layer_seeds: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    quantize_base: str | None = None,
    quant_block_size: int = 64,
    **cfg: Any,
) -> nn.Module:
    r"""Wrap every target layer of ``model`` with the adapter ``method``; freeze everything else.

    Parameters
    ----------
    model : nn.Module
        Any module (a Hugging Face model included); changed in place.
    method : str
        A registered adapter name (``lowrank_theory.adapters.names()``).
    targets : str, re.Pattern or list of them, default ``"all-linear"``
        Which modules to adapt (see the module docstring).
    exclude : same as ``targets``, optional
        Modules to leave alone.
    from_weight : bool, optional
        Build each adapter with ``cls.from_weight(W0, **cfg)`` (PiSSA, LoRA-XS, LoLDU, QWHA, ...),
        replacing the base weight when the method returns a new one.  Default: when the class has it.
    dtype : torch.dtype, optional
        Floating dtype of the adapters' floating tensors; default each base weight's dtype.
    layer_seeds : bool
        Give layer ``name`` the seed ``derive_seed(seed, name)`` instead of ``seed`` itself, so
        per-layer random tensors differ (leave False where the method shares them, e.g. VeRA).
    adapter_name : str, default ``"default"``
        The name of the new adapters.  A target that is already adapted gets this adapter next to
        the ones it holds, *inactive* (frozen) until :func:`~lowrank_theory.training.set_adapter`
        activates it, as in PEFT; a fresh target gets it as its active adapter.
    quantize_base : {"nf4", "int8"}, optional
        Store each target's frozen weight packed in 4-bit NF4 (QLoRA) or absmax int8, blocks of
        ``quant_block_size`` entries, as a :class:`~lowrank_theory.adapters.quantized_base.QuantizedLinear`
        (the packed codes are then the only copy of W0; the forward dequantizes on the fly).  The weight
        packed is the one the adapter is built over: W0, or what ``from_weight`` returned.  Default None:
        float bases, or already quantized ones kept as they are.
    quant_block_size : int, default 64
        Entries per absmax scale of ``quantize_base``.
    **cfg
        The adapter's constructor keywords (``rank=8, alpha=16``); passed unchanged to every layer.

    Returns
    -------
    nn.Module
        ``model`` itself, with ``model.lowrank_adapter_config`` (a list of JSON-able records:
        method, cfg, targets, exclude, layer names, ...) appended to.

    Raises
    ------
    ValueError
        Unknown method, a target that matches nothing, an already adapted target, bad config.
    TypeError
        A target that is not ``nn.Linear`` / ``Conv1D``, or arguments of the wrong type.

    Notes
    -----
    The adapted layer computes :math:`y = W_0 x + b_0 + \Delta W x` for additive methods; every
    parameter of ``model`` outside an adapter gets ``requires_grad=False``.  Nothing is changed
    when an error is raised (all adapters are built first).

    Over a quantized base, :func:`merge` is refused (``ValueError``, see
    :meth:`~lowrank_theory.adapters.AdaptedLinear.merge`): merging needs a lossy requantization.
    """
    return prepare(
        model, method, targets, exclude, from_weight=from_weight, dtype=dtype, layer_seeds=layer_seeds,
        adapter_name=adapter_name, quantize_base=quantize_base, quant_block_size=quant_block_size, **cfg
    ).apply()


# ============================================================================ model-level operations
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` (what ``accelerate``'s
    ``prepare`` returns on several processes) and ``torch.compile`` wrappers, so that layer names
    do not depend on how the model was wrapped for training."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """``{name: AdaptedLinear}`` for every adapted layer of ``model``, in module order.

    Names are those of the unwrapped model (:func:`unwrap_model`): a DDP-wrapped model gives the
    same names as the model itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, AdaptedLinear)}


def _remember_flags(model: nn.Module) -> None:
    """Before the first injection changes anything, record every parameter's ``requires_grad``, so that
    :func:`~lowrank_theory.training.unload` / :func:`~lowrank_theory.training.merge_and_unload` give the
    unadapted model back with the flags it had."""
    if getattr(model, ORIGINAL_FLAGS_ATTR, None) is None:
        object.__setattr__(model, ORIGINAL_FLAGS_ATTR, [(p, p.requires_grad) for p in model.parameters()])


def freeze_non_adapter(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter that is not inside an adapter (any adapter, active or not)."""
    keep = {id(p) for layer in adapted_layers(model).values() for ad in layer.adapters.values()
            for p in ad.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
