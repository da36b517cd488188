"""Small helpers every experiment shares: configs, data, training, evaluation and result files.

An experiment is one file ``experiments/<name>.py`` (flax/examples style) with
``get_config(variant="paper") -> ml_collections.ConfigDict`` (start it from
:func:`base_config`; ``get_config("quick")`` is the seconds-long variant) and
``run(config, workdir) -> {"rows": [...], "table": "<markdown>"}`` that reads only the
config. It reads its data with :func:`load_data`, trains with :func:`train_model` /
:func:`fit`, makes every choice (learning rates, rounds, temperatures, thresholds, which
variant wins) on the validation split with :func:`val_accuracy`, measures each trained
model once on the test split with :func:`accuracy`, and ends with :func:`write_results`, which
writes ``workdir/results.json`` (``{"experiment", "rows", "table", "config", ...}``),
``workdir/results.md`` (the markdown table) and ``workdir/plot.png``, each atomically
(temporary file, then rename), so a killed run never leaves a half-written result.
``write_results`` also records the experiment's ``deviations`` from the paper (each a
:func:`deviation`), the ``comparisons`` its paper makes (each a :func:`comparison`, paired
by seed when ``jcompress run NAME --seeds N`` aggregates the seeds) and the row ``keys``. The
entry point in ``pyproject.toml`` (``[project.entry-points."jcompress.experiments"]``) makes
it runnable as ``jcompress run NAME``; any such file also runs as ``jcompress run PATH``.

Example:
  >>> config = base_config("paper", data="mnist5k", epochs=2)
  >>> ds = load_data(config.data)
  >>> net = train_model("lenet300", ds, epochs=2, lr=1e-3, batch_size=128)
  >>> fig, ax = figure()
  >>> ax.plot([0, 1], [net.accuracy, net.accuracy])
  >>> write_results(out, [{"model": "lenet300", "accuracy": net.accuracy}], figure=fig, name="demo")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import optax

from jcompress import data as data_lib
from jcompress import models, report, train
from jcompress.experiments_cli import deviations_markdown, markdown_table

__all__ = [
    "Trained",
    "accuracy",
    "base_config",
    "build",
    "comparison",
    "deviation",
    "figure",
    "fit",
    "load_data",
    "markdown_table",
    "train_model",
    "val_accuracy",
    "write_results",
]


VARIANTS = ("paper", "quick")


def base_config(variant: str, *, data: str, seed: int = 0, **fields: Any) -> ml_collections.ConfigDict:
    """The fields every experiment config has, plus ``fields``.

    Args:
      variant: ``'paper'`` (the paper's settings) or ``'quick'`` (seconds; sets ``quick=True``,
        and ``get_config`` then shrinks its own fields).
      data: the experiment's dataset (what its docstring's numbers were measured on):
        ``mnist5k``, ``digits``, ``mnist1d`` or ``tfds:NAME``.
      seed: the seed of initialisation and batch order.
      **fields: the experiment's own settings (ints, floats, strings, bools, tuples or
        nested dicts, which become nested ConfigDicts).

    Raises:
      ValueError: for another variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(VARIANTS)}")
    # data_dir: where prepared TFDS datasets live ('' = TFDS's default); `jcompress run --data-dir`
    return ml_collections.ConfigDict(
        {"quick": variant == "quick", "data": data, "data_dir": "", "seed": seed, **fields}
    )


def load_data(name: str, data_dir: str = "") -> data_lib.Dataset:
    """The dataset ``name`` (a config's ``data``: ``mnist5k``, ``digits``, ``mnist1d``, ``tfds:NAME``).

    ``data_dir`` (a config's ``data_dir``) is where prepared TFDS datasets live; ``''`` is TFDS's default.

    Raises:
      ValueError: for an unknown name (the message lists the offline datasets).
    """
    return data_lib.load(name, data_dir=data_dir or None)


def build(name: str, ds: data_lib.Dataset, *, seed: int = 0, **model_kwargs: Any):
    """A registered model sized for ``ds``, and its functional view.

    Returns:
      ``(model, fn)`` where ``fn`` is :func:`jcompress.models.functional` of the model:
      ``fn.apply``, ``fn.params`` (nested dict, names such as ``fc1/kernel``), ``fn.extra``.
    """
    model = models.create(name, input_shape=ds.input_shape, num_classes=ds.num_classes, seed=seed, **model_kwargs)
    return model, models.functional(model)


def accuracy(apply_fn: Callable, params, extra, ds: data_lib.Dataset) -> float:
    """Test-set accuracy in [0, 1] of ``apply_fn`` with ``params``/``extra`` on ``ds``.

    Measured once per trained model and reported; never used to choose anything (use
    :func:`val_accuracy` for that).
    """
    return float(train.evaluate(apply_fn, params, extra, ds.x_test, ds.y_test)["accuracy"])


def val_accuracy(apply_fn: Callable, params, extra, ds: data_lib.Dataset) -> float:
    """Validation-split accuracy in [0, 1] of ``apply_fn`` with ``params``/``extra`` on ``ds``.

    The split every choice is made on (``ds.x_val``/``ds.y_val``: 10% of each class of the
    source's training split, disjoint from train and test).
    """
    return float(train.evaluate(apply_fn, params, extra, ds.x_val, ds.y_val)["accuracy"])


def deviation(setting: str, *, paper: Any, ours: Any, reason: str) -> dict:
    """One setting where the experiment differs from the paper, for ``write_results(deviations=...)``.

    Example:
      >>> deviation("optimizer", paper="SGD, momentum 0.9", ours="Adam", reason="SGD lost 1 point here")
      {'setting': 'optimizer', 'paper': 'SGD, momentum 0.9', 'ours': 'Adam', 'reason': 'SGD lost 1 point here'}

    Raises:
      ValueError: when ``setting`` or ``reason`` is empty (a deviation without a reason is not disclosed).
    """
    if not setting or not reason:
        raise ValueError(f"deviation({setting!r}): setting and reason must both be non-empty strings")
    return {"setting": setting, "paper": str(paper), "ours": str(ours), "reason": reason}


def comparison(
    name: str, *, metric: str, a: dict, b: dict, b_metric: str | None = None, higher_is_better: bool = True
) -> dict:
    """A claim of the paper, as the paired difference ``a[metric] - b[b_metric or metric]`` of two rows.

    ``a`` and ``b`` select one row each (every item must match, e.g. ``{"method": "gradual",
    "target_sparsity": 0.95}``; they may select the same row when ``b_metric`` names another
    column of it, e.g. pruned against dense error); ``jcompress run --seeds N`` pairs them by seed (same data
    order and initialisation) and reports the mean difference, its standard deviation and
    standard error, and a verdict (see :func:`jcompress.experiments_cli.compare`).

    Example:
      >>> comparison("ticket - reinit", metric="accuracy", a={"init": "rewound"}, b={"init": "reinit"})["metric"]
      'accuracy'

    Raises:
      ValueError: for an empty selector.
    """
    if not a or not b:
        raise ValueError(f"comparison {name!r}: a and b must each select a row by at least one column, e.g. {{'method': 'x'}}")
    return {
        "name": name, "metric": metric, "b_metric": b_metric or metric, "a": dict(a), "b": dict(b),
        "higher_is_better": bool(higher_is_better),
    }  # fmt: skip


def fit(
    apply_fn: Callable,
    params,
    extra,
    ds: data_lib.Dataset,
    *,
    tx: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> train.FitResult:
    """``train.fit`` without checkpoints, progress bar or per-epoch evaluation.

    Experiments train many short runs; checkpoints and per-epoch test passes would cost
    more than the training. ``epochs=0`` returns the inputs unchanged.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return train.FitResult(params, extra, None, [])
    return train.fit(
        apply_fn, params, extra, ds, tx=tx, epochs=epochs, batch_size=batch_size, seed=seed,
        progress=False, eval_every=0,
    )


class Trained(NamedTuple):
    """A trained model: the NNX module, its pure pieces, its test and validation accuracy and history."""

    model: Any
    apply: Callable
    params: dict
    extra: dict
    init_params: dict
    accuracy: float
    history: list
    val_accuracy: float


def train_model(
    name: str,
    ds: data_lib.Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    tx: optax.GradientTransformation | None = None,
    **model_kwargs: Any,
) -> Trained:
    """Create the registered model ``name`` for ``ds`` and train it with Adam(``lr``).

    Args:
      name: a :mod:`jcompress.models` registry name (``lenet300``, ``lenet5``, ``mlp``...).
      ds: the dataset (train split for training; ``val_accuracy`` and ``accuracy`` on the
        validation and test splits).
      epochs, lr, batch_size, seed: the run (``seed`` fixes initialisation and batch order).
      tx: an optax transformation to use instead of ``optax.adam(lr)``.
      **model_kwargs: passed to ``models.create`` (``widths=``, ``dropout=``...).

    Returns:
      :class:`Trained`, with ``init_params`` the initial weights (for rewinding).
    """
    model, fn = build(name, ds, seed=seed, **model_kwargs)
    res = fit(fn.apply, fn.params, fn.extra, ds, tx=tx or optax.adam(lr), epochs=epochs, batch_size=batch_size, seed=seed)
    return Trained(
        model=models.merge(model, res.params, res.extra),
        apply=fn.apply,
        params=res.params,
        extra=res.extra,
        init_params=fn.params,
        accuracy=accuracy(fn.apply, res.params, res.extra, ds),
        history=res.history,
        val_accuracy=val_accuracy(fn.apply, res.params, res.extra, ds),
    )


def figure(ncols: int = 1, *, width: float = 5.5, height: float = 4.0):
    """A matplotlib figure on the Agg backend: ``(fig, axes)`` (one Axes when ``ncols == 1``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=True)
    return fig, axes


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(
    out: str | Path,
    rows: Sequence[dict],
    *,
    figure,
    name: str,
    columns: Sequence[str] | None = None,
    formats: dict | None = None,
    notes: Sequence[str] = (),
    deviations: Sequence[dict] = (),
    comparisons: Sequence[dict] = (),
    keys: Sequence[str] | None = None,
    **extra: Any,
) -> dict:
    """Write ``results.json``, ``results.md`` and ``plot.png`` under ``out``; return the result.

    Args:
      out: the run directory (created if missing).
      rows: the measured rows (JSON-serialisable dicts; numpy scalars are fine).
      figure: a matplotlib figure (from :func:`figure`); saved as ``plot.png`` and closed.
      name: the experiment's name (the title of ``results.md``).
      columns, formats: what the markdown table shows (see :func:`markdown_table`).
      notes: lines printed under the table (what was measured).
      deviations: every setting that differs from the paper (:func:`deviation` dicts),
        printed under the table.
      comparisons: the paper's claims as paired row differences (:func:`comparison` dicts).
      keys: the columns that name a row (rows with equal keys are the same measurement in
        different seeds); default: the columns holding strings.
      **extra: more JSON fields for ``results.json`` (baselines; ``config=`` the resolved
        ConfigDict, written as a dict).

    Returns:
      ``{"rows": rows, "table": markdown}``, the experiment's return value.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    table = markdown_table(rows, columns, formats=formats)
    deviations = [dict(d) for d in deviations]
    bad = [d for d in deviations if set(d) != {"setting", "paper", "ours", "reason"}]
    if bad:
        raise ValueError(f"write_results: deviations {bad} must be made with common.deviation(setting, paper=, ours=, reason=)")
    comparisons = [dict(c) for c in comparisons]
    if keys is None:
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if any(isinstance(r.get(k), str) for r in rows)]
    extra = {k: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for k, v in extra.items()}
    report.save_json(
        {"experiment": name, "rows": rows, "table": table, "notes": list(notes), "deviations": deviations,
         "comparisons": comparisons, "keys": list(keys), "columns": list(columns) if columns else None,
         "formats": dict(formats or {}), **extra},
        out / "results.json",
    )  # fmt: skip
    md = f"# {name}\n\n{table}\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
    md += deviations_markdown(deviations)
    _write_text(out / "results.md", md)
    tmp = out / f".plot.png.tmp{os.getpid()}"
    figure.tight_layout()
    figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    os.replace(tmp, out / "plot.png")
    return {"rows": rows, "table": table}
