"""Per-layer forward+backward time and memory: our adapters vs PEFT's vs the frozen base.

    python benchmarks/adapters.py                          # CPU, d in {256, 1024}, fp32
    python benchmarks/adapters.py --device cuda --dtype bfloat16 --sizes 4096:8192 1024:4096
    python benchmarks/adapters.py --compile                # also ours and PEFT's torch.compile'd
    python benchmarks/adapters.py --alloc-only --dtype bfloat16 --sizes 4096:8192 1024:4096   # memory only

One frozen ``nn.Linear(d, d)`` and an input ``x`` (tokens × d, ``requires_grad`` as inside a
network, so the backward computes dx as well as the adapter's gradients).  Each method is
timed three ways in the same process: the base layer alone, PEFT's layer, ours
(``AdaptedLinear``).  Reported: median ms, the ratio of each to the base, ours/PEFT, and
memory: bytes of tensors saved for backward (from ``torch.autograd.graph.saved_tensors_hooks``),
the peak of tensors alive during one step (``alloc``, counted on fake tensors by
``lowrank_theory.theory.memory``; both device-independent) and, on CUDA, the peak allocated.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import print_table, time_call, write_json

from lowrank_theory.adapters.peers import PEFT_PEERS
from lowrank_theory.theory.memory import step_peak_bytes

# method -> (our registry name, our cfg, PEFT config factory, peer label)
METHODS: dict[str, tuple] = {
    key: (name, cfg, lambda P, f=factory: f(P, ["proj"]), peer)
    for key, (name, cfg, factory, peer) in PEFT_PEERS.items()
}
#: Measured by default.  The transform adapters run ``path="auto"`` there (the dense path at these
#: token counts); the ``*_structured`` entries force the per-token transform path for comparison.
DEFAULT_METHODS = list(METHODS)
METHODS["fourierft_n1000_structured"] = ("fourierft", {"n_frequency": 1000, "path": "structured"},
                                         METHODS["fourierft_n1000"][2], "fourierft")
METHODS["loca_n1000_structured"] = ("loca", {"n_frequency": 1000, "path": "structured"},
                                    METHODS["loca_n1000"][2], "fourierft")


class OneLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_ours(name: str, cfg: dict, base: nn.Linear) -> nn.Module:
    from lowrank_theory import adapters

    cls = adapters.get(name)
    base = copy.deepcopy(base)
    if hasattr(cls, "from_weight") and cls.needs_base:
        out = cls.from_weight(base.weight.detach(), **cfg)
        ad = out[0] if isinstance(out, tuple) else out
    else:
        ad = cls(base.out_features, base.in_features, **cfg)
    ad = ad.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():  # move away from the identity init so no zero shortcut is timed
        for p in ad.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return adapters.AdaptedLinear(base, ad)


def build_peft(factory: Callable, base: nn.Linear) -> nn.Module:
    import peft

    m = OneLayer(base.in_features).to(device=base.weight.device, dtype=base.weight.dtype)
    m.proj.load_state_dict(base.state_dict())
    pm = peft.get_peft_model(m, factory(peft))
    return pm.to(device=base.weight.device, dtype=base.weight.dtype)


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd saves for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    # the input itself is held by the caller anyway
    seen.pop(x.untyped_storage().data_ptr(), None)
    return int(sum(seen.values()))


def alloc_mb(layer: nn.Module, tokens: int, d: int, device: str, dtype: torch.dtype) -> float:
    """Peak tensor memory of one step of a copy of ``layer`` in MiB: the algorithm's allocations,
    counted on fake tensors, so the same on every device (:mod:`lowrank_theory.theory.memory`)."""
    return step_peak_bytes(copy.deepcopy(layer), tokens, d, dtype=dtype, device=device) / 2**20


def step_fn(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, cudagraphs: bool = False) -> Callable[[], None]:
    """One forward + backward; ``cudagraphs`` marks a new step for ``mode="reduce-overhead"``."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(gy)

    return step


def peak_mb(step: Callable[[], None], device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def compiled(layer: nn.Module, mode: str | None) -> tuple[nn.Module, bool]:
    """``torch.compile(layer, mode=mode)`` (eager when ``mode`` is None); True if it uses CUDA graphs."""
    if mode is None:
        return layer, False
    # a fresh cache per layer: every AdaptedLinear shares one forward, and past dynamo's recompile
    # limit (8 by default) a further instance would silently run eagerly
    torch._dynamo.reset()
    return torch.compile(layer, mode=None if mode == "default" else mode), mode == "reduce-overhead"


def run(sizes: list[tuple[int, int]], methods: list[str], device: str, dtype: torch.dtype,
        repeats: int, compile_mode: str | None = None, compile_peft: bool = False) -> list[dict]:
    """Time base, ours and PEFT per (d, tokens) and method; ``compile_mode`` compiles ours (and
    PEFT's too with ``compile_peft``)."""
    rows = []
    for d, tokens in sizes:
        torch.manual_seed(0)
        base = nn.Linear(d, d).to(device=device, dtype=dtype)
        for p in base.parameters():
            p.requires_grad_(False)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(tokens, d, device=device, dtype=dtype)
        t_base = time_call(step_fn(base, x, gy), repeats=repeats, device=device)
        for key in methods:
            ours_name, cfg, factory, _peer = METHODS[key]
            row = dict(method=key, d=d, tokens=tokens, dtype=str(dtype).split(".")[-1], base_ms=t_base)
            try:
                ours, graphs = compiled(build_ours(ours_name, cfg, base), compile_mode)
                s = step_fn(ours, x, gy, graphs)
                row["ours_ms"] = time_call(s, repeats=repeats, device=device)
                row["ours_x_base"] = row["ours_ms"] / t_base
                row["ours_saved_MB"] = saved_bytes(ours, x) / 2**20
                row["ours_peak_MB"] = peak_mb(s, device)
                if compile_mode is None:
                    row["ours_alloc_MB"] = alloc_mb(ours, tokens, d, device, dtype)
            except Exception as exc:  # recorded, not hidden
                row["ours_error"] = f"{type(exc).__name__}: {exc}"[:200]
            try:
                pm, graphs = compiled(build_peft(factory, base), compile_mode if compile_peft else None)
                s = step_fn(pm, x, gy, graphs)
                row["peft_ms"] = time_call(s, repeats=repeats, device=device)
                row["peft_x_base"] = row["peft_ms"] / t_base
                row["peft_saved_MB"] = saved_bytes(pm, x) / 2**20
                row["peft_peak_MB"] = peak_mb(s, device)
                if not (compile_mode and compile_peft):
                    row["peft_alloc_MB"] = alloc_mb(pm, tokens, d, device, dtype)
            except Exception as exc:
                row["peft_error"] = f"{type(exc).__name__}: {exc}"[:200]
            if "ours_ms" in row and "peft_ms" in row:
                row["ours_over_peft"] = row["ours_ms"] / row["peft_ms"]
            rows.append(row)
    return rows


def run_alloc(sizes: list[tuple[int, int]], methods: list[str], device: str, dtype: torch.dtype) -> list[dict]:
    """Only the device-independent peak tensor memory of one step (fake tensors: no arithmetic, so
    the GPU sizes take seconds on a CPU): base, ours and PEFT's, in MiB."""
    import peft

    rows = []
    for d, tokens in sizes:
        torch.manual_seed(0)
        base = nn.Linear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
        base_mb = alloc_mb(base, tokens, d, device, dtype)
        for key in methods:
            ours_name, cfg, factory, _peer = METHODS[key]
            ours = alloc_mb(build_ours(ours_name, cfg, base), tokens, d, device, dtype)
            theirs = alloc_mb(build_peft(factory, base), tokens, d, device, dtype)
            rows.append(dict(method=key, d=d, tokens=tokens, dtype=str(dtype).split(".")[-1], base_alloc_MB=base_mb,
                             ours_alloc_MB=ours, peft_alloc_MB=theirs, ours_over_peft_alloc=ours / theirs,
                             peft_version=peft.__version__))
    return rows


def run_eager_and_compiled(sizes: list[tuple[int, int]], methods: list[str], device: str, dtype: torch.dtype,
                           repeats: int, compile_mode: str | None) -> list[dict]:
    """:func:`run` eagerly and, with ``compile_mode``, again with ours and PEFT's compiled in that
    mode; the compiled ratios join each eager row as ``*_compiled_*`` columns."""
    rows = run(sizes, methods, device, dtype, repeats)
    if compile_mode:
        comp = run(sizes, methods, device, dtype, repeats, compile_mode, compile_peft=True)
        for r, c in zip(rows, comp):
            r["ours_compiled_x_base"] = c.get("ours_x_base")
            r["peft_compiled_x_base"] = c.get("peft_x_base")
            r["ours_compiled_peak_MB"] = c.get("ours_peak_MB")
            for k in ("ours_error", "peft_error"):
                if k in c:
                    r[f"compiled_{k}"] = c[k]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["256:512", "1024:1024"], help="d:tokens pairs")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="also time ours and PEFT's compiled in this torch.compile mode")
    p.add_argument("--alloc-only", action="store_true",
                   help="only the peak tensor memory of a step, on fake tensors (any size, no timing)")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes]
    if args.alloc_only:
        rows = run_alloc(sizes, args.methods, args.device, getattr(torch, args.dtype))
        print_table(rows, ["method", "d", "tokens", "base_alloc_MB", "ours_alloc_MB", "peft_alloc_MB",
                           "ours_over_peft_alloc"])
        write_json(args.name or f"adapters_alloc_{args.dtype}", rows, extra={"args": vars(args)}, out_dir=args.out)
        return 0
    rows = run_eager_and_compiled(sizes, args.methods, args.device, getattr(torch, args.dtype), args.repeats,
                                  args.compile)
    compiled_cols = ["ours_compiled_x_base", "peft_compiled_x_base"] if args.compile else []
    print_table(rows, ["method", "d", "tokens", "base_ms", "ours_x_base", "peft_x_base", "ours_over_peft",
                       *compiled_cols, "ours_saved_MB", "peft_saved_MB", "ours_alloc_MB", "peft_alloc_MB",
                       "ours_peak_MB", "peft_peak_MB"])
    for r in rows:
        for k in ("ours_error", "peft_error", "compiled_ours_error", "compiled_peft_error"):
            if k in r:
                print(r["method"], r["d"], k, r[k])
    name = args.name or f"adapters_{args.device.split(':')[0]}_{args.dtype}"
    write_json(name, rows, extra={"args": vars(args)}, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
