"""Constants and the records passed between the advisor's parts: Subject, Built, Candidate, Advice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["DEFAULT_ACCURACY_DROP", "LATENCY_SPREAD", "OBJECTIVES", "Advice", "Built", "Candidate", "Subject"]


# The accuracy budget assumed when no constraint is given: one percentage point.
DEFAULT_ACCURACY_DROP = 0.01


# Objective of each measured column: 'max' (higher is better) or 'min'. Accuracy is the
# validation accuracy: choices are made on it, never on the test accuracy.
OBJECTIVES = {"val_accuracy": "max", "bytes": "min", "latency_ms": "min"}

# The latency spread of a row: its interquartile range, ``(q1 column, q3 column)``.
LATENCY_SPREAD = ("latency_q1_ms", "latency_q3_ms")


# Families of recipes, and whether they keep the layers and shapes of the model.
FAMILIES = (
    "dense",
    "pruning",
    "quantization",
    "sharing",
    "combination",
    "structured",
    "lowrank",
    "distillation",
    "custom",
)


class Subject(NamedTuple):
    """The model being compressed, as a candidate recipe sees it.

    Attributes:
      params: nested dict of float arrays (the dense, trained parameters).
      apply_fn: ``apply_fn(params, x) -> logits`` (pure, jittable).
      model: the NNX model when one was given (needed by recipes that change the
        architecture, such as low-rank factorisation), else ``None``.
      finetune_fn: ``finetune_fn(apply_fn, params, *, tx, epochs) -> params`` trains
        ``params`` on the caller's data with the optax transformation ``tx``; ``None``
        to skip fine-tuning.
      distill_fn: ``distill_fn(width_fraction) -> (params, apply_fn)``: a student whose
        hidden widths are ``width_fraction`` of the model's, trained on its soft targets;
        ``None`` when no smaller architecture can be built.
      workdir: a directory where recipes write their files.
      epochs: fine-tuning epochs per stage (short: the advisor compares, it does not polish).
      input_shape: one example's shape (from ``inputs``), or ``None``.
    """

    params: Any
    apply_fn: Callable
    model: Any
    finetune_fn: Callable | None
    distill_fn: Callable | None
    workdir: Path
    epochs: int
    input_shape: tuple | None = None


class Built(NamedTuple):
    """What a recipe produced: the parameters to evaluate, how to run them, what it wrote.

    Attributes:
      params: the parameters as read back from ``path`` (what a user would deploy).
      apply_fn: ``apply_fn(params, x) -> logits`` for these parameters.
      path: the file or directory written; its size on disk is the candidate's bytes.
      detail: JSON-serialisable facts (sparsity, bits, ranks, widths).
    """

    params: Any
    apply_fn: Callable
    path: Path
    detail: dict


class Candidate(NamedTuple):
    """A compression recipe the advisor can try.

    Attributes:
      name: unique short name, e.g. ``'prune 90% + int8'``.
      family: one of ``dense``, ``pruning``, ``quantization``, ``sharing``,
        ``combination``, ``lowrank``, ``distillation``, ``custom``.
      keeps_architecture: whether the compressed model has the same layers and shapes
        (so it drops into the original model code).
      build: ``build(subject: Subject) -> Built``.
    """

    name: str
    family: str
    keeps_architecture: bool
    build: Callable[[Subject], Built]


class Advice(NamedTuple):
    """The advisor's answer.

    Attributes:
      rows: one dict per candidate: ``name``, ``family``, ``keeps_architecture``,
        ``val_accuracy`` (what the ranking uses), ``test_accuracy`` (reported only;
        ``None`` without a test function), ``accuracy_drop`` (dense minus candidate, on
        validation), ``bytes``, ``ratio`` (dense bytes / bytes), ``latency_ms`` (median),
        ``latency_q1_ms`` / ``latency_q3_ms`` (its interquartile range),
        ``latency_min_ms`` / ``latency_max_ms``, ``latency_repeats`` (timed calls),
        ``latency_first_ms`` (the untimed warm-up call, compilation included), ``latency_vs_dense`` (``'same as dense'`` when the
        medians differ by less than the spread, else ``'2.10x faster'`` / ``'1.30x slower'``),
        ``speedup`` (dense median / median, ``None`` when the same as dense; the dense row's
        verdict is ``'reference'``, its speedup 1.0), ``feasible``,
        ``violations`` (``{constraint: excess}``), ``pareto``, ``seconds``, ``detail``; or
        ``name``, ``family`` and ``error`` for a recipe that failed.
      pareto: the rows on the Pareto front (input order).
      recommended: the recommended row, or ``None`` when no candidate meets the constraints.
      reason: the recommendation (or the lack of one) in plain words.
      closest: when nothing is feasible, the row that misses the constraints by least.
      constraints: the constraints as given (``None`` where absent).
    """

    rows: list
    pareto: list
    recommended: dict | None
    reason: str
    closest: dict | None
    constraints: dict
