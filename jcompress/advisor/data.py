"""From a checkpoint and a dataset: the pieces :func:`advise` needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["DataFunctions", "data_functions", "student_config"]


class DataFunctions(NamedTuple):
    """What :func:`advise` needs from a model and a dataset (see :func:`data_functions`)."""

    apply_fn: Callable
    eval_fn: Callable
    test_fn: Callable
    finetune_fn: Callable
    distill_fn: Callable | None
    inputs: Any


def student_config(config: dict, width_fraction: float) -> dict:
    """The ``models.create`` config of a student with ``width_fraction`` of the model's hidden widths.

    ``lenet300`` and ``mlp`` scale their hidden widths (the student is an ``mlp``),
    ``lenet5`` its channels and hidden units, ``cnn1d`` its channels, ``resnet`` its
    widths; every width is at least 1.

    Raises:
      ValueError: a fraction outside (0, 1], or a model family without widths to scale.
    """
    if not 0.0 < width_fraction <= 1.0:
        raise ValueError(f"width_fraction={width_fraction!r} must be in (0, 1]")
    scale = lambda ws: [max(1, round(w * width_fraction)) for w in ws]
    base = {k: v for k, v in config.items() if k not in ("name", "widths", "channels", "hidden")}
    name = config["name"]
    if name == "lenet300":
        return {**base, "name": "mlp", "widths": scale((300, 100))}
    if name == "mlp":
        return {**base, "name": "mlp", "widths": scale(config.get("widths", (1200, 1200)))}
    if name == "lenet5":
        return {**base, "name": "lenet5", "channels": scale(config.get("channels", (20, 50))),
                "hidden": scale([config.get("hidden", 500)])[0]}  # fmt: skip
    if name == "cnn1d":
        return {**base, "name": "cnn1d", "channels": scale(config.get("channels", (32, 32, 32)))}
    if name == "resnet":
        return {**base, "name": "resnet", "widths": scale(config.get("widths", (16, 32, 64)))}
    raise ValueError(
        f"no rule to shrink model {name!r}; distillation candidates need lenet300, mlp, lenet5, cnn1d or resnet"
    )


def _fit_apply(apply_fn: Callable) -> Callable:
    """``apply(params, x)`` in the ``train.fit`` signature (no extra state, no dropout)."""
    return lambda params, extra, x, train=False, key=None: (apply_fn(params, x), extra)


def data_functions(
    model, config: dict, ds, *, batch_size: int = 128, distill_epochs: int = 10, seed: int = 0
) -> DataFunctions:
    """``DataFunctions(apply_fn, eval_fn, test_fn, finetune_fn, distill_fn, inputs)`` for :func:`advise`.

    Args:
      model: the trained NNX model (e.g. from ``checkpoint.load_model``).
      config: its ``models.create`` config (for building distillation students).
      ds: a ``data.Dataset``: the train split fine-tunes and distills; ``eval_fn`` reads
        the validation split (every choice is made on it), ``test_fn`` the test split
        (reported once per candidate); the first 256 validation images (fewer if the
        split is smaller) time the forward pass.
      batch_size, seed: fine-tuning and distillation batches.
      distill_epochs: epochs of each student's distillation run.

    Example:
      >>> f = data_functions(model, config, data.load('digits'))
      >>> advice = advise(model, f.apply_fn, f.eval_fn, test_fn=f.test_fn, inputs=f.inputs,
      ...                 finetune_fn=f.finetune_fn, distill_fn=f.distill_fn)
    """
    from jcompress import models, train
    from jcompress.distill import run as distill_run

    fn = models.functional(model)
    apply_fn = lambda p, x: fn.apply(p, fn.extra, x)[0]

    wrapped: dict = {}  # one train.fit-style function per apply, so evaluation compiles once per candidate

    def evaluator(x, y):
        def evaluate(params, apply):
            fit_apply = wrapped.setdefault(apply, _fit_apply(apply))
            return train.evaluate(fit_apply, params, {}, x, y)["accuracy"]

        return evaluate

    def finetune_fn(apply, params, *, tx, epochs):
        res = train.fit(_fit_apply(apply), params, {}, ds, tx=tx, epochs=epochs, batch_size=batch_size, seed=seed,
                        progress=False, eval_every=0)  # fmt: skip
        return res.params

    distill_fn = None
    try:
        student_config(config, 0.5)
    except ValueError:
        pass
    else:

        def distill_fn(width_fraction):
            res = distill_run.distill_model(
                model, student_config(config, width_fraction), ds, epochs=distill_epochs, batch_size=batch_size,
                temperature=4.0, alpha=0.9, seed=seed, progress=False,
            )  # fmt: skip
            sfn = models.functional(models.create(**res.model_config))
            extra = res.extra
            return res.params, lambda p, x: sfn.apply(p, extra, x)[0]

    inputs = ds.x_val[: min(256, len(ds.x_val))]
    return DataFunctions(
        apply_fn, evaluator(ds.x_val, ds.y_val), evaluator(ds.x_test, ds.y_test), finetune_fn, distill_fn, inputs
    )
