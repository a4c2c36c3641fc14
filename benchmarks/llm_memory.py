"""Peak memory of one training step of Llama-3-8B with adapters, ours vs PEFT's, per FSDP rank -- on a CPU.

    python benchmarks/llm_memory.py                   # every method, ckpt off/on, bf16/NF4 base, 1 and 8 ranks
    python benchmarks/llm_memory.py --methods lora_r16 dora_r16 --seq-len 4096
    python benchmarks/llm_memory.py --verify-full     # also trace all 32 blocks once and check the extrapolation
    python benchmarks/llm_memory.py --batch 8 --tag b8   # 16k tokens per rank: where "fits 80 GB" starts to bite

Everything comes from :func:`lowrank_theory.theory.llm_memory.training_step_memory`: the step is traced on
meta tensors (no storage, no arithmetic), so the 8B model costs nothing; the optimizer states and the FSDP
sharding are arithmetic (see that module's docstring for the formulas).  Ours and PEFT's adapters are
injected into the same decoder in the same run; ``ours/PEFT`` is the ratio of the two peaks.  Writes
``results/llm_memory_<date>.json`` (every breakdown) and ``results/llm_memory_<date>.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, print_table, write_json

from lowrank_theory.theory.llm_decoder import LLAMA3_8B
from lowrank_theory.theory.llm_memory import METHODS, GiB, combine, measure

DEVICE_BYTES = 80e9


def run(methods: list[str], seq_len: int, batch: int, ranks: list[int], gathered_blocks: int) -> list[dict]:
    rows = []
    for method in methods:
        for quant in (None, "nf4"):
            for ckpt in (False, True):
                got = {}
                for impl in ("ours", "peft"):
                    t0 = time.perf_counter()
                    st, caches, act = measure(method, LLAMA3_8B, seq_len=seq_len, batch=batch, base_quant=quant,
                                              checkpointing=ckpt, impl=impl)
                    got[impl] = (st, caches, act, time.perf_counter() - t0)
                for R in ranks:
                    ours, peft = (combine(method, impl, *got[impl][:1], caches=got[impl][1],
                                          activations=got[impl][2], fsdp_ranks=R, gathered_blocks=gathered_blocks)
                                  for impl in ("ours", "peft"))
                    rows.append({
                        "method": method, "peer": f"peft {METHODS[method].peer}", "base": quant or "bf16",
                        "ckpt": "on" if ckpt else "off", "ranks": R,
                        "ours_gib": ours.total / GiB, "peft_gib": peft.total / GiB,
                        "ours/peft": ours.total / peft.total,
                        "fits80_ours": "yes" if ours.total <= DEVICE_BYTES else "no",
                        "fits80_peft": "yes" if peft.total <= DEVICE_BYTES else "no",
                        "act_ours_gib": ours.activations / GiB, "act_peft_gib": peft.activations / GiB,
                        "trainable_ours": ours.trainable, "trainable_peft": peft.trainable,
                        "ours": ours.as_dict(), "peft": peft.as_dict(),
                        "seconds": round(got["ours"][3] + got["peft"][3], 2),
                    })
    return rows


def verify_full(seq_len: int, batch: int) -> list[dict]:
    """Trace all 32 blocks (LoRA, ours; both checkpointing modes) and compare with the 2/3-block extrapolation."""
    out = []
    for ckpt in (False, True):
        t0 = time.perf_counter()
        full = measure("lora_r16", LLAMA3_8B, seq_len=seq_len, batch=batch, checkpointing=ckpt, trace_layers=None)
        ext = measure("lora_r16", LLAMA3_8B, seq_len=seq_len, batch=batch, checkpointing=ckpt)
        out.append({"method": "lora_r16", "ckpt": "on" if ckpt else "off", "full_trace": full[2],
                    "extrapolated": ext[2], "equal": full[1:] == ext[1:],
                    "seconds": round(time.perf_counter() - t0, 1)})
    print_table(out, ["method", "ckpt", "full_trace", "extrapolated", "equal", "seconds"])
    return out


def nf4_storage() -> dict:
    """Bytes of the seven projections of every block (packed codes + float32 scales per 64 vs bf16) and of the
    whole frozen base (the embedding, head and norms stay bf16 in both)."""
    from lowrank_theory.adapters.quantized_base import QuantizedLinear
    from lowrank_theory.theory.llm_memory import build_model, static_bytes

    nf4 = build_model("lora_r16", LLAMA3_8B, base_quant="nf4")
    packed = [m for m in nf4.modules() if isinstance(m, QuantizedLinear)]
    q = sum(m.storage_bytes() for m in packed)
    b = sum(2 * m.in_features * m.out_features for m in packed)
    s16, s4 = static_bytes(build_model("lora_r16", LLAMA3_8B)), static_bytes(nf4)
    whole16, whole4 = s16.base_params + s16.base_buffers, s4.base_params + s4.base_buffers
    out = {"projections_bf16": b, "projections_nf4": q, "projections_ratio": q / b,
           "base_bf16": whole16, "base_nf4": whole4, "base_ratio": whole4 / whole16}
    assert out["projections_ratio"] <= 0.3, out
    print(f"NF4 storage: projections {q / GiB:.2f} GiB vs bf16 {b / GiB:.2f} GiB = {q / b:.4f}x; whole frozen base "
          f"{whole4 / GiB:.2f} vs {whole16 / GiB:.2f} GiB = {whole4 / whole16:.4f}x")
    return out


def markdown(rows: list[dict], seq_len: int, batch: int, gathered_blocks: int, check: list[dict] | None,
             nf4: dict) -> str:
    date = _dt.date.today().isoformat()
    lines = [
        f"# Llama-3-8B, one training step: peak GiB per device ({date})",
        "",
        f"`python benchmarks/llm_memory.py` (torch {torch.__version__}); sequence {seq_len}, batch {batch} per rank, "
        "bf16 weights and activations, adapters on q,k,v,o,gate,up,down of all 32 blocks, AdamW over fp32 "
        f"master weights; 8 ranks = FSDP2 full shard with the root group and {gathered_blocks} block gathered. "
        "Activations traced on meta tensors (exact, see `lowrank_theory/theory/llm_memory.py`); optimizer and "
        "sharding modelled.  Not included: CUDA context and library workspaces (~0.5-1 GiB), fragmentation.  "
        "`fits` compares with 80 GB = 74.5 GiB.",
        "",
        "| method (PEFT peer) | base | ckpt | ranks | ours GiB | PEFT GiB | ours/PEFT | fits 80 GB ours / PEFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} ({r['peer']}) | {r['base']} | {r['ckpt']} | {r['ranks']} | "
                     f"{r['ours_gib']:.2f} | {r['peft_gib']:.2f} | {r['ours/peft']:.3f} | "
                     f"{r['fits80_ours']} / {r['fits80_peft']} |")
    lines += ["", f"NF4 base storage: the 224 projections {nf4['projections_nf4'] / GiB:.2f} GiB vs "
              f"{nf4['projections_bf16'] / GiB:.2f} GiB in bf16 = **{nf4['projections_ratio']:.4f}x** (4-bit codes + a "
              f"float32 scale per 64 entries, against 16 bits); the whole frozen base (embedding and head stay bf16) "
              f"{nf4['base_nf4'] / GiB:.2f} vs {nf4['base_bf16'] / GiB:.2f} GiB = {nf4['base_ratio']:.4f}x."]
    if check:
        lines += ["", "Extrapolation check (LoRA, ours): all 32 blocks traced vs 2 and 3 blocks extrapolated, "
                  "activation peak in bytes:", ""]
        lines += [f"- ckpt {c['ckpt']}: {c['full_trace']} vs {c['extrapolated']} -> equal: {c['equal']}"
                  for c in check]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--gathered-blocks", type=int, default=1)
    ap.add_argument("--verify-full", action="store_true")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--tag", default="", help="suffix of the result files' names (e.g. b8 for --batch 8)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.methods, args.seq_len, args.batch, args.ranks, args.gathered_blocks)
    print_table(rows, ["method", "base", "ckpt", "ranks", "ours_gib", "peft_gib", "ours/peft", "fits80_ours",
                       "fits80_peft", "act_ours_gib", "act_peft_gib"])
    check = verify_full(args.seq_len, args.batch) if args.verify_full else None
    nf4 = nf4_storage()
    name = f"llm_memory_{_dt.date.today().isoformat()}" + (f"_{args.tag}" if args.tag else "")
    extra = {"config": LLAMA3_8B.__dict__, "seq_len": args.seq_len, "batch": args.batch,
             "gathered_blocks": args.gathered_blocks, "extrapolation_check": check, "nf4_storage": nf4,
             "seconds": round(time.perf_counter() - t0, 1)}
    write_json(name, rows, extra, out_dir=Path(args.out) if args.out else None)
    md = (Path(args.out) if args.out else RESULTS) / f"{name}.md"
    md.write_text(markdown(rows, args.seq_len, args.batch, args.gathered_blocks, check, nf4))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
