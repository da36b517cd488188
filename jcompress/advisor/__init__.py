"""Which compression to use: measure candidate recipes, keep the Pareto front, recommend one.

:func:`advise` takes any model as three pieces, its parameters, an apply function
``apply_fn(params, x) -> logits`` and an evaluation function ``eval_fn(params, apply_fn)
-> accuracy`` on validation data (optionally ``test_fn``, the same on test data), and runs a list of candidate recipes on it (pruning, quantization, weight
sharing, their combinations, low-rank factorisation, distillation into a smaller model),
each with a short fine-tune when a ``finetune_fn`` is given. Every candidate is measured
the same way:

* **accuracy**: ``eval_fn`` (validation) on the candidate's parameters as they are read
  back from its file; every choice uses it. ``test_fn`` is called once per candidate and
  its ``test_accuracy`` is only reported;
* **bytes**: the real size on disk of what the candidate writes (a ``jcompress.export``
  file, or the saved smaller model for an architecture change);
* **latency**: the jitted forward pass on ``inputs``, timed round-robin over the
  candidates after untimed warm-up calls (``jcompress.timing``): the median with its
  interquartile range. A difference from dense within the spread is reported as "same as
  dense". A masked or quantized model is decoded to dense float arrays and runs the dense
  matmuls; only a smaller architecture (distillation, factorisation) is faster.

The rows on the Pareto front of (higher validation accuracy, fewer bytes, lower latency) are kept;
the recommendation is the front's best row that meets the constraints (``max_bytes``,
``max_accuracy_drop`` against the dense model measured in the same run,
``max_latency_ms``), and the reason says in plain words why this family of technique
fits, or, when nothing fits, which candidate came closest and by how much it misses.

Command line (``jcompress.cli.advise``)::

    jcompress train --model lenet300 --data mnist5k --epochs 10 --out runs/dense
    jcompress advise --model runs/dense/ckpt --data mnist5k --max-bytes 40000 \\
        --max-accuracy-drop 0.01 --out runs/advice

The package, one module per part: ``records`` (Subject, Built, Candidate, Advice and the
constants), ``pareto`` (the front), ``recommend`` (constraints, the recommendation and its
reason, :func:`summarize`), ``candidates`` (the recipes), ``measure`` (:func:`advise`),
``data`` (the pieces :func:`advise` needs from a checkpoint and a dataset) and ``output``
(plot, markdown, JSON).

Example:
  >>> fn = models.functional(model)
  >>> apply = lambda p, x: fn.apply(p, fn.extra, x)[0]
  >>> def accuracy(x, y):
  ...     return lambda p, apply_fn: float(jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y))
  >>> advice = advise(fn.params, apply, accuracy(x_val, y_val), test_fn=accuracy(x_test, y_test),
  ...                 inputs=x_val[:256], max_bytes=50_000)
  >>> advice.recommended['name'], advice.reason
"""

from __future__ import annotations

from jcompress.advisor.candidates import (
    deep_compression_candidate,
    default_candidates,
    dense_candidate,
    distillation_candidate,
    lowrank_candidate,
    pruning_candidate,
    quantization_candidate,
    sharing_candidate,
    structured_candidate,
)
from jcompress.advisor.data import DataFunctions, data_functions, student_config
from jcompress.advisor.measure import advise
from jcompress.advisor.output import plot, plot_figure, write_advice
from jcompress.advisor.pareto import pareto_front
from jcompress.advisor.recommend import format_rows, latency_vs_dense, recommend, summarize, violations
from jcompress.advisor.records import (
    DEFAULT_ACCURACY_DROP,
    LATENCY_SPREAD,
    OBJECTIVES,
    Advice,
    Built,
    Candidate,
    Subject,
)

__all__ = [
    "DEFAULT_ACCURACY_DROP",
    "LATENCY_SPREAD",
    "OBJECTIVES",
    "Advice",
    "Built",
    "Candidate",
    "DataFunctions",
    "Subject",
    "advise",
    "data_functions",
    "deep_compression_candidate",
    "default_candidates",
    "dense_candidate",
    "distillation_candidate",
    "format_rows",
    "latency_vs_dense",
    "lowrank_candidate",
    "pareto_front",
    "plot",
    "plot_figure",
    "pruning_candidate",
    "quantization_candidate",
    "recommend",
    "sharing_candidate",
    "structured_candidate",
    "student_config",
    "summarize",
    "violations",
    "write_advice",
]
