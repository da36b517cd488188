"""Find, configure and run experiments: what ``jcompress run`` does.

An experiment is a Python file with two top-level functions (flax/examples style):

* ``get_config(variant="paper") -> ml_collections.ConfigDict``: the paper's settings by
  default; ``get_config("quick")`` the same experiment in seconds (what the tests run).
  Every config has the fields ``quick`` (bool), ``data`` (dataset name) and ``seed``.
* ``run(config, workdir) -> {"rows": [...], "table": "<markdown>"}``: reads only the
  config, writes ``workdir/results.json``, ``results.md`` and ``plot.png``.

Experiments are found by name through the ``jcompress.experiments`` entry points (this
repository declares its ``experiments/*.py`` in ``pyproject.toml``; another package can
declare its own), or given as a path: ``jcompress run path/to/my_exp.py``. Copying an
experiment file and editing it is the intended way to start a new one.

Settings are overridden with ``--config.FIELD=VALUE`` (nested: ``--config.lenet5.epochs=3``).
A field that the config does not have at the top level but that some of its groups have
sets it in each of those groups: ``--config.epochs=5`` on han2015 (groups ``lenet300`` and
``lenet5``) is ``--config.lenet300.epochs=5 --config.lenet5.epochs=5``.
The value is parsed as the type of the field it replaces (bool, int, float, str, tuple);
an unknown field or a value of the wrong type is an error naming the field. The resolved
config is written into ``results.json`` under ``"config"``.

Seeds: ``--seeds N`` runs the experiment once per seed (``seed``, ``seed + 1``, ...; the
config's ``seed`` is the first), each in ``OUT/seed-K/`` with its own results, so a killed
run keeps its finished seeds and a rerun with the same settings skips them. ``OUT/results.json``
then holds every seed's rows (tagged ``seed``), ``summary`` rows (mean and standard
deviation of each numeric column over the seeds, rows grouped by the experiment's ``keys``)
and the paired ``comparisons`` the experiment declares (:func:`compare`); ``results.md``
and ``plot.png`` show them with their spread.

Example:
  $ jcompress run han2015 --quick --config.seed=3 --out /tmp/han
  $ jcompress run hinton2015 --seeds 3 --out /tmp/hinton
  $ jcompress run ./my_exp.py --config.epochs=5
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "ENTRY_POINT_GROUP",
    "aggregate",
    "apply_overrides",
    "available",
    "compare",
    "deviations_markdown",
    "load",
    "markdown_table",
    "resolve_config",
    "run_experiment",
    "summarize",
]

ENTRY_POINT_GROUP = "jcompress.experiments"


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # per-seed values that differ (summarize)
        return " / ".join(_cell(v, fmt) or "-" for v in value)
    if fmt is not None and _is_number(value):
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


def deviations_markdown(deviations: Sequence[dict]) -> str:
    """The ``## Deviations from the paper`` section of a results.md ('' when there are none)."""
    if not deviations:
        return ""
    table = markdown_table(deviations, ["setting", "paper", "ours", "reason"])
    return "\n## Deviations from the paper\n\n" + table + "\n"


def _entry_points() -> dict:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of the experiments declared under the ``jcompress.experiments`` entry points, sorted."""
    return sorted(_entry_points())


def _is_path(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def _load_path(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"jcompress_experiment_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the experiment file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load(name: str) -> tuple[str, ModuleType]:
    """The experiment ``name`` (an entry-point name or a path to a ``.py`` file): ``(name, module)``.

    Raises:
      ValueError: for an unknown name (the message lists the available experiments) or a
        module without ``get_config`` and ``run``.
      FileNotFoundError: for a path that does not exist.
    """
    if _is_path(name):
        path = Path(name)
        label, module = path.stem, _load_path(path)
    else:
        eps = _entry_points()
        if name not in eps:
            raise ValueError(
                f"unknown experiment {name!r}; available: {', '.join(sorted(eps)) or '(none installed)'}; "
                "or pass the path of an experiment file"
            )
        label, module = name, eps[name].load()
    missing = [f for f in ("get_config", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(
            f"experiment {name!r} ({getattr(module, '__file__', module)}) does not define {' and '.join(missing)}; "
            "an experiment defines get_config(variant='paper') -> ConfigDict and run(config, workdir)"
        )
    return label, module


def _fields(config, prefix: str = "") -> list[str]:
    import ml_collections

    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _fields(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _parse(field: str, text: str, current):
    """``text`` as a value of the type of ``current`` (the field's default)."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{field}={text!r}: expected true or false")
    if isinstance(current, (int, float)):
        kind = type(current)
        try:
            return kind(text) if kind is float else int(text)
        except ValueError:
            raise ValueError(f"--config.{field}={text!r}: expected {kind.__name__} (default {current!r})") from None
    if isinstance(current, str):
        return text
    strings = isinstance(current, (tuple, list)) and current and all(isinstance(v, str) for v in current)
    if strings and not text.lstrip().startswith(("(", "[")):  # a,b,c for a tuple of strings
        return type(current)(t.strip() for t in text.split(",") if t.strip())
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"--config.{field}={text!r}: expected a Python literal like {current!r}") from None
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    return value


def apply_overrides(config, overrides: Sequence[str]):
    """Set ``--config.FIELD=VALUE`` (or ``--config.FIELD VALUE``) overrides on ``config`` in place.

    A top-level ``FIELD`` the config lacks but some of its groups have is set in each of
    them (on han2015, ``--config.epochs=5`` sets ``lenet300.epochs`` and ``lenet5.epochs``).

    Args:
      config: an ``ml_collections.ConfigDict``.
      overrides: command-line tokens, e.g. ``["--config.epochs=5", "--config.seed", "3"]``.

    Returns:
      ``config``, for chaining.

    Raises:
      ValueError: for a token that is not ``--config.FIELD``, an unknown field (the message
        lists the fields) or a value that does not parse as the field's type.
    """
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--config."):
            raise ValueError(f"unrecognized argument {token!r}; settings are given as --config.FIELD=VALUE")
        if "=" in token:
            field, text = token[len("--config.") :].split("=", 1)
            i += 1
        elif i + 1 < len(tokens):
            field, text = token[len("--config.") :], tokens[i + 1]
            i += 2
        else:
            raise ValueError(f"{token} needs a value: {token}=VALUE")
        for target in _targets(config, field):
            _set(config, target, text)
    return config


def _targets(config, field: str) -> list[str]:
    """The dotted fields ``--config.FIELD`` sets: itself, or ``GROUP.FIELD`` in every group that has it."""
    import ml_collections

    *groups, key = field.split(".")
    node = config
    for part in groups:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and key in node:
        return [field]
    if not groups:  # a per-group setting given once for all groups: --config.epochs=5
        owners = [g for g, v in config.items() if isinstance(v, ml_collections.ConfigDict) and key in v]
        owners = [g for g in owners if not isinstance(config[g][key], ml_collections.ConfigDict)]
        if owners:
            return [f"{g}.{key}" for g in owners]
    raise ValueError(f"unknown config field {field!r}; fields: {', '.join(_fields(config))}")


def _set(config, field: str, text: str) -> None:
    import ml_collections

    *groups, key = field.split(".")
    node = config
    for part in groups:
        node = node[part]
    current = node[key]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"config field {field!r} is a group; set one of its fields: --config.{field}.X=...")  # noqa: TRY004
    try:
        node[key] = _parse(field, text, current)
    except TypeError as e:  # ConfigDict's own type check
        raise ValueError(f"--config.{field}={text!r}: {e}") from None


def resolve_config(
    module: ModuleType,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    data: str | None = None,
    data_dir: str | None = None,
):
    """``module.get_config(...)`` ('quick' or 'paper') with ``data``, ``data_dir`` and the overrides applied, locked."""
    config = module.get_config("quick" if quick else "paper")
    if data is not None:
        config.data = data
    if data_dir is not None:
        if "data_dir" not in config:
            raise ValueError(
                "--data-dir: this experiment's config has no data_dir field; add data_dir='' to its get_config "
                "(experiments.common.base_config does) and pass it to data.load"
            )
        config.data_dir = str(data_dir)
    apply_overrides(config, overrides)
    config.lock()
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One row per distinct value of ``keys``: mean and standard deviation over the seeds.

    Args:
      rows: every seed's rows, each tagged with ``seed``.
      keys: the columns that name a row (e.g. ``["method", "target_sparsity"]``).

    Returns:
      Rows in first-seen order with the key columns, ``seeds`` (how many rows were
      averaged), for each numeric column ``COL`` its mean and ``COL_std`` (sample standard
      deviation, ``None`` with one seed), and for other columns the value when every seed
      agrees (booleans that differ become ``"k/n"``; other values that differ, or numbers
      missing in some seed, the list of per-seed values, shown joined by " / ").

    Example:
      >>> summarize([{"m": "a", "acc": 0.9, "seed": 0}, {"m": "a", "acc": 0.8, "seed": 1}], ["m"])[0]["acc"]
      0.85
    """
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(json.dumps(r.get(k)) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        row = {k: members[0].get(k) for k in keys}
        row["seeds"] = len(members)
        for col in dict.fromkeys(c for r in members for c in r):
            if col in keys or col == "seed":
                continue
            values = [r.get(col) for r in members]
            if all(_is_number(v) for v in values):
                row[col], row[f"{col}_std"] = _mean_std([float(v) for v in values])
            elif all(v == values[0] for v in values):
                row[col] = values[0]
            elif all(isinstance(v, bool) for v in values):
                row[col] = f"{sum(values)}/{len(values)}"
            else:
                row[col] = values
        out.append(row)
    return out


def _select(rows: Sequence[dict], where: dict, name: str, seed) -> dict:
    found = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    if len(found) != 1:
        raise ValueError(
            f"comparison {name!r}: {where} matches {len(found)} rows of seed {seed}, expected exactly one; "
            "make the selector name every key column of the row"
        )
    return found[0]


def compare(rows_by_seed: dict, comparison: dict) -> dict:
    """The paired difference ``a - b`` of one comparison over seeds, and its verdict.

    Pairing by seed removes what both runs share (data order, initialisation): the spread
    of the differences is usually far smaller than the spread of either column.

    Args:
      rows_by_seed: ``{seed: rows}``.
      comparison: ``{"name", "metric", "a", "b", "higher_is_better"}`` and optionally
        ``"b_metric"`` (the column of ``b``; default ``metric``) (``common.comparison``).

    Returns:
      The comparison plus ``seeds``, ``differences`` (one per seed), ``mean_a``, ``mean_b``,
      ``mean_difference``, ``std_difference`` and ``stderr_difference`` (``None`` with one
      seed) and ``verdict``: ``"real"`` when ``|mean| > 2`` standard errors, ``"within
      noise"`` otherwise, ``"one seed, no verdict"`` with one seed; ``better`` says which
      side the mean favours (``"a"``, ``"b"`` or ``"tie"``).

    Raises:
      ValueError: when a selector does not match exactly one row of some seed, or the
        metric is missing or not a number.
    """
    name, metric = comparison["name"], comparison["metric"]
    b_metric = comparison.get("b_metric") or metric
    a_vals, b_vals = [], []
    for seed, rows in rows_by_seed.items():
        a, b = _select(rows, comparison["a"], name, seed), _select(rows, comparison["b"], name, seed)
        if not (_is_number(a.get(metric)) and _is_number(b.get(b_metric))):
            raise ValueError(f"comparison {name!r}: {metric!r} / {b_metric!r} is not a number in the rows of seed {seed}")
        a_vals.append(float(a[metric]))
        b_vals.append(float(b[b_metric]))
    diffs = [x - y for x, y in zip(a_vals, b_vals, strict=True)]
    mean, std = _mean_std(diffs)
    stderr = std / math.sqrt(len(diffs)) if std is not None else None
    if stderr is None:
        verdict = "one seed, no verdict"
    else:
        verdict = "real" if abs(mean) > 2 * stderr else "within noise"
    sign = mean if comparison.get("higher_is_better", True) else -mean
    return {
        **comparison,
        "seeds": list(rows_by_seed),
        "differences": diffs,
        "mean_a": statistics.fmean(a_vals),
        "mean_b": statistics.fmean(b_vals),
        "mean_difference": mean,
        "std_difference": std,
        "stderr_difference": stderr,
        "better": "a" if sign > 0 else "b" if sign < 0 else "tie",
        "verdict": verdict,
    }


def _pm(value, std, fmt: str | None) -> str:
    if not _is_number(value):
        return _cell(value, fmt)
    text = _cell(value, fmt)
    return text if std is None else f"{text} ± {_cell(std, fmt)}"


def _summary_table(summary: list[dict], columns: Sequence[str] | None, keys: Sequence[str], formats: dict) -> str:
    if not columns:
        columns = [c for c in dict.fromkeys(c for r in summary for c in r) if not c.endswith("_std") and c != "seeds"]
    columns = [c for c in columns if c != "seed" and any(c in r for r in summary)]
    cells = [{c: _pm(r.get(c), r.get(f"{c}_std"), formats.get(c)) for c in columns} for r in summary]
    return markdown_table(cells, columns)


def _comparisons_table(comparisons: list[dict]) -> str:
    rows = [
        {
            "claim": c["name"],
            "metric": c["metric"] if c.get("b_metric", c["metric"]) == c["metric"] else f"{c['metric']} - {c['b_metric']}",
            "a": f"{c['mean_a']:.4g}",
            "b": f"{c['mean_b']:.4g}",
            "mean a - b": f"{c['mean_difference']:+.4g}",
            "std": "" if c["std_difference"] is None else f"{c['std_difference']:.3g}",
            "stderr": "" if c["stderr_difference"] is None else f"{c['stderr_difference']:.3g}",
            "per seed": ", ".join(f"{d:+.3g}" for d in c["differences"]),
            "verdict": c["verdict"] + ("" if c["verdict"] != "real" else f" ({c['better']} better)"),
        }
        for c in comparisons
    ]
    return markdown_table(rows)


def _plot(path: Path, label: str, comparisons: list[dict], rows_by_seed: dict) -> None:
    """One panel per comparison: both sides' mean with their seed standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(comparisons))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, c in zip(axes[0], comparisons):
        sides, labels = [], []
        for side, metric in (("a", c["metric"]), ("b", c.get("b_metric") or c["metric"])):
            vals = [float(_select(rows, c[side], c["name"], s)[metric]) for s, rows in rows_by_seed.items()]
            sides.append(_mean_std(vals))
            labels.append("\n".join([*(f"{v}" for v in c[side].values()), metric]))
        ax.bar([0, 1], [m for m, _ in sides], yerr=[sd or 0.0 for _, sd in sides], capsize=6, color=["tab:blue", "tab:gray"])
        ax.set_xticks([0, 1], labels, fontsize=6)
        lo = min(m - (sd or 0) for m, sd in sides)
        hi = max(m + (sd or 0) for m, sd in sides)
        pad = max(hi - lo, 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(c["metric"])
        ax.set_title("\n".join([*textwrap.wrap(c["name"], 40), c["verdict"]]), fontsize=8)
    if not comparisons:
        axes[0][0].text(0.5, 0.5, "no comparisons declared", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.suptitle(f"{label}: mean ± std over {len(rows_by_seed)} seed(s)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)


def aggregate(label: str, seed_results: dict, config, out: Path) -> dict:
    """Combine per-seed results into ``out/results.json``, ``results.md`` and ``plot.png``.

    Args:
      label: the experiment's name.
      seed_results: ``{seed: results.json of that seed's run}``.
      config: the resolved config (its ``seed`` is the first seed).
      out: the run directory.

    Returns:
      The combined result: ``rows`` (every seed's, tagged ``seed``), ``summary``,
      ``comparisons`` (see :func:`compare`), ``deviations``, ``table`` (markdown of the summary).
    """
    from jcompress import report

    first = next(iter(seed_results.values()))
    rows_by_seed = {s: [{**r, "seed": s} for r in res["rows"]] for s, res in seed_results.items()}
    rows = [r for rs in rows_by_seed.values() for r in rs]
    keys = first.get("keys") or [k for k in dict.fromkeys(k for r in rows for k in r) if isinstance(rows[0].get(k), str)]
    summary = summarize(rows, keys)
    comparisons = [compare(rows_by_seed, c) for c in first.get("comparisons") or []]
    seeds = list(seed_results)
    table = _summary_table(summary, first.get("columns"), keys, first.get("formats") or {})
    spread = "mean ± sample standard deviation over" if len(seeds) > 1 else "one run,"
    header = f"Seeds {', '.join(map(str, seeds))}: {spread} {len(seeds)} seed(s); each seed's own results are in seed-K/.\n"
    md = [f"# {label}\n\n", header + "\n", table + "\n"]
    if comparisons:
        md.append(
            "\n## The paper's claims, paired by seed\n\nverdict: real when |mean a - b| > 2 standard errors of the "
            "paired differences, else within noise.\n\n" + _comparisons_table(comparisons) + "\n"
        )
    md.append(deviations_markdown(first.get("deviations") or []))
    notes = first.get("notes") or []
    md.append("".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    (out / "results.md").write_text("".join(md))
    _plot(out / "plot.png", label, comparisons, rows_by_seed)
    result = {
        "experiment": label,
        "seeds": seeds,
        "rows": rows,
        "summary": summary,
        "comparisons": comparisons,
        "deviations": first.get("deviations") or [],
        "keys": keys,
        "notes": notes,
        "table": table,
        "config": config.to_dict(),
    }
    report.save_json(result, out / "results.json")
    return result


def _seed_config(config, seed: int):
    seeded = config.copy_and_resolve_references()
    seeded.unlock()
    seeded.seed = seed
    seeded.lock()
    return seeded


def _finished(seed_out: Path, seed_config) -> dict | None:
    """The results of a seed run that finished with exactly ``seed_config``, else ``None``."""
    path = seed_out / "results.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    same = saved.get("config") == json.loads(json.dumps(seed_config.to_dict()))
    return saved if same and saved.get("rows") else None


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    data: str | None = None,
    data_dir: str | None = None,
    out: str | Path | None = None,
    seeds: int | None = None,
) -> dict:
    """Load, configure and run one experiment once per seed; returns the combined result.

    Args:
      name: an entry-point name (``han2015``) or a path to an experiment file.
      quick: start from ``get_config("quick")`` instead of the paper's settings.
      overrides: ``--config.FIELD=VALUE`` tokens.
      data: shorthand for ``--config.data=NAME``.
      data_dir: shorthand for ``--config.data_dir=DIR`` (prepared TFDS datasets).
      out: the work directory (default ``runs/<name>``).
      seeds: how many seeds (default 3, or 1 with ``quick``): ``config.seed``,
        ``config.seed + 1``, ...; seed ``K`` runs in ``out/seed-K/``, and a seed whose
        ``results.json`` holds the same config is not run again.

    Returns:
      :func:`aggregate`'s result plus ``"config"`` (the resolved ConfigDict) and ``"out"``.

    Raises:
      ValueError: unknown experiment or field, bad value (see :func:`apply_overrides`),
        ``seeds < 1``.
      RuntimeError: when the experiment returns no rows.
    """
    from jcompress import report

    n_seeds = (1 if quick else 3) if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"seeds={seeds!r}: expected an integer >= 1 (how many seeds to run)")
    label, module = load(name)
    config = resolve_config(module, quick=quick, overrides=overrides, data=data, data_dir=data_dir)
    out = Path(out) if out is not None else Path("runs") / label
    seed_results = {}
    for seed in range(config.seed, config.seed + n_seeds):
        seed_config = _seed_config(config, seed)
        seed_out = out / f"seed-{seed}"
        saved = _finished(seed_out, seed_config)
        if saved is None:
            result = module.run(seed_config, seed_out)
            if not isinstance(result, dict) or not result.get("rows"):
                raise RuntimeError(f"experiment {label!r} returned no rows; expected {{'rows': [...], 'table': ...}}")
            path = seed_out / "results.json"
            saved = json.loads(path.read_text()) if path.exists() else {"experiment": label, **result}
            saved = {**saved, "config": seed_config.to_dict()}
            report.save_json(saved, path)
            saved = json.loads(path.read_text())
        seed_results[seed] = saved
    result = aggregate(label, seed_results, config, out)
    return {**result, "config": config, "out": out}
