"""Small helpers every experiment shares: configs, data, training, evaluation and result files.

An experiment is one file ``experiments/<name>.py`` (flax/examples style) with
``get_config(variant="paper") -> ml_collections.ConfigDict`` (start it from
:func:`base_config`; ``get_config("quick")`` is the seconds-long variant) and
``run(config, workdir) -> {"rows": [...], "table": "<markdown>"}`` that reads only the
config. It reads its data with :func:`load_data`, trains with :func:`train_model` /
:func:`fit`, measures with :func:`accuracy`, and ends with :func:`write_results`, which
writes ``workdir/results.json`` (``{"experiment", "rows", "table", "config", ...}``),
``workdir/results.md`` (the markdown table) and ``workdir/plot.png``, each atomically
(temporary file, then rename), so a killed run never leaves a half-written result. The
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

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import optax

from jcompress import data as data_lib
from jcompress import models, report, train

__all__ = [
    "Trained",
    "accuracy",
    "base_config",
    "build",
    "figure",
    "fit",
    "load_data",
    "markdown_table",
    "train_model",
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
    """Test-set accuracy in [0, 1] of ``apply_fn`` with ``params``/``extra`` on ``ds``."""
    return float(train.evaluate(apply_fn, params, extra, ds.x_test, ds.y_test)["accuracy"])


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
    """A trained model: the NNX module, its pure pieces, its test accuracy and history."""

    model: Any
    apply: Callable
    params: dict
    extra: dict
    init_params: dict
    accuracy: float
    history: list


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
      ds: the dataset (train split for training, test split for ``accuracy``).
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
    )


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return ""
    if fmt is not None:
        return fmt.format(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, formats: dict | None = None) -> str:
    """A GitHub markdown table of ``rows``.

    Args:
      rows: one dict per row.
      columns: which keys, in order (default: every key, in first-seen order).
      formats: ``{column: "{:.2%}"}`` format strings; floats default to 4 significant
        digits, ``None`` to an empty cell.

    Raises:
      ValueError: when ``rows`` is empty or a column is in no row.
    """
    if not rows:
        raise ValueError("markdown_table: rows is empty; an experiment must measure at least one row")
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    missing = [c for c in columns if not any(c in r for r in rows)]
    if missing:
        raise ValueError(f"markdown_table: columns {missing} are in no row; row keys are {sorted(rows[0])}")
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines)


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
    **extra: Any,
) -> dict:
    """Write ``results.json``, ``results.md`` and ``plot.png`` under ``out``; return the result.

    Args:
      out: the run directory (created if missing).
      rows: the measured rows (JSON-serialisable dicts; numpy scalars are fine).
      figure: a matplotlib figure (from :func:`figure`); saved as ``plot.png`` and closed.
      name: the experiment's name (the title of ``results.md``).
      columns, formats: what the markdown table shows (see :func:`markdown_table`).
      notes: lines printed under the table (what was measured, how it differs from the paper).
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
    extra = {k: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for k, v in extra.items()}
    report.save_json({"experiment": name, "rows": rows, "table": table, "notes": list(notes), **extra}, out / "results.json")
    md = f"# {name}\n\n{table}\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
    _write_text(out / "results.md", md)
    tmp = out / f".plot.png.tmp{os.getpid()}"
    figure.tight_layout()
    figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    os.replace(tmp, out / "plot.png")
    return {"rows": rows, "table": table}
