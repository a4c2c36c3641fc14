"""Command line of lowrank_theory: reproduce the papers' figures, train adapters, look methods up.

Subcommands: info (backends, devices, versions, every method), reproduce (run the experiments,
write figures, tables and a report), train (fine-tune with one method, or compare several).
A mistake in the options is one "error:" line and exit status 2, before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

__all__ = ["build_parser", "main"]


def _error(command: str, message: str) -> int:
    print(f"lowrank-theory {command}: error: {message}", file=sys.stderr)
    return 2


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch (``RANK``), or a process not launched by it."""
    return os.environ.get("RANK", "0") in ("", "0")


def _cmd_info(args: argparse.Namespace) -> int:
    if args.name:
        from . import method_index

        try:
            method_index.entry(args.name)
        except ValueError as exc:
            return _error("info", str(exc))
        if args.json:
            print(json.dumps(method_index.describe(args.name), indent=2))
        else:
            print(method_index.format_entry(args.name))
        return 0
    from . import __version__, adapters, backend, linalg, method_index
    from .training.cli_train import method_names
    from .training.optim import RULES

    data = {"lowrank_theory": __version__, **backend.info()}
    data["adapters"] = adapters.names()
    data["methods"] = method_names()
    data["rules"] = list(RULES)
    data["tools"] = method_index.names("tool")  # paper methods for a user's own loop (not train names)
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


def _state(e: dict) -> str:
    return {"holds": "holds", "partly": "holds partly", "fails": "DOES NOT HOLD",
            "skipped": f"skipped: {e.get('skipped')}", "error": f"ERROR: {e.get('error')}"}[e["status"]]


def _cmd_reproduce(args: argparse.Namespace) -> int:
    import time

    from .experiments import EXPERIMENTS
    from .preflight import check_backend, check_device, check_output_dir

    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        return _error("reproduce", f"unknown experiment(s): {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")
    twice = sorted({n for n in args.names if args.names.count(n) > 1})
    if twice:
        return _error("reproduce", f"experiment(s) given more than once: {', '.join(twice)}")
    try:
        check_output_dir(args.out)
        check_backend(args.backend)
        check_device(args.device)
    except ValueError as exc:
        return _error("reproduce", str(exc))
    from .experiments.report import run_experiments

    t0 = time.perf_counter()
    entries = run_experiments(args.names or None, args.out, scale=args.scale, backend=args.backend,
                              device=args.device, seed=args.seed, progress=not args.no_progress,
                              argv=["lowrank-theory", *args.argv])
    if _is_main_process():
        for e in entries:
            print(f"{e['name']:<18} {e['seconds']:7.1f} s  {e['rows']:5d} rows  {_state(e)}")
        print(f"report: {os.path.join(args.out, 'index.html')}  ({time.perf_counter() - t0:.1f} s)")
    return 1 if any(e["status"] in ("fails", "error") for e in entries) else 0


class _Parser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (``prog: error: message (see prog --help)``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lowrank-theory`` argument parser (subcommands info, reproduce, train)."""
    from .experiments import EXPERIMENTS

    p = _Parser(prog="lowrank-theory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,reproduce,train}")
    pi = sub.add_parser("info", help="backends, devices, versions, every method and rule; or one method's entry",
                        description="Without NAME: backends found, devices, versions, every registered adapter, "
                                    "every name `train --method` accepts and the training rules.  With NAME: that "
                                    "method's index entry (paper, formula, class and file, parameter count, tests, "
                                    "proofs, notebooks, PEFT counterpart, export support; docs/methods.md).")
    pi.add_argument("name", nargs="?", metavar="NAME", help="a method, adapter or training rule (e.g. loca, lorapro)")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pi.set_defaults(func=_cmd_info)
    pr = sub.add_parser("reproduce", help="run the experiments, write figures, tables and a report",
                        description="Run the experiments (all, or those named), write each one's table "
                                    "(CSV + JSON), figure (PNG + SVG) and deciding numbers, and a report "
                                    "(index.html, report.md, summary.json).  Exit status 1 when a claim "
                                    "does not hold.")
    pr.add_argument("names", nargs="*", metavar="NAME",
                    help="experiments to run, in this order (default: all): " + ", ".join(EXPERIMENTS))
    g = pr.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="scale", action="store_const", const="quick", help="small sizes (default)")
    g.add_argument("--full", dest="scale", action="store_const", const="full", help="the papers' sizes")
    pr.set_defaults(scale="quick", func=_cmd_reproduce)
    pr.add_argument("--backend", choices=["numpy", "torch", "cupy"], default="numpy",
                    help="array backend of the experiments that take one (gradients); the others say in "
                         "the report what they compute with")
    pr.add_argument("--device", default="cpu", help="cpu or cuda[:i], for the torch computations")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default="lrt-out", help="output folder (default: lrt-out)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .training.cli_train import add_parser as _add_train
    _add_train(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
