"""Run ``lowrank_theory.testing.check_adapter`` on every PEFT tuner that adapts an ``nn.Linear`` and merges.

    python benchmarks/peft_checks.py                    # writes docs/peft_checks.md and results/peft_checks_<date>.json
    python benchmarks/peft_checks.py --only lora vera   # a few rows, printed, nothing written

Each tuner is injected by ``peft.get_peft_model`` into one seeded ``nn.Linear`` and seen through
:class:`lowrank_theory.testing.peft_view.PeftLayerView` (PEFT's own merge / unmerge / disable /
get_delta_weight / state dict; nothing of PEFT's behaviour fixed).  The checker perturbs every trainable
tensor off its init (seeded), so ΔW ≠ 0 in every check but the identity-at-init one.  Two columns are
measured beside the checks: the bf16 merge through PEFT's *unsafe* path (``safe_merge=False``), and
whether two unseeded builds differ (PEFT drawing from torch's global RNG).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info, write_json

from lowrank_theory.testing import CHECKS, check_adapter
from lowrank_theory.testing.peft_view import PeftLayerView, peft_factory

DATE = "2026-12-04"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "peft_checks.md"
#: Shapes whose sides the block-structured tuners (OFT, BOFT, C3A, VBLoRA, RoAd, MiSS) divide by 4.
BLOCK_SHAPES = ((12, 16), (20, 8))


def _smallest_divisor(n: int) -> int:
    return next(k for k in range(2, n + 1) if n % k == 0)


@dataclass
class Tuner:
    """One row: a PEFT config (or ``(d_out, d_in) -> config``), the view's flags, and why they are set."""

    label: str
    config: Any
    shapes: tuple[tuple[int, int], ...] = ((12, 20), (17, 9))
    identity_at_init: bool = True
    exact_gradient: bool = True
    init_dtype: torch.dtype | None = None
    notes: list[str] = field(default_factory=list)

    def view_kw(self) -> dict[str, Any]:
        return dict(identity_at_init=self.identity_at_init, exact_gradient=self.exact_gradient,
                    init_dtype=self.init_dtype)


def _C(name: str, **kw: Any):
    """``(d_out, d_in) -> peft.<name>(**kw)``: built per layer, so a config PEFT refuses only fails its own row."""
    def make(d_out: int, d_in: int):
        import peft

        return getattr(peft, name)(**kw)

    make.__name__ = name
    return make


IA3_EPS = "unmerge divides by (l + 1e-8): W0 back to ~1e-8 relative, not to round-off"
F32_INIT = "PEFT refuses to run this init in float64: built in float32, then the model cast to float64"


def tuners() -> list[Tuner]:
    import peft as P

    return [
        Tuner("LoRA", _C("LoraConfig", r=4, lora_alpha=8)),
        Tuner("rsLoRA", _C("LoraConfig", r=4, lora_alpha=8, use_rslora=True)),
        Tuner("DoRA", _C("LoraConfig", r=4, lora_alpha=8, use_dora=True), exact_gradient=False,
              notes=["gradcheck n/a: PEFT detaches the column norm ‖W0 + ΔW‖ (DoRA paper §4.3), so autograd's "
                     "gradient is by design not the forward's derivative (run anyway, it fails)"]),
        Tuner("LoRA (lora_bias)", _C("LoraConfig", r=4, lora_alpha=8, lora_bias=True)),
        Tuner("PiSSA", _C("LoraConfig", r=4, lora_alpha=4, init_lora_weights="pissa"), init_dtype=torch.float32,
              notes=["PiSSA writes the residual W0 - U_r S_r V_rᵀ into the base; identity is checked against the "
                     "original W0", F32_INIT]),
        Tuner("OLoRA", _C("LoraConfig", r=4, lora_alpha=4, init_lora_weights="olora"), init_dtype=torch.float32,
              notes=["OLoRA writes W0 - Q R into the base", F32_INIT]),
        Tuner("AdaLoRA", _C("AdaLoraConfig", init_r=4, target_r=2, total_step=10, lora_alpha=8),
              notes=["state dict FAIL traced: on a float64/fp16/bf16 base (not float32) PEFT's move of the adapter to "
                     "the base dtype re-creates `ranknum` with requires_grad=True, so an optimizer trains it (the "
                     "checker's perturbation moves it) while the checkpoint does not save it"]),
        Tuner("LoHa", _C("LoHaConfig", r=4, alpha=8)),
        Tuner("LoKr", _C("LoKrConfig", r=4, alpha=8)),
        Tuner("VeRA", _C("VeraConfig", r=8)),
        Tuner("PVeRA", _C("PveraConfig", r=8),
              notes=["checked in eval mode: the reparametrized sample is replaced by its mean"]),
        Tuner("FourierFT", _C("FourierFTConfig", n_frequency=16, scaling=10.0), identity_at_init=False,
              notes=["identity n/a: PEFT's default init_weights=False draws the spectrum from N(0, 1), as the paper",
                     "gradcheck FAIL traced: get_delta_weight builds the dense spectrum in float32 (torch.zeros "
                     "without dtype) even in a float64 layer"]),
        Tuner("WaveFT", _C("WaveFTConfig", n_frequency=16)),
        Tuner("RandLoRA", _C("RandLoraConfig", r=4)),
        Tuner("VBLoRA", _C("VBLoRAConfig", r=2, num_vectors=16, vector_length=4, topk=2), shapes=BLOCK_SHAPES,
              identity_at_init=False,
              notes=["identity n/a: PEFT's docs say the vector bank is drawn from U(-0.02, 0.02), never zero"]),
        Tuner("OFT", lambda m, n: P.OFTConfig(r=0, oft_block_size=_smallest_divisor(n))),
        Tuner("BOFT", _C("BOFTConfig", boft_block_size=4, boft_n_butterfly_factor=1), shapes=BLOCK_SHAPES),
        Tuner("HRA", _C("HRAConfig", r=4)),
        Tuner("MiSS", _C("MissConfig", r=4), shapes=BLOCK_SHAPES),
        Tuner("MiSS (bat)", _C("MissConfig", r=4, init_weights="bat"), shapes=BLOCK_SHAPES),
        Tuner("C3A", lambda m, n: P.C3AConfig(block_size=math.gcd(m, n), init_weights=True), shapes=BLOCK_SHAPES,
              notes=["init_weights=True, PEFT's zero (no-op) init; its default 'xavier_uniform' is not identity",
                     "the 8e-9 forward / gradcheck FAILs: the circulant ΔW is computed in float32 (c3a_kernel.to("
                     "torch.float32)) even in a float64 layer"]),
        Tuner("SHiRA", _C("ShiraConfig", r=2)),
        Tuner("HiRA", _C("HiraConfig", r=4),
              notes=["HiRA keeps a copy of W0 at merge and unmerge copies it back, so W0 is restored exactly even "
                     "after the adapter changed (the check still fails: it asks for a ValueError)"]),
        Tuner("RoAd", _C("RoadConfig", variant="road_1", group_size=4), shapes=BLOCK_SHAPES,
              notes=["unmerge inverts the rotation in float32 (torch.linalg.inv(road_R.to(float32))): W0 back to "
                     "~6e-8 in a float64 layer"]),
        Tuner("IA3 (feedforward)", _C("IA3Config", feedforward_modules=["lin"]), notes=[IA3_EPS]),
        Tuner("IA3", _C("IA3Config", feedforward_modules=[]), notes=[IA3_EPS]),
        Tuner("GLoRA", _C("GloraConfig")),
        Tuner("DeLoRA", _C("DeloraConfig", r=4)),
        Tuner("GraLoRA", _C("GraloraConfig", r=4, gralora_k=2), shapes=BLOCK_SHAPES),
        Tuner("TinyLoRA", _C("TinyLoraConfig")),
        Tuner("UniLoRA", _C("UniLoraConfig"), identity_at_init=False,
              notes=["identity n/a: PEFT's docs say theta_d is drawn from a small uniform range, never zero"]),
        Tuner("FRoD", _C("FrodConfig"),
              notes=["identity to 4e-8 only: its decomposition is returned in float32 (u.float()) in a float64 layer"]),
        Tuner("AdaMSS", _C("AdamssConfig"),
              notes=["half-precision FAIL traced: the layer stores self.dtype at injection and casts x to it, so after "
                     "the model is cast (model.to(bfloat16)) its forward raises a dtype mismatch"]),
        Tuner("OSF", _C("OSFConfig"),
              notes=["PEFT's OSF unmerge only warns ('OSF does not support unmerging'), and merge does not check "
                     "merged_adapters, so a second merge adds ΔW again"]),
        Tuner("PEANuT", _C("PeanutConfig")),
        Tuner("PSOFT", _C("PsoftConfig", r=4), init_dtype=torch.float32, notes=[F32_INIT]),
        Tuner("SuperTuning", _C("SupertuningConfig")),
        Tuner("DeFT", _C("DeftConfig"),
              notes=["the ~1e-7 FAILs: DeFT computes its projection and update in float32 by design (its comments: "
                     "'for numerical stability'), also in a float64 layer"]),
        Tuner("BEFT", _C("BeftConfig"),
              notes=["BEFT trains a bias only; the forward = dense FAIL is the checker's guard (it asks that the "
                     "perturbation move W, and BEFT never moves W), not a PEFT defect"]),
        Tuner("LN Tuning", _C("LNTuningConfig"),
              notes=["LN Tuning trains a copy of the whole layer and 'merge' swaps it in (PEFT: 'no actual merging, "
                     "so whether safe_merge is True or False is irrelevant'); half precision raises on the mixed "
                     "f32-copy / half-input forward"]),
    ]


#: PEFT 0.21 tuner types not in the table, and why.
LEFT_OUT = {
    "LILY": "its layer's merge / unmerge / get_delta_weight raise NotImplementedError",
    "POLY": "no merge; its forward needs task_ids",
    "XLORA": "needs a transformers model with LoRA adapters to mix; no merge of its own",
    "SHADOW": "targets transformer blocks, not an nn.Linear",
    "TRAINABLE_TOKENS": "adapts embedding rows (nn.Embedding), not an nn.Linear",
    "PROMPT_TUNING, P_TUNING, PREFIX_TUNING, MULTITASK_PROMPT_TUNING, CPT, CARTRIDGE, ADAPTION_PROMPT":
        "prompt learning: no layer injected, nothing to merge",
}


def unseeded_builds_differ(t: Tuner) -> bool:
    """Whether two builds with ``seed=None`` (torch's global RNG not reseeded) hold different tensors."""
    d_out, d_in = t.shapes[0]
    a = PeftLayerView(t.config, d_out, d_in, seed=None, init_dtype=t.init_dtype).all_tensors()
    b = PeftLayerView(t.config, d_out, d_in, seed=None, init_dtype=t.init_dtype).all_tensors()
    return any(k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


def bf16_normwise_error(t: Tuner, *, safe: bool, mixed: bool) -> float | str:
    """‖merge − W'‖_F / (u ‖W'‖_F) of a bf16 base, u = 2⁻⁸ (bf16's unit round-off; a correctly rounded
    result is ≤ 1), W' the float32 dense merged weight of the same stored values (as the checker's reference)."""
    from lowrank_theory.testing.checks import Subject

    s = Subject(peft_factory(t.config, safe_merge=safe, **t.view_kw()), shapes=t.shapes)
    v = s.build(*t.shapes[0], dtype=torch.float32)
    ref = s.build(*t.shapes[0], dtype=torch.float32, perturb=False)
    try:
        v.cast(torch.bfloat16, torch.float32 if mixed else torch.bfloat16)
        mine, theirs = v.all_tensors(), ref.all_tensors()
        with torch.no_grad():
            for k, x in mine.items():
                theirs[k].copy_(x.float() if x.is_floating_point() else x)
            for dst, src in zip(ref.stored_weights(), v.stored_weights()):
                if src is not None:
                    dst.copy_(src.float())
        want = ref.dense_weights()[0]
        v.merge(safe=safe)
        got = v.stored_weights()[0].float()
    except Exception as exc:
        return f"raised {type(exc).__name__}"
    return float((got - want).norm() / (2.0**-8 * want.norm()))


def unmerge_after_change(t: Tuner) -> float:
    """merge, move every trainable tensor by 0.1·N(0, 1) (an optimizer step), unmerge: ‖W − W0‖/‖W0‖ (float64).

    Random, not the check's constant +0.5 on one tensor: a constant shift of a skew-symmetric generator
    (OFT, BOFT: R = cayley(Q − Qᵀ)) leaves the rotation unchanged."""
    from lowrank_theory.testing.checks import Subject
    from lowrank_theory.testing.views import trainable_tensors

    v = Subject(peft_factory(t.config, **t.view_kw()), shapes=t.shapes).build(*t.shapes[0])
    w0 = v.stored_weights()[0].detach().clone()
    v.merge(safe=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trainable_tensors(v):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    v.unmerge()
    return float((v.stored_weights()[0] - w0).norm() / w0.norm())


def merged_after_disabled_forward(t: Tuner) -> bool:
    """merge, one forward inside ``PeftModel.disable_adapter()``: is the layer still merged after the block?"""
    from lowrank_theory.testing.checks import Subject

    v = Subject(peft_factory(t.config, **t.view_kw()), shapes=t.shapes).build(*t.shapes[0])
    v.merge(safe=True)
    with v.disable():
        v(v.example_input(torch.float64))
    return bool(v.module.merged)


def run(t: Tuner) -> dict[str, Any]:
    row: dict[str, Any] = {"tuner": t.label, "notes": list(t.notes), "shapes": [list(s) for s in t.shapes]}
    t0 = time.perf_counter()
    try:
        probe = PeftLayerView(t.config, *t.shapes[0], init_dtype=t.init_dtype)
    except Exception as exc:
        row.update(status="not constructed", error=f"{type(exc).__name__}: {exc}")
        return row
    row.update(peft_type=probe.config.peft_type.value, layer=f"{type(probe.module).__module__}."
               f"{type(probe.module).__name__}", dense_source=probe.dense_source, status="ran")
    kw = t.view_kw()
    report = check_adapter(peft_factory(t.config, name=t.label, **kw), shapes=t.shapes, raise_on_failure=False)
    row["checks"] = {r.check: {"status": r.status, "message": r.message[:500], "numbers": r.numbers}
                     for r in report.results}
    if not t.exact_gradient:  # measure what the declared skip hides
        g = check_adapter(peft_factory(t.config, name=t.label, init_dtype=t.init_dtype), shapes=t.shapes,
                          checks=["gradcheck"],
                          raise_on_failure=False)["gradcheck"]
        row["gradcheck_if_declared_exact"] = g.status
    unsafe = check_adapter(peft_factory(t.config, name=t.label, safe_merge=False, **kw), shapes=t.shapes,
                           checks=["half_merge_ulp"], half_dtypes=(torch.bfloat16,), raise_on_failure=False)
    u = unsafe["half_merge_ulp"]
    row["bf16_unsafe_merge"] = {"status": u.status, "numbers": u.numbers}
    row["bf16_normwise"] = {f"{'safe' if safe else 'unsafe'}_{'f32adapter' if mixed else 'half'}":
                            bf16_normwise_error(t, safe=safe, mixed=mixed)
                            for safe in (True, False) for mixed in (False, True)}
    row["global_rng"] = unseeded_builds_differ(t)
    row["merged_after_disabled_forward"] = merged_after_disabled_forward(t)
    if report["unmerge_refuses_changed"].status == "failed":
        row["unmerge_after_change_w0_relerr"] = unmerge_after_change(t)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------- the markdown table
SHORT = {
    "identity_at_init": "identity at init",
    "forward_matches_dense": "forward = dense W'",
    "merge_matches_forward": "merge = unmerged",
    "merge_idempotent": "merge twice",
    "unmerge_restores": "unmerge → W0",
    "unmerge_refuses_changed": "unmerge refuses changed",
    "disable_gives_base": "disable → base",
    "safe_merge_refuses_nonfinite": "safe merge refuses NaN",
    "half_merge_ulp": "fp16 / bf16 merge ulp (half, f32 adapter)",
    "state_dict_roundtrip": "state dict",
    "config_roundtrip": "config JSON",
    "deterministic_defaults": "same seed, same layer",
    "only_adapter_trainable": "only adapter trains",
    "param_count": "param count",
    "gradcheck": "gradcheck",
    "bad_inputs": "bad inputs",
}
assert set(SHORT) == set(CHECKS), "a check was added to CHECKS: name its column here"

#: Numbers shown in a cell, per check (the first present).
_KEY = {"identity_at_init": "relerr", "forward_matches_dense": "relerr", "merge_matches_forward": "relerr",
        "unmerge_restores": "relerr_weight", "state_dict_roundtrip": "relerr", "config_roundtrip": "relerr",
        "unmerge_refuses_changed": "weight_change", "bad_inputs": "unclear"}


def _g(v: Any) -> str:
    return f"{v:.1e}" if isinstance(v, float) and v != 0 else str(v if not isinstance(v, float) else 0)


def _ulps(nums: dict[str, Any]) -> str:
    def u(k):
        return nums.get(f"{k}_ulps", "?")

    return f"{u('float16')}, {u('float16_f32adapter')} / {u('bfloat16')}, {u('bfloat16_f32adapter')}"


def cell(check: str, res: dict[str, Any], row: dict[str, Any]) -> str:
    st, nums = res["status"], res["numbers"]
    if st == "skipped":
        return "n/a"
    if check == "unmerge_refuses_changed" and st == "failed" and "unmerge_after_change_w0_relerr" in row:
        return f"**FAIL** W0 off {_g(row['unmerge_after_change_w0_relerr'])}"
    if check == "half_merge_ulp":
        return f"{'pass' if st == 'passed' else '**FAIL**'} {_ulps(nums)}" if nums else (
            "**FAIL** (raised)" if st == "failed" else "pass")
    if check == "disable_gives_base" and st == "failed":
        bad = [k for k, v in nums.items() if v > 1e-10]
        return f"**FAIL** {', '.join(f'{k} {_g(nums[k])}' for k in bad)}" if bad else "**FAIL**"
    key = _KEY.get(check)
    num = f" {_g(nums[key])}" if key in nums else ""
    return ("pass" if st == "passed" else "**FAIL**") + num


def _nw(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else "raised"


def _escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


USAGE = '''\
## Run it on your own PEFT config

```python
from peft import LoraConfig
from lowrank_theory.testing import check_adapter
from lowrank_theory.testing.peft_view import peft_factory

report = check_adapter(peft_factory(LoraConfig(r=4, use_dora=True)), raise_on_failure=False)
print(report)                        # every check: PASSED / FAILED with its numbers / SKIPPED with the reason
print(report["half_merge_ulp"].numbers)
```

`peft_factory` takes any PEFT config (or `(d_out, d_in) -> config` where a knob must divide the shape),
injects it with `peft.get_peft_model` into one seeded `nn.Linear`, and presents the injected layer through
PEFT's own `merge(safe_merge=...)`, `unmerge`, `disable_adapter()`, `get_delta_weight`,
`get_peft_model_state_dict` / `set_peft_model_state_dict` and `adapter_config.json`.  It fixes nothing in
PEFT: every FAIL below is PEFT's behaviour.  In pytest, `parametrize_with_checks({"dora": peft_factory(cfg)})`
gives one test per check.
'''


#: Checks whose outcome is the same for (nearly) every PEFT tuner: explained once in the findings.
COMMON = ("unmerge_refuses_changed", "param_count", "bad_inputs")


def _rows_where(ran: list[dict[str, Any]], pred) -> str:
    names = [r["tuner"] for r in ran if pred(r)]
    return ", ".join(names) if names else "none"


def findings(ran: list[dict[str, Any]]) -> list[str]:
    """The table read in sentences; every number and list is computed from the rows."""
    by = {r["tuner"]: r for r in ran}

    def st(r, c):
        return r["checks"][c]["status"]

    lora = by["LoRA"]
    lora_safe = lora["checks"]["half_merge_ulp"]["numbers"]
    lora_unsafe = lora["bf16_unsafe_merge"]["numbers"]
    normwise = [v for r in ran for v in r["bf16_normwise"].values() if isinstance(v, float)]
    core = ("forward_matches_dense", "merge_matches_forward", "merge_idempotent", "unmerge_restores")
    return [
        f"- **The core contract holds for most of PEFT in float64.** Forward = dense W', merge = unmerged, merge "
        f"twice and unmerge → W0 all pass for {sum(all(st(r, c) == 'passed' for c in core) for r in ran)} of "
        f"{len(ran)} rows.  Failing one of them: {_rows_where(ran, lambda r: any(st(r, c) == 'failed' for c in core))}"
        " -- mostly float32 arithmetic inside a float64 layer (errors 1e-8 to 1e-7; see the notes), OSF's "
        "missing unmerge, and BEFT (the checker's guard, not PEFT).",
        f"- **No PEFT tuner refuses an unmerge after the adapter changed while merged** (our contract asks for a "
        f"`ValueError`): PEFT subtracts the *current* update, so W0 comes back wrong -- for LoRA off by "
        f"{_g(lora.get('unmerge_after_change_w0_relerr', float('nan')))} relative after a 0.1·N(0, 1) step.  W0 "
        f"restored exactly anyway: {_rows_where(ran, lambda r: r.get('unmerge_after_change_w0_relerr', 1) < 1e-10)}"
        " (in PEFT 0.21.2 HiRA, FRoD and PEANuT keep a copy of W0 at merge and copy it back; BEFT never moves W).",
        f"- **Disable while merged works by unmerging.**  A forward inside `PeftModel.disable_adapter()` on a "
        f"merged layer calls `unmerge()` and the layer stays unmerged after the block (still merged after it: "
        f"{_rows_where(ran, lambda r: r.get('merged_after_disabled_forward') is True)}), so outputs are right "
        f"but the model is silently no longer merged, and tuners with an inexact unmerge lose precision there: "
        f"disable FAILs for {_rows_where(ran, lambda r: st(r, 'disable_gives_base') == 'failed')}.",
        f"- **Half-precision merges are fine normwise, not entrywise.**  Every normwise bf16 error is "
        f"≤ {max(normwise):.2f} u (u = 2⁻⁸), but the largest entrywise distance is many ulp (up to "
        f"{max(r['checks']['half_merge_ulp']['numbers'].get('bfloat16_ulps', 0) for r in ran)} bf16 ulp): with a "
        f"half-precision adapter, `get_delta_weight` returns ΔW (or the rotation) rounded to the half dtype and "
        f"the sum rounds again, which an entry of W' near 0 exposes.  Within 1 ulp in all four cases: "
        f"{_rows_where(ran, lambda r: st(r, 'half_merge_ulp') == 'passed')}.  With a float32 adapter on a bf16 "
        f"base most tuners round once, but these are > 1 ulp: "
        f"{_rows_where(ran, lambda r: r['checks']['half_merge_ulp']['numbers'].get('bfloat16_f32adapter_ulps', 0) > 1)}"
        f".  LoRA's `merge(safe_merge=True)` casts ΔW to the base dtype before the add, its unsafe path adds "
        f"in float32: LoRA, bf16 base, float32 adapter: {lora_safe.get('bfloat16_f32adapter_ulps')} ulp safe vs "
        f"{lora_unsafe.get('bfloat16_f32adapter_ulps')} ulp unsafe.",
        f"- **Checkpoints round-trip** (`save_pretrained`'s safetensors, and `adapter_config.json` → "
        f"`PeftConfig.from_pretrained` → fresh model) for all but "
        f"{_rows_where(ran, lambda r: st(r, 'state_dict_roundtrip') == 'failed')} (see its note).",
        "- **Where PEFT's contract is looser than ours, every tuner fails alike:** no closed-form parameter "
        "count (`param count` n/a), and no input validation (a list, an int/bool/complex tensor, a float32 x "
        "on a float64 layer or a wrong width reach `F.linear` and raise a `RuntimeError`/`AttributeError` that "
        "does not name `x`, or are accepted).",
        f"- **Inits draw from torch's global RNG** (two unseeded builds differ): "
        f"{_rows_where(ran, lambda r: r['global_rng'])}.  The others seed their own generator "
        "(e.g. VeRA's `projection_prng_key`) or have deterministic inits.",
    ]


def render(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    ran = [r for r in rows if r["status"] == "ran"]
    out = [
        "# PEFT's tuners under `lowrank_theory.testing.check_adapter`",
        "",
        f"Measured {DATE} with PEFT {info.get('peft')}, torch {info.get('torch')}, on "
        f"{info.get('processor')} ({info.get('platform')}).  Generated by `python benchmarks/peft_checks.py` "
        "(do not edit by hand); the numbers are also in "
        f"`benchmarks/results/peft_checks_{DATE}.json`.",
        "",
        USAGE,
        "## What was measured",
        "",
        "Each tuner adapts one seeded `nn.Linear` (float64 unless the check says otherwise; shapes 12×20 and "
        "17×9, or 12×16 and 20×8 for block-structured tuners); the checker moves every trainable tensor off its "
        "init by 0.3·N(0, 1) (seeded), so ΔW ≠ 0 everywhere but the identity check.  Cells: `pass` / "
        "**FAIL** with the measured number (a float64 relative error ‖a − b‖/‖b‖, or a count), `n/a` where "
        "the check does not apply (reasons under the table).  The checks' tolerances: float64 relative 1e-10; "
        "half-precision merges within 1 ulp of W0 + ΔW accumulated in float32 and rounded once.",
        "",
        "The ulp cell reads `fp16 half-adapter, fp16 f32-adapter / bf16 half-adapter, bf16 f32-adapter`: the "
        "largest entrywise distance, in units in the last place, between PEFT's `merge(safe_merge=True)` of a "
        "half-precision base and the correctly rounded float32 sum.  `bf16 unsafe` is the same bf16 figures "
        "through `merge(safe_merge=False)`.  Because one entry of W' near 0 has a tiny ulp, the largest ulp "
        "distance can be huge where the matrix as a whole is fine; `bf16 ‖err‖/u‖W'‖` is the normwise view: "
        "‖merge − W'‖_F / (u ‖W'‖_F), u = 2⁻⁸ (≤ 1 for a correctly rounded W'; half adapter, f32 adapter; "
        "safe path / unsafe path).  `unmerge refuses changed` shows ‖W − W0‖/‖W0‖ after merge, an "
        "optimizer-like step on the adapter, and unmerge.  `global RNG` says whether two builds without "
        "reseeding torch differ (PEFT's inits draw from torch's global RNG; the checks themselves seed it, "
        "forked, around each build).",
        "",
    ]
    cols = list(SHORT)
    header = (["tuner"] + [SHORT[c] for c in cols]
              + ["bf16 unsafe ulp (half, f32)", "bf16 ‖err‖/u‖W'‖ safe / unsafe", "global RNG", "dense W' from"])
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for r in ran:
        cells = [r["tuner"]] + [cell(c, r["checks"][c], r) for c in cols]
        u = r["bf16_unsafe_merge"]
        if u["numbers"]:
            cells.append(f"{'pass' if u['status'] == 'passed' else '**FAIL**'} "
                         f"{u['numbers']['bfloat16_ulps']}, {u['numbers']['bfloat16_f32adapter_ulps']}")
        else:
            cells.append("**FAIL** (raised)")
        nw = r["bf16_normwise"]
        cells.append(" / ".join(", ".join(_nw(nw[f"{p}_{m}"]) for m in ("half", "f32adapter"))
                                for p in ("safe", "unsafe")))
        cells.append("yes" if r["global_rng"] else "no")
        cells.append(r["dense_source"])
        out.append("| " + " | ".join(_escape(str(c)) for c in cells) + " |")
    out += ["", "## What the table says", "", *findings(ran), "", "## Summary", ""]
    for c in cols:
        st = [r["checks"][c]["status"] for r in ran]
        out.append(f"- **{SHORT[c]}** (`{c}`): {st.count('passed')} pass, {st.count('failed')} FAIL, "
                   f"{st.count('skipped')} n/a of {len(ran)}.")
    out += ["", "## Per tuner: notes, and each FAIL or n/a not explained above", ""]
    for r in ran:
        lines = []
        for c in cols:
            res = r["checks"][c]
            if c in COMMON or c == "half_merge_ulp" or res["status"] == "passed":
                continue
            if res["status"] == "skipped" and c == "identity_at_init":
                continue  # the note says why
            nums = ", ".join(f"{k}={_g(v)}" for k, v in res["numbers"].items())
            lines.append(f"  - `{c}` ({'n/a' if res['status'] == 'skipped' else 'FAIL'}): "
                         f"{_escape(res['message'][:300])}{f' [{nums}]' if nums else ''}")
        if "gradcheck_if_declared_exact" in r:
            lines.append(f"  - gradcheck run anyway: {r['gradcheck_if_declared_exact']}")
        notes = "".join(f" {n}." for n in r["notes"])
        out.append(f"- **{r['tuner']}** (`{r['layer']}`, {r['seconds']} s).{notes}")
        out += lines
    not_built = [r for r in rows if r["status"] != "ran"]
    out += ["", "## Not in the table", ""]
    for r in not_built:
        out.append(f"- **{r['tuner']}**: could not be constructed here: {_escape(r['error'][:300])}")
    for k, why in LEFT_OUT.items():
        out.append(f"- {k}: {why}.")
    out.append("")
    return "\n".join(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="labels (case-insensitive) to run; prints, writes nothing")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    todo = tuners()
    if args.only:
        want = {w.lower() for w in args.only}
        todo = [t for t in todo if t.label.lower() in want]
    rows = []
    for t in todo:
        row = run(t)
        rows.append(row)
        print(f"{t.label:20s} {row['status']:16s} {row.get('seconds', '')}", flush=True)
    info = machine_info()
    text = render(rows, info)
    if args.only:
        print(text)
        return
    DOCS.write_text(text)
    write_json(f"peft_checks_{DATE}", _jsonable(rows), extra={"date": DATE, "left_out": LEFT_OUT})
    print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
