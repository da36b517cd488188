"""The ``jcompress`` command line: train, demo, bench, distill, advise, run (experiments) and oneshot.

Each subcommand is a module of this package with ``register(subparsers)``; the library
modules they drive are imported when a command runs, never the other way round.

Every number is checked by an argument type (:mod:`jcompress.cli.args`) before anything is
loaded, and every failure a user can fix (a bad value, a missing file, an unknown name, a
run directory holding another run) ends in one line ``jcompress CMD: error: ...`` and exit
status 2; ``--verbose`` adds the full message and the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from jcompress.cli import advise, demo, distill, oneshot, run, train
from jcompress.cli.args import Parser

__all__ = ["build_parser", "main"]

COMMANDS = (train, demo, distill, run, advise, oneshot)

# The errors a user can fix from the command line; anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, TypeError, OSError, ImportError, RuntimeError)
MAX_MESSAGE = 400


def build_parser() -> argparse.ArgumentParser:
    """The ``jcompress`` parser with every subcommand of :data:`COMMANDS`."""
    parser = Parser(prog="jcompress", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="full error messages with their traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for p in sub.choices.values():  # also accepted after the subcommand; SUPPRESS keeps the top-level value
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(command_parser=p)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE].rstrip() + " ... (--verbose for the full message)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code.

    Errors a user can fix (bad values, missing files, unknown names) print
    ``jcompress CMD: error: ...`` and return 2 (argument errors exit with 2).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except EXPECTED as e:
        if args.verbose:
            traceback.print_exc()
            print(f"jcompress {args.command}: error: {e}", file=sys.stderr)
        else:
            print(f"jcompress {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
