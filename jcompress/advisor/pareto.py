"""The Pareto front of measured rows (higher validation accuracy, fewer bytes, lower latency)."""

from __future__ import annotations

from collections.abc import Sequence

from jcompress.advisor.records import OBJECTIVES

__all__ = ["pareto_front"]


def _close(a: float, b: float, tol: float) -> bool:
    return a == b or abs(a - b) <= tol * max(abs(a), abs(b))


def _overlap(a: dict, b: dict, columns: tuple[str, str] | None) -> bool:
    """Whether the spreads ``[low, high]`` of ``a`` and ``b`` overlap (both must have them)."""
    if columns is None or any(r.get(c) is None for r in (a, b) for c in columns):
        return False
    lo, hi = columns
    return float(a[lo]) <= float(b[hi]) and float(b[lo]) <= float(a[hi])


def _dominates(a: dict, b: dict, objectives: dict, tolerance: dict, spread: dict) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    strictly = False
    for key, sense in objectives.items():
        x, y, tol = float(a[key]), float(b[key]), float(tolerance.get(key, 0.0))
        if _close(x, y, tol) or _overlap(a, b, spread.get(key)):
            continue
        better = x > y if sense == "max" else x < y
        if not better:
            return False
        strictly = True
    return strictly


def pareto_front(
    rows: Sequence[dict],
    *,
    objectives: dict | None = None,
    tolerance: dict | None = None,
    spread: dict | None = None,
) -> list[dict]:
    """The rows no other row dominates, in their input order.

    Row ``a`` dominates ``b`` when it is at least as good on every objective and strictly
    better on at least one. Rows equal on every objective do not dominate each other, so
    ties all stay on the front.

    Args:
      rows: dicts holding the objective columns; rows with an ``error`` are skipped.
      objectives: ``{column: 'max' | 'min'}`` (default :data:`OBJECTIVES`). A column that
        is ``None`` in every row (latency not measured) is left out.
      tolerance: ``{column: relative tolerance}``: values within this fraction of each
        other count as equal (latency is noisy: 5-10% is typical); default exact.
      spread: ``{column: (low column, high column)}``: two rows whose ``[low, high]``
        intervals overlap count as equal on ``column`` (e.g. latency medians whose
        interquartile ranges overlap); rows without those columns compare by value.

    Raises:
      ValueError: an unknown objective sense, or a column missing from some rows only.

    Example:
      >>> pareto_front([{'val_accuracy': .9, 'bytes': 10}, {'val_accuracy': .8, 'bytes': 20}],
      ...              objectives={'val_accuracy': 'max', 'bytes': 'min'})
      [{'val_accuracy': 0.9, 'bytes': 10}]
    """
    objectives = dict(OBJECTIVES if objectives is None else objectives)
    tolerance = dict(tolerance or {})
    spread = dict(spread or {})
    for key, sense in objectives.items():
        if sense not in ("max", "min"):
            raise ValueError(f"objectives[{key!r}]={sense!r} must be 'max' or 'min'")
    for key, tol in tolerance.items():
        if not 0.0 <= float(tol) < 1.0:
            raise ValueError(f"tolerance[{key!r}]={tol!r} must be a relative tolerance in [0, 1)")
    valid = [r for r in rows if not r.get("error")]
    used = {}
    for key, sense in objectives.items():
        present = [r.get(key) is not None for r in valid]
        if all(present):
            used[key] = sense
        elif any(present):
            missing = [r.get("name", i) for i, r in enumerate(valid) if r.get(key) is None]
            raise ValueError(f"objective {key!r} is missing from rows {missing}; measure it for every row or for none")
    if not used:
        raise ValueError(f"no objective of {list(objectives)} is measured in the rows")
    return [r for r in valid if not any(_dominates(o, r, used, tolerance, spread) for o in valid if o is not r)]
