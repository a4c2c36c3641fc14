r"""PEFT's tuners seen by the checks: run :func:`~lowrank_theory.testing.check_adapter` on code we did not write.

:func:`peft_factory` turns a PEFT config (``LoraConfig(r=4)``, ``VeraConfig(...)``, ...) into the
``factory(d_out, d_in, dtype)`` that :func:`~lowrank_theory.testing.check_adapter` takes.  Each call builds
a one-``nn.Linear`` model over the seeded base of :func:`~lowrank_theory.testing.seeded_linear`, lets
``peft.get_peft_model`` inject the tuner, and returns a :class:`PeftLayerView` of the injected layer::

    from peft import LoraConfig
    from lowrank_theory.testing import check_adapter
    from lowrank_theory.testing.peft_view import peft_factory

    report = check_adapter(peft_factory(LoraConfig(r=4)), raise_on_failure=False)
    print(report)          # pass / FAIL with the numbers / skipped with the reason, per check

The view calls PEFT's own API and nothing else, and fixes none of its behaviour (the point is to measure it):

=====================  ======================================================================================
check needs            PEFT call
=====================  ======================================================================================
forward                the injected layer's ``forward`` (the model is in ``eval()`` mode: dropout off, and
                       PVeRA-style sampling replaced by its mean, as at inference)
merge / unmerge        ``layer.merge(safe_merge=safe)`` / ``layer.unmerge()``
disable                ``PeftModel.disable_adapter()`` (the context manager users call)
dense :math:`W'`       see below
state save / load      ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (what
                       ``save_pretrained`` / ``PeftModel.from_pretrained`` write and read)
config round trip      ``PeftConfig.save_pretrained`` + ``PeftConfig.from_pretrained`` (``adapter_config.json``),
                       a fresh ``get_peft_model`` and the saved state -- PEFT's counterpart of our
                       ``create(name, **config())``
trainable tensors      the layer's parameters outside ``base_layer`` with ``requires_grad``
parameter count        none: PEFT declares no closed-form count, so that check is skipped
=====================  ======================================================================================

The dense merged weight :math:`W'` that the forward is compared with is built from PEFT's tensors without
PEFT's ``merge``, where the math is known (:attr:`PeftLayerView.dense_source` says which):

* a formula for the layers whose ``get_delta_weight`` is not an additive update: OFT
  (:math:`W' = W_0 R^\top`, ``R = get_delta_weight``), BOFT (:math:`W' = (W_0 R^\top) \odot s`), HRA
  (:math:`W' = W_0 R`), HiRA (:math:`W' = W_0 + W_0 \odot \Delta`), MiSS (its
  ``get_delta_weight_miss(W0)``; ``W0 + get_delta_weight(W0)`` for ``init_weights="bat"``), and DoRA
  (LoRA with ``use_dora``:
  :math:`W' = \mathrm{diag}(m / \lVert V \rVert_{\text{row}})\, V`, :math:`V = W_0 + \Delta W`,
  Liu et al. 2024, arXiv:2402.09353, eq. 5);
* else :math:`W' = W_0 + \text{get\_delta\_weight}` when that returns a :math:`(d_{out}, d_{in})` tensor;
* else (IA3, RoAd, GLoRA, ... which have no ``get_delta_weight``) the weight of a deep copy after PEFT's
  own ``merge`` -- then the "forward matches dense" check compares the forward with PEFT's merge, no more.

PEFT draws its inits from torch's global RNG; the view forks that RNG and seeds it with ``seed`` around the
injection (what a user does with ``torch.manual_seed``), so equal arguments build equal layers and the
global RNG is left as it was.  ``seed=None`` leaves the global RNG alone.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from .views import LayerView, seeded_linear

__all__ = ["TARGET", "PeftLayerView", "peft_factory"]

#: The name of the one ``nn.Linear`` in the model the tuner is injected into (``target_modules=[TARGET]``).
TARGET = "lin"

ConfigLike = Any  # a peft.PeftConfig, or a callable (d_out, d_in) -> PeftConfig
DenseFormula = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]


class _OneLinear(nn.Module):
    """The model PEFT adapts: one ``nn.Linear`` named :data:`TARGET`."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("lowrank_theory.testing.peft_view needs the `peft` package (pip install peft)") from exc
    return peft


def _check_not_a_class(config: Any) -> None:
    if isinstance(config, type):
        raise TypeError(f"config must be a PEFT config instance such as LoraConfig(r=4), got the class "
                        f"{config.__name__} itself")


def _resolve_config(config: ConfigLike, d_out: int, d_in: int):
    peft = _peft()
    _check_not_a_class(config)
    cfg = config(d_out, d_in) if callable(config) and not isinstance(config, peft.PeftConfig) else config
    if not isinstance(cfg, peft.PeftConfig):
        raise TypeError(f"config must be a peft.PeftConfig (e.g. LoraConfig(r=4)) or a callable (d_out, d_in) -> "
                        f"PeftConfig, got {type(cfg).__name__}")
    if cfg.is_prompt_learning or getattr(cfg, "is_adaption_prompt", False):
        raise ValueError(f"config must be a tuner that injects into nn.Linear; {type(cfg).__name__} "
                         f"({cfg.peft_type}) is prompt learning and injects no layer")
    if not hasattr(cfg, "target_modules"):
        raise ValueError(f"config {type(cfg).__name__} ({cfg.peft_type}) has no target_modules: it does not "
                         "inject into a named nn.Linear")
    cfg = copy.deepcopy(cfg)
    cfg.target_modules = [TARGET]
    return cfg


# ----------------------------------------------------------------------------- dense W' for non-additive layers
def _oft(layer, w0, name):
    return w0 @ layer.get_delta_weight(name).to(w0.dtype).T


def _boft(layer, w0, name):
    r, s = layer.get_delta_weight(name)
    return (w0 @ r.to(w0.dtype).T) * s.to(w0.dtype)


def _hra(layer, w0, name):
    return w0 @ layer.get_delta_weight(name).to(w0.dtype)


def _hira(layer, w0, name):
    return w0 + w0 * layer.get_delta_weight(name).to(w0.dtype)


def _dora(layer, w0, name):
    v = w0 + layer.get_delta_weight(name).to(w0.dtype)
    m = layer.lora_magnitude_vector[name].weight.to(w0.dtype)
    return (m / torch.linalg.vector_norm(v, dim=1))[:, None] * v


def _miss(layer, w0, name):
    if layer.miss_fn == "bat":
        return w0 + layer.get_delta_weight(name, w0.clone()).to(w0.dtype)
    return layer.get_delta_weight_miss(name, w0.clone()).to(w0.dtype)


def _formula(layer: nn.Module, name: str) -> tuple[DenseFormula | None, str]:
    mod = type(layer).__module__
    if mod == "peft.tuners.lora.layer" and getattr(layer, "use_dora", {}).get(name, False):
        return _dora, "DoRA formula m ⊙ V/‖V‖ (V = W0 + get_delta_weight)"
    table = {"peft.tuners.oft.layer": (_oft, "W0 Rᵀ (R = get_delta_weight)"),
             "peft.tuners.boft.layer": (_boft, "(W0 Rᵀ) ⊙ s ((R, s) = get_delta_weight)"),
             "peft.tuners.hra.layer": (_hra, "W0 R (R = get_delta_weight)"),
             "peft.tuners.hira.layer": (_hira, "W0 + W0 ⊙ get_delta_weight"),
             "peft.tuners.miss.layer": (_miss, "get_delta_weight_miss(W0), or W0 + get_delta_weight(W0) for 'bat'")}
    return table.get(mod, (None, ""))


class PeftLayerView(LayerView):
    """A PEFT-injected ``nn.Linear`` presented to :func:`~lowrank_theory.testing.check_adapter`.

    Parameters
    ----------
    config : peft.PeftConfig or callable
        The tuner's config, or ``config(d_out, d_in) -> PeftConfig`` for knobs that depend on the shape
        (a block size that must divide ``d_in``).  ``target_modules`` is replaced by ``[TARGET]``.
    d_out, d_in : int
        The base layer is :func:`~lowrank_theory.testing.seeded_linear` ``(d_out, d_in, dtype, base_seed)``.
    dtype : torch.dtype
        Of the base layer (PEFT's tuners follow it when built; no autocast of the adapter).
    seed : int or None, default 0
        Seed of torch's global RNG, forked, during the injection (PEFT's inits draw from it).
    identity_at_init : bool, default True
        Whether PEFT's init (for this config) claims :math:`\\Delta W = 0`; set False where it does not.
    exact_gradient : bool, default True
        Whether autograd's gradient is the derivative of the forward (False for DoRA, whose norm PEFT
        detaches as the paper's section 4.3 says).
    dense : callable, optional
        ``dense(layer, W0, adapter_name) -> W'``: the dense merged weight, overriding the rules in the
        module docstring.
    safe_merge : bool, optional
        Pass this to PEFT's ``merge(safe_merge=...)`` whatever the check asks (None: what the check asks).
        PEFT's two merge paths round differently; this measures the unsafe one.
    init_dtype : torch.dtype, optional
        Build the base and inject in this dtype, then cast the model to ``dtype`` (for inits that refuse
        float64, such as PiSSA's and OLoRA's: ``init_dtype=torch.float32``, as a user would).
    base_seed : int, default 0
        Seed of the base layer's weights.

    Raises
    ------
    TypeError
        ``config`` is not a PEFT config (or a callable returning one).
    ValueError
        ``config`` is a prompt-learning method, or PEFT injected no tuner layer into the ``nn.Linear``.
    """

    def __init__(self, config: ConfigLike, d_out: int, d_in: int, dtype: torch.dtype = torch.float64, *,
                 seed: int | None = 0, identity_at_init: bool = True, exact_gradient: bool = True,
                 dense: DenseFormula | None = None, safe_merge: bool | None = None,
                 init_dtype: torch.dtype | None = None, base_seed: int = 0) -> None:
        peft = _peft()
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._args = dict(d_out=d_out, d_in=d_in, dtype=dtype, seed=seed, identity_at_init=identity_at_init,
                          exact_gradient=exact_gradient, dense=dense, safe_merge=safe_merge,
                          init_dtype=init_dtype, base_seed=base_seed)
        self.safe_merge = safe_merge
        self.config = _resolve_config(config, d_out, d_in)
        self.d_out, self.d_in = int(d_out), int(d_in)
        self.identity_at_init = bool(identity_at_init)
        self.exact_gradient = bool(exact_gradient)
        self.multiplicative = False
        with torch.random.fork_rng(devices=[]):  # nn.Linear's constructor draws from the global RNG too
            base = seeded_linear(d_out, d_in, dtype if init_dtype is None else init_dtype, base_seed)
        # the layer the tuner was built from: identity at init is checked against it, also where PEFT's
        # init rewrites the stored W0 (PiSSA, OLoRA keep the residual there)
        self.initial_weights = (base.weight.detach().clone(), base.bias.detach().clone())
        if seed is None:  # PEFT draws from the global RNG as it stands
            self.peft_model = peft.get_peft_model(_OneLinear(base), self.config, autocast_adapter_dtype=False)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.peft_model = peft.get_peft_model(_OneLinear(base), self.config, autocast_adapter_dtype=False)
        if init_dtype is not None:
            self.peft_model.to(dtype)
            self.initial_weights = tuple(t.to(dtype) for t in self.initial_weights)
        self.peft_model.eval()
        layer = self.peft_model.get_base_model().lin
        if not isinstance(layer, BaseTunerLayer):
            raise ValueError(f"PEFT injected no tuner layer for {type(self.config).__name__}: "
                             f"the Linear is a {type(layer).__name__}")
        self.module = layer
        self.adapter_name = self.peft_model.active_adapter
        formula, source = _formula(layer, self.adapter_name)
        if dense is not None:
            formula, source = dense, "user formula"
        self._formula = formula
        if formula is None:
            source = ("W0 + get_delta_weight" if self._additive_delta() is not None
                      else "PEFT merge of a deep copy (no get_delta_weight)")
        self.multiplicative = not source.startswith("W0 + get_delta_weight")
        #: How :meth:`dense_weights` builds W' (see the module docstring).
        self.dense_source = source

    @property
    def name(self) -> str:
        return f"peft.{self.config.peft_type.value.lower()}"

    def _additive_delta(self) -> torch.Tensor | None:
        if not callable(getattr(self.module, "get_delta_weight", None)):
            return None
        with torch.no_grad():
            try:
                d = self.module.get_delta_weight(self.adapter_name)
            except TypeError:  # another signature (MiSS's needs W0): not the additive ΔW
                return None
        w0 = self.module.get_base_layer().weight
        return d if isinstance(d, torch.Tensor) and d.shape == w0.shape else None

    # ------------------------------------------------------------------ the LayerView contract
    def merge(self, *, safe: bool) -> None:
        self.module.merge(safe_merge=safe if self.safe_merge is None else self.safe_merge)

    def unmerge(self) -> None:
        self.module.unmerge()

    def disable(self) -> AbstractContextManager[Any]:
        return self.peft_model.disable_adapter()

    def stored_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.module.get_base_layer()
        return base.weight, base.bias

    def _merged_twin(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        twin = copy.deepcopy(self.module)
        twin.merge(safe_merge=False)
        base = twin.get_base_layer()
        return base.weight.detach(), None if base.bias is None else base.bias.detach()

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')``: W' by :attr:`dense_source`; b' from PEFT's merge of a deep copy (``get_delta_weight``
        has no bias part; LoRA's ``lora_bias`` and AdaMSS move the bias)."""
        w0 = self.stored_weights()[0].detach()
        with torch.no_grad():
            w_twin, b_twin = self._merged_twin()
            if self._formula is not None:
                return self._formula(self.module, w0, self.adapter_name), b_twin
            d = self._additive_delta()
            if d is not None:
                return w0 + d.to(w0.dtype), b_twin
            return w_twin, b_twin

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters()
                if p.requires_grad and not n.startswith("base_layer.")]

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.get_base_layer().named_parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What ``PeftModel.save_pretrained`` writes (``adapter_model.safetensors``, read back)."""
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as tmp:
            self.peft_model.save_pretrained(tmp)
            return load_file(f"{tmp}/adapter_model.safetensors")

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, state)

    def cast(self, base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> None:
        base = self.module.get_base_layer()
        base.to(base_dtype)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(adapter_dtype) if t.is_floating_point() else t

        for child_name, child in self.module.named_children():
            if child is not base and child_name != "base_layer":
                child._apply(cast)
        for store in (self.module._parameters, self.module._buffers):
            for k, t in store.items():
                if t is not None and t.is_floating_point():
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(adapter_dtype)
                    else:
                        store[k] = t.to(adapter_dtype)

    def rebuild(self) -> LayerView | None:
        """PEFT's config round trip: ``adapter_config.json`` written and read back, then the saved state."""
        from peft import PeftConfig

        with tempfile.TemporaryDirectory() as tmp:
            self.peft_model.peft_config[self.adapter_name].save_pretrained(tmp)
            cfg = PeftConfig.from_pretrained(tmp)
        args = dict(self._args)
        w = self.stored_weights()[0]
        args["dtype"] = w.dtype
        view = PeftLayerView(cfg, **args)
        view.load_adapter_state(self.adapter_state())
        return view


def peft_factory(config: ConfigLike, *, name: str | None = None, seed: int | None = 0,
                 identity_at_init: bool = True, exact_gradient: bool = True,
                 dense: DenseFormula | None = None, safe_merge: bool | None = None,
                 init_dtype: torch.dtype | None = None) -> Callable[[int, int, torch.dtype], PeftLayerView]:
    """The ``factory(d_out, d_in, dtype)`` of :func:`~lowrank_theory.testing.check_adapter` for a PEFT config.

    Parameters are those of :class:`PeftLayerView`; ``name`` names the factory in reports (default
    ``peft.<type>``).  The config is checked here, before any check runs.

    Raises
    ------
    TypeError
        ``config`` is neither a ``peft.PeftConfig`` nor a callable.
    ValueError
        ``config`` is a prompt-learning method (it injects no layer).

    Examples
    --------
    >>> from peft import LoraConfig
    >>> from lowrank_theory.testing import check_adapter
    >>> report = check_adapter(peft_factory(LoraConfig(r=2)), checks=["merge_matches_forward"])
    >>> report.passed
    True
    """
    peft = _peft()
    _check_not_a_class(config)
    if isinstance(config, peft.PeftConfig):
        _resolve_config(config, 1, 1)
    elif not callable(config):
        raise TypeError(f"config must be a peft.PeftConfig (e.g. LoraConfig(r=4)) or a callable (d_out, d_in) -> "
                        f"PeftConfig, got {type(config).__name__}")

    def factory(d_out: int, d_in: int, dtype: torch.dtype) -> PeftLayerView:
        return PeftLayerView(config, d_out, d_in, dtype, seed=seed, identity_at_init=identity_at_init,
                             exact_gradient=exact_gradient, dense=dense, safe_merge=safe_merge,
                             init_dtype=init_dtype)

    if name is None:
        name = (f"peft.{config.peft_type.value.lower()}" if isinstance(config, peft.PeftConfig)
                else getattr(config, "__name__", "peft"))
    factory.__name__ = name
    return factory
