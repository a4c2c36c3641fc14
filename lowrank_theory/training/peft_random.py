r"""PEFT's frozen-basis and spectral methods and ours: VeRA, RandLoRA, Uni-LoRA, FourierFT.

**Frozen bases.**  PEFT draws VeRA's pair and RandLoRA's bases once per model with a
``torch.Generator`` seeded by ``projection_prng_key`` and, with ``save_projection=True`` (its
default), stores them as ``base_model.vera_A`` / ``vera_B`` (RandLoRA: ``base_model.randlora_A`` /
``randlora_B`` and a copy under every layer).  Export always writes our bases that way, at PEFT's
size (the largest ``d_out`` and ``d_in`` over the exported layers), filled from every layer's
slice -- so PEFT computes with exactly our bases.  Import reads PEFT's bases as they are: when the
seed regenerates them bit for bit (VeRA, whose recipe is PEFT's; a RandLoRA or VeRA we exported
ourselves) the adapters keep their usual non-persistent bases; otherwise (RandLoRA from PEFT,
whose generator we do not reproduce) they are built with ``persistent_basis=True`` and the
file's bases are copied in, so our checkpoints then carry them too.

**VeRA** (``"VERA"``): ``vera_lambda_b`` (d_out,) = our b, ``vera_lambda_d`` (r,) = our d; layers
slice ``vera_A[:, :d_in]`` and ``vera_B[:d_out, :]``, as ours do.

**RandLoRA** (``"RANDLORA"``): ``randlora_lambda`` (r, N) = our λ transposed, ``randlora_gamma``
(N, p) = our γ, scale ``randlora_alpha / r``; layer bases ``randlora_A[:, 0, :p]`` and
``randlora_B[:q, :N, :]``, whose flattened column :math:`kN + i` is our :math:`B_i[:, k]`
(see :class:`~lowrank_theory.adapters.random_basis.RandLoRA`).  PEFT has one scale: other layers'
scale ratios are folded into their λ.

**Uni-LoRA** (``"UNILORA"``): one ``base_model.unilora_theta_d`` (d,) and, with ``save_indices``,
per layer ``unilora_indices_A`` (r, d_in), ``unilora_indices_B`` (d_out, r) and the matching
``unilora_scales_*`` (:math:`1/\sqrt{n_j}`).  Export writes our indices and scales (a layer scale
s is folded into its ``scales_B``); import requires the indices to be the ones PEFT's balanced
rule or our isometric rule draws from ``proj_seed`` in module order (they are, for any file PEFT
or we wrote), so the model is rebuilt from the seed (``index_rule``), and checks the scales.

**FourierFT** (``"FOURIERFT"``): ``fourierft_spectrum`` (c,) = our spectrum; locations from
``random_loc_seed`` (ours are PEFT's); per-layer c in ``n_frequency_pattern``; one ``scaling``,
other layers' ratios folded into their spectrum.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ..adapters.projection import UniLoRAShared, balanced_indices
from ..linalg.projections import isometric_projection
from .injection import InjectionPlan
from .peft_common import (
    PREFIX,
    SHARED_PREFIX,
    Copies,
    Layers,
    PeftFile,
    PeftMethod,
    check_shape,
    config_targets,
    detached,
    dropout_of,
    fold,
    grouped,
    layer_configs,
    most_common,
    one_value,
    plan,
    weight_shapes,
)
from .targets import find_targets

__all__ = ["FOURIERFT", "RANDLORA", "UNILORA", "VERA"]

logger = logging.getLogger(__name__)

SCALE_RTOL = 1e-6  # float32 round-off of a stored 1/sqrt(n) and of a folded scale


def _fill(dst: torch.Tensor, done: torch.Tensor, index: tuple, values: torch.Tensor, what: str) -> None:
    """Write ``values`` into ``dst[index]``; where an earlier layer already wrote, the values must agree."""
    region, seen = dst[index], done[index]
    if bool(seen.any()) and not torch.equal(region[seen], values[seen]):
        raise ValueError(f"export_peft: layers use different {what}; PEFT's single shared basis cannot hold them")
    dst[index] = values
    done[index] = True


# ============================================================================ VeRA
def _export_vera(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfgs = layer_configs(layers)
    r = int(one_value({n: c["rank"] for n, c in cfgs.items()}, "VeRA rank r"))
    ads = [layer.adapter for layer in layers.values()]
    max_out, max_in = max(a.d_out for a in ads), max(a.d_in for a in ads)
    ref = ads[0].vera_A
    A = torch.zeros(r, max_in, dtype=ref.dtype)
    B = torch.zeros(max_out, r, dtype=ref.dtype)
    seen_a, seen_b = torch.zeros(A.shape, dtype=torch.bool), torch.zeros(B.shape, dtype=torch.bool)
    tensors: dict[str, torch.Tensor] = {}
    for n, layer in layers.items():
        ad = layer.adapter
        _fill(A, seen_a, (slice(None), slice(0, ad.d_in)), ad.vera_A.detach().cpu(), "VeRA pairs (seeds)")
        _fill(B, seen_b, (slice(0, ad.d_out), slice(None)), ad.vera_B.detach().cpu(), "VeRA pairs (seeds)")
        tensors[f"{PREFIX}{n}.vera_lambda_b"] = detached(ad.b)
        tensors[f"{PREFIX}{n}.vera_lambda_d"] = detached(ad.d)
    tensors[f"{SHARED_PREFIX}vera_A"], tensors[f"{SHARED_PREFIX}vera_B"] = A, B
    config = {
        "r": r,
        "projection_prng_key": most_common([int(c["seed"]) for c in cfgs.values()]),
        "save_projection": True,
        "vera_dropout": dropout_of(layers, "vera_dropout"),
        "d_initial": most_common([float(c["d_initial"]) for c in cfgs.values()]),
        "init_weights": True,
    }
    return config, tensors


def _prepare_vera(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    r, seed = int(f.get("r", 256)), int(f.get("projection_prng_key", 0))
    shapes = weight_shapes(model, list(f.layers))
    A, B = f.shared.get("vera_A"), f.shared.get("vera_B")
    if (A is None) != (B is None):
        raise ValueError("import_peft: the file holds only one of base_model.vera_A / vera_B")
    if A is None:  # save_projection=False: PEFT regenerates the pair from the seed, as we do
        basis_shape = (max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values()))
    else:
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"import_peft: vera_A {tuple(A.shape)} / vera_B {tuple(B.shape)} do not have rank r={r}")
        basis_shape = (int(B.shape[0]), int(A.shape[1]))
    for n, (m, k) in shapes.items():
        if m > basis_shape[0] or k > basis_shape[1]:
            raise ValueError(f"import_peft: layer {n!r} ({m}x{k}) does not fit the shared VeRA pair {basis_shape}")
        check_shape(n, "vera_lambda_b", f.layers[n]["vera_lambda_b"], (m,))
        check_shape(n, "vera_lambda_d", f.layers[n]["vera_lambda_d"], (r,))
    cfg = dict(rank=r, seed=seed, basis_shape=basis_shape, dropout=float(f.get("vera_dropout", 0.0)))
    p = plan(model, "vera", list(shapes), **cfg)
    given = A is not None and not all(
        torch.equal(ad.vera_A.cpu(), A[:, : ad.d_in].to(ad.vera_A.dtype))
        and torch.equal(ad.vera_B.cpu(), B[: ad.d_out].to(ad.vera_B.dtype))
        for ad in p.adapters.values()
    )
    if given:
        logger.info("import_peft: VeRA pair is not the one seed %d draws; keeping PEFT's as a persistent basis", seed)
        p = plan(model, "vera", list(shapes), persistent_basis=True, **cfg)
    copies: Copies = []
    for n, ad in p.adapters.items():
        copies += [(ad.b, f.layers[n]["vera_lambda_b"]), (ad.d, f.layers[n]["vera_lambda_d"])]
        if given:
            copies += [(ad.vera_A, A[:, : ad.d_in]), (ad.vera_B, B[: ad.d_out])]
    return [p], copies


VERA = PeftMethod(
    peft_type="VERA",
    methods=("vera",),
    suffixes=("vera_lambda_b", "vera_lambda_d"),
    shared=("vera_A", "vera_B"),
    export=_export_vera,
    prepare=_prepare_vera,
)


# ============================================================================ RandLoRA
def _peft_block(B: torch.Tensor) -> torch.Tensor:
    """Our (q, N, r) bases -> PEFT's (q, N, r) slice whose flattened column k·N + i is our B_i[:, k]."""
    q, N, r = B.shape
    return B.permute(0, 2, 1).reshape(q, r * N).reshape(q, N, r)


def _our_block(B: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_peft_block`."""
    q, N, r = B.shape
    return B.reshape(q, N * r).reshape(q, r, N).permute(0, 2, 1)


def _export_randlora(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfgs = layer_configs(layers)
    r = int(one_value({n: c["rank"] for n, c in cfgs.items()}, "RandLoRA rank r"))
    separate = [n for n, c in cfgs.items() if not c["shared_a"]]
    if separate:
        raise ValueError(f"PEFT's RandLoRA shares one A across bases; layers {separate[:5]} use shared_a=False")
    ads = {n: layer.adapter for n, layer in layers.items()}
    max_out, max_in = max(a.d_out for a in ads.values()), max(a.d_in for a in ads.values())
    p_max, q_max = min(max_out, max_in), max(max_out, max_in)
    n_max = -(-p_max // r)
    dtype = next(iter(ads.values())).randlora_A.dtype
    A, B = torch.zeros(r, 1, p_max, dtype=dtype), torch.zeros(q_max, n_max, r, dtype=dtype)
    seen_a, seen_b = torch.zeros(A.shape, dtype=torch.bool), torch.zeros(B.shape, dtype=torch.bool)
    ref = most_common([float(a.scale) for a in ads.values()])
    tensors: dict[str, torch.Tensor] = {}
    for n, ad in ads.items():
        p, q, N = min(ad.d_out, ad.d_in), max(ad.d_out, ad.d_in), ad.num_bases
        what = "RandLoRA bases (seeds, basis kinds)"
        _fill(A, seen_a, (slice(None), 0, slice(0, p)), ad.randlora_A[0].detach().cpu(), what)
        _fill(B, seen_b, (slice(0, q), slice(0, N), slice(None)), _peft_block(ad.randlora_B.detach().cpu()), what)
        lam = ad.lam.detach() * (fold(float(ad.scale), ref) if ad.scale != ref else 1.0)
        tensors[f"{PREFIX}{n}.randlora_lambda"] = detached(lam.T)
        tensors[f"{PREFIX}{n}.randlora_gamma"] = detached(ad.gamma)
    for n in ads:  # PEFT's own files repeat the shared bases under every layer; so do we
        tensors[f"{PREFIX}{n}.randlora_A"], tensors[f"{PREFIX}{n}.randlora_B"] = A.clone(), B.clone()
    tensors[f"{SHARED_PREFIX}randlora_A"], tensors[f"{SHARED_PREFIX}randlora_B"] = A, B
    kind = most_common([c["basis"] for c in cfgs.values()])
    config = {
        "r": r,
        "randlora_alpha": ref * r,
        "randlora_dropout": dropout_of(layers, "randlora_dropout"),
        "projection_prng_key": most_common([int(c["seed"]) for c in cfgs.values()]),
        "save_projection": True,
        "sparse": kind == "sparse",
        "very_sparse": kind == "very_sparse",
        "init_weights": True,
    }
    return config, tensors


def _randlora_bases(f: PeftFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    own = f.layers[name]
    for part in ("randlora_A", "randlora_B"):
        if part in own and part in f.shared and not torch.equal(own[part], f.shared[part]):
            raise ValueError(f"import_peft: layer {name!r}: its {part} differs from base_model.{part}")
    A, B = own.get("randlora_A", f.shared.get("randlora_A")), own.get("randlora_B", f.shared.get("randlora_B"))
    if A is None or B is None:
        raise ValueError(
            "import_peft: the RandLoRA adapter was saved without its bases (save_projection=False); PEFT draws "
            "them with its own generator, which we do not reproduce: save it with save_projection=True"
        )
    return A, B


def _prepare_randlora(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    r, alpha, seed = int(f.get("r", 32)), float(f.get("randlora_alpha", 640)), int(f.get("projection_prng_key", 0))
    kind = "very_sparse" if f.get("very_sparse", False) else ("sparse" if f.get("sparse", False) else "dense")
    shapes = weight_shapes(model, list(f.layers))
    ours: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, (m, k) in shapes.items():
        p, q = min(m, k), max(m, k)
        N = -(-p // r)
        A, B = _randlora_bases(f, n)
        if A.ndim != 3 or A.shape[0] != r or A.shape[1] != 1 or A.shape[2] < p:
            raise ValueError(f"import_peft: layer {n!r}: randlora_A {tuple(A.shape)} does not hold ({r}, 1, >={p})")
        if B.ndim != 3 or B.shape[0] < q or B.shape[1] < N or B.shape[2] != r:
            raise ValueError(f"import_peft: layer {n!r}: randlora_B {tuple(B.shape)} does not hold (>={q}, >={N}, {r})")
        check_shape(n, "randlora_lambda", f.layers[n]["randlora_lambda"], (r, N))
        check_shape(n, "randlora_gamma", f.layers[n]["randlora_gamma"], (N, p))
        ours[n] = (A[:, 0, :p][None], _our_block(B[:q, :N, :]))
    basis_shape = (max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values()))
    cfg = dict(rank=r, alpha=alpha, seed=seed, basis=kind, basis_shape=basis_shape)
    cfg["dropout"] = float(f.get("randlora_dropout", 0.0))
    pl = plan(model, "randlora", list(shapes), **cfg)
    given = not all(
        torch.equal(ad.randlora_A.cpu(), ours[n][0].to(ad.randlora_A.dtype))
        and torch.equal(ad.randlora_B.cpu(), ours[n][1].to(ad.randlora_B.dtype))
        for n, ad in pl.adapters.items()
    )
    if given:
        pl = plan(model, "randlora", list(shapes), persistent_basis=True, **cfg)
    copies: Copies = []
    for n, ad in pl.adapters.items():
        copies += [(ad.lam, f.layers[n]["randlora_lambda"].T), (ad.gamma, f.layers[n]["randlora_gamma"])]
        if given:
            copies += [(ad.randlora_A, ours[n][0]), (ad.randlora_B, ours[n][1])]
    return [pl], copies


RANDLORA = PeftMethod(
    peft_type="RANDLORA",
    methods=("randlora",),
    suffixes=("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
    shared=("randlora_A", "randlora_B"),
    export=_export_randlora,
    prepare=_prepare_randlora,
    required=("randlora_lambda", "randlora_gamma"),
)


# ============================================================================ Uni-LoRA
def _export_unilora(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    ads = {n: layer.adapter for n, layer in layers.items()}
    shared = {id(a.shared): a.shared for a in ads.values()}
    if len(shared) != 1:
        raise ValueError(f"PEFT's Uni-LoRA has one theta_d; these layers use {len(shared)} UniLoRAShared vectors")
    (sh,) = shared.values()
    r = int(one_value({n: a.rank for n, a in ads.items()}, "Uni-LoRA rank r"))
    sh.finalize()
    tensors: dict[str, torch.Tensor] = {}
    for n, ad in ads.items():
        rn = ad.rank * ad.d_in
        idx = sh.indices[ad.offset : ad.offset + ad.numel].detach().cpu()
        val = sh.values[ad.offset : ad.offset + ad.numel].detach().cpu().to(sh.theta_d.dtype)
        tensors[f"{PREFIX}{n}.unilora_indices_A"] = idx[:rn].reshape(ad.rank, ad.d_in).clone()
        tensors[f"{PREFIX}{n}.unilora_indices_B"] = idx[rn:].reshape(ad.d_out, ad.rank).clone()
        tensors[f"{PREFIX}{n}.unilora_scales_A"] = val[:rn].reshape(ad.rank, ad.d_in).clone()
        tensors[f"{PREFIX}{n}.unilora_scales_B"] = (ad.scale * val[rn:]).reshape(ad.d_out, ad.rank).clone()
    tensors[f"{SHARED_PREFIX}unilora_theta_d"] = detached(sh.theta_d)
    config = {
        "r": r,
        "theta_d_length": sh.d,
        "proj_seed": sh.seed,
        "init_theta_d_bound": sh.init_bound,
        "save_indices": True,
        "unilora_dropout": dropout_of(layers, "unilora_dropout"),
        "init_weights": True,
    }
    return config, tensors


def _layer_scale(name: str, file_b: torch.Tensor, expected_b: torch.Tensor) -> float:
    ratio = file_b.double().flatten() / expected_b.flatten()
    s = float(ratio.mean())
    if float((ratio - s).abs().max()) > SCALE_RTOL * max(abs(s), 1.0):
        raise ValueError(f"import_peft: layer {name!r}: unilora_scales_B is not 1/sqrt(n_j) times one scale")
    return 1.0 if abs(s - 1.0) <= SCALE_RTOL else s


def _prepare_unilora(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    r, d, seed = int(f.get("r", 4)), int(f.get("theta_d_length", 256)), int(f.get("proj_seed", 42))
    theta = f.shared.get("unilora_theta_d")
    if theta is None:
        raise ValueError("import_peft: the file has no base_model.unilora_theta_d")
    check_shape("<model>", "unilora_theta_d", theta, (d,))
    if f.layers:  # module order = PEFT's order
        names = find_targets(model, [re.compile(re.escape(n)) for n in f.layers])
    else:  # save_indices=False and theta_d only: the layers are the config's targets
        names = config_targets(model, f)
    shapes = weight_shapes(model, names)
    D = sum(r * (m + k) for m, k in shapes.values())
    if d > D:
        raise ValueError(f"import_peft: theta_d_length={d} exceeds the {D} LoRA parameters of the adapted layers")
    saved = [n for n in names if "unilora_indices_A" in f.layers.get(n, {})]
    if saved and len(saved) != len(names):
        raise ValueError("import_peft: some layers have unilora_indices_* and some do not")
    if saved:
        parts = []
        for n in names:
            m, k = shapes[n]
            parts.append(check_shape(n, "unilora_indices_A", f.layers[n]["unilora_indices_A"], (r, k)).flatten())
            parts.append(check_shape(n, "unilora_indices_B", f.layers[n]["unilora_indices_B"], (m, r)).flatten())
        idx = torch.cat(parts).to(torch.int64).numpy()
        if (idx == balanced_indices(D, d, seed)).all():
            rule = "balanced"
        elif (idx == isometric_projection(D, d, seed).indices).all():
            rule = "isometric"
        else:
            raise ValueError(
                f"import_peft: the Uni-LoRA indices are neither PEFT's balanced nor our isometric assignment for "
                f"proj_seed={seed} in module order; we rebuild P from its seed and cannot hold other indices"
            )
    else:  # save_indices=False: PEFT regenerates its balanced assignment in module order
        rule, idx = "balanced", balanced_indices(D, d, seed)
    counts = torch.bincount(torch.from_numpy(idx), minlength=d)
    if bool((counts == 0).any()):
        raise ValueError("import_peft: some entry of theta_d is used by no layer; our projection needs every one")
    expected = counts.double().rsqrt()[torch.from_numpy(idx)]
    scales: dict[str, float] = {}
    offset = 0
    for n in names:
        m, k = shapes[n]
        e = expected[offset : offset + r * (m + k)]
        offset += r * (m + k)
        if not saved:
            scales[n] = 1.0
            continue
        sa = check_shape(n, "unilora_scales_A", f.layers[n]["unilora_scales_A"], (r, k)).double().flatten()
        if float((sa - e[: r * k]).abs().max()) > SCALE_RTOL:
            raise ValueError(f"import_peft: layer {n!r}: unilora_scales_A is not 1/sqrt(n_j) of its indices")
        sb = check_shape(n, "unilora_scales_B", f.layers[n]["unilora_scales_B"], (m, r))
        scales[n] = _layer_scale(n, sb, e[r * k :])
    shared = UniLoRAShared(d, seed=seed, init_bound=float(f.get("init_theta_d_bound", 0.02)), index_rule=rule)
    dropout = float(f.get("unilora_dropout", 0.0))
    plans, run = [], [names[0]]
    for prev, n in zip(names, names[1:]):  # runs of equal scale, in module order (= attach order)
        if scales[n] != scales[prev]:
            plans.append(plan(model, "unilora", run, rank=r, shared=shared, scale=scales[prev], dropout=dropout))
            run = []
        run.append(n)
    plans.append(plan(model, "unilora", run, rank=r, shared=shared, scale=scales[run[0]], dropout=dropout))
    return plans, [(shared.theta_d, theta)]


UNILORA = PeftMethod(
    peft_type="UNILORA",
    methods=("unilora",),
    suffixes=("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
    shared=("unilora_theta_d",),
    export=_export_unilora,
    prepare=_prepare_unilora,
    required=(),
    targets_from_config=True,
)


# ============================================================================ FourierFT
def _export_fourierft(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfgs = layer_configs(layers)
    seed = int(one_value({n: c["random_loc_seed"] for n, c in cfgs.items()}, "FourierFT random_loc_seed"))
    sizes = {n: int(cf["n_frequency"]) for n, cf in cfgs.items()}
    c = most_common(list(sizes.values()))
    # FourierFT matches pattern keys by re.match(rf".*\.{key}$", name) and falls back to the exact
    # name as a dict key: unescaped full names hit through that fallback only.
    pattern = {n: k for n, k in sizes.items() if k != c}
    ref = most_common([float(cf["scaling"]) for cf in cfgs.values()])
    tensors = {}
    for n, layer in layers.items():
        ad = layer.adapter
        spec = ad.spectrum.detach()
        if float(ad.scaling) != ref:
            spec = spec * fold(float(ad.scaling), ref)
        tensors[f"{PREFIX}{n}.fourierft_spectrum"] = detached(spec)
    config = {
        "n_frequency": c,
        "n_frequency_pattern": pattern,
        "scaling": ref,
        "random_loc_seed": seed,
        "init_weights": False,
    }
    return config, tensors


def _fourierft_n_frequency(f: PeftFile, name: str) -> int:
    r"""PEFT's FourierFT rule: the first key k with ``re.match(rf".*\.{k}$", name)``, else ``name`` itself."""
    patterns = f.get("n_frequency_pattern", {})
    key = next((k for k in patterns if re.match(rf".*\.{k}$", name)), name)
    return int(patterns.get(key, f.get("n_frequency", 1000)))


def _prepare_fourierft(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    scaling, seed = float(f.get("scaling", 150.0)), int(f.get("random_loc_seed", 777))
    sizes: dict[str, int] = {}
    for n, parts in f.layers.items():
        want = int(_fourierft_n_frequency(f, n))
        sizes[n] = int(check_shape(n, "fourierft_spectrum", parts["fourierft_spectrum"], (want,)).shape[0])
    plans = [
        plan(model, "fourierft", names, n_frequency=c, scaling=scaling, random_loc_seed=seed, init_weights=True)
        for c, names in grouped(sizes).items()
    ]
    copies: Copies = [
        (ad.spectrum, f.layers[n]["fourierft_spectrum"]) for p in plans for n, ad in p.adapters.items()
    ]
    return plans, copies


FOURIERFT = PeftMethod(
    peft_type="FOURIERFT",
    methods=("fourierft",),
    suffixes=("fourierft_spectrum",),
    export=_export_fourierft,
    prepare=_prepare_fourierft,
)
