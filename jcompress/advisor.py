"""Which compression to use: measure candidate recipes, keep the Pareto front, recommend one.

:func:`advise` takes any model as three pieces, its parameters, an apply function
``apply_fn(params, x) -> logits`` and an evaluation function ``eval_fn(params, apply_fn)
-> accuracy``, and runs a list of candidate recipes on it (pruning, quantization, weight
sharing, their combinations, low-rank factorisation, distillation into a smaller model),
each with a short fine-tune when a ``finetune_fn`` is given. Every candidate is measured
the same way:

* **accuracy**: ``eval_fn`` on the candidate's parameters as they are read back from its file;
* **bytes**: the real size on disk of what the candidate writes (a ``jcompress.export``
  file, or the saved smaller model for an architecture change);
* **latency**: the median time of the jitted forward pass on ``inputs`` (``jcompress.timing``).
  A masked or quantized model is decoded to dense float arrays and runs at dense speed;
  only a smaller architecture (distillation, factorisation) is faster, and the numbers
  show it.

The rows on the Pareto front of (higher accuracy, fewer bytes, lower latency) are kept;
the recommendation is the front's best row that meets the constraints (``max_bytes``,
``max_accuracy_drop`` against the dense model measured in the same run,
``max_latency_ms``), and the reason says in plain words why this family of technique
fits, or, when nothing fits, which candidate came closest and by how much it misses.

Command line (``jcompress.cli.advise``)::

    jcompress train --model lenet300 --data mnist5k --epochs 10 --out runs/dense
    jcompress advise --model runs/dense/ckpt --data mnist5k --max-bytes 40000 \\
        --max-accuracy-drop 0.01 --out runs/advice

Example:
  >>> fn = models.functional(model)
  >>> apply = lambda p, x: fn.apply(p, fn.extra, x)[0]
  >>> def eval_fn(p, apply_fn):
  ...     return float(jnp.mean(jnp.argmax(apply_fn(p, x_test), -1) == y_test))
  >>> advice = advise(fn.params, apply, eval_fn, inputs=x_test[:256], max_bytes=50_000)
  >>> advice.recommended['name'], advice.reason
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jcompress import report, timing, tree

__all__ = [
    "DEFAULT_ACCURACY_DROP",
    "OBJECTIVES",
    "Advice",
    "Built",
    "Candidate",
    "Subject",
    "advise",
    "data_functions",
    "deep_compression_candidate",
    "default_candidates",
    "dense_candidate",
    "distillation_candidate",
    "format_rows",
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

# The accuracy budget assumed when no constraint is given: one percentage point.
DEFAULT_ACCURACY_DROP = 0.01

# Objective of each measured column: 'max' (higher is better) or 'min'.
OBJECTIVES = {"accuracy": "max", "bytes": "min", "latency_ms": "min"}

# Families of recipes, and whether they keep the layers and shapes of the model.
FAMILIES = (
    "dense", "pruning", "quantization", "sharing", "combination", "structured", "lowrank", "distillation", "custom",
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
        ``accuracy``, ``accuracy_drop`` (dense minus candidate), ``bytes``, ``ratio``
        (dense bytes / bytes), ``latency_ms``, ``speedup`` (dense latency / latency),
        ``feasible``, ``violations`` (``{constraint: excess}``), ``pareto``, ``seconds``,
        ``detail``; or ``name``, ``family`` and ``error`` for a recipe that failed.
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


# ----------------------------------------------------------------------------------------
# Pareto front
# ----------------------------------------------------------------------------------------


def _close(a: float, b: float, tol: float) -> bool:
    return a == b or abs(a - b) <= tol * max(abs(a), abs(b))


def _dominates(a: dict, b: dict, objectives: dict, tolerance: dict) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    strictly = False
    for key, sense in objectives.items():
        x, y, tol = float(a[key]), float(b[key]), float(tolerance.get(key, 0.0))
        if _close(x, y, tol):
            continue
        better = x > y if sense == "max" else x < y
        if not better:
            return False
        strictly = True
    return strictly


def pareto_front(
    rows: Sequence[dict], *, objectives: dict | None = None, tolerance: dict | None = None
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

    Raises:
      ValueError: an unknown objective sense, or a column missing from some rows only.

    Example:
      >>> pareto_front([{'accuracy': .9, 'bytes': 10}, {'accuracy': .8, 'bytes': 20}],
      ...              objectives={'accuracy': 'max', 'bytes': 'min'})
      [{'accuracy': 0.9, 'bytes': 10}]
    """
    objectives = dict(OBJECTIVES if objectives is None else objectives)
    tolerance = dict(tolerance or {})
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
    return [r for r in valid if not any(_dominates(o, r, used, tolerance) for o in valid if o is not r)]


# ----------------------------------------------------------------------------------------
# Constraints and the recommendation
# ----------------------------------------------------------------------------------------


def _check_constraints(max_bytes, max_accuracy_drop, max_latency_ms) -> dict:
    if max_bytes is not None and not (isinstance(max_bytes, (int, float)) and max_bytes > 0):
        raise ValueError(f"max_bytes={max_bytes!r} must be a positive number of bytes")
    if max_accuracy_drop is not None and not (isinstance(max_accuracy_drop, (int, float)) and 0 <= max_accuracy_drop < 1):
        raise ValueError(
            f"max_accuracy_drop={max_accuracy_drop!r} must be a fraction in [0, 1): 0.01 allows one percentage point"
        )
    if max_latency_ms is not None and not (isinstance(max_latency_ms, (int, float)) and max_latency_ms > 0):
        raise ValueError(f"max_latency_ms={max_latency_ms!r} must be a positive number of milliseconds")
    return {"max_bytes": max_bytes, "max_accuracy_drop": max_accuracy_drop, "max_latency_ms": max_latency_ms}


def violations(row: dict, constraints: dict, *, keep_architecture: bool = False) -> dict[str, float]:
    """``{constraint: relative excess}`` for each constraint ``row`` breaks (empty if none).

    The excess is relative to the limit (``0.5`` = 50% over the byte budget); for the
    accuracy drop it is the excess in percentage points divided by ``max(limit, 0.01)``.
    ``keep_architecture`` adds ``{'architecture': inf}`` for a row that changes it.
    """
    out: dict[str, float] = {}
    if constraints.get("max_bytes") is not None and row["bytes"] > constraints["max_bytes"]:
        out["max_bytes"] = row["bytes"] / constraints["max_bytes"] - 1.0
    limit = constraints.get("max_accuracy_drop")
    if limit is not None and row["accuracy_drop"] > limit + 1e-12:
        out["max_accuracy_drop"] = (row["accuracy_drop"] - limit) / max(limit, 0.01)
    if constraints.get("max_latency_ms") is not None:
        if row.get("latency_ms") is None:
            raise ValueError("max_latency_ms is set but latency was not measured; pass inputs= to advise")
        if row["latency_ms"] > constraints["max_latency_ms"]:
            out["max_latency_ms"] = row["latency_ms"] / constraints["max_latency_ms"] - 1.0
    if keep_architecture and not row["keeps_architecture"]:
        out["architecture"] = math.inf
    return out


def _objective(constraints: dict) -> str:
    """What to optimise among feasible rows: size when only accuracy is constrained, else accuracy."""
    if constraints.get("max_bytes") is None and constraints.get("max_latency_ms") is None:
        return "bytes"
    return "accuracy"


def _sort_key(row: dict, objective: str):
    lat = row.get("latency_ms") or 0.0
    if objective == "bytes":
        return (row["bytes"], -row["accuracy"], lat)
    return (-row["accuracy"], row["bytes"], lat)


def recommend(
    rows: Sequence[dict], constraints: dict, *, keep_architecture: bool = False
) -> tuple[dict | None, dict | None]:
    """``(recommended, closest)`` among measured rows with ``pareto`` and ``violations`` filled.

    Among the Pareto rows that meet every constraint: the smallest file when only the
    accuracy drop is constrained (or nothing is), else the most accurate (ties: fewer bytes,
    then lower latency). A feasible row is always dominated by a feasible Pareto row or is
    one itself, so looking at the front loses nothing. When no row is feasible, ``closest``
    is the row with the smallest summed relative excess (rows that change the architecture
    are left out of it when ``keep_architecture``).
    """
    valid = [r for r in rows if not r.get("error")]
    feasible = [r for r in valid if not r["violations"]]
    if feasible:
        front = [r for r in feasible if r["pareto"]] or feasible
        return min(front, key=lambda r: _sort_key(r, _objective(constraints))), None
    pool = [r for r in valid if not (keep_architecture and not r["keeps_architecture"])] or valid
    if not pool:
        return None, None
    return None, min(pool, key=lambda r: (sum(v for k, v in r["violations"].items() if k != "architecture"), -r["accuracy"]))


# ----------------------------------------------------------------------------------------
# The reason, in plain words
# ----------------------------------------------------------------------------------------


def _kb(n: float) -> str:
    return f"{n / 1000:.1f} KB"


def _describe(row: dict) -> str:
    lat = f", {row['latency_ms']:.2f} ms" if row.get("latency_ms") is not None else ""
    if row["family"] == "dense":
        return f"{row['name']} (accuracy {row['accuracy']:.2%}, {_kb(row['bytes'])}{lat})"
    drop = row["accuracy_drop"] * 100
    side = f"{drop:.2f} points below dense" if drop >= 0 else f"{-drop:.2f} points above dense"
    return f"{row['name']} (accuracy {row['accuracy']:.2%}, {side}; {_kb(row['bytes'])}, {row['ratio']:.1f}x smaller{lat})"


def _misses(row: dict, constraints: dict) -> str:
    """The broken constraints of ``row`` in words, with absolute and relative excess."""
    parts = []
    for key, rel in row["violations"].items():
        if key == "max_bytes":
            parts.append(f"the size limit by {_kb(row['bytes'] - constraints['max_bytes'])} ({rel:.0%})")
        elif key == "max_accuracy_drop":
            over = (row["accuracy_drop"] - constraints["max_accuracy_drop"]) * 100
            parts.append(f"the accuracy budget by {over:.2f} points")
        elif key == "max_latency_ms":
            parts.append(f"the latency limit by {row['latency_ms'] - constraints['max_latency_ms']:.2f} ms ({rel:.0%})")
        else:
            parts.append("the architecture requirement (it changes the layers)")
    return " and ".join(parts)


def _describe_constraints(c: dict, keep_architecture: bool) -> str:
    parts = []
    if c.get("max_bytes") is not None:
        parts.append(f"file at most {_kb(c['max_bytes'])}")
    if c.get("max_accuracy_drop") is not None:
        parts.append(f"accuracy at most {c['max_accuracy_drop'] * 100:.2f} points below dense")
    if c.get("max_latency_ms") is not None:
        parts.append(f"latency at most {c['max_latency_ms']:.2f} ms")
    if keep_architecture:
        parts.append("the same architecture")
    return ", ".join(parts) if parts else "no constraints"


_WHY = {
    "dense": "The dense model already meets every constraint, so no compression is needed for what was asked.",
    "pruning": (
        "Pruning keeps the architecture: the same layers and shapes, so the model code does not change; the "
        "zeroed weights are simply not stored."
    ),
    "quantization": (
        "Quantization keeps the architecture and every weight; each is stored in fewer bits, which costs little "
        "accuracy at 8 bits and needs fine-tuning (QAT) at 4."
    ),
    "sharing": (
        "Weight sharing keeps the architecture: every weight becomes an index into a small per-layer codebook."
    ),
    "combination": (
        "It keeps the architecture and combines techniques whose savings multiply (pruning removes weights, "
        "quantization or sharing shrinks each remaining one, Huffman coding shortens the frequent codes)."
    ),
    "structured": (
        "Structured pruning removes whole neurons or filters, so the model that remains is a smaller dense "
        "model: real size, FLOPs and latency all drop, but the layer widths change."
    ),
    "lowrank": (
        "Low-rank factorisation changes the layers (each Dense layer becomes two thinner ones), which cuts the "
        "real FLOPs and latency, not only the file."
    ),
    "distillation": (
        "A much smaller architecture was acceptable, and a student trained on the teacher's soft targets cuts "
        "size, FLOPs and latency together; you deploy the student model instead of the original."
    ),
    "custom": "It is a recipe you supplied.",
}


def _reason(rows, recommended, closest, constraints, keep_architecture, dense, assumed=False) -> str:
    valid = [r for r in rows if not r.get("error")]
    given = _describe_constraints(constraints, keep_architecture)
    if assumed:
        given = f"none given, so {given} is assumed"
    head = f"Constraints: {given}. Dense model: {_describe(dense)}."
    if recommended is None:
        if closest is None:
            return head + " No candidate could be measured."
        text = (
            f"{head} No candidate meets the constraints. The closest is {_describe(closest)}, which misses "
            f"{_misses(closest, constraints)}."
        )
        if "max_latency_ms" in closest["violations"] and closest["keeps_architecture"]:
            text += (
                " Models that keep the architecture run at dense speed here (masks and codes are decoded to dense "
                "arrays); a lower latency needs a smaller architecture (distillation, low rank) or sparse or "
                "integer kernels."
            )
        return text + " Relax a constraint or try stronger recipes (more sparsity, fewer bits, a smaller student)."
    text = f"{head} Recommended: {_describe(recommended)}. {_WHY[recommended['family']]}"
    fam = recommended["family"]
    singles = [r for r in valid if r["family"] in ("pruning", "quantization", "sharing")]
    if fam == "combination" and singles and not any(not r["violations"] for r in singles):
        best = min(singles, key=lambda r: sum(r["violations"].values()))
        text += f" No single technique was enough: the best alone, {best['name']}, misses {_misses(best, constraints)}."
    if constraints.get("max_latency_ms") is not None and recommended["keeps_architecture"] and fam != "dense":
        text += (
            " Its masks and codes are decoded to dense arrays before the forward pass, so it runs at dense speed "
            f"(dense: {dense['latency_ms']:.2f} ms); it meets the latency limit only because the dense model does."
        )
    lat_fail = [r for r in valid if r["keeps_architecture"] and "max_latency_ms" in r["violations"]]
    if fam in ("distillation", "lowrank", "structured") and lat_fail and constraints.get("max_latency_ms") is not None:
        text += (
            " Pruned and quantized models keep the dense shapes and run at dense speed here, so none of them met "
            "the latency limit; only a smaller architecture did."
        )
    if fam in ("distillation", "lowrank", "structured") and keep_architecture is False:
        same = [r for r in valid if r["keeps_architecture"] and r["family"] != "dense" and not r["violations"]]
        if not same:
            text += " No recipe that keeps the architecture met the constraints."
    return text


# ----------------------------------------------------------------------------------------
# Measuring candidates and advising
# ----------------------------------------------------------------------------------------


def format_rows(rows: Sequence[dict]) -> str:
    """A fixed-width text table of measured rows (Pareto rows marked with ``*``)."""
    head = f"{'':2}{'candidate':<34}{'accuracy':>9}{'drop':>8}{'bytes':>11}{'ratio':>8}{'ms':>9}{'  feasible'}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{'':2}{r['name']:<34}  failed: {r['error']}")
            continue
        lat = f"{r['latency_ms']:9.3f}" if r.get("latency_ms") is not None else f"{'-':>9}"
        mark = "* " if r.get("pareto") else "  "
        lines.append(
            f"{mark}{r['name']:<34}{r['accuracy']:>9.4f}{r['accuracy_drop'] * 100:>+8.2f}{r['bytes']:>11,}"
            f"{r['ratio']:>8.1f}{lat}  {'yes' if not r['violations'] else 'no'}"
        )
    return "\n".join(lines)


def summarize(
    rows: Sequence[dict],
    *,
    max_bytes: float | None = None,
    max_accuracy_drop: float | None = None,
    max_latency_ms: float | None = None,
    keep_architecture: bool = False,
    latency_tolerance: float = 0.1,
) -> Advice:
    """The advice for already measured rows: derived columns, Pareto front, recommendation, reason.

    Args:
      rows: dicts with ``name``, ``family``, ``keeps_architecture``, ``accuracy``, ``bytes``
        and ``latency_ms`` (``None`` when not measured), or ``name``, ``family``, ``error``
        for a failed recipe. Exactly one row has family ``'dense'``: the reference that
        accuracy drops, ratios and speedups are measured against.
      max_bytes, max_accuracy_drop, max_latency_ms, keep_architecture: the constraints
        (see :func:`advise`).
      latency_tolerance: latencies within this relative difference count as equal on the
        Pareto front (timing noise would otherwise split equal-speed models).

    Returns:
      :class:`Advice`; its rows are copies of ``rows`` with ``accuracy_drop``, ``ratio``,
      ``speedup``, ``violations``, ``feasible`` and ``pareto`` added.

    Raises:
      ValueError: bad constraints, no dense row or several, duplicate names.
    """
    constraints = _check_constraints(max_bytes, max_accuracy_drop, max_latency_ms)
    assumed = all(v is None for v in constraints.values())
    if assumed:
        constraints["max_accuracy_drop"] = DEFAULT_ACCURACY_DROP
    names = [r["name"] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique; repeated: {dup}")
    dense_rows = [r for r in rows if r.get("family") == "dense" and not r.get("error")]
    if len(dense_rows) != 1:
        raise ValueError(f"rows need exactly one measured row of family 'dense' (the reference), found {len(dense_rows)}")
    dense = dense_rows[0]
    out = []
    for r in rows:
        r = dict(r)
        if not r.get("error"):
            for key in ("accuracy", "bytes", "keeps_architecture", "family"):
                if key not in r:
                    raise ValueError(f"row {r['name']!r} has no {key!r}; measured rows need {key}")
            r["accuracy_drop"] = dense["accuracy"] - r["accuracy"]
            r["ratio"] = dense["bytes"] / r["bytes"] if r["bytes"] else math.inf
            lat, dlat = r.get("latency_ms"), dense.get("latency_ms")
            r["speedup"] = dlat / lat if lat and dlat else None
            r["violations"] = violations(r, constraints, keep_architecture=keep_architecture)
            r["feasible"] = not r["violations"]
        out.append(r)
    front = pareto_front(out, tolerance={"latency_ms": latency_tolerance})
    on_front = {id(r) for r in front}
    for r in out:
        if not r.get("error"):
            r["pareto"] = id(r) in on_front
    recommended, closest = recommend(out, constraints, keep_architecture=keep_architecture)
    dense_out = next(r for r in out if r["name"] == dense["name"])
    reason = _reason(out, recommended, closest, constraints, keep_architecture, dense_out, assumed)
    return Advice(out, front, recommended, reason, closest, constraints)


# ----------------------------------------------------------------------------------------
# Candidate recipes
# ----------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _write(subject: Subject, name: str, ctree) -> tuple[Any, Path]:
    """Write ``ctree`` with ``jcompress.export`` and read the params back from the file."""
    from jcompress import export

    path = subject.workdir / f"{_slug(name)}.jcz"
    export.write(path, ctree, meta={"candidate": name})
    return export.load_params(path), path


def _write_dense(subject: Subject, name: str, params) -> tuple[Any, Path]:
    from jcompress import export

    path = subject.workdir / f"{_slug(name)}.jcz"
    export.write_dense(path, params, meta={"candidate": name})
    return export.load_params(path), path


def _finetune(subject: Subject, apply_fn: Callable, params, tx) -> Any:
    if subject.finetune_fn is None or subject.epochs == 0:
        return params
    return subject.finetune_fn(apply_fn, params, tx=tx, epochs=subject.epochs)


def _pruned(subject: Subject, sparsity: float, lr: float, score_fn: Callable | None = None, **mask_kw):
    """Pruning of the kernels by ``score_fn(subject)`` (default magnitude), then a fine-tune keeping the masks."""
    import optax

    from jcompress.pruning import masks as masks_lib
    from jcompress.pruning import optim

    if score_fn is None:
        pruned, aux = jax.jit(masks_lib.magnitude(sparsity=sparsity, scope="global"))(subject.params)
    else:
        kw = {"scope": "global", **mask_kw}
        pruned, aux = jax.jit(masks_lib.by_scores(score_fn(subject), sparsity=sparsity, **kw))(subject.params)
    tx = optax.chain(optax.adam(lr), optim.keep_masked(aux.masks))
    tuned = _finetune(subject, subject.apply_fn, pruned, tx)
    return masks_lib.apply_masks(tuned, aux.masks), aux


def _share_bits(name: str, leaf) -> int:
    """Deep Compression's widths: 8-bit codebooks for conv kernels, 5-bit for Dense kernels."""
    return 8 if np.ndim(leaf) > 2 else 5


def _shared(subject: Subject, params, lr: float):
    """K-means sharing (``2**b - 1`` centroids plus the zero) and centroid fine-tuning."""
    import re

    import optax

    from jcompress import pipeline, tree
    from jcompress.core.base import chain, default_leaves
    from jcompress.sharing import kmeans

    leaves = dict(tree.named_leaves(params))
    k = [
        (f"^{re.escape(n)}$", min(2 ** _share_bits(n, leaves[n]) - 1, int(np.count_nonzero(np.asarray(leaves[n])))))
        for n in default_leaves(params)
    ]
    stages = [kmeans(k=k, init="linear")]
    if subject.finetune_fn is not None and subject.epochs > 0:
        # pipeline.finetune trains the centroids (assignment fixed) and returns the new codebooks.
        stages.append(pipeline.finetune(lambda p, wrap: _finetune(subject, subject.apply_fn, p, wrap(optax.adam(lr)))))
    shared, auxes = chain(*stages)(params)
    return shared, auxes[-1]


def dense_candidate() -> Candidate:
    """The reference: every leaf stored as float32 in the same container."""

    def build(s: Subject) -> Built:
        params, path = _write_dense(s, "dense float32", s.params)
        return Built(params, s.apply_fn, path, {})

    return Candidate("dense float32", "dense", True, build)


def pruning_candidate(
    sparsity: float, *, lr: float = 1e-3, score_fn: Callable | None = None, label: str = "prune", **mask_kw
) -> Candidate:
    """Global pruning to ``sparsity``, fine-tuned with masks kept, stored sparse (relative indices).

    Args:
      sparsity: fraction of the kernel weights removed.
      lr: Adam learning rate of the fine-tune.
      score_fn: ``score_fn(subject) -> score tree`` (``jcompress.pruning.scores``: Taylor,
        SNIP, OBD...); default magnitude.
      label: the name's prefix (``'<label> 90%'``).
      **mask_kw: passed to ``jc.pruning.by_scores`` (``pattern=``, ``scope=``, ``allow_empty=``).
    """

    def build(s: Subject) -> Built:
        from jcompress import compressed

        params, aux = _pruned(s, sparsity, lr, score_fn, **mask_kw)
        back, path = _write(s, name, compressed.compress(params, aux))
        return Built(back, s.apply_fn, path, {"sparsity": sparsity})

    name = f"{label} {sparsity:.0%}"
    return Candidate(name, "pruning", True, build)


def quantization_candidate(bits: int, *, qat: bool = False, lr: float = 1e-3) -> Candidate:
    """Per-output-channel symmetric ``bits``-bit weights: post-training, or after QAT fine-tuning."""

    def build(s: Subject) -> Built:
        import optax

        from jcompress import compressed, quant
        from jcompress import qat as qat_lib

        params = s.params
        if qat:
            q_apply = lambda p, x: s.apply_fn(qat_lib.qat_params(p, bits=bits, axis=-1), x)
            params = _finetune(s, q_apply, params, optax.adam(lr))
        qparams, aux = jax.jit(quant.quantize(bits=bits, axis=-1))(params)
        back, path = _write(s, name, compressed.compress(qparams, aux))
        return Built(back, s.apply_fn, path, {"bits": bits, "qat": qat})

    name = f"int{bits} {'QAT' if qat else 'PTQ'}"
    return Candidate(name, "quantization", True, build)


def sharing_candidate(*, lr: float = 1e-3) -> Candidate:
    """K-means weight sharing (conv 8 bits, fc 5 bits) with centroid fine-tuning, Huffman-coded indices."""

    def build(s: Subject) -> Built:
        from jcompress import compressed

        params, aux = _shared(s, s.params, lr)
        back, path = _write(s, name, compressed.compress(params, aux, huffman=True))
        return Built(back, s.apply_fn, path, {"bits": "conv 8 / fc 5"})

    name = "k-means sharing"
    return Candidate(name, "sharing", True, build)


def deep_compression_candidate(sparsity: float, *, lr: float = 1e-3) -> Candidate:
    """Deep Compression: prune + fine-tune, k-means sharing + centroid fine-tune, Huffman coding."""

    def build(s: Subject) -> Built:
        from jcompress import compressed

        pruned, paux = _pruned(s, sparsity, lr)
        params, saux = _shared(s, pruned, lr)
        back, path = _write(s, name, compressed.compress(params, paux, saux, huffman=True))
        return Built(back, s.apply_fn, path, {"sparsity": sparsity, "bits": "conv 8 / fc 5"})

    name = f"prune {sparsity:.0%} + share + Huffman"
    return Candidate(name, "combination", True, build)


def lowrank_candidate(rank_fraction: float, *, lr: float = 1e-3) -> Candidate:
    """Truncated-SVD factorisation of the hidden Dense layers (surgery) and a fine-tune; needs the NNX model.

    Each Dense layer but the output one gets rank ``round(rank_fraction * min(in, out))``
    when that makes it smaller; the layers are new, so the fine-tune uses a full learning rate.
    """

    def build(s: Subject) -> Built:
        import optax

        from jcompress import models
        from jcompress.core.base import masked
        from jcompress.nnx import factorize

        if s.model is None or s.input_shape is None:
            raise ValueError("low-rank factorisation changes the layers: pass the NNX model and inputs= to advise")
        # Dense layers in call order; the last one produces the logits and keeps its full rank.
        order = [n[: -len("/kernel")] for n in report.layer_flops(s.model, s.input_shape)]
        layers = {n: np.shape(tree.get_by_name(s.params, n + "/kernel")) for n in order}
        dense = [n for n in order if len(layers[n]) == 2][:-1]
        ranks = {n: max(1, round(rank_fraction * min(layers[n]))) for n in dense}
        ranks = {n: r for n, r in ranks.items() if r * sum(layers[n]) < layers[n][0] * layers[n][1]}
        if not ranks:
            raise ValueError(f"no hidden Dense layer gets smaller at rank fraction {rank_fraction}")
        kernels = [f"^{n}/kernel$" for n in ranks]
        small, aux = masked(factorize.factorize(rank=dict(zip(kernels, ranks.values()))), kernels)(s.model)
        fn = models.functional(small)
        apply = lambda p, x: fn.apply(p, fn.extra, x)[0]
        params = _finetune(s, apply, fn.params, optax.adam(lr))
        back, path = _write_dense(s, name, params)
        return Built(back, apply, path, {"ranks": {k: int(v) for k, v in aux.ranks.items()}})

    name = f"SVD rank {rank_fraction:.0%}"
    return Candidate(name, "lowrank", False, build)


def structured_candidate(
    fraction: float, *, lr: float = 1e-3, score_fn: Callable | None = None, label: str = "remove neurons"
) -> Candidate:
    """Structured hard pruning: drop ``fraction`` of the hidden units (surgery), then fine-tune.

    Units of the hidden layers (the layers whose units ``nnx.surgery.coupling`` finds
    removable and that write their units alone, so not the output nor a residual stream)
    are ranked by the L2 norm of their kernel column, or by ``score_fn(subject)`` (a score
    tree, e.g. ``scores.unit_scores`` of neuron entropies), and the lowest are removed with
    their biases and norm entries: the new model is really smaller and faster. Needs the
    NNX model and inputs.

    Args:
      fraction: fraction of the units of each hidden layer removed, in [0, 1).
      lr, score_fn, label: fine-tune rate, unit scores, name prefix.
    """

    def build(s: Subject) -> Built:
        import optax

        from jcompress import models
        from jcompress.core.patterns import Units
        from jcompress.nnx import surgery
        from jcompress.pruning import masks as masks_lib
        from jcompress.pruning import scores as scores_lib

        if s.model is None or s.input_shape is None:
            raise ValueError("structured hard pruning builds a smaller model: pass the NNX model and inputs= to advise")
        groups = surgery.coupling(s.model, input_shape=s.input_shape)
        layers = [g.producers[0] for g in groups if g.reason is None and len(g.producers) == 1]
        scores = scores_lib.magnitude_scores(s.params) if score_fn is None else score_fn(s)
        masks = masks_lib.make_masks(scores, layers, sparsity=fraction, pattern=Units(norm="l2"))
        masks = surgery.complete_masks(s.model, masks, input_shape=s.input_shape)
        small, _ = surgery.hard_prune(masks, input_shape=s.input_shape)(s.model)
        fn = models.functional(small)
        apply = lambda p, x: fn.apply(p, fn.extra, x)[0]
        params = _finetune(s, apply, fn.params, optax.adam(lr))
        back, path = _write_dense(s, name, params)
        return Built(back, apply, path, {"fraction": fraction, "widths": [int(np.shape(tree.get_by_name(params, k))[-1]) for k in layers]})

    name = f"{label} {fraction:.0%}"
    return Candidate(name, "structured", False, build)


def distillation_candidate(width_fraction: float) -> Candidate:
    """A student with ``width_fraction`` of the hidden widths, trained on the model's soft targets."""

    def build(s: Subject) -> Built:
        if s.distill_fn is None:
            raise ValueError("distillation needs distill_fn (a student trainer); pass distill_fn= to advise")
        params, apply = s.distill_fn(width_fraction)
        back, path = _write_dense(s, name, params)
        return Built(back, apply, path, {"width_fraction": width_fraction})

    name = f"distill x{width_fraction:g} widths"
    return Candidate(name, "distillation", False, build)


def default_candidates(*, quick: bool = False, model: bool = True, distill: bool = True) -> list[Candidate]:
    """The recipes :func:`advise` tries when none are given.

    Args:
      quick: a short list (dense, prune 90%, int8, prune 90% + sharing + Huffman, the
        smallest student) for tests and a first look.
      model: include recipes that need the NNX model (low-rank factorisation).
      distill: include distillation into smaller students.
    """
    if quick:
        out = [dense_candidate(), pruning_candidate(0.9), quantization_candidate(8), deep_compression_candidate(0.9)]
        return out + ([distillation_candidate(0.25)] if distill else [])
    out = [dense_candidate()]
    out += [pruning_candidate(s) for s in (0.8, 0.9, 0.95)]
    out += [quantization_candidate(8), quantization_candidate(4), quantization_candidate(4, qat=True)]
    out.append(sharing_candidate())
    out += [deep_compression_candidate(s) for s in (0.9, 0.95)]
    if model:
        out += [lowrank_candidate(f) for f in (0.5, 0.25)]
    if distill:
        out += [distillation_candidate(f) for f in (0.5, 0.25)]
    return out


def _measure(candidate: Candidate, subject: Subject, eval_fn: Callable) -> tuple[dict, Built | None]:
    """Build one candidate, evaluate it and size its file; a recipe's ValueError becomes an ``error`` row."""
    row = {"name": candidate.name, "family": candidate.family, "keeps_architecture": candidate.keeps_architecture}
    t0 = time.perf_counter()
    try:
        built = candidate.build(subject)
    except jax.errors.JaxRuntimeError:
        raise
    except ValueError as e:
        return {**row, "error": f"{type(e).__name__}: {e}"}, None
    row.update(
        accuracy=float(eval_fn(built.params, built.apply_fn)),
        bytes=report.dir_size(built.path),
        latency_ms=None,
        seconds=round(time.perf_counter() - t0, 2),
        detail=built.detail,
    )
    return row, built


def _latencies(builts: Sequence[Built], inputs, *, repeats: int) -> list[float]:
    """Milliseconds of each jitted forward pass: the median of ``repeats`` interleaved calls.

    Timing every candidate once, then again, then again, spreads a slow spell of a shared
    machine over all of them instead of charging it to whichever ran during it.
    """
    fns = {i: functools.partial(jax.jit(b.apply_fn), b.params, inputs) for i, b in enumerate(builts)}
    return [t.median * 1e3 for t in timing.compare(fns, repeats=repeats, warmup=2).values()]


def advise(
    model_or_params: Any,
    apply_fn: Callable | None = None,
    eval_fn: Callable | None = None,
    *,
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
      eval_fn: ``eval_fn(params, apply_fn) -> accuracy`` in [0, 1] on held-out data (it
        receives the candidate's apply function, which differs for a smaller architecture).
      inputs: a batch ``(N, ...)`` for timing the jitted forward pass (e.g. 256 test
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
      latency_tolerance: relative timing difference treated as equal on the Pareto front.
      repeats: timed forward passes per candidate, interleaved across candidates; the latency
        is their median (:func:`jcompress.timing.compare`).
      log: called with one line per measured candidate (e.g. ``print``).

    Returns:
      :class:`Advice` (rows, pareto, recommended, reason, closest, constraints).

    Raises:
      ValueError: bad constraints, a latency constraint without ``inputs``, a missing
        ``apply_fn``/``eval_fn``, non-finite params, duplicate candidate names.

    Example:
      >>> advice = advise(model, eval_fn=eval_fn, inputs=x_test[:256], max_bytes=30_000,
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
            raise ValueError("apply_fn is required when params (not an NNX model) are given: apply_fn(params, x) -> logits")
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
            row, built = _measure(c, subject, eval_fn)
            rows.append(row)
            builts.append(built)
            if log is not None:
                log(_log_line(row))
        if inputs is not None:
            done = [i for i, b in enumerate(builts) if b is not None]
            for i, ms in zip(done, _latencies([builts[i] for i in done], inputs, repeats=repeats)):
                rows[i]["latency_ms"] = ms
    return summarize(
        rows, max_bytes=max_bytes, max_accuracy_drop=max_accuracy_drop, max_latency_ms=max_latency_ms,
        keep_architecture=keep_architecture, latency_tolerance=latency_tolerance,
    )  # fmt: skip


def _log_line(row: dict) -> str:
    if row.get("error"):
        return f"{row['name']}: failed ({row['error']})"
    return f"{row['name']}: accuracy {row['accuracy']:.4f}, {row['bytes']:,} bytes ({row['seconds']:.1f} s)"


# ----------------------------------------------------------------------------------------
# From a checkpoint and a dataset: the pieces advise() needs, and the written advice
# ----------------------------------------------------------------------------------------


def student_config(config: dict, width_fraction: float) -> dict:
    """The ``models.create`` config of a student with ``width_fraction`` of the model's hidden widths.

    ``lenet300`` and ``mlp`` scale their hidden widths (the student is an ``mlp``),
    ``lenet5`` its channels and hidden units, ``cnn1d`` its channels, ``resnet`` its
    widths; every width is at least 1.

    Raises:
      ValueError: a fraction outside (0, 1], or a model family without widths to scale.
    """
    if not 0.0 < width_fraction <= 1.0:
        raise ValueError(f"width_fraction={width_fraction!r} must be in (0, 1]")
    scale = lambda ws: [max(1, round(w * width_fraction)) for w in ws]
    base = {k: v for k, v in config.items() if k not in ("name", "widths", "channels", "hidden")}
    name = config["name"]
    if name == "lenet300":
        return {**base, "name": "mlp", "widths": scale((300, 100))}
    if name == "mlp":
        return {**base, "name": "mlp", "widths": scale(config.get("widths", (1200, 1200)))}
    if name == "lenet5":
        return {**base, "name": "lenet5", "channels": scale(config.get("channels", (20, 50))),
                "hidden": scale([config.get("hidden", 500)])[0]}  # fmt: skip
    if name == "cnn1d":
        return {**base, "name": "cnn1d", "channels": scale(config.get("channels", (32, 32, 32)))}
    if name == "resnet":
        return {**base, "name": "resnet", "widths": scale(config.get("widths", (16, 32, 64)))}
    raise ValueError(f"no rule to shrink model {name!r}; distillation candidates need lenet300, mlp, lenet5, cnn1d or resnet")


def _fit_apply(apply_fn: Callable) -> Callable:
    """``apply(params, x)`` in the ``train.fit`` signature (no extra state, no dropout)."""
    return lambda params, extra, x, train=False, key=None: (apply_fn(params, x), extra)


def data_functions(model, config: dict, ds, *, batch_size: int = 128, distill_epochs: int = 10, seed: int = 0):
    """``(apply_fn, eval_fn, finetune_fn, distill_fn, inputs)`` for :func:`advise` from a model and a dataset.

    Args:
      model: the trained NNX model (e.g. from ``checkpoint.load_model``).
      config: its ``models.create`` config (for building distillation students).
      ds: a ``data.Dataset``: the train split fine-tunes and distills, the test split evaluates,
        and its first 256 test images (fewer if the split is smaller) time the forward pass.
      batch_size, seed: fine-tuning and distillation batches.
      distill_epochs: epochs of each student's distillation run.
    """
    from jcompress import models, train
    from jcompress.distill import run as distill_run

    fn = models.functional(model)
    apply_fn = lambda p, x: fn.apply(p, fn.extra, x)[0]

    wrapped: dict = {}  # one train.fit-style function per apply, so evaluation compiles once per candidate

    def eval_fn(params, apply):
        fit_apply = wrapped.setdefault(apply, _fit_apply(apply))
        return train.evaluate(fit_apply, params, {}, ds.x_test, ds.y_test)["accuracy"]

    def finetune_fn(apply, params, *, tx, epochs):
        res = train.fit(_fit_apply(apply), params, {}, ds, tx=tx, epochs=epochs, batch_size=batch_size, seed=seed,
                        progress=False, eval_every=0)  # fmt: skip
        return res.params

    distill_fn = None
    try:
        student_config(config, 0.5)
    except ValueError:
        pass
    else:

        def distill_fn(width_fraction):
            res = distill_run.distill_model(
                model, student_config(config, width_fraction), ds, epochs=distill_epochs, batch_size=batch_size,
                temperature=4.0, alpha=0.9, seed=seed, progress=False,
            )  # fmt: skip
            sfn = models.functional(models.create(**res.model_config))
            extra = res.extra
            return res.params, lambda p, x: sfn.apply(p, extra, x)[0]

    inputs = ds.x_test[: min(256, len(ds.x_test))]
    return apply_fn, eval_fn, finetune_fn, distill_fn, inputs


def plot_figure(advice: Advice):
    """A matplotlib figure: accuracy against bytes (log scale) and against latency.

    Pareto rows are blue, the others gray; triangles change the architecture; the
    recommended row is ringed in red; constraints are red lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in advice.rows if not r.get("error")]
    has_lat = all(r.get("latency_ms") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_lat else 1, figsize=(11 if has_lat else 6, 4.5), squeeze=False)
    panels = [("bytes", "file size (bytes, log scale)")] + ([("latency_ms", "forward latency (ms)")] if has_lat else [])
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            color = "tab:blue" if r["pareto"] else "tab:gray"
            ax.scatter(r[key], r["accuracy"], c=color, marker="o" if r["keeps_architecture"] else "^", s=40, zorder=3)
            ax.annotate(r["name"], (r[key], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if advice.recommended is not None:
            r = advice.recommended
            ax.scatter(r[key], r["accuracy"], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=4)
        limit = advice.constraints.get("max_bytes" if key == "bytes" else "max_latency_ms")
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
        drop = advice.constraints.get("max_accuracy_drop")
        dense = next(r for r in rows if r["family"] == "dense")
        if drop is not None:
            ax.axhline(dense["accuracy"] - drop, color="tab:red", linestyle=":", linewidth=1)
        if key == "bytes":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: Pareto front, red ring: recommended; ^ = new architecture", fontsize=9)
    fig.tight_layout()
    return fig


def plot(advice: Advice, path: str | Path) -> None:
    """Save :func:`plot_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = plot_figure(advice)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(advice: Advice) -> str:
    cols = ["name", "family", "accuracy", "accuracy_drop", "bytes", "ratio", "latency_ms", "speedup", "pareto", "feasible"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in advice.rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['family']} | failed: {r['error']} |" + " |" * (len(cols) - 3))
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "# Compression advice\n\n" + "\n".join(lines) + f"\n\n{advice.reason}\n"


def write_advice(advice: Advice, out: str | Path) -> dict[str, Path]:
    """Write ``advice.json``, ``advice.md`` and ``plot.png`` under ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "advice.json", "md": out / "advice.md", "plot": out / "plot.png"}
    report.save_json(
        {
            "rows": advice.rows,
            "pareto": [r["name"] for r in advice.pareto],
            "recommended": advice.recommended["name"] if advice.recommended else None,
            "closest": advice.closest["name"] if advice.closest else None,
            "reason": advice.reason,
            "constraints": advice.constraints,
        },
        paths["json"],
    )
    paths["md"].write_text(_markdown(advice))
    plot(advice, paths["plot"])
    return paths
