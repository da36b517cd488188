"""Measuring candidates (validation and test accuracy, bytes on disk, latency) and :func:`advise`."""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jcompress import report, timing, tree
from jcompress.advisor.candidates import default_candidates, dense_candidate
from jcompress.advisor.recommend import _check_constraints, summarize
from jcompress.advisor.records import FAMILIES, Advice, Built, Candidate, Subject

__all__ = ["advise"]


def _measure(
    candidate: Candidate, subject: Subject, eval_fn: Callable, test_fn: Callable | None
) -> tuple[dict, Built | None]:
    """Build one candidate, evaluate it (validation, then test once) and size its file.

    A recipe's ValueError becomes an ``error`` row.
    """
    row = {"name": candidate.name, "family": candidate.family, "keeps_architecture": candidate.keeps_architecture}
    t0 = time.perf_counter()
    try:
        built = candidate.build(subject)
    except jax.errors.JaxRuntimeError:
        raise
    except ValueError as e:
        return {**row, "error": f"{type(e).__name__}: {e}"}, None
    row.update(
        val_accuracy=float(eval_fn(built.params, built.apply_fn)),
        test_accuracy=None if test_fn is None else float(test_fn(built.params, built.apply_fn)),
        bytes=report.dir_size(built.path),
        latency_ms=None,
        seconds=round(time.perf_counter() - t0, 2),
        detail=built.detail,
    )
    return row, built


def _latencies(builts: Sequence[Built], inputs, *, repeats: int) -> list[dict]:
    """The latency columns of each jitted forward pass, from ``repeats`` interleaved calls.

    Every candidate is called twice untimed first (the first call compiles; it is reported
    as ``latency_first_ms``), then the candidates are timed round-robin, once each, then
    again, ``repeats`` times: a slow spell of a shared machine lands on all of them instead
    of on whichever ran during it. Reported: the median, the interquartile range and the
    extremes, in milliseconds, compilation excluded.
    """
    fns = {i: functools.partial(jax.jit(b.apply_fn), b.params, inputs) for i, b in enumerate(builts)}
    out = []
    for t in timing.compare(fns, repeats=repeats, warmup=2).values():
        ms = [1e3 * x for x in t.times]
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        out.append(
            {
                "latency_ms": 1e3 * t.median,
                "latency_q1_ms": q1,
                "latency_q3_ms": q3,
                "latency_min_ms": 1e3 * t.low,
                "latency_max_ms": 1e3 * t.high,
                "latency_first_ms": 1e3 * t.first,
                "latency_repeats": len(ms),
            }
        )
    return out


def advise(
    model_or_params: Any,
    apply_fn: Callable | None = None,
    eval_fn: Callable | None = None,
    *,
    test_fn: Callable | None = None,
    inputs: Any = None,
    max_bytes: float | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
    finetune_fn: Callable | None = None,
    distill_fn: Callable | None = None,
    candidates: Sequence[Candidate] | None = None,
    keep_architecture: bool = False,
    epochs: int = 1,
    quick: bool = False,
    workdir: str | Path | None = None,
    latency_tolerance: float = 0.1,
    repeats: int = 20,
    log: Callable[[str], None] | None = None,
) -> Advice:
    """Try compression recipes on a model, keep the Pareto front, recommend one and say why.

    Args:
      model_or_params: an NNX model, or its parameters (nested dict or NNX State of float
        arrays). With a model, ``apply_fn`` defaults to its forward pass in eval mode
        (non-parameter state such as BatchNorm statistics held fixed), and recipes that
        change the architecture (low-rank factorisation) become available.
      apply_fn: ``apply_fn(params, x) -> logits``, pure and jittable.
      eval_fn: ``eval_fn(params, apply_fn) -> accuracy`` in [0, 1] on validation data (it
        receives the candidate's apply function, which differs for a smaller architecture).
        Ranking, the accuracy budget and the recommendation use this accuracy only.
      test_fn: the same on test data, called once per candidate after it is built; its
        result is reported as ``test_accuracy`` and never used for a choice. ``None``: not
        measured.
      inputs: a batch ``(N, ...)`` for timing the jitted forward pass (e.g. 256 validation
        images); ``None`` skips latency (then ``max_latency_ms`` cannot be used).
      max_bytes: largest acceptable file, in bytes.
      max_accuracy_drop: largest acceptable drop of accuracy below the dense model's, as a
        fraction (0.01 = one percentage point). With no constraint at all, 0.01 is assumed.
      max_latency_ms: largest acceptable median forward time on ``inputs``.
      finetune_fn: ``finetune_fn(apply_fn, params, *, tx, epochs) -> params``: trains on the
        caller's training data with the optax ``tx`` the recipe passes (mask keeping,
        centroid sharing and QAT are in ``tx`` / ``apply_fn``). ``None``: no fine-tuning.
      distill_fn: ``distill_fn(width_fraction) -> (params, apply_fn)``: a trained student
        with that fraction of the hidden widths. ``None``: no distillation candidates.
      candidates: the recipes (default :func:`default_candidates`); a dense reference is
        added in front when none of family ``'dense'`` is given.
      keep_architecture: only recipes that keep the layers and shapes may be recommended
        (the others are still measured and shown).
      epochs: fine-tuning epochs per stage (short: 1-2). The recipes fine-tune with Adam at
        1e-3: with so few steps, 1/10 of the training rate (Han et al.'s rule for SGD) left
        a LeNet-300-100 pruned to 8% on mnist5k 1.5 points below dense, the full rate none.
      quick: the short default list of recipes.
      workdir: where the candidates' files are written (default: a temporary directory,
        removed afterwards; the rows keep the sizes).
      latency_tolerance: relative timing difference treated as equal on the Pareto front
        (latencies whose interquartile ranges overlap are equal too).
      repeats: timed forward passes per candidate (>= 3), interleaved round-robin across
        candidates after two untimed warm-up calls each; the latency is their median with
        the interquartile range as its spread, and a difference from dense smaller than the
        spread is reported as ``'same as dense'`` (:func:`~jcompress.advisor.latency_vs_dense`).
      log: called with one line per measured candidate (e.g. ``print``).

    Returns:
      :class:`Advice` (rows, pareto, recommended, reason, closest, constraints).

    Raises:
      ValueError: bad constraints, a latency constraint without ``inputs``, a missing
        ``apply_fn``/``eval_fn``, non-finite params, duplicate candidate names.

    Example:
      >>> advice = advise(model, eval_fn=val_fn, test_fn=test_fn, inputs=x_val[:256], max_bytes=30_000,
      ...                 finetune_fn=finetune_fn)
      >>> print(advice.reason)
    """
    from flax import nnx

    from jcompress import models

    _check_constraints(max_bytes, max_accuracy_drop, max_latency_ms)
    if eval_fn is None:
        raise ValueError("eval_fn is required: eval_fn(params, apply_fn) -> accuracy on held-out data")
    if max_latency_ms is not None and inputs is None:
        raise ValueError("max_latency_ms needs inputs= (a batch to time the forward pass on)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 3:
        raise ValueError(f"repeats={repeats!r} must be an int >= 3: the latency spread is an interquartile range")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r} must be a non-negative int (fine-tuning epochs per stage)")
    model = model_or_params if isinstance(model_or_params, nnx.Module) else None
    if model is not None:
        fn = models.functional(model)
        params = fn.params
        if apply_fn is None:
            apply_fn = lambda p, x: fn.apply(p, fn.extra, x)[0]
    else:
        params = tree.to_pure_dict(model_or_params)
        if apply_fn is None:
            raise ValueError(
                "apply_fn is required when params (not an NNX model) are given: apply_fn(params, x) -> logits"
            )
    tree.check_finite(params)
    if candidates is None:
        candidates = default_candidates(quick=quick, model=model is not None, distill=distill_fn is not None)
    candidates = list(candidates)
    if not any(c.family == "dense" for c in candidates):
        candidates.insert(0, dense_candidate())
    for c in candidates:
        if c.family not in FAMILIES:
            raise ValueError(f"candidate {c.name!r} has family {c.family!r}; use one of {FAMILIES}")
    names = [c.name for c in candidates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique; repeated: {dup}")
    inputs = None if inputs is None else jax.numpy.asarray(inputs)

    with tempfile.TemporaryDirectory(prefix="jcompress-advise-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        shape = None if inputs is None else tuple(inputs.shape[1:])
        subject = Subject(params, apply_fn, model, finetune_fn, distill_fn, wd, epochs, shape)
        rows, builts = [], []
        for c in candidates:
            row, built = _measure(c, subject, eval_fn, test_fn)
            rows.append(row)
            builts.append(built)
            if log is not None:
                log(_log_line(row))
        if inputs is not None:
            done = [i for i, b in enumerate(builts) if b is not None]
            for i, lat in zip(done, _latencies([builts[i] for i in done], inputs, repeats=repeats)):
                rows[i].update(lat)
    return summarize(
        rows, max_bytes=max_bytes, max_accuracy_drop=max_accuracy_drop, max_latency_ms=max_latency_ms,
        keep_architecture=keep_architecture, latency_tolerance=latency_tolerance,
    )  # fmt: skip


def _log_line(row: dict) -> str:
    if row.get("error"):
        return f"{row['name']}: failed ({row['error']})"
    test = f", test accuracy {row['test_accuracy']:.4f}" if row.get("test_accuracy") is not None else ""
    return (
        f"{row['name']}: validation accuracy {row['val_accuracy']:.4f}{test}, {row['bytes']:,} bytes "
        f"({row['seconds']:.1f} s)"
    )
