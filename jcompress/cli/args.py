"""Argument types shared by the subcommands, and the parser that reports errors in one line.

Every number a subcommand takes is parsed by one of these ``type=`` functions, so a bad
value stops the command before anything is loaded: ``jcompress train --epochs 0`` prints
``jcompress train: error: argument --epochs: expected an integer >= 1, got '0'`` and exits
with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

__all__ = [
    "Parser",
    "fraction",
    "new_dir",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "rate",
    "seed",
    "widths",
]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE``, exit status 2.

    The usage text is left to ``--help``; subparsers made from it are of this class too.
    """

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _int(text: str, lo: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
    if value < lo:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (epochs, batch sizes)."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (fine-tuning epochs, where 0 means none)."""
    return _int(text, 0)


def seed(text: str) -> int:
    """A random seed: an integer >= 0."""
    return _int(text, 0)


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what} (finite), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures, byte and time budgets)."""
    value = _float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def rate(text: str) -> float:
    """A rate in [0, 1) (dropout): 1 would drop every unit."""
    value = _float(text, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def fraction(text: str) -> float:
    """A fraction in [0, 1] (the weight of a loss term, an accuracy drop)."""
    value = _float(text, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def widths(text: str) -> tuple[int, ...]:
    """``--widths 800,800``: comma-separated positive integers (hidden layer widths)."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 800,800, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 800,800, got {text!r}")
    return values


def new_dir(text: str) -> Path:
    """An output directory: a path that is a directory already or does not exist yet."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory; give a directory to write into")
    return path
