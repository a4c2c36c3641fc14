r"""Linear probe of a classification task's head on the frozen model (the "LP" of LP-FT).

Fitting the head first and freezing it (Kumar et al., "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution", arXiv:2202.10054, for the LP-then-FT recipe)
leaves the adapters as the only trained parameters of a run: the experiments on learning rates and
rank allocation then measure the adapters, not a head learning alongside them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_probe", "pooled_features"]


@torch.no_grad()
def pooled_features(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Mask-weighted mean of the last hidden states of ``model.backbone`` (N, width), as the head sees them."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, data["input_ids"].shape[0], batch_size):
        ids = data["input_ids"][i : i + batch_size].to(dev)
        mask = data["attention_mask"][i : i + batch_size].to(dev)
        h = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.to(h.dtype).unsqueeze(-1)
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def linear_probe(task, wd: float) -> dict[str, float]:
    r"""Fit ``task.model.classifier`` on the frozen model's pooled features, then freeze it.

    Parameters
    ----------
    task : Task
        A :func:`~lowrank_theory.training.tasks.classification_task` (its model has ``backbone``
        and a linear ``classifier``); the head is changed in place, nothing else.
    wd : float
        :math:`\ell_2` weight :math:`\mu \ge 0` on the head's weight matrix.

    Returns
    -------
    dict
        ``train_loss`` (cross-entropy without the penalty), ``test_loss``, ``test_accuracy``.

    Raises
    ------
    ValueError
        If ``wd`` is negative or not finite.

    Notes
    -----
    Minimizes :math:`\mathrm{CE}(XW^\top + b,\, y) + \mu\|W\|_F^2` over :math:`(W, b)` with
    :math:`X` (N, width) the mask-weighted mean of the last hidden states (:func:`pooled_features`),
    by L-BFGS (strong Wolfe line search, 200 iterations) from the head's seeded init.  The
    objective is convex, so the result does not depend on that init beyond the stopping tolerance.
    """
    if not (isinstance(wd, int | float) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"wd must be a finite number >= 0, got {wd!r}")
    head = task.model.classifier
    model = task.model
    X_tr, X_te = pooled_features(model, task.train), pooled_features(model, task.test)
    y_tr, y_te = task.train["labels"].to(X_tr.device), task.test["labels"].to(X_te.device)
    head.requires_grad_(True)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(X_tr), y_tr) + wd * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head.requires_grad_(False)
    with torch.no_grad():
        logits = head(X_te)
        return dict(train_loss=float(F.cross_entropy(head(X_tr), y_tr)), test_loss=float(F.cross_entropy(logits, y_te)),
                    test_accuracy=float((logits.argmax(-1) == y_te).float().mean()))
