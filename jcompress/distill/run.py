"""Distill a saved teacher into a student: a resumable run, a demo stage, and ``jcompress distill``.

``distill(teacher_dir, student_config, dataset, ...)`` loads the teacher with
``checkpoint.load_model``, builds the student from its config, and trains it on the
distillation loss with the jitted data-parallel step of :mod:`jcompress.distill.step`.
Like ``train.fit`` it shows a tqdm bar, evaluates every epoch on the validation split,
appends one JSON line per epoch to ``out_dir/metrics.jsonl`` and writes an orbax
checkpoint to ``out_dir/ckpt`` every epoch; the test split is measured once, on the
final student (``DistillResult.test_accuracy``, ``out_dir/final.json``).
Batches and dropout keys depend on ``(seed, epoch, step)`` only and the teacher's logits
are deterministic, so a resumed run ends with exactly the params of an uninterrupted one.
The checkpoint records the student's model config, so ``checkpoint.load_model(out_dir /
'ckpt')`` gives the distilled student as an NNX model.

Command line (``jcompress.cli.distill``)::

    jcompress distill --teacher runs/teacher/ckpt --student mlp --widths 800,800 \\
        --data mnist5k --epochs 20 --temperature 20 --alpha 0.9 --out runs/student
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jcompress import checkpoint, models, parallel, train, tree
from jcompress import data as data_lib
from jcompress.distill import losses
from jcompress.distill.step import (
    DistillConfig,
    DistillState,
    init_state,
    make_step,
    teacher_logits,
)

__all__ = ["DistillResult", "demo_stage", "distill", "distill_model"]


class DistillResult(NamedTuple):
    """The distilled student and its figures.

    Attributes:
      params, extra: the student's trained state; ``state``: the final :class:`DistillState`.
      history: one row per epoch (``train_*``, and ``val_accuracy``/``val_loss``).
      model_config: ``models.create(**model_config)`` rebuilds the student.
      teacher_accuracy: the teacher's test accuracy; ``teacher_val_accuracy`` its validation one.
      val_accuracy, test_accuracy: the final student's, test measured once after training.
    """

    params: Any
    extra: Any
    state: DistillState
    history: list
    model_config: dict
    teacher_accuracy: float
    teacher_val_accuracy: float
    val_accuracy: float
    test_accuracy: float


def distill(
    teacher_dir: str | Path,
    student_config: dict,
    dataset: str | data_lib.Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    temperature: float = 4.0,
    alpha: float = 0.9,
    lr: float = 1e-3,
    out_dir: str | Path | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> DistillResult:
    """Distill the model saved in ``teacher_dir`` into a new student.

    Args:
      teacher_dir: a model checkpoint (``train.fit``'s ``out/ckpt`` or ``save_model``'s dir).
      student_config: arguments of ``models.create`` such as ``{'name': 'mlp', 'widths':
        [800, 800]}``; ``input_shape``, ``num_classes`` and ``seed`` default to the data's
        and to ``seed``.
      dataset: a ``data.load`` name or a ``Dataset``.
      epochs, batch_size, lr, seed: the run (Adam at ``lr`` unless ``tx=`` is given).
      temperature, alpha: Hinton's ``T`` and soft-target weight.
      out_dir: where ``ckpt/`` and ``metrics.jsonl`` go; a run there is resumed.
      **kwargs: passed to :func:`distill_model` (``config=``, ``tx=``, ``mesh=``,
        ``cache_teacher=``, ``progress=``).

    Returns:
      :class:`DistillResult`.

    Example:
      >>> res = distill('runs/teacher/ckpt', {'name': 'mlp', 'widths': [800, 800]}, 'mnist5k',
      ...               epochs=20, temperature=20.0, alpha=0.9, out_dir='runs/student')
    """
    teacher, _, _ = checkpoint.load_model(teacher_dir, build=models.from_meta)
    meta = {**kwargs.pop("meta", {}), "teacher": str(Path(teacher_dir).absolute())}
    return distill_model(
        teacher, student_config, dataset, epochs=epochs, batch_size=batch_size, temperature=temperature,
        alpha=alpha, lr=lr, out_dir=out_dir, seed=seed, meta=meta, **kwargs,
    )  # fmt: skip


def _student_config(student_config: dict, ds: data_lib.Dataset, seed: int) -> dict:
    if "name" not in student_config:
        raise ValueError(f"student_config={student_config!r} needs a 'name' (one of {', '.join(models.NAMES)})")
    config = {"input_shape": list(ds.input_shape), "num_classes": ds.num_classes, "seed": seed, **student_config}
    if tuple(config["input_shape"]) != ds.input_shape or config["num_classes"] != ds.num_classes:
        raise ValueError(
            f"student_config input_shape={config['input_shape']} / num_classes={config['num_classes']} do not match "
            f"the data ({list(ds.input_shape)}, {ds.num_classes}); leave them out to take the data's"
        )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _apply_fns(teacher: nnx.Module, student: nnx.Module, config: DistillConfig) -> tuple[Callable, Callable]:
    pairs = config.hints + config.attention  # empty unless the loss reads activations
    s_names = list(dict.fromkeys(s for s, _ in pairs))
    t_names = list(dict.fromkeys(t for _, t in pairs))
    return models.functional(student, features=s_names).apply, models.functional(teacher, features=t_names).apply


def _hint_params(teacher: nnx.Module, student: nnx.Module, config: DistillConfig, input_shape, seed: int) -> dict:
    if not config.hints:
        return {}

    def probe(model):  # one example's activations as shapes: enough to size the regressors
        return {
            k: jax.ShapeDtypeStruct((1, *v), jnp.float32) for k, v in models.feature_shapes(model, input_shape).items()
        }

    return losses.init_hint_regressor(jax.random.key(seed + 1), probe(student), probe(teacher), hints=config.hints)


def distill_model(
    teacher: nnx.Module,
    student_config: dict,
    dataset: str | data_lib.Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    temperature: float = 4.0,
    alpha: float = 0.9,
    lr: float = 1e-3,
    out_dir: str | Path | None = None,
    seed: int = 0,
    config: DistillConfig | None = None,
    tx: optax.GradientTransformation | None = None,
    mesh=None,
    cache_teacher: bool = True,
    progress: bool = True,
    meta: dict | None = None,
) -> DistillResult:
    """:func:`distill` with the teacher given as an NNX model (nothing is loaded from disk).

    Args:
      teacher: the frozen teacher (run in eval mode; any architecture with the student's classes).
      config: the full loss (hints, attention, parameter distance); when given it replaces
        ``temperature`` and ``alpha``.
      tx: the student's optax transformation (default ``optax.adam(lr)``); also trains the
        hint regressors.
      mesh: a ``'data'`` mesh (default: ``parallel.default_mesh(batch_size)``).
      cache_teacher: compute the teacher's logits on the training set once and feed them
        with each batch (not possible with hints or attention, which need its activations).
      Other arguments as in :func:`distill`.
    """
    ds = data_lib.load(dataset) if isinstance(dataset, str) else dataset
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
    config = config or DistillConfig(temperature=temperature, alpha=alpha)
    tx = tx or optax.adam(lr)
    s_config = _student_config(student_config, ds, seed)
    student = models.create(**s_config)
    s_fn, t_fn = models.functional(student), models.functional(teacher)
    if config.param_weight:  # the distance needs a student with the teacher's leaves
        tree.check_same_structure(t_fn.params, s_fn.params, "teacher params", "student params")
    student_apply, teacher_apply = _apply_fns(teacher, student, config)
    cache = cache_teacher and not config.needs_features
    if mesh is None:
        mesh = parallel.default_mesh(batch_size)

    hint_params = _hint_params(teacher, student, config, ds.input_shape, seed)
    state = init_state(jax.tree.map(jnp.array, s_fn.params), s_fn.extra, tx, seed=seed, hint_params=hint_params)
    teacher_arrays = parallel.replicate((t_fn.params, t_fn.extra), mesh)
    step_fn = make_step(
        student_apply=student_apply, teacher_apply=None if cache else teacher_apply, tx=tx, config=config, mesh=mesh
    )
    cached = teacher_logits(t_fn.apply, t_fn.params, t_fn.extra, ds.x_train) if cache else None
    teacher_val = train.evaluate(t_fn.apply, t_fn.params, t_fn.extra, ds.x_val, ds.y_val)
    teacher_eval = train.evaluate(t_fn.apply, t_fn.params, t_fn.extra, ds.x_test, ds.y_test)
    run_meta = {
        **(meta or {}),
        "model": s_config,
        "kind": "distill",
        "data": ds.name,
        "distill": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "teacher_val_accuracy": teacher_val["accuracy"],
        "teacher_test_accuracy": teacher_eval["accuracy"],
    }

    def batch_fn(x, index):
        return (x, ds.y_train[index]) if cached is None else (x, ds.y_train[index], cached[index])

    def evaluate_state(state):
        return train.evaluate(s_fn.apply, state.params, state.extra, ds.x_val, ds.y_val)

    state, history = train.epoch_loop(
        state,
        lambda state, batch: step_fn(state, batch, *teacher_arrays),
        ds,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        mesh=mesh,
        out_dir=out_dir,
        meta=run_meta,
        progress=progress,
        evaluate_fn=evaluate_state,
        batch_fn=batch_fn,
    )
    final = train.final_metrics(
        s_fn.apply, state.params, state.extra, ds, epochs=history[-1]["epoch"] if history else epochs, out_dir=out_dir
    )
    return DistillResult(
        state.params, state.extra, state, history, s_config, teacher_eval["accuracy"], teacher_val["accuracy"],
        final["val_accuracy"], final["test_accuracy"],
    )  # fmt: skip


def demo_stage(
    teacher_model: nnx.Module,
    dataset: str | data_lib.Dataset,
    *,
    epochs: int = 10,
    student_widths: tuple[int, ...] = (100, 50),
    temperature: float = 4.0,
    alpha: float = 0.9,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Distill ``teacher_model`` into a small MLP and compare with the same MLP trained alone.

    Both students start from the same initialisation, see the same batches and use the same
    optimizer; only the loss differs. With Hinton et al.'s advice for small students, the
    defaults use ``T = 4`` (their 30-unit students did best at ``T`` of 2.5 to 4).

    Returns:
      One report row: ``stage``, ``student``, ``params``, ``teacher_params``,
      ``compression`` (teacher params / student params), ``teacher_accuracy``,
      ``accuracy`` (distilled), ``student_alone_accuracy``, ``gain`` (distilled minus alone),
      all on the test split (measured once per model after training), the same on the
      validation split as ``val_accuracy``, ``student_alone_val_accuracy``,
      ``teacher_val_accuracy``,
      ``temperature``, ``alpha``, ``epochs``, ``seconds``; and, not for JSON, the distilled
      ``student_params`` (nested dict of numpy arrays) with the ``student_config`` that
      ``models.create(**student_config)`` rebuilds the student from.

    Example:
      >>> row = demo_stage(lenet300_model, 'mnist5k', epochs=10)
    """
    t0 = time.perf_counter()
    ds = data_lib.load(dataset) if isinstance(dataset, str) else dataset
    s_config = {"name": "mlp", "widths": list(student_widths)}
    res = distill_model(
        teacher_model, s_config, ds, epochs=epochs, batch_size=batch_size, temperature=temperature, alpha=alpha,
        lr=lr, seed=seed, progress=progress,
    )  # fmt: skip
    alone = models.functional(models.create(**res.model_config))
    fit = train.fit(
        alone.apply, jax.tree.map(jnp.array, alone.params), alone.extra, ds, tx=optax.adam(lr), epochs=epochs,
        batch_size=batch_size, seed=seed, progress=progress, eval_every=0,
    )  # fmt: skip
    n_student = sum(int(np.size(x)) for x in jax.tree.leaves(res.params))
    n_teacher = sum(int(np.size(x)) for x in jax.tree.leaves(models.functional(teacher_model).params))
    alone_final = train.final_metrics(alone.apply, fit.params, fit.extra, ds, epochs=epochs)
    acc, acc_alone = res.test_accuracy, alone_final["test_accuracy"]
    return {
        "stage": "distill",
        "student": "mlp " + "-".join(str(w) for w in student_widths),
        "params": n_student,
        "teacher_params": n_teacher,
        "compression": n_teacher / n_student,
        "teacher_accuracy": res.teacher_accuracy,
        "accuracy": acc,
        "student_alone_accuracy": acc_alone,
        "gain": acc - acc_alone,
        "val_accuracy": res.val_accuracy,
        "student_alone_val_accuracy": alone_final["val_accuracy"],
        "teacher_val_accuracy": res.teacher_val_accuracy,
        "temperature": temperature,
        "alpha": alpha,
        "epochs": epochs,
        "seconds": round(time.perf_counter() - t0, 2),
        "student_params": jax.tree.map(np.asarray, jax.device_get(res.params)),
        "student_config": res.model_config,
    }
