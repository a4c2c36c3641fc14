r"""Docstring sub-tasks on MiniLM for the merging experiment: one LoRA per sub-task, its task vector, and an
evaluator that writes :math:`W_0 + \Delta W` into one shared backbone.

Each sub-task is the docstring classification task (:func:`~lowrank_theory.training.data.docstring_dataset`)
restricted to a few standard-library modules, with its own linear head fitted by a linear probe on the frozen
pretrained features (:func:`._probe.linear_probe`) and then frozen -- the multi-task merging setting of the
task-arithmetic, TIES and PCB papers: one backbone, one head per task.  A LoRA trained on a sub-task gives the
task vector :math:`\Delta W_t = sB_tA_t` of every adapted layer.  The evaluator keeps a clean copy of the
pretrained backbone and, for any dict of per-layer :math:`\Delta W`, writes :math:`W_0 + \Delta W` into it and
scores each sub-task with that sub-task's head -- the same code path for the pretrained model (no
:math:`\Delta W`), each fine-tuned model (its own :math:`\Delta W_t`) and every merge.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ._minilm import minilm
from ._probe import linear_probe

__all__ = ["MergeEvaluator", "SubTask", "build_subtasks", "train_lora"]


@dataclass
class SubTask:
    """One sub-task: its classification :class:`~lowrank_theory.training.tasks.Task`, its trained LoRA's task
    vectors (``deltas``, layer name -> ΔW) and factors (``factors``, layer name -> (sB, A)), and scores."""

    name: str
    modules: tuple[str, ...]
    task: Any
    probe: dict = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    merge: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_test_accuracy: float = float("nan")
    train_seconds: float = 0.0


def _stratified(labels: torch.Tensor, per_class: int, exclude: set[int]) -> list[int]:
    """The first ``per_class`` indices of each label (in data order, which is hash-random within a label)."""
    out = []
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(labels.shape[0]) if int(labels[i]) == c and i not in exclude]
        out += idx[:per_class]
    return out


def _take(data: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    index = torch.tensor(idx, dtype=torch.long)
    return {k: v[index] for k, v in data.items()}


def build_subtasks(tasks: dict[str, tuple[str, ...]], n_layers: int, max_length: int, *, shots: int, merge_set: int,
                   probe_wd: float, seed: int, device: Any = "cpu") -> list[SubTask]:
    """One :class:`SubTask` per entry of ``tasks`` (name -> modules), each on its own fresh MiniLM copy.

    The training split of each sub-task is divided: ``merge_set`` examples per class are held out as the merge set
    (the data merge settings are chosen on, never trained on), ``shots`` examples per class fit the head (a
    few-shot linear probe on the frozen pretrained features, then frozen -- the analogue of the zero-shot heads of
    the merging papers: a pretrained model that is fair but clearly improvable), and the LoRA trains on everything
    but the merge set.
    """
    from ..training.data import docstring_dataset
    from ..training.tasks import classification_task

    out = []
    for i, (name, modules) in enumerate(tasks.items()):
        model, tok = minilm(n_layers)
        task = classification_task(model.to(device), tok, docstring_dataset(modules), max_length=max_length,
                                   seed=seed + i, name=f"docstrings:{name}")
        orig, labels = task.train, task.train["labels"]
        held = _stratified(labels, merge_set, set())
        merge, shot_data = _take(orig, held), _take(orig, _stratified(labels, shots, set(held)))
        task.train = _take(orig, [j for j in range(labels.shape[0]) if j not in set(held)])
        # the probe's "test" metrics are on the merge set (no test example is touched before the end)
        probe = linear_probe(SimpleNamespace(model=task.model, train=shot_data, test=merge), probe_wd)
        out.append(SubTask(name, tuple(modules), task, probe=probe, merge=merge))
    return out


def train_lora(sub: SubTask, targets: list[str], cfg: dict, seed: int, device: Any = "cpu") -> SubTask:
    """Train a LoRA on ``sub``'s model (a copy; the probe-fitted head stays frozen) and store its task vectors."""
    from ..training.injection import adapted_layers, inject
    from ..training.trainer import TrainConfig, Trainer

    task = sub.task
    names = [t for t in task.targets if t.endswith(tuple("." + s for s in targets))]
    if not names:
        raise ValueError(f"targets {targets} match no linear layer of the task's model")
    model = copy.deepcopy(task.model)
    inject(model, "lora", names, rank=cfg["rank"], layer_seeds=True, seed=seed)
    conf = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], rule="adamw",
                       lr_schedule="linear", warmup_steps=max(1, cfg["steps"] // 10), progress=False, device=device,
                       seed=seed, log_every=cfg["steps"])
    out = Trainer(model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=conf).fit()
    sub.adapter_test_accuracy = float(out["eval"]["accuracy"])
    sub.train_seconds = float(out["seconds"])
    with torch.no_grad():
        for name, layer in adapted_layers(model).items():
            key = name.removeprefix("backbone.")
            ad = layer.adapter
            sub.deltas[key] = ad.delta_weight().detach().clone()
            sub.factors[key] = ((ad.scale * ad.B).detach().clone(), ad.A.detach().clone())
    return sub


class MergeEvaluator:
    """Scores any per-layer ΔW on every sub-task with one pretrained backbone (written, evaluated, restored).

    Parameters
    ----------
    subs : list of SubTask
        Their heads and data are used; their backbones are not.
    n_layers : int
        Blocks of the evaluation backbone (the sub-tasks' size).

    Each sub-task's held-out *merge set* (:func:`build_subtasks`) is what merge settings are chosen on and M2N2's
    fitness data; no test example is ever used to choose.
    """

    def __init__(self, subs: list[SubTask], n_layers: int, device: Any = "cpu") -> None:
        self.subs = subs
        self.backbone, _ = minilm(n_layers)
        self.backbone = self.backbone.to(device).eval()
        self.device = device
        self.weights = {n: m.weight for n, m in self.backbone.named_modules() if isinstance(m, nn.Linear)}
        self.W0 = {n: w.detach().clone() for n, w in self.weights.items()}
        self.heads = [s.task.model.classifier for s in subs]
        self.merge = [s.merge for s in subs]
        self.test = [s.task.test for s in subs]
        self.evaluations = 0

    @torch.no_grad()
    def _write(self, deltas: dict[str, torch.Tensor] | None, full: bool = False) -> None:
        for name, w in self.weights.items():
            if deltas is not None and name in deltas:
                d = deltas[name].to(device=w.device, dtype=w.dtype)
                w.copy_(d if full else self.W0[name] + d)
            else:
                w.copy_(self.W0[name])

    @torch.no_grad()
    def _correct(self, head: nn.Module, data: dict[str, torch.Tensor]) -> np.ndarray:
        ids, mask = data["input_ids"].to(self.device), data["attention_mask"].to(self.device)
        h = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.to(h.dtype).unsqueeze(-1)
        logits = head((h * m).sum(1) / m.sum(1).clamp_min(1))
        return (logits.argmax(-1).cpu() == data["labels"]).numpy().astype(np.float64)

    def scores(self, deltas: dict[str, torch.Tensor] | None, split: str = "merge", *, full: bool = False):
        """Per-example 1/0 correctness on ``split`` ("merge" or "test"), one array per sub-task.

        ``deltas`` maps layer names to ΔW (``full=True``: to whole weights W); None is the pretrained model.
        """
        self._write(deltas, full)
        self.evaluations += 1
        try:
            data = self.merge if split == "merge" else self.test
            return [self._correct(h, d) for h, d in zip(self.heads, data)]
        finally:
            self._write(None)

    def accuracies(self, deltas: dict[str, torch.Tensor] | None, split: str = "merge") -> list[float]:
        """Accuracy per sub-task of ``W0 + deltas`` on ``split``."""
        return [float(s.mean()) for s in self.scores(deltas, split)]
