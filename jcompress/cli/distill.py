"""``jcompress distill``: distill a saved teacher into a smaller student (Hinton et al. 2015).

Example:
  $ jcompress distill --teacher runs/teacher/ckpt --student mlp --widths 800,800 \\
      --data mnist5k --epochs 20 --temperature 20 --alpha 0.9 --out runs/student
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jcompress.cli.args import widths

__all__ = ["main", "register"]


def register(subparsers) -> None:
    """Add the ``distill`` subcommand to the ``jcompress`` argument parser."""
    p = subparsers.add_parser("distill", help="distill a saved teacher into a smaller student (Hinton et al. 2015)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory (e.g. runs/teacher/ckpt)")
    p.add_argument("--student", default="mlp", help="student model: a jcompress.models name such as mlp or lenet300")
    p.add_argument("--widths", type=widths, default=None, help="student hidden widths for mlp/resnet, e.g. 800,800")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, mnist1d or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T of the soft targets")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft targets in [0, 1]")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-cache", action="store_true", help="run the teacher in every step instead of caching its logits"
    )
    p.add_argument("--out", required=True, help="run directory: ckpt/ (orbax) and metrics.jsonl; resumes if present")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``jcompress distill``; prints the last epoch's metrics as JSON and the checkpoint path."""
    from jcompress import data as data_lib
    from jcompress.distill.run import distill

    ds = data_lib.load(args.data, data_dir=args.data_dir)
    student_config: dict = {"name": args.student}
    if args.widths is not None:
        student_config["widths"] = list(args.widths)
    res = distill(
        args.teacher, student_config, ds, epochs=args.epochs, batch_size=args.batch_size, temperature=args.temperature,
        alpha=args.alpha, lr=args.lr, out_dir=args.out, seed=args.seed, cache_teacher=not args.no_cache,
    )  # fmt: skip
    last = res.history[-1] if res.history else {}
    print(json.dumps({**last, "teacher_test_accuracy": res.teacher_accuracy}))
    print(f"checkpoint: {Path(args.out) / 'ckpt'}")
    return 0
