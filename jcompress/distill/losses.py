"""Distillation losses: soft targets, logit matching, hints, attention maps, parameter distance.

Every loss is a pure function of arrays that returns a float32 scalar averaged over the
batch, so it can be added to any training objective and differentiated with respect to
the student's arrays. The teacher's arrays are treated as constants (``stop_gradient``).

* :func:`hinton_loss`: Hinton, Vinyals & Dean 2015,
  ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``.
  The gradient of the KL term with respect to a student logit is ``(q_i - p_i) / T``, and
  for large ``T`` and zero-mean logits ``q_i - p_i ~ (z_i - v_i) / (N T)``, so it shrinks
  like ``1/T^2``; the ``T^2`` factor keeps hard and soft terms on the same scale whatever
  ``T`` is.
* :func:`logit_mse`: squared error between raw logits (Ba & Caruana 2014), which the
  soft term approaches as ``T`` grows.
* :func:`hint_loss` with :func:`init_hint_regressor`: FitNets (Romero et al. 2015). A
  learnable linear regressor maps a student activation to the width of a teacher
  activation; the squared error between them is the hint. The regressor is a small params
  dict trained together with the student.
* :func:`attention_map` and :func:`attention_transfer_loss`: Zagoruyko & Komodakis 2017.
  A conv feature map ``(N, H, W, C)`` becomes an attention map by averaging ``|A|^p``
  over channels and scaling each example's flattened map to unit L2 norm.
* :func:`param_distance`: ``weight * sum |theta - theta_teacher|`` for a student that
  has the teacher's shape (for example a pruned copy pulled towards the original).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jcompress import tree
from jcompress.core import spec

__all__ = [
    "HintonTerms",
    "attention_map",
    "attention_transfer_loss",
    "hint_loss",
    "hinton_loss",
    "init_hint_regressor",
    "kl_divergence",
    "logit_mse",
    "param_distance",
    "regressor_key",
]


class HintonTerms(NamedTuple):
    """The two parts of :func:`hinton_loss` before weighting (float32 scalars)."""

    hard: jax.Array  # mean cross-entropy with the integer labels
    soft: jax.Array  # T^2 * mean KL(softmax(teacher/T) || softmax(student/T))


def _check_scalar(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Range check for Python or concrete scalars; traced values pass through unchecked."""
    if isinstance(value, jax.core.Tracer):
        return
    if not isinstance(value, (numbers.Real, jax.Array)) or getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{name} must be a real scalar, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v) or v > high or (v <= low if low_open else v < low)
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if math.isinf(high) else ']'}"
        raise ValueError(f"{name}={value} is outside {interval}; give a finite value in that range")


def _check_logits(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = tree.as_float_array(student, "student_logits")
    t = tree.as_float_array(teacher, "teacher_logits")
    if s.shape != t.shape or s.ndim < 1:
        raise ValueError(
            f"student_logits {s.shape} and teacher_logits {t.shape} must have the same shape (..., num_classes); "
            "a teacher and student for distillation must predict the same classes."
        )
    return s, jax.lax.stop_gradient(t)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Mean ``KL(softmax(teacher/T) || softmax(student/T))`` over all leading axes.

    Args:
      student_logits: float ``(..., C)``; gradients flow into these.
      teacher_logits: float ``(..., C)``, the same shape; treated as constants.
      temperature: ``T > 0``.

    Returns:
      A float32 scalar, zero exactly when the two softmaxes are equal (not scaled by ``T^2``).

    Example:
      >>> kl_divergence(jnp.zeros((2, 10)), jnp.zeros((2, 10)), temperature=4.0)
      Array(0., dtype=float32)
    """
    _check_scalar(temperature, "temperature", 0.0, math.inf, low_open=True)
    s, t = _check_logits(student_logits, teacher_logits)
    log_q = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl).astype(jnp.float32)


def hinton_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float,
    alpha: float,
) -> tuple[jax.Array, HintonTerms]:
    """Hinton et al.'s distillation loss with soft targets at temperature ``T``.

    ``loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(p_T || q_T)`` with
    ``p_T = softmax(teacher / T)`` and ``q_T = softmax(student / T)``. KL differs from the
    paper's cross-entropy with soft targets only by the teacher's entropy, a constant, so
    the gradients are the same; KL is zero when the student matches the teacher.

    Args:
      student_logits: float ``(N, C)``.
      teacher_logits: float ``(N, C)``; constants (precomputed or from a frozen teacher).
      labels: integer ``(N,)`` hard labels in ``[0, C)``.
      temperature: ``T > 0`` (the paper finds any ``T > 8`` works for 300+ unit layers).
      alpha: weight of the soft term in ``[0, 1]``; ``0`` is plain training.

    Returns:
      ``(loss, HintonTerms(hard, soft))``, float32 scalars.

    Example:
      >>> loss, terms = hinton_loss(s, t, y, temperature=20.0, alpha=0.9)
    """
    _check_scalar(alpha, "alpha", 0.0, 1.0)
    s, _ = _check_logits(student_logits, teacher_logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels have dtype {labels.dtype}; integer class indices are needed")
    if labels.shape != s.shape[:-1]:
        raise ValueError(
            f"labels {labels.shape} must have the shape of the logits without the class axis, {s.shape[:-1]}"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:  # traced labels give a NaN loss instead
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= s.shape[-1]:
            raise ValueError(f"labels must be class indices in [0, {s.shape[-1]}), got values from {lo} to {hi}")
    hard = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, labels)).astype(jnp.float32)
    soft = (temperature**2) * kl_divergence(s, teacher_logits, temperature=temperature)
    return (1.0 - alpha) * hard + alpha * soft, HintonTerms(hard, soft)


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Mean squared difference of raw logits over all elements (float32 scalar).

    Example:
      >>> logit_mse(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]]))  # (1 + 4) / 2
      Array(2.5, dtype=float32)
    """
    s, t = _check_logits(student_logits, teacher_logits)
    return jnp.mean(jnp.square(s - t)).astype(jnp.float32)


def regressor_key(student_name: str) -> str:
    """The key of a hint regressor in the regressor dict: the feature name with ``/`` -> ``.``."""
    return student_name.replace("/", ".")


def _check_hints(hints: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = [tuple(h) for h in hints]
    if not pairs or any(len(h) != 2 or not all(isinstance(n, str) for n in h) for h in pairs):
        raise ValueError(f"hints={hints!r} must be a non-empty list of (student_feature, teacher_feature) name pairs")
    keys = [regressor_key(s) for s, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"hints={hints!r} names a student feature twice; give each student feature one teacher feature"
        )
    return pairs


def _feature(feats: Mapping[str, Any], name: str, arg: str) -> Any:
    if name not in feats:
        raise KeyError(f"{arg} has no feature {name!r}; it has {sorted(feats)}")
    return feats[name]


def init_hint_regressor(
    key: jax.Array,
    student_features: Mapping[str, Any],
    teacher_features: Mapping[str, Any],
    *,
    hints: Sequence[tuple[str, str]],
) -> dict:
    """Parameters of the linear regressors that map student features to teacher features.

    For each pair ``(s, t)`` the regressor is a dense map on the last (channel) axis,
    ``kernel (C_s, C_t)`` (LeCun-normal) and ``bias (C_t,)`` (zeros); on conv features
    this is FitNets' regressor with a 1x1 kernel, so the spatial sizes must already agree.

    Args:
      key: PRNG key for the kernels.
      student_features, teacher_features: ``name -> array`` (or anything with ``.shape``,
        such as ``jax.ShapeDtypeStruct``) of one batch, shaped ``(N, ..., C)``.
      hints: ``[(student_name, teacher_name), ...]``.

    Returns:
      ``{regressor_key(s): {'kernel': (C_s, C_t), 'bias': (C_t,)}}`` float32.

    Example:
      >>> reg = init_hint_regressor(key, {'fc1': s1}, {'fc2': t2}, hints=[('fc1', 'fc2')])
    """
    pairs = _check_hints(hints)
    out = {}
    for i, (s_name, t_name) in enumerate(pairs):
        s_shape = tuple(_feature(student_features, s_name, "student_features").shape)
        t_shape = tuple(_feature(teacher_features, t_name, "teacher_features").shape)
        if s_shape[:-1] != t_shape[:-1]:
            raise ValueError(
                f"hint {s_name!r} -> {t_name!r}: student feature {s_shape} and teacher feature {t_shape} must agree "
                "in every axis but the last (channels); pick layers with the same spatial size or pool first"
            )
        init = jax.nn.initializers.lecun_normal()
        out[regressor_key(s_name)] = {
            "kernel": init(jax.random.fold_in(key, i), (s_shape[-1], t_shape[-1]), jnp.float32),
            "bias": jnp.zeros((t_shape[-1],), jnp.float32),
        }
    return out


def hint_loss(
    regressor: Mapping[str, Mapping[str, jax.Array]],
    student_features: Mapping[str, jax.Array],
    teacher_features: Mapping[str, jax.Array],
    *,
    hints: Sequence[tuple[str, str]],
) -> jax.Array:
    """FitNets hint loss: ``sum over pairs of mean((s @ W + b - t)^2)``.

    Args:
      regressor: from :func:`init_hint_regressor`; gradients flow into it.
      student_features: ``name -> (N, ..., C_s)``; gradients flow into these.
      teacher_features: ``name -> (N, ..., C_t)``; constants.
      hints: the ``(student_name, teacher_name)`` pairs the regressor was built for.

    Returns:
      A float32 scalar: for each pair, the mean over all elements of the squared error
      between the regressed student feature and the teacher feature, summed over pairs.
    """
    total = jnp.zeros((), jnp.float32)
    for s_name, t_name in _check_hints(hints):
        k = regressor_key(s_name)
        if k not in regressor:
            raise KeyError(
                f"regressor has no entry {k!r} for hint {s_name!r} -> {t_name!r}; it has {sorted(regressor)}"
            )
        s = tree.as_float_array(_feature(student_features, s_name, "student_features"), f"student feature {s_name}")
        t = jax.lax.stop_gradient(_feature(teacher_features, t_name, "teacher_features"))
        w, b = regressor[k]["kernel"], regressor[k]["bias"]
        if s.shape[-1] != w.shape[0] or t.shape[-1] != w.shape[1] or s.shape[:-1] != t.shape[:-1]:
            raise ValueError(
                f"hint {s_name!r} -> {t_name!r}: student feature {s.shape}, teacher feature {t.shape} and regressor "
                f"kernel {w.shape} do not fit; rebuild the regressor with init_hint_regressor on these features"
            )
        total = total + jnp.mean(jnp.square(s @ w + b - t)).astype(jnp.float32)
    return total


def attention_map(features: jax.Array, *, p: float = 2.0, eps: float = 1e-12) -> jax.Array:
    """Zagoruyko & Komodakis's spatial attention map of channels-last conv features.

    ``Q = mean_c |A_c|^p`` flattened over space, divided by its L2 norm per example
    (``mean`` or ``sum`` over channels give the same normalised map).

    Args:
      features: float ``(N, H, W, C)`` (or ``(N, L, C)`` for 1-D convs).
      p: the power (the paper uses 2).
      eps: floor of the norm, so an all-zero map stays zero instead of NaN.

    Returns:
      float32 ``(N, H * W)`` with unit L2 norm per row.
    """
    a = tree.as_float_array(features, "features")
    if a.ndim < 3:
        raise ValueError(f"features {a.shape} must be conv features (N, ..., C) with at least one spatial axis")
    _check_scalar(p, "p", 0.0, math.inf, low_open=True)
    q = jnp.mean(jnp.abs(a) ** p, axis=-1).reshape(a.shape[0], -1)
    norm = jnp.sqrt(jnp.sum(jnp.square(q), axis=-1, keepdims=True))
    return (q / jnp.maximum(norm, eps)).astype(jnp.float32)


def attention_transfer_loss(
    student_features: Mapping[str, jax.Array],
    teacher_features: Mapping[str, jax.Array],
    *,
    pairs: Sequence[tuple[str, str]],
    p: float = 2.0,
) -> jax.Array:
    """Attention transfer: ``sum over pairs of mean((Q_s - Q_t)^2)`` of normalised attention maps.

    The squared difference averaged over batch and positions is what the authors'
    released code minimises; the paper writes the unsquared L2 norm, whose gradient is
    undefined where the two maps coincide. Channel counts of student and teacher may
    differ; spatial sizes must agree.

    Args:
      student_features: ``name -> (N, H, W, C_s)``; gradients flow into these.
      teacher_features: ``name -> (N, H, W, C_t)``; constants.
      pairs: ``[(student_name, teacher_name), ...]``.
      p: the power in :func:`attention_map`.

    Returns:
      A float32 scalar, zero when every pair has proportional attention maps.
    """
    total = jnp.zeros((), jnp.float32)
    for s_name, t_name in _check_hints(pairs):
        qs = attention_map(_feature(student_features, s_name, "student_features"), p=p)
        qt = attention_map(jax.lax.stop_gradient(_feature(teacher_features, t_name, "teacher_features")), p=p)
        if qs.shape != qt.shape:
            raise ValueError(
                f"attention pair {s_name!r} -> {t_name!r}: maps {qs.shape} and {qt.shape} differ in spatial size; "
                "pick layers with the same resolution"
            )
        total = total + jnp.mean(jnp.square(qs - qt))
    return total


def param_distance(params: Any, teacher_params: Any, *, weight: float, leaves: spec.Spec = None) -> jax.Array:
    """``weight * sum |theta - theta_teacher|`` over the selected leaves (all by default).

    Args:
      params: the student's params; same structure and shapes as ``teacher_params``.
      teacher_params: constants.
      weight: ``lambda >= 0``.
      leaves: a selection spec (regexes, ``(regex, bool)`` pairs, a predicate or a bool
        tree; see :func:`jcompress.core.spec.select_names`); ``None`` means every leaf.

    Returns:
      A float32 scalar (a sum, not a mean, as the formula states).

    Example:
      >>> param_distance({'w': jnp.ones(3)}, {'w': jnp.zeros(3)}, weight=0.1)  # 0.1 * 3
      Array(0.3, dtype=float32)
    """
    _check_scalar(weight, "weight", 0.0, math.inf)
    tree.check_same_structure(teacher_params, params, "teacher_params", "params")
    picked = set(spec.select_names(params, leaves if leaves is not None else (lambda n, x: True), arg="leaves"))
    total = jnp.zeros((), jnp.float32)
    t_leaves = dict(tree.named_leaves(teacher_params))
    for name, leaf in tree.named_leaves(params):
        if name not in picked:
            continue
        t = t_leaves[name]
        if jnp.shape(leaf) != jnp.shape(t):
            raise ValueError(f"params/{name} has shape {jnp.shape(leaf)} but teacher_params/{name} has {jnp.shape(t)}")
        total = total + jnp.sum(jnp.abs(leaf - jax.lax.stop_gradient(t))).astype(jnp.float32)
    return weight * total
