"""``jcompress run NAME [--quick] [--data NAME] [--out DIR]``: run one experiment.

An experiment is any module ``experiments/<name>.py`` that defines a top-level function
``run(*, quick, data, out)``. Modules are discovered by reading the package's files
(``ast``, no import), so a new experiment file is runnable, and tested, without being
registered anywhere. The experiment writes ``DIR/results.json``, ``DIR/results.md`` and
``DIR/plot.png`` (default ``DIR``: ``runs/<name>``); the markdown table is printed at the end.

Example:
  $ jcompress run han2015 --quick --out /tmp/han
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import time
from pathlib import Path

__all__ = ["available", "run_experiment", "register"]

_PACKAGE = "experiments"


def _package_dir() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the '{_PACKAGE}' package is not importable; install jcompress from its source tree "
            "(pip install -e .), which ships experiments/ beside jcompress/"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _defines_run(path: Path) -> bool:
    try:
        module = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in module.body)


def available() -> list[str]:
    """Names of the experiments: modules in ``experiments/`` with a top-level ``run``, sorted."""
    return sorted(p.stem for p in _package_dir().glob("*.py") if not p.stem.startswith("_") and _defines_run(p))


def run_experiment(name: str, *, quick: bool = False, data: str | None = None, out: str | Path | None = None) -> dict:
    """Import ``experiments.<name>`` and call its ``run``; returns ``{"rows", "table"}``.

    Raises:
      ValueError: for an unknown name (the message lists the available experiments), or
        when the experiment returns no rows.
    """
    names = available()
    if name not in names:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names) or '(none found)'}")
    module = importlib.import_module(f"{_PACKAGE}.{name}")
    out = Path(out) if out is not None else Path("runs") / name
    result = module.run(quick=quick, data=data, out=out)
    if not isinstance(result, dict) or not result.get("rows"):
        raise RuntimeError(f"experiment {name!r} returned no rows; expected {{'rows': [...], 'table': ...}}")
    return result


def _main(args) -> int:
    t0 = time.perf_counter()
    result = run_experiment(args.name, quick=args.quick, data=args.data, out=args.out)
    out = Path(args.out) if args.out is not None else Path("runs") / args.name
    print(result["table"])
    print(f"\n{args.name}: {time.perf_counter() - t0:.1f} s; results in {out}/ (results.json, results.md, plot.png)")
    return 0


def register(subparsers) -> None:
    """Add the ``run`` subcommand to the ``jcompress`` argument parser."""
    p = subparsers.add_parser("run", help="run an experiment from experiments/ (e.g. han2015, lottery_ticket)")
    p.add_argument("name", help="experiment name: a module experiments/<name>.py")
    p.add_argument("--quick", action="store_true", help="tiny epochs and sizes (seconds; what the tests run)")
    p.add_argument("--data", default=None, help="dataset (default: the experiment's own, e.g. mnist5k); tfds:NAME")
    p.add_argument("--out", default=None, help="output directory (default runs/NAME)")
    p.set_defaults(func=_main)
