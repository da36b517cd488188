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

Example:
  $ jcompress run han2015 --quick --config.seed=3 --out /tmp/han
  $ jcompress run ./my_exp.py --config.epochs=5
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["ENTRY_POINT_GROUP", "apply_overrides", "available", "load", "resolve_config", "run_experiment"]

ENTRY_POINT_GROUP = "jcompress.experiments"


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


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    data: str | None = None,
    data_dir: str | None = None,
    out: str | Path | None = None,
) -> dict:
    """Load, configure and run one experiment; returns ``{"rows", "table", "config", "out"}``.

    Args:
      name: an entry-point name (``han2015``) or a path to an experiment file.
      quick: start from ``get_config("quick")`` instead of the paper's settings.
      overrides: ``--config.FIELD=VALUE`` tokens.
      data: shorthand for ``--config.data=NAME``.
      data_dir: shorthand for ``--config.data_dir=DIR`` (prepared TFDS datasets).
      out: the work directory (default ``runs/<name>``); ``results.json`` there gets the
        resolved config under ``"config"``.

    Raises:
      ValueError: unknown experiment or field, bad value (see :func:`apply_overrides`).
      RuntimeError: when the experiment returns no rows.
    """
    from jcompress import report

    label, module = load(name)
    config = resolve_config(module, quick=quick, overrides=overrides, data=data, data_dir=data_dir)
    out = Path(out) if out is not None else Path("runs") / label
    result = module.run(config, out)
    if not isinstance(result, dict) or not result.get("rows"):
        raise RuntimeError(f"experiment {label!r} returned no rows; expected {{'rows': [...], 'table': ...}}")
    results = out / "results.json"
    saved = json.loads(results.read_text()) if results.exists() else {"experiment": label, **result}
    report.save_json({**saved, "config": config.to_dict()}, results)
    return {**result, "config": config, "out": out}
