"""The distillation train step: a pure function, jitted once, data-parallel on any mesh.

``distill_step(state, batch, *, teacher_params, teacher_extra, student_apply,
teacher_apply, tx, config)`` is a module-level pure function. Its static dependencies
(the two apply functions, the optax transformation, the loss config) are bound with
``functools.partial`` before ``jax.jit``; the teacher's arrays are passed as arguments on
every call, so they are neither differentiated nor baked into the compiled program as
constants, and they have no optimizer state.

Data parallelism follows ``jcompress.parallel``: the batch is sharded over the 1-D mesh
axis ``'data'`` (``P('data')``) and everything else is replicated (``P()``). Under
``jax.jit`` the global-batch mean is partitioned by XLA, which inserts the gradient
all-reduce; the result equals the one-device step on the same global batch (random bits
are sharding-invariant, so even dropout masks agree). :func:`make_step` with
``shard_map=True`` builds the same step with explicit collectives instead:
``jax.shard_map`` over the mesh and ``lax.pmean`` of the loss and metrics.

The teacher's logits for a fixed dataset can be computed once with :func:`teacher_logits`
and passed as a third batch element ``(x, y, teacher_logits)``; the step then skips the
teacher's forward pass. Student and teacher may have different architectures; hints and
attention transfer read named intermediate activations through ``models.functional(model, features=names)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jcompress.distill import losses

__all__ = [
    "DistillConfig",
    "DistillState",
    "distill_step",
    "init_state",
    "make_step",
    "teacher_logits",
]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What the distillation loss is made of (hashable, validated on construction).

    ``loss = (1 - alpha) * CE(student, y) + alpha * soft + hint_weight * hint
    + attention_weight * attention + param_weight * sum|theta - theta_teacher|`` where
    ``soft`` is ``T^2 * KL`` (``logit_loss='kl'``, Hinton) or the logit MSE
    (``logit_loss='mse'``).

    Attributes:
      temperature: ``T > 0`` for the soft targets.
      alpha: weight of the soft term in ``[0, 1]``.
      logit_loss: ``'kl'`` or ``'mse'``.
      hints: ``((student_feature, teacher_feature), ...)`` for FitNets hints.
      hint_weight: weight of the hint loss (``> 0`` exactly when ``hints`` are given).
      attention: ``((student_feature, teacher_feature), ...)`` conv features for attention transfer.
      attention_weight: weight of the attention loss (``> 0`` exactly when ``attention`` is given).
      param_weight: ``lambda >= 0`` of the parameter distance (student must have the teacher's shape).
    """

    temperature: float = 4.0
    alpha: float = 0.9
    logit_loss: str = "kl"
    hints: tuple = ()
    hint_weight: float = 0.0
    attention: tuple = ()
    attention_weight: float = 0.0
    param_weight: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number > 0")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha={self.alpha!r} must be in [0, 1]")
        if self.logit_loss not in ("kl", "mse"):
            raise ValueError(f"logit_loss={self.logit_loss!r}; choose 'kl' (Hinton) or 'mse' (logit matching)")
        for name in ("hint_weight", "attention_weight", "param_weight"):
            w = getattr(self, name)
            if not (isinstance(w, (int, float)) and 0.0 <= w < math.inf):
                raise ValueError(f"{name}={w!r} must be a finite number >= 0")
        object.__setattr__(self, "hints", tuple(tuple(h) for h in self.hints))
        object.__setattr__(self, "attention", tuple(tuple(h) for h in self.attention))
        for pairs, weight, what in (
            (self.hints, self.hint_weight, "hint"),
            (self.attention, self.attention_weight, "attention"),
        ):
            if bool(pairs) != (weight > 0):
                raise ValueError(
                    f"{what}_weight={weight} with {what} pairs {pairs!r}: give both (a weight > 0 and "
                    f"(student_feature, teacher_feature) pairs) or neither"
                )

    @property
    def needs_features(self) -> bool:
        """Whether the apply functions must return ``(logits, features)``."""
        return bool(self.hints or self.attention)


class DistillState(NamedTuple):
    """The student's training state; the teacher is not part of it. All leaves are arrays."""

    step: jax.Array
    params: Any  # student params (differentiated, updated by tx)
    extra: Any  # student non-trainable state (BatchNorm statistics)
    opt_state: Any  # tx state for params
    hint_params: Any  # FitNets regressors ({} without hints), trained with the student
    hint_opt_state: Any  # hint_tx state for hint_params
    key: jax.Array  # raw uint32 key data (dropout), so it checkpoints as a plain array


def init_state(
    params,
    extra,
    tx: optax.GradientTransformation,
    *,
    seed: int = 0,
    hint_params: Any = None,
    hint_tx: optax.GradientTransformation | None = None,
) -> DistillState:
    """A fresh :class:`DistillState`; ``hint_tx`` defaults to ``tx``.

    Example:
      >>> state = init_state(fn.params, fn.extra, optax.adam(1e-3), seed=0)
    """
    hint_params = {} if hint_params is None else hint_params
    return DistillState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        extra=extra,
        opt_state=tx.init(params),
        hint_params=hint_params,
        hint_opt_state=(hint_tx or tx).init(hint_params),
        key=jax.random.key_data(jax.random.key(seed)),
    )


def _split_output(out: Any, who: str, need_features: bool) -> tuple[jax.Array, dict]:
    if isinstance(out, tuple):
        logits, feats = out
        return logits, dict(feats)
    if need_features:
        raise ValueError(
            f"the loss config uses hints or attention, so {who} must return ((logits, features), extra); "
            "build it with models.functional(model, features=names)"
        )
    return out, {}


def distill_step(
    state: DistillState,
    batch: tuple,
    *,
    teacher_params: Any,
    teacher_extra: Any,
    student_apply: Callable,
    teacher_apply: Callable | None,
    tx: optax.GradientTransformation,
    config: DistillConfig,
    hint_tx: optax.GradientTransformation | None = None,
    axis_name: str | None = None,
) -> tuple[DistillState, dict]:
    """One optimizer step of the student on a distillation loss.

    Args:
      state: the student's :class:`DistillState`.
      batch: ``(x, y)`` with ``x`` float ``(B, ...)`` and ``y`` int ``(B,)``, or
        ``(x, y, teacher_logits)`` with precomputed float ``(B, C)`` teacher logits
        (then ``teacher_apply`` is not called and may be ``None``).
      teacher_params, teacher_extra: the frozen teacher's arrays (``None`` with cached logits).
      student_apply, teacher_apply: ``apply(params, extra, x, train, key) -> (out, extra)``
        where ``out`` is the logits, or ``(logits, features)`` from ``models.functional(model, features=names)``.
        The teacher runs in eval mode (``train=False``); the student in train mode with a
        dropout key folded from ``state.key`` and ``state.step``.
      tx: the student's optax transformation (masks, schedules and QAT compose here).
      config: the loss.
      hint_tx: the regressors' optax transformation (default ``tx``).
      axis_name: inside ``shard_map``, the mesh axis over which the loss, metrics and extra
        state are averaged with ``lax.pmean``; the gradient of the averaged loss with respect
        to the replicated params is then the global-batch gradient (shard_map's autodiff
        inserts the cross-device sum). ``None`` under plain ``jax.jit``.

    Returns:
      ``(new_state, metrics)``; metrics are float32 scalars: ``loss``, ``hard_loss``,
      ``soft_loss``, ``accuracy`` (student vs labels), ``agreement`` (student argmax equal
      to teacher argmax), plus ``hint_loss``, ``attention_loss``, ``param_loss`` when used.
    """
    hint_tx = hint_tx or tx
    if len(batch) == 3:
        x, y, t_logits = batch
        t_feats: dict = {}
        if config.needs_features:
            raise ValueError(
                "hints and attention transfer need the teacher's features; pass (x, y) batches, not cached logits"
            )
    elif len(batch) == 2:
        x, y = batch
        if teacher_apply is None:
            raise ValueError(
                "teacher_apply is None but the batch has no cached teacher logits; pass (x, y, teacher_logits)"
            )
        t_out, _ = teacher_apply(teacher_params, teacher_extra, x, train=False)
        t_logits, t_feats = _split_output(t_out, "teacher_apply", config.needs_features)
    else:
        raise ValueError(f"batch must be (x, y) or (x, y, teacher_logits), got {len(batch)} elements")
    t_logits = jax.lax.stop_gradient(t_logits)
    t_feats = jax.lax.stop_gradient(t_feats)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

    def loss_fn(trainable):
        params, hint_params = trainable
        s_out, extra = student_apply(params, state.extra, x, train=True, key=key)
        s_logits, s_feats = _split_output(s_out, "student_apply", config.needs_features)
        if config.logit_loss == "kl":
            loss, terms = losses.hinton_loss(s_logits, t_logits, y, temperature=config.temperature, alpha=config.alpha)
            hard, soft = terms
        else:
            hard = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s_logits, y))
            soft = losses.logit_mse(s_logits, t_logits)
            loss = (1.0 - config.alpha) * hard + config.alpha * soft
        m = {"hard_loss": hard, "soft_loss": soft}
        if config.hints:
            m["hint_loss"] = losses.hint_loss(hint_params, s_feats, t_feats, hints=config.hints)
            loss = loss + config.hint_weight * m["hint_loss"]
        if config.attention:
            m["attention_loss"] = losses.attention_transfer_loss(s_feats, t_feats, pairs=config.attention)
            loss = loss + config.attention_weight * m["attention_loss"]
        if config.param_weight:
            m["param_loss"] = losses.param_distance(params, teacher_params, weight=1.0)
            loss = loss + config.param_weight * m["param_loss"]
        m["accuracy"] = jnp.mean(jnp.argmax(s_logits, -1) == y)
        m["agreement"] = jnp.mean(jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1))
        if axis_name is not None:  # the global-batch mean; its gradient is the mean gradient
            loss, m, extra = jax.lax.pmean((loss, m, extra), axis_name)
        return loss, (m, extra)

    (loss, (metrics, extra)), (grads, hint_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
        (state.params, state.hint_params)
    )
    metrics = {"loss": loss, **metrics}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    hint_updates, hint_opt_state = hint_tx.update(hint_grads, state.hint_opt_state, state.hint_params)
    new_state = DistillState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        extra=extra,
        opt_state=opt_state,
        hint_params=optax.apply_updates(state.hint_params, hint_updates),
        hint_opt_state=hint_opt_state,
        key=state.key,
    )
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def _positional_step(state, batch, teacher_params, teacher_extra, **kwargs):
    return distill_step(state, batch, teacher_params=teacher_params, teacher_extra=teacher_extra, **kwargs)


def make_step(
    *,
    student_apply: Callable,
    teacher_apply: Callable | None,
    tx: optax.GradientTransformation,
    config: DistillConfig,
    hint_tx: optax.GradientTransformation | None = None,
    mesh: Mesh | None = None,
    shard_map: bool = False,
    donate: bool = True,
) -> Callable:
    """The jitted step ``step(state, batch, teacher_params, teacher_extra) -> (state, metrics)``.

    Args:
      student_apply, teacher_apply, tx, config, hint_tx: bound into :func:`distill_step`.
      mesh: a 1-D ``'data'`` mesh (``parallel.data_mesh``). With a mesh, outputs are
        replicated over it; the caller puts the state and teacher with
        ``parallel.replicate`` and the batch with ``parallel.shard_batch``.
      shard_map: use ``jax.shard_map`` with explicit ``lax.pmean`` (needs ``mesh``). Then
        dropout masks and BatchNorm batch statistics are per device (statistics are
        averaged after the step), so only models without them match the one-device step.
      donate: donate the state's buffers (the state passed in must not be used again).

    Example:
      >>> step = make_step(student_apply=s.apply, teacher_apply=t.apply, tx=optax.adam(1e-3),
      ...                  config=DistillConfig(temperature=20.0, alpha=0.9), mesh=parallel.data_mesh())
      >>> state, metrics = step(state, parallel.shard_batch((x, y), mesh), t_params, t_extra)
    """
    bound = functools.partial(
        _positional_step,
        student_apply=student_apply,
        teacher_apply=teacher_apply,
        tx=tx,
        config=config,
        hint_tx=hint_tx,
    )
    donate_argnums = (0,) if donate else ()
    if shard_map:
        if mesh is None:
            raise ValueError("shard_map=True needs a mesh (parallel.data_mesh())")
        fn = jax.shard_map(
            functools.partial(bound, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P("data"), P(), P()),
            out_specs=(P(), P()),
        )
        return jax.jit(fn, donate_argnums=donate_argnums)
    if mesh is None:
        return jax.jit(bound, donate_argnums=donate_argnums)
    replicated = NamedSharding(mesh, P())
    return jax.jit(bound, donate_argnums=donate_argnums, out_shardings=(replicated, replicated))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _teacher_batch(params, extra, x, apply_fn):
    out, _ = apply_fn(params, extra, x, train=False)
    return out[0] if isinstance(out, tuple) else out


def teacher_logits(apply_fn: Callable, params, extra, x: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    """The teacher's eval-mode logits for every row of ``x``, computed once in batches.

    The last partial batch is padded, so every batch has one shape and compiles once.

    Args:
      apply_fn: the teacher's ``apply(params, extra, x, train, key)``.
      params, extra: the teacher's arrays.
      x: float ``(N, ...)`` inputs.
      batch_size: rows per forward pass.

    Returns:
      float32 numpy ``(N, C)``, row ``i`` for ``x[i]``; index it like the labels to build
      ``(x, y, teacher_logits)`` batches.
    """
    n = len(x)
    if n == 0:
        raise ValueError("x is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    bs = min(batch_size, n)
    chunks = []
    for i in range(0, n, bs):
        xb = x[i : i + bs]
        rows = len(xb)
        if rows < bs:
            xb = np.concatenate([xb, np.zeros((bs - rows, *xb.shape[1:]), xb.dtype)])
        chunks.append(np.asarray(_teacher_batch(params, extra, xb, apply_fn))[:rows])
    return np.concatenate(chunks).astype(np.float32)
