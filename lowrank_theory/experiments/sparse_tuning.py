r"""SaRA's premise on the real MiniLM: do the smallest-magnitude weights contribute to the model's outputs?

SaRA (arXiv:2409.06633) reports that in Stable Diffusion the 10--20 % of parameters with the smallest absolute
values "do not contribute to the generation process", and re-uses exactly those entries as its trainable sparse
update (:class:`~lowrank_theory.adapters.sara.SaRA`).  This experiment asks the same of all-MiniLM-L6-v2: in every
linear weight of the encoder blocks (36 matrices: q, k, v, o, ffn_in, ffn_out of six blocks) zero

* ``smallest`` -- the fraction f of entries of smallest :math:`|w|` (SaRA's support, :func:`sara_support`), or
* ``random`` -- a uniformly random fraction f of the entries (seeded; the control), or
* ``largest`` -- the fraction f of largest :math:`|w|` (the opposite control),

and compare the sentence embeddings (mean-pooled last hidden state, L2-normalized, the model's intended use) of a
fixed batch of sentences with the unmodified model's.

Rows (:func:`run`): ``mode, fraction, seed, cos_mean`` (mean cosine similarity of each sentence's embedding with
its original), ``one_minus_cos`` (mean of 1 − cos), ``rel_change`` (:math:`\|E' - E\|_F/\|E\|_F` over the batch),
``sim_corr`` (correlation of the 120 pairwise sentence similarities with the original ones: what retrieval sees) and
``weight_share`` (:math:`\|W - W'\|_F^2/\|W\|_F^2` summed over the 36 matrices: the fraction of the weights' energy
that was zeroed).  :func:`verdict` turns the numbers into holds / partly / not.

Measured (float32; float64 agrees to 4 digits), 1 − cos / relative change / similarity correlation / energy zeroed:

* 10 %: smallest 0.0048 / 0.098 / 0.994 / 0.04 %; random 0.23 / 0.68 / 0.82 / 10 %; largest 0.67 / 1.16 / 0.57 / 50 %
* 20 %: smallest 0.027 / 0.23 / 0.95 / 0.34 %; random 0.41 / 0.91 / 0.69 / 20 %; largest 0.75 / 1.22 / 0.51 / 70 %

Full scale (relative change, smallest vs random mean of 3 seeds): 2 %: 0.009 vs 0.30; 5 %: 0.037 vs 0.48;
15 %: 0.17 vs 0.81; 30 %: 0.37 vs 1.05 -- negligible (< 1 %) only up to about 2 %.

Verdict **partly** at 10--20 %: the smallest entries matter far less than their number (a seventh of a random
10 %'s effect, a quarter at 20 %) but zeroing them is not negligible for this small encoder -- they are not
"ineffective" here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..adapters.sara import sara_support, sara_support_size
from ..linalg import derive_seed
from ._minilm import minilm

__all__ = ["SCALES", "SENTENCES", "embed", "plot", "run", "run_scale", "verdict", "zero_entries"]

#: quick: what the tests and CI run (~10 s of CPU); full: the figure (more fractions, three random seeds)
SCALES = {"quick": dict(fractions=(0.1, 0.2), seeds=(0,)),
          "full": dict(fractions=(0.02, 0.05, 0.1, 0.15, 0.2, 0.3), seeds=(0, 1, 2))}

#: A fixed batch of plain sentences (topics mixed so the embeddings are spread).
SENTENCES = (
    "The cat sat on the warm windowsill all afternoon.",
    "Interest rates rose for the third month in a row.",
    "A low-rank update changes only a few directions of a weight matrix.",
    "She planted tomatoes and basil in the garden behind the house.",
    "The train to the coast was delayed by heavy snow.",
    "Gradient descent follows the negative gradient of the loss.",
    "The orchestra played a symphony by Brahms last night.",
    "He forgot his umbrella and got soaked on the way home.",
    "The committee approved the new budget after a long debate.",
    "Proteins fold into shapes that determine their function.",
    "Our team won the final match in extra time.",
    "The recipe calls for two eggs, flour and a pinch of salt.",
    "Volcanic eruptions can cool the climate for several years.",
    "The library opens at nine and closes at six on weekdays.",
    "Sparse matrices store only their nonzero entries.",
    "A strong wind knocked over the old oak tree near the river.",
)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in f".{n}"]


def zero_entries(W: torch.Tensor, fraction: float, mode: str, seed: int = 0,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted flat indices of the entries of ``W`` to zero: ``smallest`` / ``largest`` magnitudes or ``random``.

    ``smallest`` is SaRA's support (:func:`~lowrank_theory.adapters.sara.sara_support`: ties by flat index);
    ``largest`` the last k of the same stable ascending order; ``random`` uniform without replacement from ``seed``.
    ``order`` -- the stable ascending argsort of ``|W|`` (float64), when the caller already has it.
    """
    k = sara_support_size(W.shape[0], W.shape[1], fraction)
    if mode == "random":
        rng = np.random.default_rng(seed)
        return torch.from_numpy(np.sort(rng.choice(W.numel(), size=k, replace=False)))
    if mode not in ("smallest", "largest"):
        raise ValueError(f"mode must be 'smallest', 'largest' or 'random', got {mode!r}")
    if order is None:
        if mode == "smallest":
            return sara_support(W, k)[0]
        order = torch.argsort(W.detach().to(torch.float64).abs().reshape(-1), stable=True)
    picked = order[:k] if mode == "smallest" else order[order.numel() - k:]
    return torch.sort(picked).values


@torch.no_grad()
def embed(model: nn.Module, tok, texts=SENTENCES, max_length: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden states, shape (len(texts), hidden)."""
    batch = tok(list(texts), max_length=max_length, padding=True, truncation=True, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _similarity_correlation(E: torch.Tensor, ref: torch.Tensor) -> float:
    """Pearson correlation of the off-diagonal pairwise cosine similarities of two embedding batches."""
    iu = torch.triu_indices(len(E), len(E), offset=1)
    a, b = (E @ E.T)[iu[0], iu[1]].numpy(), (ref @ ref.T)[iu[0], iu[1]].numpy()
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def run(fractions=(0.1, 0.2), modes=("smallest", "random", "largest"), seeds=(0, 1), n_layers: int | None = None,
        texts=SENTENCES, dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (mode, fraction, seed); ``smallest`` and ``largest`` are deterministic (seed 0 only)."""
    model, tok = minilm(n_layers)
    model = model.to(dtype)
    ref = embed(model, tok, texts)
    original = {n: m.weight.detach().clone() for n, m in _linears(model)}
    orders = {n: torch.argsort(W.to(torch.float64).abs().reshape(-1), stable=True) for n, W in original.items()}
    rows = []
    for mode in modes:
        for f in fractions:
            for seed in (seeds if mode == "random" else seeds[:1]):
                removed, total = 0.0, 0.0
                for n, m in _linears(model):
                    W = original[n]
                    idx = zero_entries(W, f, mode, derive_seed(seed, n), order=orders[n])
                    Wz = W.clone().reshape(-1)
                    removed += float(Wz[idx].pow(2).sum())
                    total += float(W.pow(2).sum())
                    Wz[idx] = 0.0
                    m.weight.copy_(Wz.view_as(W))
                E = embed(model, tok, texts)
                cos = (E * ref).sum(-1)
                rows.append({"mode": mode, "fraction": f, "seed": seed, "cos_mean": float(cos.mean()),
                             "one_minus_cos": float((1 - cos).mean()),
                             "rel_change": float((E - ref).norm() / ref.norm()),
                             "sim_corr": _similarity_correlation(E, ref), "weight_share": removed / total})
                for n, m in _linears(model):
                    m.weight.copy_(original[n])
    return rows


def verdict(rows: list[dict], fraction: float) -> str:
    """SaRA's claim "the smallest f do not contribute" at our scale, from the mean ``rel_change`` over seeds:

    ``holds`` -- zeroing the smallest f changes the embeddings by less than 1 % (negligible);
    ``partly`` -- not negligible, but less than half of what zeroing a random f does (they contribute much less than
    their share of entries, but they do contribute);
    ``not`` -- comparable to a random f.
    """
    small = [r["rel_change"] for r in rows if r["mode"] == "smallest" and r["fraction"] == fraction]
    rand = [r["rel_change"] for r in rows if r["mode"] == "random" and r["fraction"] == fraction]
    if not small or not rand:
        raise ValueError(f"rows must hold 'smallest' and 'random' rows at fraction {fraction}")
    s, r = float(np.mean(small)), float(np.mean(rand))
    if s < 0.01:
        return "holds"
    if s < 0.5 * r:
        return "partly"
    return "not"


def run_scale(scale: str = "quick", **kw) -> list[dict]:
    """:func:`run` at the sizes of ``SCALES[scale]`` (``kw`` override them)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return run(**{**SCALES[scale], **kw})


def plot(rows: list[dict], path) -> list:
    """Relative embedding change against the zeroed fraction, one line per mode (random: mean over seeds)."""
    from ._plot import plt, save, styles

    fig, ax = plt.subplots(figsize=(5.6, 4.0), layout="constrained")
    modes = [m for m in ("smallest", "random", "largest") if any(r["mode"] == m for r in rows)]
    sty = styles(modes)
    for mode in modes:
        fs = sorted({r["fraction"] for r in rows if r["mode"] == mode})
        ys = [float(np.mean([r["rel_change"] for r in rows if r["mode"] == mode and r["fraction"] == f])) for f in fs]
        ax.plot([100 * f for f in fs], ys, label=f"zero the {mode} |w|" if mode != "random" else "zero random entries",
                **sty[mode])
    ax.set_xlabel("fraction of each encoder weight zeroed (%)")
    ax.set_ylabel("relative change of sentence embeddings")
    ax.set_title("SaRA's premise on all-MiniLM-L6-v2", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)
