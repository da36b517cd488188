"""Benchmarks: ``python -m jcompress.bench`` runs the ``b*.py`` modules (see ``__main__``)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["best_time"]


def best_time(fn: Callable, repeats: int = 3, *, warmup: bool = True) -> tuple[float, object]:
    """``(fastest seconds of repeats calls, the last call's output)``, after one untimed call
    when ``warmup`` (which compiles a JAX function). ``fn`` must block until its result is ready."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
