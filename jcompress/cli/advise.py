"""``jcompress advise``: try compression recipes on a trained model and recommend one.

Candidates are ranked and recommended on the dataset's validation split; the test split
is evaluated once per candidate and shown beside it. Latency is the median of interleaved
forward passes on 256 validation inputs, with its interquartile range; a difference from
dense within that spread is shown as "same as dense".

Example:
  $ jcompress advise --model runs/lenet300/ckpt --data mnist5k --max-bytes 60000 --max-accuracy-drop 0.01
"""

from __future__ import annotations

import argparse

from jcompress.cli.args import fraction, new_dir, nonnegative_int, positive_float, positive_int

__all__ = ["main", "register"]


def register(subparsers) -> None:
    """Add ``jcompress advise`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "advise", help="try compression recipes on a trained model, print the Pareto front and recommend one"
    )
    p.add_argument(
        "--model", required=True, help="model checkpoint directory (e.g. the ckpt/ of 'jcompress train --out DIR')"
    )
    p.add_argument("--data", required=True, help="mnist5k, digits, mnist1d or tfds:NAME (the model's dataset)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--max-bytes", type=positive_float, default=None, help="largest acceptable file, bytes")
    p.add_argument(
        "--max-accuracy-drop", type=fraction, default=None, help="largest accuracy drop, fraction (0.01 = 1 point)"
    )
    p.add_argument(
        "--max-latency-ms",
        type=positive_float,
        default=None,
        help="largest median forward time on 256 validation inputs, ms",
    )
    p.add_argument(
        "--keep-architecture", action="store_true", help="recommend only recipes that keep layers and shapes"
    )
    p.add_argument(
        "--epochs", type=nonnegative_int, default=None, help="fine-tuning epochs per stage, 0 for none (default 1)"
    )
    p.add_argument(
        "--distill-epochs", type=positive_int, default=None, help="epochs per distilled student (default 10, quick 3)"
    )
    p.add_argument("--quick", action="store_true", help="a short list of recipes (about a minute on a laptop)")
    p.add_argument(
        "--out", type=new_dir, default="runs/advise", help="output directory: advice.json, advice.md, plot.png"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress advise`` for parsed ``args``; prints the table, the front and the reason."""
    from jcompress import advisor, checkpoint, models
    from jcompress import data as data_lib

    model, config, _ = checkpoint.load_model(args.model, build=models.from_meta)
    ds = data_lib.load(args.data, data_dir=args.data_dir)
    if (
        tuple(config.get("input_shape", ds.input_shape)) != ds.input_shape
        or config.get("num_classes") != ds.num_classes
    ):
        raise ValueError(
            f"the model in {args.model} takes inputs {tuple(config.get('input_shape', ()))} with "
            f"{config.get('num_classes')} classes, but {args.data} has {ds.input_shape} and {ds.num_classes}; "
            "pass the dataset the model was trained on"
        )
    distill_epochs = args.distill_epochs if args.distill_epochs is not None else (3 if args.quick else 10)
    f = advisor.data_functions(model, config, ds, distill_epochs=distill_epochs)
    advice = advisor.advise(
        model, f.apply_fn, f.eval_fn, test_fn=f.test_fn, inputs=f.inputs, max_bytes=args.max_bytes,
        max_accuracy_drop=args.max_accuracy_drop, max_latency_ms=args.max_latency_ms, finetune_fn=f.finetune_fn,
        distill_fn=f.distill_fn,
        keep_architecture=args.keep_architecture, epochs=1 if args.epochs is None else args.epochs, quick=args.quick,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    paths = advisor.write_advice(advice, args.out)
    print()
    print(advisor.format_rows(advice.rows))
    print("\nChosen on validation accuracy; test accuracy is reported, never used for the choice.")
    print("Pareto front (* above): " + ", ".join(r["name"] for r in advice.pareto))
    print(f"\n{advice.reason}")
    print(f"\nwritten: {paths['json']}, {paths['md']}, {paths['plot']}")
    return 0
