"""The ``jcompress`` command line: train, demo, bench, distill, advise and run (experiments).

Each subcommand is a module of this package with ``register(subparsers)``; the library
modules they drive are imported when a command runs, never the other way round.
"""

from __future__ import annotations

import argparse
import sys

from jcompress.cli import advise, demo, distill, run, train

__all__ = ["build_parser", "main"]

COMMANDS = (train, demo, distill, run, advise)


def build_parser() -> argparse.ArgumentParser:
    """The ``jcompress`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="jcompress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code.

    Errors a user can fix (bad values, missing files, unknown names) print
    ``jcompress CMD: error: ...`` and return 2.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"jcompress {args.command}: error: {e}", file=sys.stderr)
        return 2
