"""Training side: adapters inside real models, training rules, rank schedules, a trainer, data and tasks.

* :mod:`~lowrank_theory.training.injection` -- :func:`inject` (one adapter, or another named one with
  ``adapter_name=``; ``quantize_base=`` for NF4/int8 frozen bases), :func:`prepare`, :func:`adapted_layers`,
  :func:`unwrap_model` (DDP / ``accelerate`` / ``torch.compile`` wrappers); target selection (names,
  suffixes, regex, ``"all-linear"``) in :mod:`~lowrank_theory.training.targets` (:func:`find_targets`).
* :mod:`~lowrank_theory.training.adapter_ops` -- model-level :func:`merge` (``safe``, ``requantize``),
  :func:`unmerge`, :func:`disable`, :func:`merge_and_unload`, :func:`unload`, named adapters
  (:func:`adapter_names`, :func:`active_adapters`, :func:`set_adapter`, :func:`delete_adapter`), :func:`summary`;
  :mod:`~lowrank_theory.training.combine` -- :func:`combine_adapters` (PEFT's ``add_weighted_adapter``,
  on :mod:`lowrank_theory.merging`).
* :mod:`~lowrank_theory.training.checkpoint` -- :func:`save_adapters` / :func:`load_adapters`
  (safetensors + JSON; frozen random bases regenerated from seeds; ``resize=True`` after a rank change;
  :func:`~lowrank_theory.training.checkpoint_load.plan_load` validates without writing).
* :mod:`~lowrank_theory.training.peft_format` -- :func:`export_peft` / :func:`import_peft` in
  PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` for every method PEFT also has
  (LoRA / rsLoRA / DoRA, AdaLoRA, HiRA = HUT, VeRA, RandLoRA, Uni-LoRA, FourierFT), one table of
  per-method mappings in :mod:`~lowrank_theory.training.peft_lora` / :mod:`~lowrank_theory.training.peft_random`.
* :mod:`~lowrank_theory.training.hf` -- ``transformers.Trainer`` with adapter-only checkpoints
  (``AdapterTrainer``, :func:`~lowrank_theory.training.hf.adapter_trainer`), ``save_pretrained`` /
  ``from_pretrained`` for both formats.
* :mod:`~lowrank_theory.training.optim`, :mod:`~lowrank_theory.training.optim_projected`,
  :mod:`~lowrank_theory.training.perturb` -- LoRA+, ALLoRA, LoRA-Pro, AltLoRA, GGPO;
  :func:`make_optimizer` by name.
* :mod:`~lowrank_theory.training.schedules` (with :mod:`~lowrank_theory.training.increlora` and
  :mod:`~lowrank_theory.training.rank_change`) -- AdaLoRA, SoRA, IncreLoRA, LoRA-Squeeze rank
  schedules that replace tensors; :func:`remap_optimizer` keeps an optimizer in step with them.
* :mod:`~lowrank_theory.training.trainer` (settings in :mod:`~lowrank_theory.training.train_config`) --
  :class:`Trainer` / :class:`TrainConfig` (AdamW or any
  rule, LR schedule, accumulation, bf16 on CUDA, eval, early stop, JSONL/CSV metrics, safetensors
  checkpoints and resume, DDP under ``torchrun`` or ``accelerate launch``, FSDP2 with ``fsdp=True``).
* :mod:`~lowrank_theory.training.fsdp` -- :func:`shard_model` (FSDP2 for injected models: blocks and
  adapters sharded, shared and rank-changing adapter tensors kept whole), ``gathered``, ``clip_grad_norm_``.
* :mod:`~lowrank_theory.training.data`, :mod:`~lowrank_theory.training.tasks`,
  :mod:`~lowrank_theory.training.real_updates` -- offline MiniLM and tiny GPT-2, standard-library
  text, the teacher--student and docstring tasks, real fine-tuning updates and gradients.
* :mod:`~lowrank_theory.training.cli_train` -- the ``lowrank-theory train`` subcommand.
"""

from __future__ import annotations

from .adapter_ops import (
    active_adapters,
    adapter_names,
    delete_adapter,
    disable,
    merge,
    merge_and_unload,
    set_adapter,
    summary,
    trainable_parameters,
    unload,
    unmerge,
)
from .checkpoint import save_adapters
from .checkpoint_load import load_adapters, plan_load
from .combine import combine_adapters
from .data import (
    ByteTokenizer,
    TextDataset,
    docstring_dataset,
    load_model,
    load_text_dataset,
    stdlib_sentences,
    tiny_gpt2,
)
from .fsdp import shard_model
from .increlora import IncreLoRASchedule, grow_adalora
from .injection import adapted_layers, inject, prepare, unwrap_model
from .optim import make_optimizer
from .peft_format import export_peft, import_peft
from .rank_change import ParamRemap, RankChange, RankSchedule, remap_optimizer
from .real_updates import GradientTrace, real_finetune_delta, real_layer_gradients
from .schedules import AdaLoRASchedule, LoRASqueezeSchedule, SoRASchedule, make_schedule, squeeze_model
from .targets import find_targets
from .tasks import (
    SequenceClassifier,
    Task,
    classification_task,
    make_task,
    planted_delta,
    teacher_student_task,
)
from .trainer import TrainConfig, Trainer, init_distributed

__all__ = [
    "AdaLoRASchedule",
    "ByteTokenizer",
    "GradientTrace",
    "IncreLoRASchedule",
    "LoRASqueezeSchedule",
    "ParamRemap",
    "RankChange",
    "RankSchedule",
    "SequenceClassifier",
    "SoRASchedule",
    "Task",
    "TextDataset",
    "TrainConfig",
    "Trainer",
    "active_adapters",
    "adapted_layers",
    "adapter_names",
    "classification_task",
    "combine_adapters",
    "delete_adapter",
    "disable",
    "docstring_dataset",
    "export_peft",
    "find_targets",
    "grow_adalora",
    "import_peft",
    "init_distributed",
    "inject",
    "load_adapters",
    "load_model",
    "load_text_dataset",
    "make_optimizer",
    "make_schedule",
    "make_task",
    "merge",
    "merge_and_unload",
    "plan_load",
    "planted_delta",
    "prepare",
    "real_finetune_delta",
    "real_layer_gradients",
    "remap_optimizer",
    "save_adapters",
    "set_adapter",
    "shard_model",
    "squeeze_model",
    "stdlib_sentences",
    "summary",
    "teacher_student_task",
    "tiny_gpt2",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unwrap_model",
]
