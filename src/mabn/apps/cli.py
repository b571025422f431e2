"""The ``mabn`` command: one sub-command per module, loaded on demand."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import enable_huge_pages

#: sub-command -> module providing ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "demo": "mabn.apps.demo",
    "train": "mabn.apps.train",
    "reproduce": "mabn.apps.reproduce",
    "export": "mabn.apps.export",
    "stats": "mabn.apps.stats",
    "bench": "mabn.apps.bench",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _load(name: str):
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == COMMANDS[name]:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mabn", description="Moving Average Batch Normalization toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=doc[0] if doc else None)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    enable_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"mabn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mabn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
