"""The ``jcompress`` command line: train, demo, distill, run (experiments), bench."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 300,100, got {text!r}") from None


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset and checkpoint it")
    p.add_argument("--model", default="lenet300", help="lenet300, lenet5, mlp, cnn1d or resnet")
    p.add_argument("--widths", type=_ints, default=None, help="hidden widths for mlp/resnet, e.g. 1200,1200")
    p.add_argument("--dropout", type=float, default=None, help="hidden dropout rate (mlp, lenet300)")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist1d or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory: ckpt/ (orbax) and metrics.jsonl; resumes if present")
    p.set_defaults(func=_train)


def _train(args) -> int:
    import optax

    from jcompress import data, models, train

    ds = data.load(args.data, data_dir=args.data_dir)
    kwargs = {}
    if args.widths is not None:
        kwargs["widths"] = list(args.widths)
    if args.dropout is not None:
        kwargs["dropout"] = args.dropout
    config = dict(name=args.model, input_shape=list(ds.input_shape), num_classes=ds.num_classes, seed=args.seed, **kwargs)
    model = models.create(**config)
    fn = models.functional(model)
    result = train.fit(
        fn.apply, fn.params, fn.extra, ds, tx=optax.adam(args.lr), epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, out_dir=args.out, meta={"model": config, "data": args.data},
    )
    last = result.history[-1] if result.history else {}
    print(json.dumps(last))
    print(f"checkpoint: {Path(args.out) / 'ckpt'}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train LeNet-300-100 on mnist5k and run the compression pipeline")
    p.add_argument("--out", default="jcompress-demo", help="output directory (report.json, report.png, files)")
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs")
    p.set_defaults(func=lambda a: importlib.import_module("jcompress.demo").main(out=Path(a.out), epochs=a.epochs))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks (same as python -m jcompress.bench)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--only", default=None, help="comma-separated benchmark modules, e.g. b1_threshold,b3_kmeans")
    p.set_defaults(func=lambda a: importlib.import_module("jcompress.bench.__main__").main(a))


# Subcommands defined next to the code they drive: module path -> its register(subparsers).
_EXTERNAL = ("jcompress.distill.run", "jcompress.experiments_cli", "jcompress.advisor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_demo(sub)
    _add_bench(sub)
    for mod in _EXTERNAL:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"jcompress {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
