"""Training and evaluation: a jitted optax train step, evaluation, and a resumable fit loop.

The train step is a module-level pure function; its dependencies (the model's apply
function, the optax transformation) are bound with ``functools.partial`` before
``jax.jit``. State is a :class:`TrainState` NamedTuple of arrays, so it checkpoints with
orbax and shards like any pytree.

``fit`` checkpoints every epoch (params, extra state, optimizer state, step and RNG
key) and evaluates on the validation split (``val_accuracy``, ``val_loss``); the test
split is never touched while training: :func:`final_metrics` measures it once, on the
trained model. The loop, :func:`epoch_loop`, also drives the distillation trainer. It
stops with ``FloatingPointError`` when an epoch ends with a non-finite loss or
parameters, before that epoch is checkpointed. Batches and dropout keys are functions of
``(seed, epoch, step)`` only, so a run resumed from a checkpoint continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress import data as data_lib
from jcompress import parallel
from jcompress.core.spec import check_value

__all__ = [
    "FitResult",
    "TrainState",
    "cross_entropy",
    "epoch_loop",
    "evaluate",
    "final_metrics",
    "fit",
    "init_state",
    "train_step",
]


class TrainState(NamedTuple):
    """Everything a training run needs to continue: all leaves are arrays."""

    step: jax.Array
    params: Any
    extra: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key data, so that it checkpoints as a plain array


def init_state(params, extra, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        extra=extra,
        opt_state=tx.init(params),
        key=jax.random.key_data(jax.random.key(seed)),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: TrainState, batch, *, apply_fn: Callable, tx: optax.GradientTransformation):
    """One optimizer step on ``batch = (x, y)``; returns ``(state, {'loss', 'accuracy'})``."""
    x, y = batch
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

    def loss_fn(params):
        logits, extra = apply_fn(params, state.extra, x, train=True, key=key)
        return cross_entropy(logits, y), (logits, extra)

    (loss, (logits, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
    return TrainState(state.step + 1, params, extra, opt_state, state.key), metrics


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _eval_batch(params, extra, x, y, valid, apply_fn):
    logits, _ = apply_fn(params, extra, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y) & valid
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(correct)


def evaluate(apply_fn: Callable, params, extra, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000) -> dict:
    """Accuracy and mean loss over ``(x, y)`` in eval mode (no dropout, running BN stats).

    The last partial batch is padded and masked, so every batch has the same shape and
    the function compiles once.
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate got no examples (x has length 0); pass a non-empty split such as ds.x_val")
    bs = min(batch_size, n)
    total_loss, total_correct = 0.0, 0
    for i in range(0, n, bs):
        xb, yb = x[i : i + bs], y[i : i + bs]
        valid = np.ones(bs, bool)
        if len(xb) < bs:
            pad = bs - len(xb)
            valid[len(xb) :] = False
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        loss, correct = _eval_batch(params, extra, xb, yb, valid, apply_fn)
        total_loss += float(loss)
        total_correct += int(correct)
    return {"accuracy": total_correct / n, "loss": total_loss / n}


class FitResult(NamedTuple):
    params: Any
    extra: Any
    state: TrainState
    history: list


def fit(
    apply_fn: Callable,
    params,
    extra,
    dataset: data_lib.Dataset,
    *,
    tx: optax.GradientTransformation,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
    progress: bool = True,
    eval_every: int = 1,
    mesh=None,
    callback: Callable[[TrainState, int], TrainState] | None = None,
) -> FitResult:
    """Train for ``epochs`` epochs; checkpoint to ``out_dir`` and resume from it.

    Args:
      apply_fn: ``apply(params, extra, x, train, key) -> (logits, extra)`` (``models.functional``).
      params, extra: initial model state (ignored when ``out_dir`` holds a checkpoint).
      dataset: a ``data.Dataset``; trains on ``x_train``/``y_train`` and evaluates on
        ``x_val``/``y_val`` (the test split is not used: see :func:`final_metrics`).
      tx: the optax transformation (compose masks, schedules, QAT here).
      epochs, batch_size, seed: the run; batch order and dropout depend on ``seed`` only.
      out_dir: where ``ckpt/`` (orbax, every epoch) and ``metrics.jsonl`` go; ``None`` for none.
      meta: JSON metadata saved with each checkpoint (``{'model': config}`` makes it loadable
        with ``checkpoint.load_model``).
      mesh: a ``'data'`` mesh for data parallelism (default: ``parallel.default_mesh``, all
        accelerator devices when the batch splits evenly over them).
      eval_every: evaluate on the validation split every this many epochs and after the
        last; ``0`` never.
      callback: ``callback(state, epoch) -> state`` after each epoch (e.g. to re-prune).

    Returns:
      ``FitResult(params, extra, state, history)``; ``history`` holds one dict per epoch:
      ``epoch``, ``step``, ``seconds``, ``train_loss``, ``train_accuracy`` and, on evaluated
      epochs, ``val_accuracy`` and ``val_loss``.

    Raises:
      FloatingPointError: an epoch ended with a non-finite train loss or parameters (the
        learning rate or optimizer diverged); that epoch is not checkpointed, so the last
        good checkpoint in ``out_dir`` stays the latest.

    Example:
      >>> res = fit(fn.apply, fn.params, fn.extra, data.load('digits'), tx=optax.adam(1e-3), epochs=5)
      >>> res.history[-1]['val_accuracy']
    """
    if mesh is None:
        mesh = parallel.default_mesh(batch_size)
    # The step donates its state; copy once so the caller's arrays (and the NNX model they
    # came from) stay valid after fit returns.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), init_state(params, extra, tx, seed=seed))
    step_fn = jax.jit(functools.partial(train_step, apply_fn=apply_fn, tx=tx), donate_argnums=0)

    def evaluate_state(state):
        return evaluate(apply_fn, state.params, state.extra, dataset.x_val, dataset.y_val)

    state, history = epoch_loop(
        state,
        step_fn,
        dataset,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        mesh=mesh,
        out_dir=out_dir,
        meta={**(meta or {}), "kind": "train"},
        progress=progress,
        evaluate_fn=evaluate_state,
        eval_every=eval_every,
        callback=callback,
    )
    return FitResult(state.params, state.extra, state, history)


def epoch_loop(
    state,
    step_fn: Callable,
    dataset: data_lib.Dataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    mesh,
    out_dir: str | Path | None,
    meta: dict,
    progress: bool,
    evaluate_fn: Callable[[Any], dict],
    eval_every: int = 1,
    callback: Callable | None = None,
    batch_fn: Callable | None = None,
):
    """The resumable epoch loop shared by :func:`fit` and the distillation driver.

    Restores the latest checkpoint in ``out_dir/ckpt`` (the state's NamedTuple type and
    the history), then for each remaining epoch: runs ``step_fn(state, batch) -> (state,
    metrics)`` over the epoch's batches (from ``(seed, epoch)``, resumed mid-epoch at
    ``state.step``, sharded over ``mesh``), applies ``callback(state, epoch)``, evaluates with
    ``evaluate_fn(state)`` every ``eval_every`` epochs and at the last, appends a row to
    ``out_dir/metrics.jsonl`` (process 0 only) and saves a checkpoint with ``meta``.
    ``evaluate_fn`` should read the validation split: its results are stored as
    ``val_<key>``. An epoch whose train loss or parameters are not finite raises
    ``FloatingPointError`` before its row and checkpoint are written.

    Args:
      state: a NamedTuple of arrays with ``step``, ``params`` and ``extra`` fields.
      batch_fn: ``batch_fn(x, index) -> batch`` from the batch's inputs and example
        indices; default ``(x, y_train[index])``.
      Other arguments as in :func:`fit`.

    Returns:
      ``(state, history)``.
    """
    from jcompress.checkpoint import Checkpointer

    epochs = check_value(epochs, arg="epochs", kind=int, lo=1)
    batch_size = check_value(batch_size, arg="batch_size", kind=int, lo=1)
    steps_per_epoch = data_lib.num_batches(len(dataset.x_train), batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({len(dataset.x_train)} examples)")
    ck = Checkpointer(Path(out_dir) / "ckpt") if out_dir is not None else None
    history: list = []
    if ck is not None and ck.latest_step() is not None:
        restored, saved_meta = ck.restore({"state": state._asdict()})
        state = type(state)(**restored["state"])
        history = list(saved_meta.get("history", []))
    state = parallel.replicate(state, mesh)
    if batch_fn is None:

        def batch_fn(x, index):
            return x, dataset.y_train[index]

    metrics_path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
    start_step = int(state.step)
    index = np.arange(len(dataset.x_train))
    bar = _progress(epochs * steps_per_epoch, start_step, progress)
    for epoch in range(start_step // steps_per_epoch, epochs):
        t0 = time.perf_counter()
        start = int(state.step) - epoch * steps_per_epoch
        sums: dict = {}
        for xb, ib in data_lib.batches(
            dataset.x_train, index, batch_size=batch_size, seed=seed, epoch=epoch, start=start
        ):
            state, m = step_fn(state, parallel.shard_batch(batch_fn(xb, ib), mesh))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
        if callback is not None:
            state = callback(state, epoch)
        done = steps_per_epoch - start
        row = {"epoch": epoch + 1, "step": int(state.step), "seconds": round(time.perf_counter() - t0, 3)}
        row.update({f"train_{k}": float(v) / max(done, 1) for k, v in sums.items()})
        _check_finite_epoch(row, state, epoch + 1, out_dir, ck, bar)
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            row.update({f"val_{k}": v for k, v in evaluate_fn(state).items()})
        history.append(row)
        bar.set_postfix_str(
            ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("train_loss", "val_acc")))
        )
        if metrics_path is not None and jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if ck is not None:
            ck.save(
                int(state.step),
                {"state": state._asdict(), "model": {"params": state.params, "extra": state.extra}},
                {**meta, "epoch": epoch + 1, "history": history},
            )
    bar.close()
    if ck is not None:
        ck.close()
    return state, history


def _finite(leaf) -> bool:
    """Whether every float value of ``leaf`` this process holds is finite (checked on the host, no compile)."""
    if not isinstance(leaf, jax.Array):
        leaf = np.asarray(leaf)
        return not np.issubdtype(leaf.dtype, np.inexact) or bool(np.isfinite(leaf).all())
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return True
    shards = [leaf.addressable_data(0)] if leaf.is_fully_replicated else [s.data for s in leaf.addressable_shards]
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in shards)


def _check_finite_epoch(row: dict, state, epoch: int, out_dir, ck, bar) -> None:
    """Raise ``FloatingPointError`` (closing the checkpointer and bar) if the epoch diverged."""
    bad_metrics = [k for k, v in row.items() if k.startswith("train_") and not np.isfinite(v)]
    leaves = jax.tree_util.tree_leaves_with_path({"params": state.params, "extra": state.extra})
    bad_leaves = [jax.tree_util.keystr(path, simple=True, separator="/") for path, leaf in leaves if not _finite(leaf)]
    if not bad_metrics and not bad_leaves:
        return
    last = ck.latest_step() if ck is not None else None
    bar.close()
    if ck is not None:
        ck.close()
    what = []
    if bad_metrics:
        what.append(", ".join(f"{k}={row[k]}" for k in bad_metrics))
    if bad_leaves:
        shown = ", ".join(bad_leaves[:3]) + (f" and {len(bad_leaves) - 3} more" if len(bad_leaves) > 3 else "")
        what.append(f"non-finite values in {shown}")
    kept = (
        f"; the last good checkpoint (step {last}) in {Path(out_dir) / 'ckpt'} is kept"
        if last is not None
        else "; nothing was checkpointed"
    )
    raise FloatingPointError(
        f"epoch {epoch}: training diverged ({'; '.join(what)}): the learning rate or optimizer produced non-finite "
        f"values; lower the learning rate (or check the optimizer's settings) and run again{kept}"
    )


def final_metrics(
    apply_fn: Callable, params, extra, dataset: data_lib.Dataset, *, epochs: int, out_dir: str | Path | None = None
) -> dict:
    """Validation and test accuracy and loss of a trained model, measured once at the end of a run.

    Test is evaluated here and nowhere during training, so nothing is chosen on it. With
    ``out_dir`` the record is written to ``out_dir/final.json`` (process 0 only).

    Args:
      apply_fn: as in :func:`fit`.
      params, extra: the trained model state.
      dataset: the run's ``data.Dataset``.
      epochs: the epochs the model was trained for (recorded).
      out_dir: the run directory, or ``None``.

    Returns:
      ``{'epochs', 'val_accuracy', 'val_loss', 'test_accuracy', 'test_loss', 'val_examples',
      'test_examples'}``.

    Example:
      >>> res = fit(fn.apply, fn.params, fn.extra, ds, tx=optax.adam(1e-3), epochs=5, out_dir='runs/a')
      >>> final_metrics(fn.apply, res.params, res.extra, ds, epochs=5, out_dir='runs/a')['test_accuracy']
    """
    val = evaluate(apply_fn, params, extra, dataset.x_val, dataset.y_val)
    test = evaluate(apply_fn, params, extra, dataset.x_test, dataset.y_test)
    record = {
        "epochs": int(epochs),
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_examples": len(dataset.x_val),
        "test_examples": len(dataset.x_test),
    }
    if out_dir is not None and jax.process_index() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "final.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", leave=False, dynamic_ncols=True)
