"""``jcompress demo`` (the main job) and ``jcompress bench`` (the benchmarks)."""

from __future__ import annotations

import argparse

from jcompress.cli.args import new_dir, positive_int, seed

__all__ = ["register"]


def _demo(args: argparse.Namespace) -> int:
    from jcompress import demo

    return demo.main(out=args.out, epochs=args.epochs, seed=args.seed)


def _bench(args: argparse.Namespace) -> int:
    from jcompress.bench import __main__ as bench_main

    if args.only:
        names = bench_main.modules()
        unknown = sorted({w.strip() for w in args.only.split(",") if w.strip()} - set(names))
        if unknown:
            raise ValueError(f"--only: unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    return bench_main.main(args)


def register(subparsers) -> None:
    """Add ``jcompress demo`` and ``jcompress bench`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="Deep Compression of LeNet-300-100 on mnist5k: every stage's validation and test accuracy and file size",
    )
    p.add_argument(
        "--out", type=new_dir, default="jcompress-demo", help="output directory (report.json, report.png, files)"
    )
    p.add_argument("--epochs", type=positive_int, default=None, help="override the dense training epochs (>= 1)")
    p.add_argument("--seed", type=seed, default=0, help="model initialisation and batch order (>= 0)")
    p.set_defaults(func=_demo)

    p = subparsers.add_parser("bench", help="run the benchmarks (same as python -m jcompress.bench)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--only", default=None, help="comma-separated benchmark modules, e.g. b1_threshold,b3_kmeans")
    p.set_defaults(func=_bench)
