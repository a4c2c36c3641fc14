r"""transformers integration: adapter-only ``Trainer`` checkpoints and ``save_pretrained`` / ``from_pretrained``.

An injected Hugging Face model is still a ``PreTrainedModel``, so ``transformers.Trainer`` would
checkpoint all of it (90 MB for MiniLM).  :class:`AdapterTrainer` (or :func:`adapter_trainer` for
any ``Trainer`` subclass, e.g. TRL's) writes only the adapters at every checkpoint and at
``save_model`` -- our format, and PEFT's in a ``peft/`` subfolder where the method has a PEFT
counterpart -- and restores them for ``resume_from_checkpoint`` and ``load_best_model_at_end``.
The optimizer, scheduler, RNG and trainer state files are the Trainer's own, as always.

A PEFT script changes in one line per step::

    model = inject(model, "lora", targets=["query", "value"], rank=8)  # was: get_peft_model(model, config)
    trainer = AdapterTrainer(model=model, args=args, ...)            # was: Trainer(...)
    save_pretrained(model, "out")                                     # was: model.save_pretrained("out")
    model = from_pretrained(base, "out")                              # was: PeftModel.from_pretrained(base, "out")

A directory written by :func:`save_pretrained` holds our checkpoint
(:func:`~lowrank_theory.training.checkpoint.save_adapters`: ``adapters.safetensors`` +
``adapter_config.json``) and, where the method exports, ``peft/`` for
``PeftModel.from_pretrained(base, "out/peft")``.  The two cannot share a folder: both formats name
their config ``adapter_config.json``.  :func:`from_pretrained` reads either.

This module imports transformers only when :class:`AdapterTrainer` is first used.  Checkpoints
are written by the main process from the live adapters, which covers one process and DDP;
FSDP / DeepSpeed ZeRO-3 shard the adapter tensors and are not supported.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import CONFIG_NAME, FORMAT, read_json, save_adapters
from .checkpoint_load import load_adapters
from .injection import adapted_layers, unwrap_model
from .peft_format import PEFT_CONFIG_NAME, export_peft, import_peft, peft_type_of

# AdapterTrainer is built on first access (module __getattr__): importing this module does not import transformers
__all__ = ["PEFT_SUBDIR", "AdapterTrainer", "adapter_trainer", "from_pretrained", "save_pretrained"]  # noqa: F822

logger = logging.getLogger(__name__)

#: Subfolder of a :func:`save_pretrained` directory that holds the PEFT-format copy.
PEFT_SUBDIR = "peft"


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, peft: bool | None = None) -> Path:
    """Write the adapters of ``model`` to ``path``: our format, and PEFT's in ``path/peft``.

    Parameters
    ----------
    model : nn.Module
        An injected model (DDP / ``accelerate`` / ``torch.compile`` wrappers are unwrapped).
    path : str or PathLike
        Directory, created if needed.
    peft : bool, optional
        Also write PEFT's format.  Default (None): exactly when every adapted layer's method has
        a PEFT counterpart (:func:`~lowrank_theory.training.peft_format.peft_type_of`); ``True``
        raises the export's ``ValueError`` when it has none.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        No adapted layer, NaN/Inf, or ``peft=True`` on a method PEFT does not have.
    """
    model = unwrap_model(model)
    out = save_adapters(model, path)
    if peft is None:
        peft = peft_type_of(model) is not None
    if peft:
        export_peft(model, out / PEFT_SUBDIR)
    return out


def from_pretrained(base_model: nn.Module, path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Inject ``base_model`` with the adapters saved at ``path`` (ours or PEFT's) and load them.

    Parameters
    ----------
    base_model : nn.Module
        The model the adapters were trained on, not yet adapted.
    path : str or PathLike
        A directory from :func:`save_pretrained`, :func:`~lowrank_theory.training.checkpoint.save_adapters`,
        an :class:`AdapterTrainer` checkpoint (our ``adapter_config.json`` at its root), or a PEFT
        adapter directory (``peft_type`` in its ``adapter_config.json``; see
        :func:`~lowrank_theory.training.peft_format.import_peft`).
    **overrides
        Passed to :func:`~lowrank_theory.training.checkpoint_load.load_adapters` for our format (objects
        that were not saved, e.g. ``shared=UniLoRAShared(...)``).

    Returns
    -------
    nn.Module
        ``base_model``, injected and loaded.

    Raises
    ------
    ValueError
        The directory holds neither format, or the load fails (the model is then unchanged).
    """
    root = Path(path)
    config = read_json(root / CONFIG_NAME, "from_pretrained")
    if config.get("format") == FORMAT:
        return load_adapters(base_model, root, inject=True, **overrides)
    if "peft_type" in config:
        if overrides:
            raise TypeError(f"from_pretrained: overrides {sorted(overrides)} apply to our format only, not PEFT's")
        return import_peft(base_model, root)
    raise ValueError(f"from_pretrained: {root / PEFT_CONFIG_NAME} is neither our adapter config nor a PEFT one")


class _AdapterCheckpoints:
    """Overrides of ``transformers.Trainer`` that save and restore the adapters only (see the module docstring)."""

    #: write PEFT's format next to ours where the method has one (``save_pretrained``'s ``peft``)
    peft_format: bool | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not adapted_layers(self.model):
            raise ValueError(
                f"{type(self).__name__} saves adapters only, but the model has no adapted layer; inject() it first"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("saving adapters to %s", output_dir)
        save_pretrained(self.model, output_dir, peft=self.peft_format)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        logger.info("loading adapters from %s", resume_from_checkpoint)
        load_adapters(unwrap_model(self.model if model is None else model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("loading the best adapters from %s", self.state.best_model_checkpoint)
        load_adapters(unwrap_model(self.model), self.state.best_model_checkpoint)


@functools.cache
def adapter_trainer(base: type | None = None) -> type:
    """A subclass of ``base`` (default ``transformers.Trainer``) whose checkpoints hold the adapters only.

    Parameters
    ----------
    base : type, optional
        ``transformers.Trainer`` or a subclass of it (TRL's ``SFTTrainer``, ...).

    Returns
    -------
    type
        ``class Adapter<base>(..., base)``: ``_save`` writes :func:`save_pretrained` (ours, and
        PEFT's in ``peft/`` where the method has it; set the class attribute ``peft_format`` to
        force either way), ``_load_from_checkpoint`` and ``_load_best_model`` read it back with
        :func:`~lowrank_theory.training.checkpoint_load.load_adapters`.  The model must be injected.

    Raises
    ------
    TypeError
        If ``base`` is not a ``transformers.Trainer`` subclass.
    """
    import transformers

    base = transformers.Trainer if base is None else base
    if not (isinstance(base, type) and issubclass(base, transformers.Trainer)):
        raise TypeError(f"base must be transformers.Trainer or a subclass of it, got {base!r}")
    return type(f"Adapter{base.__name__}", (_AdapterCheckpoints, base), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    if name == "AdapterTrainer":
        return adapter_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
