"""Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 3 (MNIST).

Command: ``jcompress run hinton2015 [--quick] [--data mnist5k]``

Method, as in the paper: a large teacher, an MLP with two hidden layers of 1,200 ReLU
units trained with dropout (0.5 on hidden units, 0.2 on the inputs), and a smaller
student, an MLP 800-800 without dropout. The student is trained twice from the same
initialisation, on the same batches, for the same epochs with the same optimizer:
alone on the hard labels, and with Hinton's loss
``(1 - alpha) * CE(labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
(``jcompress.distill``; the teacher's logits are computed once and cached). The sweep
covers ``T`` in {1, 2, 5, 10, 20} and ``alpha`` in {0.5, 0.9}. The paper adds input
jitter of up to 2 pixels for the teacher; we do not.

Reported per row: test errors out of the 1,000 test images, parameters, and the fraction
of the gap between the student trained alone and the teacher that distillation closes:
``(errors_alone - errors_distilled) / (errors_alone - errors_teacher)`` (above 1 when the
distilled student beats the teacher).

Expected result (mnist5k: 4,000 training / 1,000 test images of real MNIST, 30 epochs of
Adam at 1e-3). Measured once: teacher 43 errors, student alone 53, distilled students
39-44 at ``T >= 5`` (gap closed 0.9-1.4, i.e. as good as the teacher or better), 43-46 at
``T = 2``; ``T = 1`` does not help (53 errors at alpha 0.5, 61 at alpha 0.9, where the
soft targets are nearly the hard ones and carry little else). The paper, on full MNIST
(60,000 training images): teacher 67 errors, student alone 146, distilled at ``T = 20``
74 errors (out of 10,000). The student has 1.9x fewer parameters than the teacher
(1,276,810 vs 2,395,210), as in the paper.

Runtime on 2 idle CPU cores: full about 3-4 minutes (12 trainings of 30 epochs; 12 minutes
when the cores were shared with other jobs);
``--quick`` (teacher 128-128 and student 32-32, 2 epochs, ``T`` in {2, 20}, ``alpha`` 0.9)
about 10-20 s.

Writes ``results.json`` (rows and configuration), ``results.md`` and ``plot.png`` (test
errors against ``T`` for each ``alpha``, with the teacher and the student alone).
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections
import numpy as np

from experiments import common
from jcompress.distill import run as distill_run

__all__ = ["PAPER", "get_config", "run"]

def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """The paper's MNIST settings (``'paper'``), or small networks and two epochs (``'quick'``).

    The teacher is initialised with ``seed``, the student alone and the distilled students
    with ``seed + 1`` (the same for all of them).
    """
    config = common.base_config(
        variant, data="mnist5k", teacher_widths=(1200, 1200), student_widths=(800, 800), epochs=30,
        temperatures=(1.0, 2.0, 5.0, 10.0, 20.0), alphas=(0.5, 0.9), lr=1e-3, batch_size=128,
    )  # fmt: skip
    if config.quick:
        config.update({
            "teacher_widths": (128, 128), "student_widths": (32, 32), "epochs": 2, "temperatures": (2.0, 20.0),
            "alphas": (0.9,),
        })  # fmt: skip
    return config


PAPER = {"teacher_errors": 67, "student_alone_errors": 146, "distilled_errors_T20": 74, "test_images": 10_000}


def _errors(accuracy: float, n: int) -> int:
    return round((1.0 - accuracy) * n)


def _params(tree_) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree.leaves(tree_)))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train the teacher, the student alone and the distilled students; write the results to ``workdir``."""
    cfg, out = config, Path(workdir)
    ds = common.load_data(config.data, config.data_dir)
    n_test = len(ds.y_test)
    t0 = time.perf_counter()
    teacher = common.train_model(
        "mlp", ds, widths=cfg["teacher_widths"], dropout=0.5, input_dropout=0.2, epochs=cfg["epochs"], lr=cfg["lr"],
        batch_size=cfg["batch_size"], seed=config.seed,
    )  # fmt: skip
    alone = common.train_model(
        "mlp",
        ds,
        widths=cfg["student_widths"],
        epochs=cfg["epochs"],
        lr=cfg["lr"],
        batch_size=cfg["batch_size"],
        seed=config.seed + 1,
    )
    teacher_err, alone_err = _errors(teacher.accuracy, n_test), _errors(alone.accuracy, n_test)
    gap = alone_err - teacher_err
    widths = lambda w: "-".join(map(str, w))
    rows = [
        {"model": f"teacher {widths(cfg['teacher_widths'])} (dropout)", "T": None, "alpha": None,
         "test_errors": teacher_err, "params": _params(teacher.params), "gap_closed": None},
        {"model": f"student {widths(cfg['student_widths'])} alone", "T": None, "alpha": None,
         "test_errors": alone_err, "params": _params(alone.params), "gap_closed": 0.0 if gap > 0 else None},
    ]  # fmt: skip
    for alpha in cfg["alphas"]:
        for T in cfg["temperatures"]:
            res = distill_run.distill_model(
                teacher.model, {"name": "mlp", "widths": list(cfg["student_widths"])}, ds, epochs=cfg["epochs"],
                batch_size=cfg["batch_size"], temperature=T, alpha=alpha, lr=cfg["lr"], seed=config.seed + 1, progress=False,
            )  # fmt: skip
            err = _errors(res.history[-1]["test_accuracy"], n_test)
            rows.append(
                {
                    "model": f"student {widths(cfg['student_widths'])} distilled",
                    "T": T,
                    "alpha": alpha,
                    "test_errors": err,
                    "params": _params(res.params),
                    "gap_closed": (alone_err - err) / gap if gap > 0 else None,
                }
            )
    seconds = time.perf_counter() - t0

    fig, ax = common.figure()
    for alpha in cfg["alphas"]:
        pts = [(r["T"], r["test_errors"]) for r in rows if r["alpha"] == alpha]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"distilled, alpha={alpha}")
    ax.axhline(teacher_err, color="k", ls="--", label="teacher")
    ax.axhline(alone_err, color="r", ls=":", label="student alone")
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel(f"test errors (of {n_test})")
    ax.set_title(f"Distillation on {ds.name}")
    ax.legend()
    notes = [
        f"{ds.name}: {len(ds.y_train)} training / {n_test} test images; {cfg['epochs']} epochs of Adam {cfg['lr']} for every model.",
        f"Student alone and distilled students share initialisation (seed {config.seed + 1}), batches and optimizer; only the loss differs.",
        "gap_closed = (errors alone - errors distilled) / (errors alone - errors teacher); above 1 beats the teacher.",
        (
            f"Paper (full MNIST, of 10,000): teacher {PAPER['teacher_errors']}, student alone {PAPER['student_alone_errors']}, "
            f"distilled T=20 {PAPER['distilled_errors_T20']}."
        ),
        f"Total time {seconds:.0f} s.",
    ]
    return common.write_results(
        out, rows, figure=fig, name="hinton2015", columns=["model", "T", "alpha", "test_errors", "params", "gap_closed"],
        formats={"gap_closed": "{:.2f}"}, notes=notes, config=config, paper=PAPER,
        seconds=seconds,
    )  # fmt: skip
