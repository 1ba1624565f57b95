"""`recmerge` console script. Each subcommand lives in app/commands/<name>.py and exposes
`register(subparsers)`; heavy imports happen inside the handlers so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

# Explicit registration: a command exists because it is listed here, not because a module was imported.
COMMANDS = {
    "data": "prepare datasets",
    "train": "train a recommender with a recipe",
    "evaluate": "evaluate a checkpoint on a prepared dataset",
    "recommend": "top-k recommendations for a user of the dataset",
    "compare": "error inconsistency between two checkpoints",
    "fisher": "estimate the diagonal Fisher of a checkpoint",
    "merge": "merge checkpoints",
    "plot": "draw the thesis's figures from logs and models",
    "serve": "run the REST API",
    "db": "database schema",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the chosen command's module is imported (torch takes seconds to import); the others
    appear in --help by name."""
    parser = argparse.ArgumentParser(prog="recmerge", description="Train, merge and serve sequential recommenders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, text in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"app.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.errors import RecmergeError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
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
