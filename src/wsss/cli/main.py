"""The ``wsss`` command: one subcommand per step of the pipeline."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import WSSSError

# Modules under wsss.cli, in the order of the data flow; each has add_parser(subparsers) and run(args).
SUBCOMMANDS = ("synth", "prepare", "check_data", "train", "entropy", "cam", "pseudo", "predict", "eval", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description="Weakly supervised semantic segmentation toolkit")
    parser.add_argument("--version", action="version", version=f"wsss {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"wsss.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"wsss.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except WSSSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
