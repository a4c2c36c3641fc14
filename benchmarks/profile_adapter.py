"""Where an adapter's step spends its time: torch.profiler kernel table for one layer's fwd + bwd.

    python benchmarks/profile_adapter.py lora_r16 dora_r16 --device cuda --dtype bfloat16 --size 4096:8192

Uses the same layers as ``benchmarks/adapters.py`` (ours through ``AdaptedLinear``) and prints, per
method, the kernels sorted by device (or CPU) time over ``--steps`` steps, so a gap to the roofline
floor can be attributed to named kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapters as adapter_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", choices=list(adapter_bench.METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--size", default="512:1024", help="d:tokens")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args(argv)
    d, tokens = (int(v) for v in args.size.split(":"))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(device=args.device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, d, device=args.device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, d, device=args.device, dtype=dtype)
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for key in ["base", *args.methods]:
        layer = base if key == "base" else adapter_bench.build_ours(*adapter_bench.METHODS[key][:2], base)
        step = adapter_bench.step_fn(layer, x, gy)
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"\n=== {key}  d={d} tokens={tokens} {args.dtype}  ({args.steps} steps)")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
