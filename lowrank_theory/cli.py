"""Command line: ``lowrank-theory info | reproduce | train | bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, adapters, backend, linalg

    data = {"lowrank_theory": __version__, **backend.info()}
    data["adapters"] = adapters.names()
    data["linalg"] = sorted(linalg.__all__)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v)) if v else "-"
        print(f"{k:<{width}}  {v}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    import time

    from .experiments import names
    from .experiments.report import run_experiments

    unknown = [n for n in args.names if n not in names()]
    if unknown:
        print(f"unknown experiment(s): {', '.join(unknown)}; known: {', '.join(names())}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    summaries = run_experiments(args.names or None, args.out, scale=args.scale, backend=args.backend,
                                device=args.device, seed=args.seed, progress=not args.no_progress)
    failed = [s for s in summaries if s["problems"]]
    for s in summaries:
        state = "skipped: " + s["skipped"] if s.get("skipped") else ("ok" if not s["problems"] else "CLAIM FAILS")
        print(f"{s['name']:<16} {s['seconds']:7.1f} s  {s['rows']:5d} rows  {state}")
    print(f"report: {args.out}/index.html  ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-theory", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="backends found, devices, versions, registered methods")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pi.set_defaults(func=_cmd_info)
    pr = sub.add_parser("reproduce", help="run the experiments, write figures, tables and a report")
    pr.add_argument("names", nargs="*", help="experiments to run (default: all)")
    g = pr.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="scale", action="store_const", const="quick", help="small sizes (default)")
    g.add_argument("--full", dest="scale", action="store_const", const="full", help="the papers' sizes")
    pr.set_defaults(scale="quick", func=_cmd_reproduce)
    pr.add_argument("--backend", choices=["numpy", "torch", "cupy"], default="numpy",
                    help="array backend for the experiments that take one (gradients, complexity); "
                         "the expressivity solvers always run in NumPy/SciPy float64")
    pr.add_argument("--device", default="cpu", help="cpu or cuda[:i] (torch backend)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default="lrt-out", help="output folder (default: lrt-out)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .training.cli_train import add_parser as _add_train
    _add_train(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
