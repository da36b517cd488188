"""``jcompress run NAME|PATH [--quick] [--seeds N] [--config.FIELD=VALUE ...] [--data NAME] [--data-dir DIR] [--out DIR]``.

Runs one experiment (see :mod:`jcompress.experiments_cli`): an installed one by name
(``han2015``) or a file of your own (``path/to/my_exp.py``), with the paper's settings or
``--quick`` ones, each overridable as ``--config.FIELD=VALUE``, once per seed (3 by
default, 1 with ``--quick``); prints the table of means and standard deviations over the
seeds and the paper's claims as paired differences with their verdicts.

Example:
  $ jcompress run han2015 --quick --config.seed=3 --out /tmp/han
  $ jcompress run hinton2015 --seeds 5 --out /tmp/hinton
"""

from __future__ import annotations

import argparse
import time

from jcompress.cli.args import new_dir, positive_int

__all__ = ["main", "register"]


def register(subparsers) -> None:
    """Add ``jcompress run`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "run",
        help="run an experiment (e.g. han2015, lottery_ticket, or path/to/my_exp.py); --config.FIELD=VALUE overrides",
        epilog="settings: --config.FIELD=VALUE (repeatable; nested fields as --config.GROUP.FIELD=VALUE), parsed "
        "as the type of the field's default; an unknown field or a bad value exits with status 2",
    )
    p.add_argument("name", help="an experiment name (jcompress.experiments entry point) or the path of a .py file")
    p.add_argument("--quick", action="store_true", help="start from get_config('quick'): tiny epochs and sizes")
    p.add_argument("--data", default=None, help="dataset (same as --config.data=NAME), e.g. digits or tfds:NAME")
    p.add_argument(
        "--data-dir", default=None, help="where prepared TFDS datasets live (same as --config.data_dir=DIR)"
    )
    p.add_argument(
        "--seeds", type=positive_int, default=None,
        help="run each of N seeds (config.seed, config.seed+1, ...) in OUT/seed-K/, skipping finished ones; "
        "default 3, or 1 with --quick",
    )  # fmt: skip
    p.add_argument("--out", type=new_dir, default=None, help="output directory (default runs/NAME)")
    p.set_defaults(func=main, accepts_overrides=True)


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress run`` for parsed ``args`` (``args.overrides``: the ``--config.*`` tokens)."""
    from jcompress import experiments_cli

    t0 = time.perf_counter()
    result = experiments_cli.run_experiment(
        args.name,
        quick=args.quick,
        overrides=getattr(args, "overrides", ()),
        data=args.data,
        data_dir=args.data_dir,
        out=args.out,
        seeds=args.seeds,
    )
    print(result["table"])
    for c in result["comparisons"]:
        spread = "" if c["stderr_difference"] is None else f" (std {c['std_difference']:.3g}, stderr {c['stderr_difference']:.3g})"
        print(f"{c['name']}: {c['metric']} a - b = {c['mean_difference']:+.4g}{spread}: {c['verdict']}")
    print(
        f"\n{args.name}: {len(result['seeds'])} seed(s) in {time.perf_counter() - t0:.1f} s; results in {result['out']}/ "
        "(results.json with every seed's rows, the summary and the resolved config, results.md, plot.png; "
        "each seed's own files in seed-K/)"
    )
    return 0
