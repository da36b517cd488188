"""The one wall-clock timer: medians of interleaved calls, with the spread and the compile time.

JAX dispatches work asynchronously, so every timed call here ends with
``jax.block_until_ready`` on its result. The first call of a jitted function compiles it;
that call is timed separately (``Timing.first``) and never enters the median. When
several functions are compared they are called in turn (``a, b, c, a, b, c, ...``), so a
slow spell of a shared machine lands on all of them instead of on whichever ran during it.

Example:
  >>> fast = jax.jit(lambda x: x @ x.T)
  >>> t = timing.timeit(fast, jnp.ones((256, 256)), repeats=20)
  >>> print(t)                      # 'median 0.41 ms (0.38-0.52 ms over 20 calls; first call 35.2 ms)'
  >>> ts = timing.compare({"dense": lambda: dense(x), "small": lambda: small(x)})
  >>> speedup = ts["dense"].median / ts["small"].median
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

__all__ = ["Timing", "compare", "timeit"]


class Timing(NamedTuple):
    """Wall-clock times of one function, in seconds.

    Attributes:
      median: the median of the timed calls (what to report).
      low, high: the fastest and the slowest timed call (the spread).
      first: the first call, compilation included (NaN when ``warmup=0``).
      times: every timed call, in order.
      output: the result of the last call.
    """

    median: float
    low: float
    high: float
    first: float
    times: tuple[float, ...]
    output: Any

    @property
    def spread(self) -> float:
        """``high - low`` in seconds."""
        return self.high - self.low

    def __str__(self) -> str:
        first = "" if math.isnan(self.first) else f"; first call {1e3 * self.first:.1f} ms"
        return (
            f"median {1e3 * self.median:.3g} ms ({1e3 * self.low:.3g}-{1e3 * self.high:.3g} ms over "
            f"{len(self.times)} calls{first})"
        )


def _call(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def compare(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 10, warmup: int = 1) -> dict[str, Timing]:
    """Time several zero-argument functions side by side, interleaving their calls.

    Args:
      fns: ``{label: fn}``; each ``fn()`` runs the work once (bind arguments with a lambda
        or ``functools.partial``). Results are blocked on with ``jax.block_until_ready``;
        numpy arrays and ``None`` pass through it.
      repeats: timed calls of each function (>= 1).
      warmup: untimed calls of each function before the timed ones (>= 0); the first of
        them is reported as ``Timing.first`` (it includes compilation).

    Returns:
      ``{label: Timing}`` in the order of ``fns``.

    Raises:
      ValueError: for ``repeats < 1``, ``warmup < 0`` or no functions.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not fns:
        raise ValueError("compare needs at least one function")
    first = dict.fromkeys(fns, math.nan)
    outputs: dict[str, Any] = dict.fromkeys(fns)
    for i in range(warmup):
        for label, fn in fns.items():
            seconds, outputs[label] = _call(fn)
            if i == 0:
                first[label] = seconds
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            seconds, outputs[label] = _call(fn)
            times[label].append(seconds)
    return {
        label: Timing(
            median=statistics.median(ts),
            low=min(ts),
            high=max(ts),
            first=first[label],
            times=tuple(ts),
            output=outputs[label],
        )
        for label, ts in times.items()
    }


def timeit(fn: Callable, *args: Any, repeats: int = 10, warmup: int = 1) -> Timing:
    """Time ``fn(*args)``: ``warmup`` untimed calls, then the median of ``repeats`` calls.

    Example:
      >>> timing.timeit(jax.jit(model_fn), params, x, repeats=20).median   # seconds
    """
    return compare({"fn": lambda: fn(*args)}, repeats=repeats, warmup=warmup)["fn"]
