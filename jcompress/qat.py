"""Quantization-aware training (QAT) with the straight-through estimator (STE).

The forward pass uses quantized weights (and optionally quantized layer inputs); the
backward pass treats the quantizer as the identity:

    ste(w) = w + stop_gradient(fake_quant(w) - w)

so ``ste(w) == fake_quant(w)`` in value, and ``d loss(ste(w)) / d w`` equals the float
gradient ``d loss / d v`` evaluated at the quantized point ``v = fake_quant(w)``. The
float weights are the optimizer's "shadow" weights; they accumulate the small updates
that a round-to-nearest grid would swallow.

:func:`qat_apply` wraps a model's apply function so that ``train.fit`` trains through the
quantizers unchanged. After training, :func:`jcompress.quant.quantize_params` with the
same hyperparameters gives the deployable codes, and
:func:`jcompress.quant.quantized_apply` evaluates exactly the network QAT trained.

Example:
  >>> fn = models.functional(model)
  >>> qat = qat_apply(model, bits=4, axis=-1)
  >>> res = train.fit(qat, fn.params, fn.extra, ds, tx=optax.adam(1e-4), epochs=3)
  >>> params4, aux = quant.quantize_params(res.params, bits=4, axis=-1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jcompress import quant, tree

__all__ = ["qat_apply", "qat_params", "ste_fake_quant", "ste_fake_quant_range"]


def _straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Value ``q``, gradient of the identity in ``x``."""
    return x + jax.lax.stop_gradient(q - x)


def ste_fake_quant(
    w: jax.Array,
    *,
    bits: int,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
) -> jax.Array:
    """:func:`jcompress.quant.fake_quant` (round-to-nearest) with an identity gradient.

    Args and shapes as in :func:`jcompress.quant.quantize`; returns an array of ``w``'s
    shape and dtype whose value is the fake-quantized ``w``.
    """
    q = quant.fake_quant(w, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size)
    return _straight_through(w, q)


def ste_fake_quant_range(x: jax.Array, act_range, *, bits: int, symmetric: bool = False) -> jax.Array:
    """:func:`jcompress.quant.fake_quant_range` (a fixed calibrated grid) with an identity gradient."""
    return _straight_through(x, quant.fake_quant_range(x, act_range, bits=bits, symmetric=symmetric))


def qat_params(
    params: Any,
    *,
    bits: int,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
) -> Any:
    """The params with every selected leaf replaced by :func:`ste_fake_quant` of it.

    Same structure (dict or NNX State) and dtypes as ``params``; unselected leaves are
    returned as they are. Differentiable: gradients reach the float leaves unchanged.
    """
    selected = dict(tree.named_leaves(tree.select(params, include, exclude)))

    def one(name, w):
        if not selected[name]:
            return w
        try:
            return ste_fake_quant(w, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size)
        except (ValueError, TypeError) as e:
            raise type(e)(f"leaf {name!r}: {e}") from None

    return tree.map_with_names(one, params)


def qat_apply(
    model_or_apply: nnx.Module | Callable,
    *,
    bits: int,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    act_bits: int | None = None,
    act_ranges: dict | None = None,
    act_symmetric: bool = False,
) -> Callable:
    """An apply function that trains through weight (and activation) quantizers.

    Args:
      model_or_apply: an NNX model, or an apply function
        ``apply(params, extra, x, train=False, key=None) -> (logits, extra)`` (for example
        ``models.functional(model).apply``). Activation quantization needs the model, to
        find its ``nnx.Linear`` / ``nnx.Conv`` layers.
      bits, include, exclude, symmetric, axis, group_size: the weight quantizer (as in
        :func:`jcompress.quant.quantize_params`; default selection: Dense and conv kernels).
      act_bits: bits of the layer inputs, or ``None`` for float activations.
      act_ranges: ``{layer name: (lo, hi)}`` from :func:`jcompress.quant.calibrate_activations`.
      act_symmetric: symmetric activation grid (default asymmetric).

    Returns:
      ``apply(params, extra, x, train=False, key=None) -> (logits, extra)``, for
      ``train.fit`` and ``train.evaluate``. Its forward values equal those of
      ``quant.quantized_apply`` with the same arguments.

    Raises:
      ValueError: bad bits, activation quantization without the model or without ranges,
        or ranges naming layers the model does not have.
    """
    quant.code_range(bits, symmetric)

    def weight_fn(params):
        return qat_params(
            params, bits=bits, include=include, exclude=exclude, symmetric=symmetric, axis=axis, group_size=group_size
        )

    if not isinstance(model_or_apply, nnx.Module):
        if not callable(model_or_apply):
            raise TypeError(f"model_or_apply must be an NNX model or an apply function, got {type(model_or_apply)}.")
        if act_bits is not None:
            raise ValueError(
                "act_bits needs the NNX model (to find its layers); pass the model, not its apply function."
            )
        apply_fn = model_or_apply

        def apply(params, extra, x, train: bool = False, key: jax.Array | None = None):
            return apply_fn(weight_fn(params), extra, x, train=train, key=key)

        return apply

    ranges = quant.check_act_ranges(model_or_apply, act_ranges, act_bits, act_symmetric)

    def act_fn(name: str, x: jnp.ndarray) -> jnp.ndarray:
        if name not in ranges:
            return x
        return ste_fake_quant_range(x, ranges[name], bits=act_bits, symmetric=act_symmetric)

    return quant.apply_with_quantizers(model_or_apply, weight_fn=weight_fn, act_fn=act_fn if ranges else None)
