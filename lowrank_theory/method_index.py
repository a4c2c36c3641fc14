r"""The per-method index: each method's paper, math, code, parameter count, tests, proofs, notebooks,
PEFT counterpart and export support, in one place.

Four kinds of name are indexed; the first three together are every name ``lowrank-theory train --method``
and ``--rule`` accept:

* ``adapter`` -- a registered :class:`~lowrank_theory.adapters.Adapter` class (``adapters.names()``);
* ``method`` -- an adapter driven by a rank schedule (``increlora``, ``squeeze``; see
  :data:`~lowrank_theory.training.cli_train.METHOD_DEFAULTS`);
* ``rule`` -- a training rule of :func:`~lowrank_theory.training.optim.make_optimizer`;
* ``tool`` -- a paper's method offered as a function or class for a user's own training loop (a parameter
  selection, a loss term, a rank allocation, a delta operation), not a ``train`` name.

What is *declared*: the paper, the parameter-count formula (a Python expression in the arguments of the
class's ``param_count``, checked against it by the tests), the tests, proofs and notebooks, and the PEFT
counterpart.  Each adapter class declares its own, as the class attribute ``index_entry`` made with
:func:`adapter_entry` next to the class; schedule-driven methods and training rules are declared in the
table :data:`DECLARED` here.  What is *read from the code* when asked (:func:`describe`): the
class, its file, its formula (the first line of its docstring) and the export formats.  ``docs/methods.md``
is :func:`methods_markdown` of this data; ``python -m lowrank_theory.method_index docs/methods.md``
rewrites it, and a test fails when the checked-in file is stale.

:func:`index` merges the two and refuses a name declared in both places.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DECLARED", "MethodEntry", "Paper", "adapter_entry", "describe", "entry", "format_entry", "index",
           "methods_markdown", "names", "param_count_from_formula"]


@dataclass(frozen=True)
class Paper:
    """A method's paper: title and arXiv id (``None`` when it has none)."""

    title: str
    arxiv: str | None = None

    def cite(self) -> str:
        return f"{self.title}" + (f", arXiv:{self.arxiv}" if self.arxiv else "")


@dataclass(frozen=True)
class MethodEntry:
    """The declared part of a method's index entry (see the module docstring)."""

    name: str
    kind: str
    paper: Paper
    params: str = ""
    where: tuple[tuple[str, str], ...] = ()
    tests: tuple[str, ...] = ()
    proofs: tuple[str, ...] = ()
    notebooks: tuple[str, ...] = ()
    peft: str = ""
    peft_test: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


NB_COMPLEXITY = "notebooks/09_complexity.py"  # measures every registered adapter


def adapter_entry(name: str, paper: Paper, params: str, tests: tuple[str, ...], *,
                  notebooks: tuple[str, ...] = (), **kw: Any) -> MethodEntry:
    """The index entry of a registered adapter ``name``: its paper, its parameter-count formula (a Python
    expression in the arguments of ``param_count``, with ``where`` definitions evaluated first), the test
    files that exercise it and, in ``kw``, its ``proofs``, ``peft`` counterpart, ``note`` ...

    Set it as the class attribute ``index_entry`` of the adapter class to declare the method next to its
    code; the complexity notebook, which measures every registered adapter, is added to ``notebooks``.
    """
    return MethodEntry(name, "adapter", paper, params, tests=tests, notebooks=(*notebooks, NB_COMPLEXITY), **kw)


_T = "tests/adapters/"
_P = "proofs/"
_N = "notebooks/"
_EY, _RSVD = _P + "01-eckart-young-mirsky.md", _P + "02-randomized-range-finder.md"

#: name -> entry declared in this module: the schedule-driven methods and the training rules (each adapter
#: class declares its own ``index_entry``)
DECLARED: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("increlora", "method", Paper("IncreLoRA: Incremental Parameter Allocation Method for "
                                             "Parameter-Efficient Fine-tuning", "2308.12043"),
                tests=("tests/training/test_schedules.py",), notebooks=(_N + "10_rank_allocation.py",),
                extra={"adapter": "adalora", "schedule": "lowrank_theory.training.increlora.IncreLoRASchedule"}),
    MethodEntry("squeeze", "method", Paper("LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning "
                                           "Compression of LoRA Modules", "2602.10993"),
                tests=("tests/training/test_schedules.py", _T + "test_squeeze.py"), proofs=(_EY, _RSVD),
                notebooks=(_N + "06_lora_squeeze.py",),
                extra={"adapter": "lora", "schedule": "lowrank_theory.training.schedules.LoRASqueezeSchedule"}),
    MethodEntry("hipa", "tool", Paper("HiPA: Enabling One-Step Text-to-Image Diffusion Models via "
                                        "High-Frequency-Promoting Adaptation", "2311.18158"),
                tests=("tests/training/test_frequency_loss.py",), proofs=(_P + "20-hipa-parseval.md",),
                extra={"impl": "lowrank_theory.training.frequency_loss.hipa_loss",
                       "params": "none of its own (a loss term on the outputs of any adapter, e.g. LoRA)"}),
    MethodEntry("diffora", "tool", Paper("DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential "
                                           "Module Selection", "2502.08905"),
                tests=("tests/training/test_module_selection.py",), proofs=(_P + "21-diffora-topk-projection.md",),
                extra={"impl": "lowrank_theory.training.module_selection.ModuleGates",
                       "params": "one gate per adapted module while searching; after pruning, the kept adapters' own"}),
    MethodEntry("adamw", "rule", Paper("Decoupled Weight Decay Regularization", "1711.05101"),
                tests=("tests/training/test_optim.py",), extra={"impl": "torch.optim.AdamW"}),
    MethodEntry("sgd", "rule", Paper("plain stochastic gradient descent (torch.optim.SGD)"),
                tests=("tests/training/test_optim.py",), extra={"impl": "torch.optim.SGD"}),
    MethodEntry("lora+", "rule", Paper("LoRA+: Efficient Low Rank Adaptation of Large Models", "2402.12354"),
                tests=("tests/training/test_optim.py",), notebooks=(_N + "03_gradient_approximation.py",
                                                                   _N + "08_lr_sensitivity.py"),
                peft="peft.optimizers.create_loraplus_optimizer",
                extra={"impl": "lowrank_theory.training.optim.lora_plus_param_groups"}),
    MethodEntry("lorapro", "rule", Paper("LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", "2407.18242"),
                tests=("tests/training/test_optim.py",), proofs=(_P + "03-lorapro-tangent-projection.md",),
                notebooks=(_N + "03_gradient_approximation.py",),
                extra={"impl": "lowrank_theory.training.optim_projected.LoRAPro"}),
    MethodEntry("altlora", "rule", Paper("AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation "
                                         "with Alternating Projections", "2505.12455"),
                tests=("tests/training/test_optim.py",), proofs=(_P + "03-lorapro-tangent-projection.md",),
                notebooks=(_N + "03_gradient_approximation.py",),
                extra={"impl": "lowrank_theory.training.optim_projected.AltLoRA"}),
    MethodEntry("allora", "rule", Paper("ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", "2410.09692"),
                tests=("tests/training/test_optim.py",), extra={"impl": "lowrank_theory.training.optim.ALLoRA"}),
    MethodEntry("colora", "tool", Paper("CoLoRA, contribution-based LoRA rank allocation (arXiv id from the seed list; "
                                        "the paper itself was not found, so this is our reading of its title)",
                                        "2408.01099"),
                tests=("tests/training/test_rank_budget.py",), proofs=(_P + "25-budget-greedy.md",),
                extra={"impl": "lowrank_theory.training.rank_budget.colora_ranks",
                       "params": "the LoRA ranks it allocates sum exactly to the budget: Σ_l r_l (d_out,l + d_in,l)"}),
    MethodEntry("id3", "tool", Paper("Step-by-Step Unmasking for Parameter-Efficient Fine-tuning of Large Language "
                                     "Models", "2408.14470"),
                tests=("tests/training/test_id3.py",), proofs=(_P + "23-id3-first-order.md",),
                extra={"impl": "lowrank_theory.training.id3.ID3Mask",
                       "params": "the budget: entries of the governed tensors unmasked step by step"}),
    MethodEntry("model_surgery", "tool", Paper("Model Surgery: Modulating LLM's Behavior Via Simple Parameter "
                                               "Editing", "2407.08770"),
                tests=("tests/merging/test_model_surgery.py",),
                extra={"impl": "lowrank_theory.merging.surgery.model_surgery",
                       "params": "none trained: a probe direction added to the k selected rows"}),
    MethodEntry("spt", "tool", Paper("Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", "2303.08566"),
                tests=("tests/training/test_sensitivity.py",), proofs=(_P + "27-spt-first-order.md",),
                extra={"impl": "lowrank_theory.training.sensitivity.spt_allocate",
                       "params": "at most the budget: LoRA on the selected matrices plus sparse_delta entries"}),
    MethodEntry("snella_bilevel", "tool", Paper("Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition "
                                                "for Vision Models", "2510.24037"),
                tests=("tests/adapters/test_kernel_sparse.py",),
                extra={"impl": "lowrank_theory.training.bilevel_sparsity.BilevelAllocator",
                       "params": "the snella adapters' own; the kept entries follow a cubic schedule"}),
)}


def index() -> dict[str, MethodEntry]:
    """name -> entry: :data:`DECLARED` plus the ``index_entry`` of every registered adapter class that has
    one; adapters sorted by name, then schedule-driven methods, rules, tools (the order of ``docs/methods.md``).
    """
    from . import adapters

    merged = dict(DECLARED)
    for name in adapters.names():
        own = adapters.get(name).__dict__.get("index_entry")
        if own is None:
            continue
        if name in DECLARED:
            raise RuntimeError(f"{name!r} is declared both in method_index.DECLARED and on its class")
        if own.name != name or own.kind != "adapter":
            raise RuntimeError(f"{adapters.get(name).__name__}.index_entry declares {own.name!r} ({own.kind}), "
                               f"not the adapter {name!r}")
        merged[name] = own
    order = {"adapter": 0, "method": 1, "rule": 2, "tool": 3}
    keys = sorted(merged, key=lambda n: (order[merged[n].kind], n if merged[n].kind == "adapter" else ""))
    return {k: merged[k] for k in keys}


def names(kind: str | None = None) -> list[str]:
    """Indexed names (of one ``kind``: ``"adapter"``, ``"method"``, ``"rule"``, ``"tool"``), in index order."""
    return [n for n, e in index().items() if kind is None or e.kind == kind]


def entry(name: str) -> MethodEntry:
    """The declared entry of ``name`` (``ValueError`` listing the indexed names otherwise)."""
    try:
        return index()[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(names())}") from None


def _namespace() -> dict[str, Any]:
    return {"min": min, "max": max, "ceil": math.ceil, "floor": math.floor, "sqrt": math.sqrt}


def param_count_from_formula(name: str, d_out: int, d_in: int, **cfg: Any) -> int:
    """Evaluate ``name``'s declared parameter-count formula for a (d_out, d_in) weight.

    Missing arguments take the defaults of the class's ``param_count``; ``where`` definitions are
    evaluated first, in order.  The tests compare this with ``param_count`` itself.
    """
    from . import adapters

    e = entry(name)
    if e.kind != "adapter" or not e.params:
        raise ValueError(f"{name!r} declares no evaluable parameter-count formula")
    sig = inspect.signature(adapters.get(name).param_count)
    env = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    env.update(cfg, d_out=d_out, d_in=d_in)
    ns = _namespace()
    for var, expr in e.where:
        env[var] = eval(expr, ns, dict(env))  # our own declared expressions, not user input
    return int(eval(e.params, ns, env))


def _source_path(obj: Any) -> str:
    path = Path(inspect.getsourcefile(obj)).resolve()
    parts = path.parts
    return "/".join(parts[parts.index("lowrank_theory"):]) if "lowrank_theory" in parts else str(path)


def _import(dotted: str) -> Any:
    import importlib

    mod, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n")[0]
    return " ".join(first.split())


_LATEX = [(r"\Delta ", "Δ"), (r"\Delta", "Δ"), (r"\odot", "⊙"), (r"\times", "×"), (r"\in ", "∈ "), (r"\top", "ᵀ"),
          (r"\lambda", "λ"), (r"\eta", "η"), (r"\theta", "θ"), (r"\sigma", "σ"), (r"\sum", "Σ"), (r"\gamma", "γ"),
          (r"\beta", "β"), (r"\delta", "δ"), (r"\approx", "≈"), (r"\lVert", "‖"), (r"\rVert", "‖"),
          (r"\cdots", "…"), (r"\dots", "…"), (r"\,", " "), (r"\;", " "), (r"\!", ""), (r"\textstyle", "")]


def plain_math(text: str) -> str:
    """reST/LaTeX of a docstring line as plain text for a terminal (``\\Delta W = s\\,BA`` -> ``ΔW = s BA``)."""
    text = re.sub(r":math:`([^`]*)`", r"\1", text)
    text = re.sub(r":(?:class|func|meth|data|mod):`~?([^`]*)`", r"\1", text)
    text = text.replace("``", "")
    text = re.sub(r"\\(?:operatorname|mathrm|mathbb|mathcal|text)\{([^}]*)\}", r"\1", text)
    text = re.sub(r"\\sqrt\{((?:[^{}]|\{[^{}]*\})*)\}", r"√(\1)", text)
    for a, b in _LATEX:
        text = text.replace(a, b)
    text = re.sub(r"\\(?:mathcal|mathbb) ?([A-Za-z])", r"\1", text)
    text = text.replace("^ᵀ", "ᵀ").replace("{", "").replace("}", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def describe(name: str) -> dict[str, Any]:
    """The full index entry of ``name``: the declared data plus what the code says (class, file, formula,
    parameter count formula, export support)."""
    from . import adapters

    e = entry(name)
    out: dict[str, Any] = {"name": name, "kind": e.kind, "paper": e.paper.cite(),
                           "arxiv": f"https://arxiv.org/abs/{e.paper.arxiv}" if e.paper.arxiv else None,
                           "tests": list(e.tests), "proofs": list(e.proofs), "notebooks": list(e.notebooks),
                           "peft": e.peft or "none", "peft_checked_in": e.peft_test or None, "note": e.note}
    if e.kind == "adapter":
        cls = adapters.get(name)
        out.update(cls=f"{cls.__module__}.{cls.__qualname__}", file=_source_path(cls), formula=_first_line(cls),
                   params=_params_text(e), param_count=f"{cls.__qualname__}.param_count")
    elif e.kind == "method":
        cls = adapters.get(e.extra["adapter"])
        sched = _import(e.extra["schedule"])
        out.update(cls=f"{cls.__module__}.{cls.__qualname__} + {e.extra['schedule']}", file=_source_path(sched),
                   formula=_first_line(sched), params=f"that of {e.extra['adapter']}, changing with the schedule")
    else:
        impl = e.extra["impl"]
        obj = _import(impl)
        out.update(cls=impl, file=_source_path(obj) if impl.startswith("lowrank_theory") else impl,
                   formula=_first_line(obj) if impl.startswith("lowrank_theory") else _first_line(obj).split(".")[0],
                   params="the adapter's (a rule changes how it trains, not what)" if e.kind == "rule"
                   else e.extra.get("params", "none of its own"))
    out["export"] = _export_text(name, e)
    return out


def _params_text(e: MethodEntry) -> str:
    if not e.params:
        return e.note or "see param_count"
    text = e.params.replace(" ** 2", "²").replace(" ** ", "^").replace(" * ", "·")
    if e.where:
        text += "  with " + ", ".join(f"{v} = {x}" for v, x in e.where)
    return text


def _export_text(name: str, e: MethodEntry) -> str:
    if e.kind in ("rule", "tool"):
        return "-"
    base = name if e.kind == "adapter" else e.extra["adapter"]
    from .training.peft_format import PEFT_METHODS

    ours = "our checkpoint format (training.checkpoint: safetensors + JSON)"
    peft_type = next((t for t, m in PEFT_METHODS.items() if base in m.methods), None)
    if peft_type is not None and e.kind == "adapter":
        return f"{ours}; PEFT's format, peft_type {peft_type} (training.peft_format.export_peft / import_peft)"
    return ours + "; not PEFT's format"


_FIELDS = (("kind", "kind"), ("paper", "paper"), ("arxiv", "arXiv"), ("formula", "formula"), ("cls", "class"),
           ("file", "file"), ("params", "parameters"), ("tests", "tests"), ("proofs", "proofs"),
           ("notebooks", "notebooks"), ("peft", "PEFT"), ("peft_checked_in", "checked against PEFT in"),
           ("export", "export"), ("note", "note"))


def format_entry(name: str) -> str:
    """The entry of ``name`` as aligned text lines for ``lowrank-theory info NAME``."""
    d = describe(name)
    d["formula"] = plain_math(d["formula"])
    width = max(len(label) for _, label in _FIELDS)
    lines = [f"{name}"]
    for key, label in _FIELDS:
        v = d.get(key)
        if v in (None, "", []):
            continue
        if isinstance(v, list):
            v = ", ".join(v)
        lines.append(f"  {label:<{width}}  {v}")
    return "\n".join(lines)


def methods_markdown() -> str:
    """``docs/methods.md``: one table row per method, then one section per method (generated; do not edit)."""
    md = ["# Methods: paper, math, code, tests, proofs, notebooks", "",
          "Generated by `python -m lowrank_theory.method_index docs/methods.md` from "
          "`lowrank_theory/method_index.py` and the code; `tests/test_method_index.py` fails when this file is "
          "stale. The same entry is printed by `lowrank-theory info NAME`.", "",
          "| name | kind | paper | parameters | PEFT | export to PEFT |", "|---|---|---|---|---|---|"]
    for n in names():
        d = describe(n)
        paper = f"[{d['paper']}]({d['arxiv']})" if d["arxiv"] else d["paper"]
        to_peft = "yes" if "PEFT" in d["export"] and "not PEFT" not in d["export"] else "no"
        md.append(f"| [`{n}`](#{_anchor(_heading(n, d['kind']))}) | {d['kind']} | {paper} | {_cell(d['params'])} | "
                  f"{_cell(d['peft'])} | {to_peft} |")
    for n in names():
        d = describe(n)
        md += ["", f"## {_heading(n, d['kind'])}", ""]
        formula = re.sub(r":math:`([^`]*)`", r"$\1$", d["formula"])
        formula = re.sub(r":(?:class|func|meth|data|mod):`~?([^`]*)`", r"`\1`", formula).replace("``", "`")
        md += [f"- **formula:** {formula}", f"- **paper:** {d['paper']}" + (f" ({d['arxiv']})" if d["arxiv"] else ""),
               f"- **class:** `{d['cls']}` in [`{d['file']}`](../{d['file']})" if d["file"].startswith("lowrank_theory")
               else f"- **implementation:** `{d['cls']}`",
               f"- **parameters:** {d['params']}"]
        for key, label in (("tests", "tests"), ("proofs", "proofs"), ("notebooks", "notebooks")):
            if d[key]:
                md.append(f"- **{label}:** " + ", ".join(f"[`{p}`](../{p})" for p in d[key]))
        md.append(f"- **PEFT:** {d['peft']}" + (f" (checked in `{d['peft_checked_in']}`)" if d["peft_checked_in"]
                                                else ""))
        md.append(f"- **export:** {d['export']}")
        if d["note"]:
            md.append(f"- **note:** {d['note']}")
    return "\n".join(md) + "\n"


def _heading(name: str, kind: str) -> str:
    labels = {"rule": "training rule", "method": "adapter + schedule", "tool": "library tool"}
    return name if kind == "adapter" else f"{name} ({labels[kind]})"


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9_ -]", "", name.lower()).replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":  # pragma: no cover - the docs generator
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    text = methods_markdown()
    if target is None:
        sys.stdout.write(text)
    else:
        target.write_text(text, encoding="utf-8")
