"""Sparsity of a params or masks tree: per-layer and total counts, as a dict or a table.

For a params tree an entry counts as pruned when it equals zero; for a bool masks tree
when it is False. Leaves are named by their slash-joined path.

Example:
  >>> s = sparsity_summary(pruned_params, names=['fc1/kernel', 'fc2/kernel'])
  >>> s['total']['sparsity'], s['layers']['fc1/kernel']['zeros']
  >>> print(format_summary(s))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jcompress import tree as jtree

__all__ = ["format_summary", "sparsity_summary"]


def _counts(size: int, zeros: int) -> dict:
    return {
        "size": size,
        "zeros": zeros,
        "nonzeros": size - zeros,
        "sparsity": zeros / size if size else 0.0,
        "density": (size - zeros) / size if size else 0.0,
    }


def sparsity_summary(tree: Any, *, names: Sequence[str] | None = None) -> dict:
    """Per-leaf and total zero counts of a params tree or a bool masks tree.

    Args:
      tree: params (zeros count as pruned) or bool masks (False counts as pruned); a
        dict, NNX State or any pytree. Values must be concrete (not traced).
      names: the leaves to report (slash-joined names, e.g. from
        ``jc.core.spec.select_names(params, r'kernel')``); ``None`` reports every leaf.

    Returns:
      ``{'layers': {name: counts}, 'total': counts}`` where ``counts`` holds the ints
      ``size``, ``zeros``, ``nonzeros`` and the floats ``sparsity``, ``density``.
    """
    leaves = jtree.named_leaves(tree)
    if names is not None:
        by_name = dict(leaves)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"names {unknown} are not leaves of the tree; leaves are {sorted(by_name)[:12]}")
        leaves = [(n, by_name[n]) for n in names]
    layers = {}
    for name, leaf in leaves:
        arr = np.asarray(leaf)
        zeros = int(arr.size - np.count_nonzero(arr))
        layers[name] = _counts(int(arr.size), zeros)
    size = sum(c["size"] for c in layers.values())
    zeros = sum(c["zeros"] for c in layers.values())
    return {"layers": layers, "total": _counts(size, zeros)}


def format_summary(summary: dict) -> str:
    """A plain-text table of a :func:`sparsity_summary` result (one row per leaf + total)."""
    rows = [(name, c) for name, c in summary["layers"].items()] + [("total", summary["total"])]
    width = max(len("layer"), *(len(n) for n, _ in rows))
    head = f"{'layer':<{width}}  {'size':>12}  {'nonzeros':>12}  {'sparsity':>8}"
    lines = [head, "-" * len(head)]
    for name, c in rows:
        lines.append(f"{name:<{width}}  {c['size']:>12,d}  {c['nonzeros']:>12,d}  {c['sparsity']:>8.2%}")
    return "\n".join(lines)
