r"""Real offline tasks for end-to-end runs: planted-update recovery and docstring classification.

A :class:`Task` bundles the model to adapt, tokenized train/test tensors, a loss, an evaluation
and the injection targets; :class:`~lowrank_theory.training.trainer.Trainer` consumes it.

* :func:`teacher_student_task` -- the teacher is the pretrained model with a planted
  :math:`\Delta W^\star` of known structure in chosen layers (:func:`planted_delta`: low-rank,
  frequency-sparse or full-rank); the student is the pretrained model plus adapters, trained to
  reproduce the teacher's last hidden states on real English sentences
  (:func:`~lowrank_theory.training.data.stdlib_sentences`).  This is the end-to-end test of
  expressivity: a method recovers :math:`\Delta W^\star` only as well as its structure allows.
* :func:`classification_task` -- a labelled text task (by default which standard-library module
  a docstring comes from, :func:`~lowrank_theory.training.data.docstring_dataset`) with a linear
  head on mean-pooled hidden states (:class:`SequenceClassifier`).

Both losses are means over examples, so the gradient of a global batch split over DDP ranks
(equal shares) equals the single-process gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import idct2, random_basis
from .data import (
    DEFAULT_MODULES,
    TextDataset,
    docstring_dataset,
    encode,
    hidden_size,
    last_hidden_state,
    load_model,
    load_text_dataset,
    stdlib_sentences,
)
from .injection import adapted_layers
from .targets import find_targets

__all__ = [
    "PLANTED_KINDS",
    "TASKS",
    "SequenceClassifier",
    "Task",
    "classification_task",
    "default_plant_layers",
    "make_task",
    "planted_delta",
    "teacher_student_task",
]

PLANTED_KINDS = ("lowrank", "frequency", "fullrank")
#: Task names understood by :func:`make_task` (plus ``"file:<path>"`` and ``"hub:<name>"``).
TASKS = ("teacher-lowrank", "teacher-frequency", "teacher-fullrank", "docstrings")


@dataclass
class Task:
    """Everything a training run needs.

    Attributes
    ----------
    name : str
    model : nn.Module
        The model to adapt (inject adapters into it, then call :meth:`unfreeze_head`).
    train, test : dict of str to Tensor
        Tensors with a common first dimension (examples).
    loss_fn : callable ``(model, batch) -> scalar Tensor``
        Mean over the examples of ``batch``.
    eval_fn : callable ``(model, data) -> dict of str to float``
        Metrics on a whole split (``loss`` always; ``accuracy`` for classification).
    targets : list of str
        Default injection targets (module names).
    head : str or None
        Name of a trainable head module outside the adapters.
    metric : str
        The metric to report (``"accuracy"`` or ``"loss"``); ``mode`` says if larger is better.
    info : dict
        Task facts: baselines, planted layers, label names, sizes.
    """

    name: str
    model: nn.Module
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    eval_fn: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]]
    targets: list[str]
    head: str | None = None
    metric: str = "loss"
    mode: str = "min"
    info: dict[str, Any] = field(default_factory=dict)

    def unfreeze_head(self, model: nn.Module | None = None) -> None:
        """Make the head trainable again (``inject`` freezes everything outside the adapters)."""
        if self.head is not None:
            (model or self.model).get_submodule(self.head).requires_grad_(True)


def _batches(data: dict[str, torch.Tensor], size: int):
    n = next(iter(data.values())).shape[0]
    for i in range(0, n, size):
        yield {k: v[i : i + size] for k, v in data.items()}


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or better (bf16/fp16 activations are promoted, float64 kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ============================================================================ planted updates
def planted_delta(kind: str, d_out: int, d_in: int, *, rank: int = 4, n_coefficients: int = 64, seed: int = 0,
                  norm: float = 1.0) -> torch.Tensor:
    r"""A float64 :math:`\Delta W^\star` (d_out, d_in) of known structure, Frobenius norm ``norm``.

    Parameters
    ----------
    kind : {"lowrank", "frequency", "fullrank"}
        ``"lowrank"``: :math:`U V^\top` with Haar-orthonormal :math:`U` (m×r), :math:`V` (n×r)
        -- rank ``rank``, flat spectrum.  ``"frequency"``: :math:`\mathrm{IDCT2}(S)` with
        ``n_coefficients`` Gaussian spikes at random positions of :math:`S` -- exactly sparse
        in the 2-D DCT basis (LoCA's), typically full rank.  ``"fullrank"``: i.i.d. Gaussian.
    d_out, d_in : int
    rank, n_coefficients : int
        Structure sizes.
    seed : int
    norm : float
        :math:`\|\Delta W^\star\|_F`.

    Raises
    ------
    ValueError
        Unknown kind, sizes out of range, non-positive norm.
    """
    if kind not in PLANTED_KINDS:
        raise ValueError(f"kind must be one of {PLANTED_KINDS}, got {kind!r}")
    for name, v in (("d_out", d_out), ("d_in", d_in), ("rank", rank), ("n_coefficients", n_coefficients)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be finite and > 0, got {norm}")
    if kind == "lowrank":
        if rank > min(d_out, d_in):
            raise ValueError(f"rank must be <= min(d_out, d_in) = {min(d_out, d_in)}, got {rank}")
        U = random_basis((d_out, rank), "orthogonal", seed=seed)
        V = random_basis((d_in, rank), "orthogonal", seed=seed + 1)
        D = torch.from_numpy(U @ V.T)
    elif kind == "frequency":
        if n_coefficients > d_out * d_in:
            raise ValueError(f"n_coefficients must be <= d_out*d_in = {d_out * d_in}, got {n_coefficients}")
        g = torch.Generator().manual_seed(seed)
        S = torch.zeros(d_out * d_in, dtype=torch.float64)
        S[torch.randperm(d_out * d_in, generator=g)[:n_coefficients]] = torch.randn(
            n_coefficients, generator=g, dtype=torch.float64)
        D = idct2(S.reshape(d_out, d_in))
    else:
        g = torch.Generator().manual_seed(seed)
        D = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return D * (norm / torch.linalg.matrix_norm(D))


def _weight_2d(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def default_plant_layers(model: nn.Module) -> list[str]:
    """Two square projections of the last block: attention value and output for BERT, ``c_proj`` for GPT-2."""
    names = find_targets(model, "all-linear")
    for pair in (("attention.self.value", "attention.output.dense"), ("attn.c_proj", "mlp.c_proj")):
        last = [[n for n in names if n.endswith(suffix)] for suffix in pair]
        if all(last):
            return [hits[-1] for hits in last]
    return names[-2:]


# ============================================================================ teacher-student
def teacher_student_task(
    model: nn.Module,
    tokenizer: Any,
    kind: str = "lowrank",
    *,
    layers: Sequence[str] | None = None,
    rank: int = 4,
    n_coefficients: int = 256,
    relative_norm: float = 0.5,
    n_train: int = 256,
    n_test: int = 64,
    max_length: int = 16,
    seed: int = 0,
    batch_size: int = 64,
) -> Task:
    r"""Recover a planted update from the teacher's hidden states on real sentences.

    Parameters
    ----------
    model : nn.Module
        The pretrained model (returned as the student; not changed here).
    tokenizer
    kind : {"lowrank", "frequency", "fullrank"}
        Structure of :math:`\Delta W^\star` (:func:`planted_delta`).
    layers : sequence of str, optional
        Where to plant (Linear / Conv1D module names); default :func:`default_plant_layers`.
        These are also the task's injection targets.
    rank, n_coefficients : int
        Structure sizes.
    relative_norm : float
        :math:`\|\Delta W^\star\|_F = \text{relative\_norm}\cdot\|W_0\|_F` per layer.
    n_train, n_test : int
        Sentences (disjoint) from :func:`~lowrank_theory.training.data.stdlib_sentences`.
    max_length : int
        Tokens per sentence.
    seed : int
    batch_size : int
        Batch size of the teacher's forward passes and of evaluation.

    Returns
    -------
    Task
        ``loss`` is the normalized error
        :math:`\frac{1}{c}\,\mathrm{mean}_{i}\,\mathrm{mean}_{t\in i}\|h^S_{it} - h^T_{it}\|^2` with
        :math:`c` the same quantity for the unadapted student on the training set, so the loss
        starts at 1 on the training set and 0 means the teacher is matched.  ``eval_fn`` also
        reports ``delta_error`` = :math:`\|\Delta W - \Delta W^\star\|_F / \|\Delta W^\star\|_F`
        averaged over the planted layers that carry an adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (math.isfinite(relative_norm) and relative_norm > 0):
        raise ValueError(f"relative_norm must be finite and > 0, got {relative_norm}")
    layers = list(layers) if layers is not None else default_plant_layers(model)
    find_targets(model, layers)  # validates the names
    texts = stdlib_sentences(n_train + n_test, seed=seed)
    train, test = encode(tokenizer, texts[:n_train], max_length), encode(tokenizer, texts[n_train:], max_length)
    deltas: dict[str, torch.Tensor] = {}
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        for i, name in enumerate(layers):
            W = _weight_2d(teacher.get_submodule(name))
            D = planted_delta(kind, W.shape[0], W.shape[1], rank=rank, n_coefficients=n_coefficients,
                              seed=seed * 1000 + i, norm=relative_norm * float(torch.linalg.matrix_norm(W.double())))
            deltas[name] = D
            W.add_(D.to(W))
        dev = _device_of(model)
        for data in (train, test):
            outs, base = [], []
            for b in _batches(data, batch_size):
                b = {k: v.to(dev) for k, v in b.items()}
                outs.append(_acc(last_hidden_state(teacher, b)).cpu())
                base.append(_acc(last_hidden_state(model.eval(), b)).cpu())
            data["target"] = torch.cat(outs)
            data["_base"] = torch.cat(base)
    del teacher

    def per_example(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(h.dtype)
        err = ((h - target.to(h.dtype)) ** 2).sum(-1)
        return (err * m).sum(-1) / m.sum(-1).clamp_min(1)

    scale = float(per_example(train["_base"], train["target"], train["attention_mask"]).mean())
    for data in (train, test):
        del data["_base"]

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = last_hidden_state(net, batch)
        return per_example(_acc(h), batch["target"], batch["attention_mask"]).mean() / scale

    def eval_fn(net: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
        dev = _device_of(net)
        total, n = 0.0, 0
        with torch.no_grad():
            for b in _batches(data, batch_size):
                b = {k: v.to(dev) for k, v in b.items()}
                total += float(loss_fn(net, b)) * b["input_ids"].shape[0]
                n += b["input_ids"].shape[0]
        out = {"loss": total / n}
        errs = []
        for name, layer in adapted_layers(net).items():
            key = next((k for k in deltas if name == k or name.endswith("." + k)), None)
            if key is None:
                continue
            with torch.no_grad():
                dW = layer.adapter.merged_weight(layer.weight).double() - layer.weight.double()
            errs.append(float(torch.linalg.matrix_norm(dW.cpu() - deltas[key]) / torch.linalg.matrix_norm(deltas[key])))
        if errs:
            out["delta_error"] = sum(errs) / len(errs)
        return out

    info = {"kind": kind, "layers": layers, "rank": rank, "n_coefficients": n_coefficients,
            "relative_norm": relative_norm, "loss_scale": scale, "n_train": n_train, "n_test": n_test,
            "max_length": max_length, "planted": deltas}
    return Task(f"teacher-{kind}", model, train, test, loss_fn, eval_fn, layers, None, "loss", "min", info)


# ============================================================================ classification
class SequenceClassifier(nn.Module):
    """``backbone`` + a linear ``classifier`` on the mask-weighted mean of the last hidden states.

    Parameters
    ----------
    backbone : nn.Module
        A Hugging Face encoder/decoder returning ``last_hidden_state``.
    num_labels : int
    seed : int
        Seed of the head's init (:math:`\\mathcal N(0, 0.02^2)`, zero bias).
    """

    def __init__(self, backbone: nn.Module, num_labels: int, seed: int = 0) -> None:
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
        self.backbone = backbone
        p = next(backbone.parameters())
        self.classifier = nn.Linear(hidden_size(backbone), num_labels).to(device=p.device, dtype=p.dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.classifier.weight.copy_(0.02 * torch.randn(self.classifier.weight.shape, generator=g))
            self.classifier.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = last_hidden_state(self.backbone, {"input_ids": input_ids, "attention_mask": attention_mask})
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.classifier(pooled.to(self.classifier.weight.dtype))


def classification_task(
    model: nn.Module,
    tokenizer: Any,
    data: TextDataset | None = None,
    *,
    max_length: int = 24,
    seed: int = 0,
    batch_size: int = 64,
    name: str = "docstrings",
) -> Task:
    """A text classification task with a fresh linear head (default: the docstring task).

    Parameters
    ----------
    model : nn.Module
        The pretrained backbone; wrapped in a :class:`SequenceClassifier` (the task's model).
    tokenizer
    data : TextDataset, optional
        Default :func:`~lowrank_theory.training.data.docstring_dataset` (fixed split).
    max_length : int
        Tokens per text.
    seed : int
        Head init.
    batch_size : int
        Evaluation batch size.
    name : str

    Returns
    -------
    Task
        ``loss_fn`` is the mean cross-entropy; ``eval_fn`` gives ``loss`` and ``accuracy``;
        ``info["majority_baseline"]`` is the test accuracy of the most frequent training label.
        Targets default to every Linear of the backbone but its pooler (the head is excluded; it is
        trained as a plain parameter: ``task.unfreeze_head()`` after ``inject``).
    """
    data = data if data is not None else docstring_dataset(DEFAULT_MODULES)
    if not isinstance(data, TextDataset):
        raise TypeError(f"data must be a TextDataset, got {type(data).__name__}")
    clf = SequenceClassifier(model, data.num_labels, seed=seed)
    train = encode(tokenizer, data.train_texts, max_length)
    train["labels"] = torch.tensor(data.train_labels, dtype=torch.long)
    test = encode(tokenizer, data.test_texts, max_length)
    test["labels"] = torch.tensor(data.test_labels, dtype=torch.long)

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(_acc(logits), batch["labels"])

    def eval_fn(net: nn.Module, split: dict[str, torch.Tensor]) -> dict[str, float]:
        dev = _device_of(net)
        loss, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for b in _batches(split, batch_size):
                b = {k: v.to(dev) for k, v in b.items()}
                logits = _acc(net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
                loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["labels"]).sum())
                n += b["labels"].shape[0]
        return {"loss": loss / n, "accuracy": correct / n}

    # every Linear of the backbone except a pooler, which mean pooling never uses (its adapter
    # would get no gradient, and DDP rejects parameters that take no part in the loss)
    targets = ["backbone." + n for n in find_targets(model, "all-linear") if "pooler" not in n.split(".")]
    info = {"label_names": data.label_names, "majority_baseline": data.majority_baseline(),
            "n_train": len(data.train_texts), "n_test": len(data.test_texts), "max_length": max_length}
    return Task(name, clf, train, test, loss_fn, eval_fn, targets, "classifier", "accuracy", "max", info)


# ============================================================================ by name
def make_task(name: str, model_name: str = "minilm", *, seed: int = 0, max_length: int | None = None,
              model_kw: dict[str, Any] | None = None, **kw: Any) -> Task:
    """Build a task by name on a freshly loaded model.

    Parameters
    ----------
    name : str
        ``"teacher-lowrank"`` / ``"teacher-frequency"`` / ``"teacher-fullrank"``
        (:func:`teacher_student_task`), ``"docstrings"`` (:func:`classification_task`),
        ``"file:<path>"`` (a local ``.jsonl``/``.csv`` with ``text``, ``label``) or ``"hub:<name>"``
        (``datasets`` on the hub).
    model_name : str
        For :func:`~lowrank_theory.training.data.load_model`.
    seed : int
    max_length : int, optional
        Tokens per text (task default when None).
    model_kw : dict, optional
        Extra arguments of ``load_model``.
    **kw
        Passed to the task builder.

    Raises
    ------
    ValueError
        Unknown task name.
    """
    model, tok = load_model(model_name, **(model_kw or {}))
    if max_length is not None:
        kw["max_length"] = max_length
    if name.startswith("teacher-"):
        kind = name.removeprefix("teacher-")
        if kind not in PLANTED_KINDS:
            raise ValueError(f"teacher task must be one of teacher-{{{', '.join(PLANTED_KINDS)}}}, got {name!r}")
        return teacher_student_task(model, tok, kind, seed=seed, **kw)
    if name == "docstrings":
        return classification_task(model, tok, seed=seed, **kw)
    if name.startswith(("file:", "hub:")):
        data = load_text_dataset(name.split(":", 1)[1], seed=seed)
        return classification_task(model, tok, data, seed=seed, name=name, **kw)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, 'file:<path>' or 'hub:<name>', got {name!r}")
