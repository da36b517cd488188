"""``jcompress train``: train a registered model on a dataset and checkpoint it.

Each epoch is evaluated on the validation split (``metrics.jsonl``: ``val_accuracy``,
``val_loss``); the test split is measured once, on the trained model, and written with
the final validation figures to ``--out/final.json`` and the last printed line. Rerunning
the same command line resumes the run in ``--out`` (``--epochs`` may grow); a run
directory whose saved settings differ is refused unless ``--override`` is given (see
:mod:`jcompress.cli.resume`).
"""

from __future__ import annotations

import argparse
import json

from jcompress.cli.args import new_dir, positive_float, positive_int, rate, seed, widths
from jcompress.cli.resume import run_meta

__all__ = ["main", "register"]


def register(subparsers) -> None:
    """Add ``jcompress train`` to the CLI's subparsers."""
    p = subparsers.add_parser("train", help="train a model on a dataset and checkpoint it")
    p.add_argument("--model", default="lenet300", help="lenet300, lenet5, mlp, cnn1d or resnet")
    p.add_argument("--widths", type=widths, default=None, help="hidden widths for mlp/resnet, e.g. 1200,1200")
    p.add_argument("--dropout", type=rate, default=None, help="hidden dropout rate in [0, 1) (mlp, lenet300)")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist1d or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs in all (a resumed run trains the rest)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (> 0)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--out", type=new_dir, required=True, help="run directory: ckpt/ (orbax) and metrics.jsonl; resumes if present"
    )
    p.add_argument(
        "--override", action="store_true", help="resume a run in --out even if its saved settings differ (recorded)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress train``; prints the last epoch's row, the final validation and test figures, the checkpoint."""
    settings = {
        "model": args.model,
        "widths": None if args.widths is None else list(args.widths),
        "dropout": args.dropout,
        "data": args.data,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
    }
    meta = run_meta(args.out, "train", settings, override=args.override)

    from jcompress import data

    ds = data.load(args.data, data_dir=args.data_dir)  # before the heavy imports: a bad dataset fails fast

    import optax

    from jcompress import models, train

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
    try:
        result = train.fit(
            fn.apply, fn.params, fn.extra, ds, tx=optax.adam(args.lr), epochs=args.epochs,
            batch_size=args.batch_size, seed=args.seed, out_dir=args.out,
            meta={"model": config, "data": args.data, **meta},
        )  # fmt: skip
    except FloatingPointError as e:  # a diverged --lr: the user's to fix, so one line, exit status 2
        raise ValueError(f"--lr {args.lr}: {e}") from e
    last = result.history[-1] if result.history else {}
    epochs = int(last.get("epoch", args.epochs))
    final = train.final_metrics(fn.apply, result.params, result.extra, ds, epochs=epochs, out_dir=args.out)
    print(json.dumps(last))
    print(
        f"final (epoch {epochs}): validation accuracy {final['val_accuracy']:.4f}, "
        f"test accuracy {final['test_accuracy']:.4f} (test measured once, here; written to {args.out / 'final.json'})"
    )
    print(f"checkpoint: {args.out / 'ckpt'}")
    return 0
