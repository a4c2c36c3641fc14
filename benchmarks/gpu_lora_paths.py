"""Measure before choosing: ways to compute a frozen-base + LoRA layer's forward + backward on a GPU.

    python benchmarks/gpu_lora_paths.py [--d 4096 --tokens 8192 --rank 16]

Every path computes the same y = x W0ᵀ + b + s (x Aᵀ) Bᵀ and the gradients for x, A, B (checked
against the unfused path in the same run).  Times are CUDA-event medians after warm-up, as ratios
to the frozen base layer's own forward + backward.  Also timed: the pieces (the base GEMM with and
without an accumulated C input, the skinny GEMMs, one read + write of the output), so the overhead
of each path can be attributed.  Writes ``results/gpu_lora_paths_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import print_table, time_call, write_json


def unfused(x, W, b, A, B, s):
    return F.linear(x, W, b) + s * ((x @ A.T) @ B.T)


class _InPlace(torch.autograd.Function):
    """Base GEMM first, then the rank-r term added in place (addmm_), hand-written backward."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, s):
        xa = x @ A.T
        y = F.linear(x, W, b)
        y.addmm_(xa, B.T, alpha=s)
        ctx.save_for_backward(x, xa, W, A, B)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, W, A, B = ctx.saved_tensors
        s = ctx.s
        gb = g @ B
        gx = g @ W
        gx.addmm_(gb, A, alpha=s)
        return gx, None, None, (gb.T @ x) * s, (g.T @ xa) * s, None


class _Concat(torch.autograd.Function):
    """One GEMM for x [W0; A]ᵀ (and g [W0 | B] backward), then the rank-r term in place."""

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, wa, wb):
        m = W.shape[0]
        wa[m:].copy_(A)
        out = x @ wa.T  # (T, m + r)
        y, xa = out[:, :m], out[:, m:]
        y.addmm_(xa, B.T, alpha=s)
        if b is not None:
            y.add_(b)
        ctx.save_for_backward(x, xa, B, A)
        ctx.s, ctx.m, ctx.wb = s, m, wb
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, B, A = ctx.saved_tensors
        s, n = ctx.s, x.shape[1]
        wb = ctx.wb
        wb[:, n:].copy_(B)
        out = g @ wb  # (T, n + r)
        gx, gb = out[:, :n], out[:, n:]
        gx.addmm_(gb, A, alpha=s)
        return gx, None, None, (gb.T @ x) * s, (g.T @ xa) * s, None, None, None


def main(argv: list[str] | None = None) -> int:
    from lowrank_theory.adapters.fused import lora_linear

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    dev, dt_ = "cuda", torch.bfloat16
    d, T, r, s = args.d, args.tokens, args.rank, 2.0
    torch.manual_seed(0)
    W = torch.randn(d, d, device=dev, dtype=dt_) / d**0.5
    b = torch.randn(d, device=dev, dtype=dt_)
    A = (torch.randn(r, d, device=dev, dtype=dt_) / d**0.5).requires_grad_()
    B = (torch.randn(d, r, device=dev, dtype=dt_) / r**0.5).requires_grad_()
    x = torch.randn(T, d, device=dev, dtype=dt_, requires_grad=True)
    g = torch.randn(T, d, device=dev, dtype=dt_)
    wa = torch.cat([W, A.detach()], 0).contiguous()  # (d + r, d)
    wb = torch.cat([W, B.detach()], 1).contiguous()  # (d, d + r)

    paths = {
        "base": lambda: F.linear(x, W, b),
        "unfused (3 modules + add)": lambda: unfused(x, W, b, A, B, s),
        "fused: rank-r term as GEMM C input (ours)": lambda: lora_linear(x, W, b, A, B, s),
        "in-place addmm_ after base GEMM": lambda: _InPlace.apply(x, W, b, A, B, s),
        "concat [W0; A] GEMM + addmm_": lambda: _Concat.apply(x, W, b, A, B, s, wa, wb),
    }
    ref = None
    rows = []

    def step(f):
        def run():
            x.grad = A.grad = B.grad = None
            f().backward(g)
        return run

    t_base = time_call(step(paths["base"]), repeats=args.repeats, warmup=5, device=dev)
    for name, f in paths.items():
        x.grad = A.grad = B.grad = None
        y = f()
        y.backward(g)
        got = (y.detach().float(), x.grad.float(), None if A.grad is None else A.grad.float())
        if name == "unfused (3 modules + add)":
            ref = got
        ms = time_call(step(f), repeats=args.repeats, warmup=5, device=dev)
        row = dict(path=name, ms=ms, x_base=ms / t_base)
        if ref is not None and name != "base":
            row["rel_err_y"] = float((got[0] - ref[0]).norm() / ref[0].norm())
            row["rel_err_dx"] = float((got[1] - ref[1]).norm() / ref[1].norm())
            row["rel_err_dA"] = float((got[2] - ref[2]).norm() / ref[2].norm())
        rows.append(row)
    # the pieces
    xd, gd = x.detach(), g
    C = torch.randn(T, d, device=dev, dtype=dt_)
    xa = xd @ A.detach().T
    pieces = {
        "GEMM x W0ᵀ": lambda: xd @ W.T,
        "GEMM x W0ᵀ + C (addmm, beta=1)": lambda: torch.addmm(C, xd, W.T),
        "GEMM x [W0; A]ᵀ (concat)": lambda: xd @ wa.T,
        "skinny x Aᵀ (T×d×r)": lambda: xd @ A.detach().T,
        "skinny (xA)Bᵀ (T×r×d)": lambda: xa @ B.detach().T,
        "in-place C.addmm_(xA, Bᵀ)": lambda: C.addmm_(xa, B.detach().T),
        "weight grad gᵀ (xA) (d×T×r)": lambda: gd.T @ xa,
        "copy T×d (read + write)": lambda: C.copy_(xd),
    }
    for name, f in pieces.items():
        ms = time_call(f, repeats=args.repeats, warmup=5, device=dev)
        rows.append(dict(path="piece: " + name, ms=ms, x_base=ms / t_base))
    print(f"device {torch.cuda.get_device_name(0)}  d={d} tokens={T} rank={r} bf16; base fwd+bwd {t_base:.3f} ms")
    print_table(rows, ["path", "ms", "x_base", "rel_err_y", "rel_err_dx", "rel_err_dA"])
    gpu = torch.cuda.get_device_name(0).replace(" ", "-")
    write_json(f"gpu_lora_paths_{gpu}_{dt.date.today().isoformat()}", rows,
               extra={"args": vars(args), "base_ms": t_base}, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
