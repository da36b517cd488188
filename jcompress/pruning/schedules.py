"""Sparsity schedules: the target sparsity as a pure function of the training step.

A schedule is built by a factory that takes the hyperparameters and returns
``schedule(step) -> sparsity``, the same shape as an optax learning-rate schedule. For a
Python int ``step`` it returns a Python float computed in float64 (the exact value that
:func:`jcompress.pruning.optim.gradual_pruning` turns into counts); for a traced or array
``step`` it returns float32, so schedules also work inside ``jax.jit``.

* :func:`cubic`: Zhu & Gupta (2017), "To prune, or not to prune":
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` for ``t0 <= t <= t0 + n dt``,
  where pruning happens every ``dt = frequency`` steps from ``t0 = begin_step`` to
  ``t0 + n dt = end_step``. Sparsity rises fast at first, when there are many redundant
  weights, and slowly near the end.
* :func:`linear`: the same with exponent 1.
* :func:`polynomial`: the same with any exponent.
* :func:`constant`: one sparsity at every step (masks fixed from the start).
* :func:`one_shot`: 0 before ``step``, then ``sparsity``.

Every schedule is 0 before its first pruning step and holds its last value afterwards.
With ``frequency > 1`` the value is a staircase: between two pruning steps it keeps the
value of the last pruning step at or before ``t``, which is the sparsity a model pruned
every ``frequency`` steps really has at step ``t``.

Example:
  >>> s = cubic(final_sparsity=0.9, begin_step=0, end_step=1000, frequency=100)
  >>> s(500)   # 0.9 + (0 - 0.9) * (1 - 0.5) ** 3 = 0.7875
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.core.spec import check_value

__all__ = ["Schedule", "check_sparsity", "constant", "cubic", "linear", "one_shot", "polynomial", "pruning_steps"]

Schedule = Callable[[int | jax.Array], jax.Array]


def check_sparsity(value: float, name: str) -> float:
    """``value`` as a float in ``[0, 1)``; TypeError/ValueError naming ``name`` otherwise."""
    return check_value(value, arg=name, kind=float, lo=0.0, hi=1.0, hi_open=True)


def _is_int(step) -> bool:
    return isinstance(step, (int, np.integer)) and not isinstance(step, bool)


def _check_steps(begin_step: int, end_step: int, frequency: int) -> None:
    for name, v in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}={v!r} must be a Python int")
    if begin_step < 0:
        raise ValueError(f"begin_step={begin_step} must be >= 0")
    if frequency < 1:
        raise ValueError(f"frequency={frequency} must be >= 1 (steps between two pruning steps)")
    if end_step < begin_step:
        raise ValueError(f"end_step={end_step} must be >= begin_step={begin_step}")
    if (end_step - begin_step) % frequency:
        raise ValueError(
            f"end_step - begin_step = {end_step - begin_step} is not a multiple of frequency={frequency}; "
            f"the schedule prunes at begin_step + i * frequency and must land on end_step "
            f"(for example end_step={begin_step + (end_step - begin_step) // frequency * frequency})"
        )


def pruning_steps(*, begin_step: int, end_step: int, frequency: int) -> list[int]:
    """The steps at which a gradual schedule prunes: ``begin_step, begin_step + frequency, ..., end_step``."""
    _check_steps(begin_step, end_step, frequency)
    return list(range(begin_step, end_step + 1, frequency))


def polynomial(
    *,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    power: float = 3.0,
) -> Schedule:
    """``s_t = s_f + (s_i - s_f) (1 - (t_last - t0) / (t_end - t0))^power``.

    ``t_last`` is the last pruning step at or before ``t`` (``t0 + i * frequency``, at most
    ``end_step``). Before ``begin_step`` the sparsity is 0; from ``end_step`` on it is
    ``final_sparsity``. With ``begin_step == end_step`` it jumps to ``final_sparsity`` there.

    Args:
      final_sparsity: ``s_f`` in ``[0, 1)``.
      initial_sparsity: ``s_i`` in ``[0, 1)``, the sparsity at ``begin_step``.
      begin_step: ``t0``, the first pruning step.
      end_step: ``t0 + n dt``, the last pruning step; ``end_step - begin_step`` must be a
        multiple of ``frequency``.
      frequency: ``dt``, steps between pruning steps.
      power: 3 for Zhu & Gupta, 1 for linear.

    Returns:
      ``schedule(step)``: a Python float for a Python int step, else a float32 array.
    """
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    s_i = check_sparsity(initial_sparsity, "initial_sparsity")
    _check_steps(begin_step, end_step, frequency)
    if not power > 0:
        raise ValueError(f"power={power!r} must be > 0")
    span = end_step - begin_step

    def schedule(step):
        if _is_int(step):  # exact float64 arithmetic for a concrete step
            t = int(step)
            if t < begin_step:
                return 0.0
            last = begin_step + (min(t, end_step) - begin_step) // frequency * frequency
            return s_f + (s_i - s_f) * (1.0 - ((last - begin_step) / span if span else 1.0)) ** power
        t = jnp.asarray(step, jnp.int32)
        last = begin_step + (jnp.clip(t, begin_step, end_step) - begin_step) // frequency * frequency
        progress = (last - begin_step).astype(jnp.float32) / span if span else jnp.float32(1.0)
        s = s_f + (s_i - s_f) * (1.0 - progress) ** power
        return jnp.where(t < begin_step, 0.0, s).astype(jnp.float32)

    return schedule


cubic: Callable[..., Schedule] = functools.partial(polynomial, power=3.0)
cubic.__doc__ = """Zhu & Gupta's cubic schedule: :func:`polynomial` with ``power=3`` (same keywords)."""

linear: Callable[..., Schedule] = functools.partial(polynomial, power=1.0)
linear.__doc__ = """Sparsity rising linearly from ``initial_sparsity`` to ``final_sparsity``: ``power=1``."""


def constant(sparsity: float) -> Schedule:
    """``sparsity`` at every step, from step 0."""
    s = check_sparsity(sparsity, "sparsity")
    return lambda step: s if _is_int(step) else jnp.full(jnp.shape(step), s, jnp.float32)


def one_shot(sparsity: float, *, step: int) -> Schedule:
    """0 before ``step``, ``sparsity`` from ``step`` on (prune once, then fine-tune)."""
    s = check_sparsity(sparsity, "sparsity")
    _check_steps(step, step, 1)
    return lambda t: (
        (0.0 if t < step else s) if _is_int(t) else jnp.where(jnp.asarray(t) < step, 0.0, s).astype(jnp.float32)
    )
