"""``jcompress train``: train a registered model on a dataset and checkpoint it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jcompress.cli.args import widths

__all__ = ["main", "register"]


def register(subparsers) -> None:
    """Add ``jcompress train`` to the CLI's subparsers."""
    p = subparsers.add_parser("train", help="train a model on a dataset and checkpoint it")
    p.add_argument("--model", default="lenet300", help="lenet300, lenet5, mlp, cnn1d or resnet")
    p.add_argument("--widths", type=widths, default=None, help="hidden widths for mlp/resnet, e.g. 1200,1200")
    p.add_argument("--dropout", type=float, default=None, help="hidden dropout rate (mlp, lenet300)")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist1d or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory: ckpt/ (orbax) and metrics.jsonl; resumes if present")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress train``; prints the last epoch's metrics as JSON and the checkpoint path."""
    import optax

    from jcompress import data, models, train

    ds = data.load(args.data, data_dir=args.data_dir)
    kwargs = {}
    if args.widths is not None:
        kwargs["widths"] = list(args.widths)
    if args.dropout is not None:
        kwargs["dropout"] = args.dropout
    config = dict(
        name=args.model, input_shape=list(ds.input_shape), num_classes=ds.num_classes, seed=args.seed, **kwargs
    )
    model = models.create(**config)
    fn = models.functional(model)
    result = train.fit(
        fn.apply, fn.params, fn.extra, ds, tx=optax.adam(args.lr), epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, out_dir=args.out, meta={"model": config, "data": args.data},
    )  # fmt: skip
    last = result.history[-1] if result.history else {}
    print(json.dumps(last))
    print(f"checkpoint: {Path(args.out) / 'ckpt'}")
    return 0
