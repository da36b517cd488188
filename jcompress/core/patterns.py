"""Sparsity patterns as values, shared by magnitude/score pruning and the one-shot solvers.

A pattern says which groups of weights are kept or removed together:

- :class:`Unstructured`: any weight.
- :class:`NM`: ``n`` of every ``m`` consecutive weights along ``axis`` are *kept*
  (``NM(2, 4)`` is the 2:4 sparsity of sparse tensor cores; for a Dense kernel
  ``(in, out)`` the groups run along the inputs, ``axis=-2``).
- :class:`Block`: ``rows x cols`` tiles of the matrix view, kept or removed whole.
- :class:`Units`: whole output units (neurons, conv filters) along ``axis``, scored by
  the ``l1`` or ``l2`` norm of their weights; the pattern that hard pruning turns into
  a smaller dense model.

Example:
  >>> jc.pruning.magnitude(sparsity=0.5, pattern=jc.NM(2, 4))
  >>> jc.oneshot.sparsegpt(stats, pattern=jc.NM(2, 4))
"""

from __future__ import annotations

import dataclasses

from jcompress.core.spec import check_value

__all__ = ["NM", "Block", "Pattern", "Units", "Unstructured", "check_pattern"]


@dataclasses.dataclass(frozen=True)
class Unstructured:
    """Any weight may be removed on its own."""


@dataclasses.dataclass(frozen=True)
class NM:
    """Keep ``n`` of every ``m`` consecutive weights along ``axis`` (``1 <= n < m``)."""

    n: int
    m: int
    axis: int = -2

    def __post_init__(self):
        m = check_value(self.m, arg="NM.m", kind=int, lo=2)
        n = check_value(self.n, arg="NM.n", kind=int, lo=1)
        if n >= m:
            raise ValueError(f"NM(n={n}, m={m}): n is the number kept of every m and must be in [1, m - 1]")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "axis", check_value(self.axis, arg="NM.axis", kind=int))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


@dataclasses.dataclass(frozen=True)
class Block:
    """``rows x cols`` tiles of the (flattened to 2-D) weight, kept or removed together."""

    rows: int = 1
    cols: int = 4
    norm: str = "l1"

    def __post_init__(self):
        object.__setattr__(self, "rows", check_value(self.rows, arg="Block.rows", kind=int, lo=1))
        object.__setattr__(self, "cols", check_value(self.cols, arg="Block.cols", kind=int, lo=1))
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"Block.norm={self.norm!r} must be 'l1' or 'l2'")


@dataclasses.dataclass(frozen=True)
class Units:
    """Whole units along ``axis`` (default: the outputs of a Dense or conv kernel)."""

    axis: int = -1
    norm: str = "l1"

    def __post_init__(self):
        object.__setattr__(self, "axis", check_value(self.axis, arg="Units.axis", kind=int))
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"Units.norm={self.norm!r} must be 'l1' or 'l2'")


Pattern = Unstructured | NM | Block | Units


def check_pattern(pattern, *, arg: str = "pattern") -> Pattern:
    """``pattern`` if it is one of the pattern types, else a TypeError naming ``arg``."""
    if isinstance(pattern, (Unstructured, NM, Block, Units)):
        return pattern
    raise TypeError(
        f"{arg}={pattern!r} must be a pattern value: Unstructured(), NM(n, m), Block(rows, cols) or Units(axis=-1)"
    )
