"""``jcompress distill``: distill a saved teacher into a smaller student (Hinton et al. 2015).

Every epoch is evaluated on the validation split (``metrics.jsonl``); the test split is
measured once, on the final student, and written to ``--out/final.json``.

Example:
  $ jcompress distill --teacher runs/teacher/ckpt --student mlp --widths 800,800 \\
      --data mnist5k --epochs 20 --temperature 20 --alpha 0.9 --out runs/student
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jcompress.cli.args import fraction, new_dir, positive_float, positive_int, seed, widths
from jcompress.cli.resume import run_meta

__all__ = ["main", "register"]


def register(subparsers) -> None:
    """Add the ``distill`` subcommand to the ``jcompress`` argument parser."""
    p = subparsers.add_parser("distill", help="distill a saved teacher into a smaller student (Hinton et al. 2015)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory (e.g. runs/teacher/ckpt)")
    p.add_argument("--student", default="mlp", help="student model: a jcompress.models name such as mlp or lenet300")
    p.add_argument("--widths", type=widths, default=None, help="student hidden widths for mlp/resnet, e.g. 800,800")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist1d or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs in all (a resumed run trains the rest)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--temperature", type=positive_float, default=4.0, help="softmax temperature T (> 0)")
    p.add_argument("--alpha", type=fraction, default=0.9, help="weight of the soft targets in [0, 1]")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (> 0)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--no-cache", action="store_true", help="run the teacher in every step instead of caching its logits"
    )
    p.add_argument(
        "--out", type=new_dir, required=True, help="run directory: ckpt/ (orbax) and metrics.jsonl; resumes if present"
    )
    p.add_argument(
        "--override", action="store_true", help="resume a run in --out even if its saved settings differ (recorded)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress distill``; prints the last epoch's row, the final validation and test figures, the checkpoint."""
    teacher = Path(args.teacher).expanduser()
    if not teacher.is_dir():
        raise FileNotFoundError(
            f"--teacher {args.teacher}: no such checkpoint directory (the ckpt/ of 'jcompress train --out DIR')"
        )
    settings = {
        "teacher": str(teacher.absolute()),
        "student": args.student,
        "widths": None if args.widths is None else list(args.widths),
        "data": args.data,
        "batch_size": args.batch_size,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "lr": args.lr,
        "seed": args.seed,
    }
    meta = run_meta(args.out, "distill", settings, override=args.override)

    from jcompress import data as data_lib

    ds = data_lib.load(args.data, data_dir=args.data_dir)  # before the heavy imports: a bad dataset fails fast
    _check_teacher_fits(teacher, args.data, ds)

    from jcompress.distill.run import distill

    student_config: dict = {"name": args.student}
    if args.widths is not None:
        student_config["widths"] = list(args.widths)
    try:
        res = distill(
            args.teacher, student_config, ds, epochs=args.epochs, batch_size=args.batch_size,
            temperature=args.temperature, alpha=args.alpha, lr=args.lr, out_dir=args.out, seed=args.seed,
            cache_teacher=not args.no_cache, meta=meta,
        )  # fmt: skip
    except FloatingPointError as e:  # a diverged --lr: the user's to fix, so one line, exit status 2
        raise ValueError(f"--lr {args.lr}: {e}") from e
    last = res.history[-1] if res.history else {}
    print(json.dumps(last))
    print(
        f"final (epoch {last.get('epoch', args.epochs)}): student validation accuracy {res.val_accuracy:.4f}, "
        f"test accuracy {res.test_accuracy:.4f}; teacher validation {res.teacher_val_accuracy:.4f}, test "
        f"{res.teacher_accuracy:.4f} (test measured once per model; written to {args.out / 'final.json'})"
    )
    print(f"checkpoint: {args.out / 'ckpt'}")
    return 0


def _check_teacher_fits(teacher, data_name: str, ds) -> None:
    """The teacher's saved input shape and classes against the dataset's, before anything is built."""
    from jcompress import checkpoint

    ck = checkpoint.Checkpointer(teacher)
    try:
        if ck.latest_step() is None:
            raise FileNotFoundError(f"--teacher {teacher}: no checkpoint in this directory")
        config = ck.read_meta().get("model", {})
    finally:
        ck.close()
    shape, classes = config.get("input_shape"), config.get("num_classes")
    if (shape is not None and tuple(shape) != ds.input_shape) or (classes is not None and classes != ds.num_classes):
        raise ValueError(
            f"--teacher {teacher} takes inputs {tuple(shape or ())} with {classes} classes, but --data {data_name} "
            f"has {ds.input_shape} and {ds.num_classes}; pass the dataset the teacher was trained on"
        )
