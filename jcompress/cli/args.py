"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse

__all__ = ["widths"]


def widths(text: str) -> tuple[int, ...]:
    """``--widths 800,800``: comma-separated positive integers (hidden layer widths)."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 800,800, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 800,800, got {text!r}")
    return values
