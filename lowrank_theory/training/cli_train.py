"""``lowrank-theory train``: fine-tune a model with one method on one task, or compare several.

Examples::

    lowrank-theory train --model minilm --method loca --task teacher-lowrank --steps 100
    lowrank-theory train --task docstrings --compare lora,dora,vera,loca --steps 60 --out runs/cmp

A single run prints a summary (the task's metric and its baseline, final loss, trainable
parameters, wall time, peak memory) and writes ``metrics.jsonl`` / ``metrics.csv``, the
checkpoint and ``summary.json`` under ``--out``.  ``--compare`` runs every method on the same
task and data with the same settings and writes ``compare.csv``, ``compare.json`` and
``compare.png`` (metric per method, and the training-loss curves).

Method settings: each method starts from :data:`METHOD_DEFAULTS` (its size and learning rate;
the rates of LoCA, FourierFT and VeRA were picked from {2e-3, 1e-2, 5e-2} by a 40-step probe on
the docstring task);
``--rank`` / ``--alpha`` / ``--n-frequency`` override the matching constructor arguments of the
methods that take them, ``--cfg key=value`` any other, and ``--lr`` the learning rate of all.
``increlora`` and ``squeeze`` are AdaLoRA and LoRA adapters driven by their rank schedules;
``adalora`` and ``sora`` get their schedules by default (``--schedule none`` turns them off).
On the CPU the reported peak memory is the process's peak RSS so far (``getrusage``), so in
``--compare`` it never decreases from one method to the next; on CUDA it is the peak allocated.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["METHOD_DEFAULTS", "add_parser", "compare", "run_one"]

log = logging.getLogger(__name__)

#: Per method: adapter name, constructor defaults, learning rate, and default rank schedule.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"adapter": "lora", "cfg": {"rank": 8}, "lr": 2e-3},
    "dora": {"adapter": "dora", "cfg": {"rank": 8}, "lr": 2e-3},
    "pissa": {"adapter": "pissa", "cfg": {"rank": 8}, "lr": 2e-3},
    "vera": {"adapter": "vera", "cfg": {"rank": 256}, "lr": 1e-2},
    "loca": {"adapter": "loca", "cfg": {"n_frequency": 1000}, "lr": 1e-2},
    "fourierft": {"adapter": "fourierft", "cfg": {"n_frequency": 1000, "scaling": 150.0}, "lr": 5e-2},
    "adalora": {"adapter": "adalora", "cfg": {"rank": 8}, "lr": 2e-3, "schedule": "adalora"},
    "sora": {"adapter": "sora", "cfg": {"rank": 8}, "lr": 2e-3, "schedule": "sora"},
    "increlora": {"adapter": "adalora", "cfg": {"rank": 2}, "lr": 2e-3, "schedule": "increlora"},
    "squeeze": {"adapter": "lora", "cfg": {"rank": 16}, "lr": 2e-3, "schedule": "squeeze"},
}


def _method_spec(method: str) -> dict[str, Any]:
    from .. import adapters

    if method in METHOD_DEFAULTS:
        spec = METHOD_DEFAULTS[method]
        return {"adapter": spec["adapter"], "cfg": dict(spec["cfg"]), "lr": spec["lr"],
                "schedule": spec.get("schedule")}
    adapters.get(method)  # ValueError listing the names when unknown
    return {"adapter": method, "cfg": {}, "lr": 2e-3, "schedule": None}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_cfg(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--cfg expects key=value, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _adapter_config(adapter: str, base: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    from .. import adapters

    params = inspect.signature(adapters.get(adapter).__init__).parameters
    cfg = dict(base)
    for flag, key in (("rank", "rank"), ("alpha", "alpha"), ("n_frequency", "n_frequency")):
        value = getattr(args, flag, None)
        if value is not None and key in params:
            cfg[key] = value
    extra = _parse_cfg(getattr(args, "cfg", None))
    unknown = [k for k in extra if k not in params]
    if unknown:
        known = [k for k in params if k not in ("self", "d_out", "d_in")]
        raise ValueError(f"adapter {adapter!r} takes no argument(s) {unknown}; it takes {known}")
    cfg.update(extra)
    per_layer = "seed" in params and "basis_shape" not in params and "shared" not in params
    if "seed" in params and "seed" not in cfg:
        cfg["seed"] = args.seed
    return cfg, per_layer


def run_one(method: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Train ``method`` on ``args.task`` with the settings in ``args``; return the summary row."""
    import torch

    from .injection import inject
    from .schedules import make_schedule
    from .tasks import make_task
    from .trainer import TrainConfig, Trainer

    spec = _method_spec(method)
    cfg, per_layer = _adapter_config(spec["adapter"], spec["cfg"], args)
    schedule = spec["schedule"] if args.schedule == "auto" else (None if args.schedule == "none" else args.schedule)
    torch.manual_seed(args.seed)
    task = make_task(args.task, args.model, seed=args.seed, max_length=args.max_length)
    targets = args.targets.split(",") if args.targets else task.targets
    if args.targets and task.head is not None:
        targets = [t if t.startswith(("backbone.", "re:")) else f"backbone.{t}" for t in targets]
    inject(task.model, spec["adapter"], targets, layer_seeds=per_layer, **cfg)
    task.unfreeze_head()
    callbacks = [make_schedule(schedule, task.model, args.steps)] if schedule else []
    lr = args.lr if args.lr is not None else spec["lr"]
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr, rule=args.rule,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup, eval_every=args.eval_every,
        early_stop_patience=args.patience, early_stop_metric=task.metric, early_stop_mode=task.mode,
        out_dir=str(out_dir), seed=args.seed, progress=not args.no_progress, device=args.device,
        max_grad_norm=args.max_grad_norm, train_mode=not args.no_dropout, fsdp=getattr(args, "fsdp", False),
    )
    trainer = Trainer(task.model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn,
                      config=tcfg, callbacks=callbacks)
    start = trainer.evaluate()
    summary = trainer.fit(resume=args.resume)
    row = {
        "task": task.name, "model": args.model, "method": method, "adapter": spec["adapter"],
        "schedule": schedule or "", "lr": lr, "config": json.dumps(cfg, sort_keys=True),
        "metric": task.metric, "value": summary["eval"].get(task.metric, float("nan")),
        "start_value": start.get(task.metric, float("nan")),
        "eval_loss": summary["eval"].get("loss", float("nan")), "train_loss": summary["train_loss"],
        "baseline": task.info.get("majority_baseline", start.get("loss") if task.metric == "loss" else None),
        "trainable_params": summary["trainable_params"], "steps": summary["steps"],
        "seconds": round(summary["seconds"], 2), "peak_memory_mb": round(summary["peak_memory_mb"], 1),
        "device": summary["device"],
    }
    if "delta_error" in summary["eval"]:
        row["delta_error"] = summary["eval"]["delta_error"]
    row["losses"] = [r["loss"] for r in trainer.history if "loss" in r]
    if trainer.is_main:
        (out_dir / "summary.json").write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return row


def _print_summary(row: dict[str, Any]) -> None:
    base = row["baseline"]
    base_txt = "" if base is None else f" (baseline {base:.4g})"
    mem = "peak GPU" if row["device"].startswith("cuda") else "peak RSS"
    print(f"task {row['task']}  model {row['model']}  method {row['method']}"
          + (f" + {row['schedule']} schedule" if row["schedule"] else ""))
    print(f"  {row['metric']}: {row['start_value']:.4g} -> {row['value']:.4g}{base_txt}")
    print(f"  eval loss {row['eval_loss']:.4g}   train loss {row['train_loss']:.4g}")
    if "delta_error" in row:
        print(f"  relative error of the recovered update: {row['delta_error']:.4g}")
    print(f"  trainable params {row['trainable_params']:,}   steps {row['steps']}   "
          f"time {row['seconds']:.1f} s   {mem} {row['peak_memory_mb']:.0f} MB")


TABLE_KEYS = ("method", "schedule", "metric", "value", "start_value", "baseline", "eval_loss", "train_loss",
              "delta_error", "trainable_params", "seconds", "peak_memory_mb", "lr", "config")


def compare(methods: list[str], args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Run every method (same task, data and settings); write ``compare.{csv,json,png}`` under ``out``."""
    import csv

    rows = []
    for m in methods:
        log.info("compare: %s", m)
        rows.append(run_one(m, args, out / m))
    table = [{k: r.get(k, "") for k in TABLE_KEYS} for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(TABLE_KEYS))
        w.writeheader()
        w.writerows(table)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    _plot(rows, out / "compare.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["method"] for r in rows]
    ax1.bar(names, [r["value"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['trainable_params']:,}", (i, r["value"]), ha="center", va="bottom", fontsize=8)
    base = rows[0].get("baseline")
    if isinstance(base, int | float):
        ax1.axhline(base, color="gray", ls="--", lw=1, label="baseline")
        ax1.legend(loc="lower right")
    ax1.set_ylabel(f"test {rows[0]['metric']}")
    ax1.set_title(f"{rows[0]['task']} (labels: trainable params)")
    for r in rows:
        losses = r["losses"]
        k = max(1, min(5, len(losses) // 10))  # running mean over k steps: batch losses are noisy
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]
        ax2.plot(range(1, len(losses) + 1), smooth, label=r["method"], lw=1.2)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (running mean)")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("method", "value", "eval_loss", "trainable_params", "seconds", "peak_memory_mb")
    head = {"value": rows[0]["metric"], "peak_memory_mb": "peak MB", "trainable_params": "trainable"}
    cells = [[head.get(c, c) for c in cols]]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))

    for r in rows:
        cells.append([fmt(r[c]) for c in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    base = rows[0].get("baseline")
    if base is not None:
        print(f"baseline {rows[0]['metric']}: {base:.4g}")


def _cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        if args.compare:
            methods = [m.strip() for m in args.compare.split(",") if m.strip()]
            for m in methods:
                _method_spec(m)
            t0 = time.perf_counter()
            rows = compare(methods, args, out)
            _print_table(rows)
            print(f"table: {out / 'compare.csv'}  figure: {out / 'compare.png'}  ({time.perf_counter() - t0:.1f} s)")
        else:
            row = run_one(args.method, args, out)
            _print_summary(row)
    except (ValueError, TypeError) as exc:
        print(f"lowrank-theory train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object; return its parser."""
    p = subparsers.add_parser("train", help="fine-tune with one method on a task, or --compare several",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="minilm (offline), tiny-gpt2, or a Hugging Face name/directory")
    p.add_argument("--method", default="lora", help="adapter or method name (lora, dora, vera, loca, fourierft, ...)")
    p.add_argument("--compare", default=None, help="comma-separated methods to run on the same task")
    p.add_argument("--task", default="docstrings",
                   help="docstrings, teacher-lowrank, teacher-frequency, teacher-fullrank, file:<path>, hub:<name>")
    p.add_argument("--targets", default=None, help="comma-separated module names/suffixes (default: the task's)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--n-frequency", dest="n_frequency", type=int, default=None)
    p.add_argument("--cfg", action="append", metavar="KEY=VALUE", help="any other adapter argument (repeatable)")
    p.add_argument("--schedule", default="auto", choices=["auto", "none", "adalora", "sora", "increlora", "squeeze"])
    p.add_argument("--rule", default="adamw", help="optimizer rule: adamw, sgd, lora+, lorapro, altlora, allora")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--lr-schedule", dest="lr_schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=None)
    p.add_argument("--max-length", dest="max_length", type=int, default=None, help="tokens per text")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=0)
    p.add_argument("--patience", type=int, default=0, help="early stop after this many evaluations without gain")
    p.add_argument("--no-dropout", dest="no_dropout", action="store_true", help="train in eval mode (no dropout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--out", default="lrt-train", help="output folder (default: lrt-train)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (launch with torchrun)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(func=_cmd_train)
    return p
