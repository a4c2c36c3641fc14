r"""ID3: selective fine-tuning by step-by-step unmasking, by the importance :math:`|g| / (\varepsilon + |\theta|)^e`.

A training rule over chosen parameters of a model (any tensors: a model's own weights, or an adapter's).  Every
entry starts **masked** (frozen); at each optimizer step t the rule computes the D3 importance of the still-masked
entries from the current gradient and value,

.. math:: s_i = \frac{|\partial L/\partial\theta_i|}{(\varepsilon + |\theta_i|)^{e}},

unmasks the :math:`n_t` highest (over all governed tensors together), and zeroes the gradient of every entry that is
still masked, so the optimizer step moves only unmasked entries.  Unmasked entries stay unmasked.  The
**increment schedule** spreads a budget B over T steps uniformly: :math:`n_t = \lfloor B/T\rfloor`, plus one in the
first :math:`B \bmod T` steps, so after step t exactly :math:`N_t = t\lfloor B/T\rfloor + \min(t, B \bmod T)`
entries are unmasked and :math:`N_T = B` (then no more).

Use::

    rule = ID3Mask(params, budget=B, total_steps=T, eps=1e-3, exponent=1.0)
    rule.check_optimizer(opt)          # refuses decoupled weight decay on governed tensors
    for batch in data:
        opt.zero_grad(); loss(batch).backward()
        rule.step()                    # unmask n_t entries, zero masked gradients
        opt.step()

With SGD (any momentum) or Adam/AdamW without weight decay, a masked entry's gradient has been exactly zero since
the start, so its momentum / moment buffers are zero and the step leaves it bit-identical.  Decoupled weight decay
would shrink masked entries: :meth:`ID3Mask.check_optimizer` refuses it.

References
----------
A. Agarwal, S. K. Ramesh, A. Sengupta, T. Chakraborty, "Step-by-Step Unmasking for Parameter-Efficient Fine-tuning
of Large Language Models", TACL 2025, arXiv:2408.14470.  Read: the abstract (arXiv / ACL Anthology / the project
page via the pages corpus: "increment-S" halves the number of gradient updates, "D3" subsumes Fisher- and
magnitude-based heuristics) and the authors' toolkit github.com/Aradhye2002/selective-peft-toolkit
(``selective_optimizers/optimizers/id3.py``: metric ``grad.abs() / (eps + data.abs()) ** exp``, a global top-k over
all tensors of the entries not yet chosen, ``budget // max_steps`` per step with the remainder spread over the
first steps; ``base_optimizer.py``: choose, then zero the gradients outside the mask, then the base step; the
README's example ``exp=0, eps=1e-3``).  The paper's tuned (ε, e) were not read; the defaults here are ε = 1e-3,
e = 1.  Differences from the toolkit: ties at the cutoff are broken by the global flat index (the toolkit keeps
every entry ``>= cutoff`` and then trims by position), so exactly :math:`n_t` entries are unmasked per step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["ID3Mask", "d3_importance", "unmask_schedule"]


def _check_eps_exponent(eps: float, exponent: float) -> tuple[float, float]:
    for name, v in (("eps", eps), ("exponent", exponent)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite real number, got {v!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if exponent > 0 and eps == 0:
        raise ValueError("eps must be > 0 when exponent > 0 (a zero parameter would get an infinite score)")
    return float(eps), float(exponent)


def d3_importance(param: torch.Tensor, grad: torch.Tensor, eps: float = 1e-3, exponent: float = 1.0) -> torch.Tensor:
    r"""The D3 importance :math:`|g| / (\varepsilon + |\theta|)^e`, entrywise, in float32 or wider.

    Parameters
    ----------
    param, grad : torch.Tensor, same shape
        Current values θ and gradient g.
    eps : float, default 1e-3
        ε ≥ 0 (> 0 when e > 0).
    exponent : float, default 1.0
        e.  ``e = 0``: the gradient magnitude; ``e = -1, eps = 0``: :math:`|g\,\theta|`, the first-order loss change of
        zeroing θ (``proofs/23-id3-first-order.md``); ``e > 0`` favours small entries with large gradients.

    Raises
    ------
    TypeError, ValueError
        Non-tensors, mismatched shapes, or invalid ``eps`` / ``exponent``.
    """
    if not isinstance(param, torch.Tensor) or not isinstance(grad, torch.Tensor):
        raise TypeError(f"param and grad must be torch tensors, got {type(param).__name__}, {type(grad).__name__}")
    if param.shape != grad.shape:
        raise ValueError(f"grad must have param's shape {tuple(param.shape)}, got {tuple(grad.shape)}")
    eps, exponent = _check_eps_exponent(eps, exponent)
    acc = torch.promote_types(torch.promote_types(param.dtype, grad.dtype), torch.float32)
    return grad.detach().to(acc).abs() / (eps + param.detach().to(acc).abs()) ** exponent


def unmask_schedule(budget: int, total_steps: int) -> list[int]:
    r"""Cumulative unmasked counts :math:`[N_1, \dots, N_T]`, :math:`N_t = t\lfloor B/T\rfloor + \min(t, B \bmod T)`."""
    for name, v in (("budget", budget), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    base, rem = divmod(int(budget), int(total_steps))
    return [t * base + min(t, rem) for t in range(1, int(total_steps) + 1)]


class ID3Mask:
    r"""Incremental unmasking of ``params`` up to ``budget`` entries over ``total_steps`` steps (module docstring).

    Parameters
    ----------
    params : iterable of nn.Parameter, or mapping name -> nn.Parameter
        The governed tensors (floating, ``requires_grad``, distinct).  Other trainable tensors of the model are not
        touched by the rule.
    budget : int
        B, the number of entries unmasked in the end; ``1 <= B <=`` total number of governed entries.
    total_steps : int
        T, the steps over which the budget is spent (the toolkit's ``max_steps``).
    eps, exponent : float
        ε and e of :func:`d3_importance`.

    Attributes
    ----------
    masks : list of torch.BoolTensor
        True where an entry is unmasked (trainable), one per governed tensor.
    steps : int
        Calls of :meth:`step` so far.

    Raises
    ------
    TypeError, ValueError
        Bad ``params`` (not parameters, repeated, non-floating, frozen), budget, steps, ε or e.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Mapping[str, nn.Parameter], budget: int, total_steps: int,
                 *, eps: float = 1e-3, exponent: float = 1.0) -> None:
        items = list(params.items()) if isinstance(params, Mapping) else list(enumerate(params))
        if not items:
            raise ValueError("params must name at least one parameter")
        seen: set[int] = set()
        for key, p in items:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point() or not p.requires_grad:
                raise TypeError(f"params[{key!r}] must be a floating tensor with requires_grad=True, got "
                                f"{type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"params[{key!r}] appears twice")
            seen.add(id(p))
        self.names = [k for k, _ in items]
        self.params = [p for _, p in items]
        total = sum(p.numel() for p in self.params)
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 1 <= budget <= total:
            raise ValueError(f"budget must be an int in [1, {total}] (the governed entries), got {budget!r}")
        self.schedule = unmask_schedule(int(budget), total_steps)
        self.budget, self.total_steps = int(budget), int(total_steps)
        self.eps, self.exponent = _check_eps_exponent(eps, exponent)
        self.masks = [torch.zeros_like(p, dtype=torch.bool) for p in self.params]
        self.steps = 0

    @property
    def num_unmasked(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    def target(self, step: int) -> int:
        """:math:`N_t`, the number of unmasked entries after ``step`` calls (B after the last scheduled step)."""
        return 0 if step <= 0 else self.schedule[min(step, self.total_steps) - 1]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Refuse an optimizer that would move masked entries: a governed tensor in a group with weight decay.

        Raises
        ------
        ValueError
            Naming the tensor and the group's ``weight_decay``.
        """
        ids = {id(p): n for n, p in zip(self.names, self.params, strict=True)}
        for group in optimizer.param_groups:
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            for p in group["params"]:
                if id(p) in ids and wd != 0.0:
                    raise ValueError(f"params[{ids[id(p)]!r}] is in an optimizer group with weight_decay={wd}; "
                                     "weight decay moves masked entries, use weight_decay=0 for ID3's tensors")
        return optimizer

    @torch.no_grad()
    def step(self) -> int:
        """Unmask this step's entries by D3 importance, then zero the gradient of every still-masked entry.

        Call after ``backward()`` and before ``optimizer.step()``.  A tensor without a gradient scores 0.
        Returns the number of entries unmasked by this call.
        """
        self.steps += 1
        n_new = self.target(self.steps) - self.num_unmasked
        if n_new > 0:
            scores = []
            for p, m in zip(self.params, self.masks, strict=True):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                s = d3_importance(p, g, self.eps, self.exponent).reshape(-1).to(torch.float64)
                scores.append(torch.where(m.reshape(-1), torch.full_like(s, -math.inf), s).cpu())
            flat = torch.cat(scores)
            # highest score first, ties by the global flat index (stable sort of the negated scores)
            chosen = torch.argsort(-flat, stable=True)[:n_new]
            offset = 0
            for m in self.masks:
                sel = chosen[(chosen >= offset) & (chosen < offset + m.numel())] - offset
                m.view(-1)[sel.to(m.device)] = True
                offset += m.numel()
        for p, m in zip(self.params, self.masks, strict=True):
            if p.grad is not None:
                p.grad.masked_fill_(~m, 0.0)  # exact zeros (a NaN gradient of a masked entry is dropped too)
        return max(n_new, 0)
