"""`recmerge` console script. Each subcommand lives in app/commands/<name>.py and exposes
`register(subparsers)`; heavy imports happen inside the handlers so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

# Explicit registration: a command exists because it is listed here, not because a module was imported.
COMMANDS = ["data", "train", "evaluate", "recommend", "compare", "fisher", "merge", "plot", "serve", "db"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recmerge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"app.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"app.commands.{name}":
                raise
            continue  # a command whose module is not written yet is simply not offered
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.errors import RecmergeError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except RecmergeError as e:
        print(f"recmerge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"recmerge {args.command}: error: {e.filename}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
