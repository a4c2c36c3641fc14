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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-theory", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="backends found, devices, versions, registered methods")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pi.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
