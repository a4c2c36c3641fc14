r"""Peak memory of one training step of an adapted LLM, per method and per FSDP rank, without the hardware.

:func:`training_step_memory` builds a Llama-style decoder (:mod:`~lowrank_theory.theory.llm_decoder`) on
the ``meta`` device -- shapes and dtypes, no storage, so Llama-3-8B costs nothing -- injects a method
into its seven projections per block (ours with :func:`~lowrank_theory.training.inject`, or PEFT's with
``get_peft_model``, into the same model), and returns a breakdown of the bytes one rank holds at the
peak of a step.

What is measured and what is modelled
-------------------------------------
*Measured* (a trace of the step on meta tensors under
:class:`~lowrank_theory.theory.memory.PeakTracker`, the same counter as
:func:`~lowrank_theory.theory.memory.peak_tensor_bytes`):

* ``activations`` :math:`A` -- the peak of the bytes of every storage the step's operators create
  (token ids, activations saved for backward, recomputed blocks under checkpointing, the float32
  logits and the loss's saved softmax, gradients in flight, temporaries), over forward + backward.
  Each trainable gradient is handed on as soon as it is accumulated (a post-accumulate-grad hook
  drops the bf16 ``.grad``: its fp32 copy is the modelled ``grads`` below; under FSDP this is the
  reduce-scatter after each block's backward), so a bf16 gradient counts while it is in flight.
* ``caches`` -- storages a first (warm-up) step creates and leaves alive (DoRA's cached
  :math:`\|w_i\|^2` rows); the measured step is the second one, in steady state.
* ``base_weights``, ``adapter_params``, ``adapter_buffers`` -- bytes of the distinct storages of the
  model's tensors (frozen weights and packed codes + scales of the base; trainable tensors; frozen
  tensors an adapter adds, such as VeRA's random pair -- a storage shared by several layers counts once).

*Modelled* (arithmetic, the conventions stated here).  :math:`P` trainable numbers, :math:`R` ranks,
AdamW over an fp32 master copy (mixed precision, as FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` and our :mod:`~lowrank_theory.training.fsdp`):

* per trainable number: fp32 master 4 B, fp32 gradient 4 B, AdamW :math:`m` 4 B and :math:`v` 4 B
  (``master``, ``grads``, ``optimizer``), sharded :math:`1/R`;
* :math:`R = 1` (one device, no FSDP): the model's own bf16 copy of the trainable tensors
  (``adapter_params``) and the frozen base are whole:

  .. math:: M = W_\text{base} + W_\text{buf} + 2P_{\text{bf16}} + 16P + C + \max(A, O)

* :math:`R > 1` (FSDP2 full shard, one group per block and a root group with the embedding, final
  norm and head, as :func:`~lowrank_theory.training.fsdp.shard_model` builds them): frozen and
  trainable parameters sharded :math:`1/R`, adapter buffers replicated (FSDP2 shards parameters
  only), plus the all-gathered unsharded compute copies -- the root group, which FSDP2 does not
  reshard after the forward, and the largest block (``gathered_blocks`` of them at once; 1 without
  prefetch, 2 with FSDP2's default one-block prefetch):

  .. math:: M_r = \frac{W_\text{base} + 16P}{R} + W_\text{buf} + G_\text{root} + g\,G_\text{block} + C + \max(A, O)

  where :math:`G_u` is the bytes of group :math:`u` unsharded (frozen tensors as stored, trainable
  ones in bf16).  The packed NF4 codes are counted as sharded, which needs them to be FSDP
  parameters (QLoRA-FSDP stores them as a bf16-typed parameter for this); our ``QuantizedLinear`` keeps
  them as buffers, which FSDP2 would replicate -- ``base_replicated_total`` gives that total.
* :math:`O = 8P/R` -- the optimizer step's temporaries (fp32 ``foreach`` AdamW: one list for the
  denominator, one for the update), after the activations are freed; :math:`\max(A, O)` because the
  two are never alive together.

Activations are per rank for the per-rank ``batch`` (data parallel: each rank runs its own
micro-batch, unsharded).  Not counted: the CUDA context and cuBLAS/FlashAttention workspaces
(≈ 0.5--1 GiB on a GPU), allocator fragmentation, and communication buffers beyond the gathered
groups; "fits 80 GB" compares :math:`M` with 80·10⁹ bytes and is therefore optimistic by about that much.

Per-layer extrapolation
-----------------------
Every block has the same shapes, so it adds the same saved storages, and the step's peak is
reached at a point (the loss, or the first block's backward) where the saved storages of all blocks
are alive: :math:`A(L) = A_0 + L\,a`.  With ``trace_layers=(L_1, L_2)`` the step is traced at
:math:`L_1` and :math:`L_2` blocks and :math:`A(L) = A(L_1) + (L - L_1)(A(L_2) - A(L_1))/(L_2 - L_1)`;
``tests/theory/test_llm_memory.py`` checks it equals the full trace to the byte (checkpointing on and off,
bf16 and NF4, several methods), and :func:`training_step_memory` raises if the two traces are not
consistent with it (a non-integer slope).  ``trace_layers=None`` traces all the blocks.  The static byte
counts are extrapolated the same way (shared tensors, such as PEFT's one VeRA pair, are constant in the
depth; per-layer ones linear; the same test covers them).  The line starts at :math:`L = 2`: with
checkpointing a one-block model is off it (measured: extrapolating from 1 and 2 blocks misses the
4-block trace; not analysed further), so the traced depths must be at least 2.  At Llama-3-8B shapes the
benchmark (``--verify-full``) traces all 32 blocks and finds the extrapolation equal to the byte.

The trace, device by device
---------------------------
Meta tensors run every operator's meta kernel, which creates the output storages a CPU or GPU kernel
creates (``tests/theory/test_llm_memory.py``: equal to a real CPU run to the byte for every method,
ours and PEFT's, bf16 and NF4, checkpointing on and off), except where a library branches on the
device: PEFT's RandLoRA upcasts to float32 on a CPU only, and PEFT's FourierFT copies its host-held
indices to the device every forward, which a CPU run skips.  The meta trace takes the GPU's branch in
both (the tests check both: the FourierFT copies to the byte).  Attention runs the fused CPU flash kernel's meta
function, which saves what FlashAttention-2 saves (output and log-sum-exp); the kernels' own scratch
space is not in any trace.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..adapters.quantized_base import QuantizedLinear
from .llm_decoder import LLAMA3_8B, PROJECTIONS, Block, Decoder, DecoderConfig
from .memory import PeakTracker

__all__ = ["METHODS", "MethodSpec", "PackedLinearForPeft", "StepMemory", "build_model", "combine", "measure",
           "static_bytes", "trace_step", "training_step_memory"]

GiB = 1 << 30
#: Bytes per trainable number held by the optimizer side: fp32 master, fp32 gradient, AdamW m and v.
MASTER_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
#: fp32 temporaries of the foreach AdamW step, bytes per trainable number.
OPT_STEP_BYTES = 8


@dataclass(frozen=True)
class MethodSpec:
    """One method at one setting: our registry name and config, and PEFT's config (None: PEFT has no such method)."""

    ours: str
    cfg: dict[str, Any]
    peft: Callable[[Any, list[str]], Any] | None
    peer: str | None


#: The methods compared, at the settings of issue #8 (``lowrank_theory.adapters.peers``) plus AdaLoRA.
METHODS: dict[str, MethodSpec] = {
    "lora_r16": MethodSpec("lora", {"rank": 16, "alpha": 16},
                           lambda P, t: P.LoraConfig(r=16, lora_alpha=16, target_modules=t), "lora"),
    "dora_r16": MethodSpec("dora", {"rank": 16, "alpha": 16},
                           lambda P, t: P.LoraConfig(r=16, lora_alpha=16, use_dora=True, target_modules=t), "dora"),
    "vera_r256": MethodSpec("vera", {"rank": 256}, lambda P, t: P.VeraConfig(r=256, target_modules=t), "vera"),
    "fourierft_n1000": MethodSpec("fourierft", {"n_frequency": 1000},
                                  lambda P, t: P.FourierFTConfig(n_frequency=1000, target_modules=t), "fourierft"),
    "randlora_r32": MethodSpec("randlora", {"rank": 32},
                               lambda P, t: P.RandLoraConfig(r=32, target_modules=t), "randlora"),
    "adalora_r16": MethodSpec("adalora", {"rank": 16},
                              lambda P, t: P.AdaLoraConfig(init_r=16, target_r=8, total_step=1000,
                                                           target_modules=t), "adalora"),
    "loca_n1000": MethodSpec("loca", {"n_frequency": 1000},
                             lambda P, t: P.FourierFTConfig(n_frequency=1000, target_modules=t), "fourierft"),
}


@dataclass(frozen=True)
class StepMemory:
    """Bytes one rank holds at the peak of a training step (see the module docstring for each term)."""

    method: str
    impl: str
    ranks: int
    trainable: int  # P, trainable numbers (whole model)
    base_weights: int  # frozen weights (packed codes + scales for a quantized base), per rank
    adapter_buffers: int  # frozen tensors the adapters add, replicated
    adapter_params: int  # bf16 compute copy of the trainable tensors (R = 1 only)
    master: int
    grads: int
    optimizer: int
    gathered: int  # FSDP all-gathered unsharded groups (R > 1)
    caches: int
    activations: int  # measured peak of the step's own storages
    optimizer_step: int  # O, modelled
    total: int
    base_replicated_total: int  # total if the base's buffers (packed codes) were replicated by FSDP

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def fits(self, device_bytes: float = 80e9) -> bool:
        """Whether :attr:`total` is at most ``device_bytes`` (default an 80 GB device, 80·10⁹ bytes)."""
        return self.total <= device_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total_gib": self.total_gib, "fits_80gb": self.fits()}


# ============================================================================ PEFT over a packed base
class PackedLinearForPeft(nn.Linear):
    """A :class:`QuantizedLinear` that PEFT accepts as an ``nn.Linear``: the same packed storage and forward,
    and a ``weight`` property that dequantizes (what PEFT's ``dequantize_module_weight`` returns for a
    bitsandbytes ``Linear4bit``).  Lets PEFT's own adapter code run over our NF4 base, counted the same way."""

    def __init__(self, packed: QuantizedLinear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.packed = packed
        self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.packed.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x)


def _wrap_packed(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, PackedLinearForPeft(mod))


# ============================================================================ building and tracing
def _check_args(method, config, seq_len, batch, base_dtype, base_quant, fsdp_ranks, impl, gathered_blocks,
                trace_layers) -> MethodSpec:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
    for name, v in (("seq_len", seq_len), ("batch", batch), ("fsdp_ranks", fsdp_ranks),
                    ("gathered_blocks", gathered_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not (isinstance(base_dtype, torch.dtype) and base_dtype.is_floating_point):
        raise TypeError(f"base_dtype must be a floating torch.dtype, got {base_dtype!r}")
    if base_quant not in (None, "nf4", "int8"):
        raise ValueError(f"base_quant must be None, 'nf4' or 'int8', got {base_quant!r}")
    if impl not in ("ours", "peft"):
        raise ValueError(f"impl must be 'ours' or 'peft', got {impl!r}")
    spec = METHODS[method]
    if impl == "peft" and spec.peft is None:
        raise ValueError(f"method {method!r} has no PEFT counterpart")
    if trace_layers is not None:
        ok = (isinstance(trace_layers, tuple) and len(trace_layers) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in trace_layers)
              and trace_layers[0] < trace_layers[1])
        if not ok or trace_layers[0] < 2:
            raise ValueError(f"trace_layers must be None or a pair (L1, L2) of ints with 2 <= L1 < L2, "
                             f"got {trace_layers!r}")
    return spec


def build_model(method: str, config: DecoderConfig, *, impl: str = "ours", base_dtype: torch.dtype = torch.bfloat16,
                base_quant: str | None = None, checkpointing: bool = False, targets: tuple[str, ...] = PROJECTIONS,
                device: str | torch.device = "meta", seed: int = 0, fast_init: bool = True) -> nn.Module:
    """The decoder with ``method`` injected (ours or PEFT's), on ``device`` (``"meta"``: no storage).

    ``fast_init`` memoizes ``torch.randperm(n, generator=g)`` while the adapters are built: FourierFT and
    LoCA (ours and PEFT's) draw their entries from a permutation of all m·n positions of every weight with
    a generator seeded the same way for every layer (5 s per 14336×4096 layer here).  A repeated call
    with the same ``n`` and the same generator state returns a copy of the first result and leaves the
    generator in the state the call would have left it, so the adapters are exactly the ones the seeds
    give (``tests/theory/test_llm_memory.py`` checks it); calls without a generator are not memoized.
    """
    with _memoized_randperm(fast_init):
        return _build(method, config, impl, base_dtype, base_quant, checkpointing, targets, device, seed)


_RANDPERM_MEMO: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@contextlib.contextmanager
def _memoized_randperm(active: bool):
    """While active, ``torch.randperm(n, generator=g)`` (CPU) is answered from a memo keyed by n, dtype, g's state."""
    if not active:
        yield
        return
    original = torch.randperm

    def randperm(n, *args, generator=None, **kwargs):
        if generator is None or args or set(kwargs) - {"dtype"} or generator.device.type != "cpu":
            return original(n, *args, generator=generator, **kwargs)
        state = generator.get_state()
        key = (int(n), kwargs.get("dtype", torch.int64), state.numpy().tobytes())
        if key not in _RANDPERM_MEMO:
            out = original(n, generator=generator, **kwargs)
            _RANDPERM_MEMO.clear()  # one entry at a time: these are m·n-long
            _RANDPERM_MEMO[key] = (out, generator.get_state())
        out, after = _RANDPERM_MEMO[key]
        generator.set_state(after)
        return out.clone()

    torch.randperm = randperm
    try:
        yield
    finally:
        torch.randperm = original


def _build(method, config, impl, base_dtype, base_quant, checkpointing, targets, device, seed) -> nn.Module:
    spec = METHODS[method]
    torch.manual_seed(seed)
    dec = Decoder(config, dtype=base_dtype, device=device, base_quant=base_quant, checkpointing=checkpointing)
    object.__setattr__(dec, BASE_KEYS_ATTR, frozenset(_storage_key(t) for _, t in _tensors(dec)))
    if impl == "ours":
        from ..training.injection import inject

        return inject(dec, spec.ours, list(targets), **spec.cfg)
    import peft

    if base_quant is not None:
        _wrap_packed(dec)
    return peft.get_peft_model(dec, spec.peft(peft, list(targets)), autocast_adapter_dtype=False)


BASE_KEYS_ATTR = "_llm_memory_base_storages"


def _storage_key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [(n, t) for n, t in named if t is not None]


def _decoder(model: nn.Module) -> Decoder:
    return next(m for m in model.modules() if isinstance(m, Decoder))


@dataclass(frozen=True)
class _Static:
    base_params: int  # frozen Parameters of the decoder
    base_buffers: int  # the decoder's buffers: packed codes + scales, rotary frequencies
    adapter_buffers: int  # frozen tensors an adapter adds (buffers, frozen parameters)
    trainable_bytes: int
    trainable: int  # numel
    root_group: int  # unsharded compute bytes of FSDP's root group (embedding, final norm, head)
    block_group: int  # ... of the largest block


def static_bytes(model: nn.Module) -> _Static:
    """Bytes of the distinct storages of ``model``'s tensors, by kind, and of its FSDP groups unsharded."""
    base_keys = getattr(_decoder(model), BASE_KEYS_ATTR)
    params = {id(p) for p in model.parameters()}
    kinds: dict[int, tuple[str, int]] = {}
    numel = 0
    for _, t in _tensors(model):
        key = _storage_key(t)
        if key in kinds:
            continue
        if t.requires_grad:
            kind = "train"
            numel += t.numel()
        elif key in base_keys:
            kind = "base_param" if id(t) in params else "base_buffer"
        else:
            kind = "adapter_buffer"
        kinds[key] = (kind, t.untyped_storage().nbytes())

    def total(kind: str) -> int:
        return sum(b for k, b in kinds.values() if k == kind)

    def group(tensors) -> int:  # frozen base tensors as stored, trainable ones in their compute dtype
        seen = {}
        for t in tensors:
            k = _storage_key(t)
            if kinds[k][0] != "adapter_buffer":
                seen[k] = kinds[k][1]
        return sum(seen.values())

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    in_block = {_storage_key(t) for b in blocks for _, t in _tensors(b)}
    root = group(t for _, t in _tensors(model) if _storage_key(t) not in in_block)
    block = max((group(t for _, t in _tensors(b)) for b in blocks), default=0)
    return _Static(total("base_param"), total("base_buffer"), total("adapter_buffer"), total("train"), numel,
                   root, block)


def _step(model: nn.Module, batch: int, seq_len: int, vocab: int, device) -> None:
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    loss = model(ids, ids)
    loss.backward()


def trace_step(model: nn.Module, *, batch: int, seq_len: int) -> tuple[int, int]:
    """(caches, activation peak) of a training step of ``model``: a warm-up step, then the measured one.

    Works on any device; on ``meta`` nothing is computed.  Trainable gradients are dropped as soon as
    accumulated (see the module docstring), and the hooks that do it are removed afterwards.
    """
    dec = _decoder(model)
    device = dec.inv_freq.device
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    try:
        with PeakTracker() as warm:
            _step(model, batch, seq_len, dec.config.vocab, device)
            gc.collect()
            warm._collect()
        caches = warm.current
        with PeakTracker() as tracker:
            _step(model, batch, seq_len, dec.config.vocab, device)
        return int(caches), int(tracker.peak)
    finally:
        for h in hooks:
            h.remove()


def training_step_memory(
    method: str,
    config: DecoderConfig = LLAMA3_8B,
    *,
    seq_len: int = 2048,
    batch: int = 1,
    base_dtype: torch.dtype = torch.bfloat16,
    base_quant: str | None = None,
    checkpointing: bool = False,
    fsdp_ranks: int = 1,
    impl: str = "ours",
    targets: tuple[str, ...] = PROJECTIONS,
    gathered_blocks: int = 1,
    trace_layers: tuple[int, int] | None = (2, 3),
    device: str | torch.device = "meta",
) -> StepMemory:
    r"""Bytes one rank holds at the peak of one training step of ``config`` adapted by ``method``.

    Parameters
    ----------
    method : str
        A key of :data:`METHODS` (``"lora_r16"``, ``"dora_r16"``, ...).
    config : DecoderConfig, default Llama-3-8B
    seq_len, batch : int
        Tokens per sequence and sequences per rank (per-rank micro-batch).
    base_dtype : torch.dtype, default bfloat16
        Dtype of the model's float weights and activations; trainable tensors are held in it too.
    base_quant : {None, "nf4", "int8"}
        Store the seven projections of every block packed (QLoRA's NF4: 4-bit codes + float32 scale per 64).
    checkpointing : bool
        Recompute each block in the backward.
    fsdp_ranks : int, default 1
        R; 1 is one device without FSDP (see the module docstring for the two formulas).
    impl : {"ours", "peft"}
        Whose adapters are injected into the same decoder.
    targets : tuple of str
        Projection names to adapt (default the seven of every block).
    gathered_blocks : int, default 1
        Blocks all-gathered at once under FSDP (2 with FSDP2's one-block prefetch).
    trace_layers : (int, int) or None, default (2, 3)
        Trace with these numbers of blocks and extrapolate linearly to ``config.layers`` (exact: see
        the module docstring); None traces the full model.
    device : default "meta"
        Where the model is built and the step traced; ``"cpu"`` runs it for real (tiny configs, tests).

    Returns
    -------
    StepMemory
        The breakdown; ``total`` is :math:`M` (R = 1) or :math:`M_r` (R > 1).

    Raises
    ------
    ValueError, TypeError
        Unknown ``method``/``impl``, ``seq_len``/``batch``/``fsdp_ranks`` < 1, bad dtype or ``trace_layers``,
        PEFT asked for a method it does not have -- before anything is built.
    """
    _check_args(method, config, seq_len, batch, base_dtype, base_quant, fsdp_ranks, impl, gathered_blocks,
                trace_layers)
    st, caches, activations = measure(method, config, seq_len=seq_len, batch=batch, base_dtype=base_dtype,
                                      base_quant=base_quant, checkpointing=checkpointing, impl=impl, targets=targets,
                                      trace_layers=trace_layers, device=device)
    return combine(method, impl, st, caches=caches, activations=activations, fsdp_ranks=fsdp_ranks,
                   gathered_blocks=gathered_blocks)


def measure(method: str, config: DecoderConfig = LLAMA3_8B, *, seq_len: int = 2048, batch: int = 1,
            base_dtype: torch.dtype = torch.bfloat16, base_quant: str | None = None, checkpointing: bool = False,
            impl: str = "ours", targets: tuple[str, ...] = PROJECTIONS,
            trace_layers: tuple[int, int] | None = (2, 3), device: str | torch.device = "meta",
            ) -> tuple[_Static, int, int]:
    """The measured terms, independent of the number of ranks: (static bytes, caches, activation peak).

    Arguments as :func:`training_step_memory` (which is ``combine(measure(...))``); not validated here.
    Each traced model is built once and stepped with checkpointing off and on (results cached per
    process), so asking for the other mode next costs nothing.
    """
    key = (method, impl, base_dtype, base_quant, tuple(targets), seq_len, batch, str(device))
    L = config.layers
    if trace_layers is None or L <= trace_layers[0]:
        st, traced = _traced(config, *key)
        return st, *traced[bool(checkpointing)]
    l1, l2 = trace_layers
    (s1, t1), (s2, t2) = (_traced(config.with_layers(n), *key) for n in (l1, l2))
    (c1, a1), (c2, a2) = t1[bool(checkpointing)], t2[bool(checkpointing)]
    ext = functools.partial(_extrapolate, l1, l2, L)
    if (s1.root_group, s1.block_group) != (s2.root_group, s2.block_group):
        raise RuntimeError("the FSDP groups differ between the traced depths; use trace_layers=None")
    st = _Static(*(ext(getattr(s1, f), getattr(s2, f)) for f in _LINEAR_FIELDS), s2.root_group, s2.block_group)
    return st, ext(c1, c2), ext(a1, a2)


_LINEAR_FIELDS = ("base_params", "base_buffers", "adapter_buffers", "trainable_bytes", "trainable")


def _extrapolate(l1: int, l2: int, L: int, v1: int, v2: int) -> int:
    if (v2 - v1) % (l2 - l1):
        raise RuntimeError(f"per-block growth is not an integer number of bytes ({v1} at {l1} blocks, {v2} at "
                           f"{l2}): the linear extrapolation does not hold; use trace_layers=None")
    return v1 + (L - l1) * ((v2 - v1) // (l2 - l1))


@functools.lru_cache(maxsize=32)
def _traced(config: DecoderConfig, method: str, impl: str, base_dtype: torch.dtype, base_quant: str | None,
            targets: tuple[str, ...], seq_len: int, batch: int, device: str
            ) -> tuple[_Static, dict[bool, tuple[int, int]]]:
    """Static bytes of the model of ``config`` and its (caches, activations) with checkpointing off and on."""
    model = build_model(method, config, impl=impl, base_dtype=base_dtype, base_quant=base_quant, targets=targets,
                        device=device)
    dec = _decoder(model)
    out = {}
    for ckpt in (False, True):
        dec.checkpointing = ckpt
        out[ckpt] = trace_step(model, batch=batch, seq_len=seq_len)
    return static_bytes(model), out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def combine(method: str, impl: str, st: _Static, *, caches: int, activations: int, fsdp_ranks: int,
            gathered_blocks: int = 1) -> StepMemory:
    """The modelled part: :math:`M` or :math:`M_r` of the module docstring from the measured terms."""
    R, P = fsdp_ranks, st.trainable
    master, grads, optimizer, opt_step = MASTER_BYTES * P, GRAD_BYTES * P, ADAM_BYTES * P, OPT_STEP_BYTES * P
    base = st.base_params + st.base_buffers
    if R == 1:
        adapter_params, gathered, extra = st.trainable_bytes, 0, 0
    else:
        adapter_params = 0
        master, grads, optimizer, opt_step = (_ceil_div(x, R) for x in (master, grads, optimizer, opt_step))
        gathered = st.root_group + gathered_blocks * st.block_group
        extra = st.base_buffers - _ceil_div(st.base_buffers, R)
        base = _ceil_div(base, R)
    total = (base + st.adapter_buffers + adapter_params + master + grads + optimizer + gathered + caches
             + max(activations, opt_step))
    return StepMemory(method, impl, R, P, base, st.adapter_buffers, adapter_params, master, grads, optimizer,
                      gathered, caches, activations, opt_step, total, total + extra)
