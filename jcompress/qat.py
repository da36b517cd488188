"""Quantization-aware training (QAT) with the straight-through estimator (STE).

The forward pass uses quantized weights (and optionally quantized layer inputs); the
backward pass treats the quantizer as the identity:

    ste(w) = w + stop_gradient(fake_quant(w) - w)

so ``ste(w) == fake_quant(w)`` in value, and ``d loss(ste(w)) / d w`` equals the float
gradient ``d loss / d v`` evaluated at the quantized point ``v = fake_quant(w)``. The
float weights are the optimizer's "shadow" weights; they accumulate the small updates
that a round-to-nearest grid would swallow.

:func:`qat_apply` wraps a model's apply function so that ``train.fit`` trains through the
quantizers unchanged. After training, :func:`jcompress.quant.quantize` with the
same hyperparameters gives the deployable codes of exactly the network QAT trained.

Example:
  >>> fn = models.functional(model)
  >>> qat = qat_apply(model, bits=4, axis=-1)
  >>> res = train.fit(qat, fn.params, fn.extra, ds, tx=optax.adam(1e-4), epochs=3)
  >>> params4, aux = quant.quantize(bits=4)(res.params)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jcompress import quant, tree
from jcompress.core import base
from jcompress.nnx import hooks

__all__ = ["qat_apply", "qat_params", "ste_fake_quant", "ste_fake_quant_range"]


def _straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Value ``q``, gradient of the identity in ``x``."""
    return x + jax.lax.stop_gradient(q - x)


def ste_fake_quant(
    w: jax.Array,
    *,
    bits: int,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
) -> jax.Array:
    """:func:`jcompress.quant.fake_quant` (round-to-nearest) with an identity gradient.

    Args and shapes as in :func:`jcompress.core.grid.quantize_leaf`; returns an array of
    ``w``'s shape and dtype whose value is the fake-quantized ``w``.
    """
    q = quant.fake_quant(w, bits=bits, axis=axis, group_size=group_size, symmetric=symmetric)
    return _straight_through(w, q)


def ste_fake_quant_range(x: jax.Array, act_range, *, bits: int, symmetric: bool = False) -> jax.Array:
    """:func:`jcompress.quant.fake_quant_range` (a fixed calibrated grid) with an identity gradient."""
    return _straight_through(x, quant.fake_quant_range(x, act_range, bits=bits, symmetric=symmetric))


def qat_params(
    params: Any,
    *,
    bits: int,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    names: Sequence[str] | None = None,
) -> Any:
    """The params with every named leaf replaced by :func:`ste_fake_quant` of it.

    Args:
      params: dict or NNX State of float arrays.
      bits, axis, group_size, symmetric: the grid, as in :func:`jcompress.quant.quantize`
        (the same defaults, so ``quant.quantize`` with the same arguments gives the codes
        of exactly the values trained here).
      names: the leaves to quantize (default: Dense and conv kernels).

    Returns:
      the same structure and dtypes; other leaves are returned as they are.
      Differentiable: gradients reach the float leaves unchanged.
    """
    chosen = set(base.default_leaves(params) if names is None else names)

    def one(name, w):
        if name not in chosen:
            return w
        try:
            return ste_fake_quant(w, bits=bits, axis=axis, group_size=group_size, symmetric=symmetric)
        except (ValueError, TypeError) as e:
            raise type(e)(f"leaf {name!r}: {e}") from None

    return tree.map_with_names(one, params)


def qat_apply(
    model_or_apply: nnx.Module | Callable,
    *,
    bits: int,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    names: Sequence[str] | None = None,
    act_bits: int | None = None,
    act_ranges: dict | None = None,
    act_symmetric: bool = False,
) -> Callable:
    """An apply function that trains through weight (and activation) quantizers.

    Args:
      model_or_apply: an NNX model, or an apply function
        ``apply(params, extra, x, train=False, key=None) -> (logits, extra)`` (for example
        ``models.functional(model).apply``). Activation quantization needs the model, to
        hook its ``nnx.Linear`` / ``nnx.Conv`` layers.
      bits, axis, group_size, symmetric, names: the weight quantizer (as in :func:`qat_params`).
      act_bits: bits of the layer inputs, or ``None`` for float activations.
      act_ranges: ``{layer name: (lo, hi)}``, e.g. ``quant.activations(x)(model)[1].ranges``.
      act_symmetric: symmetric activation grid (default asymmetric).

    Returns:
      ``apply(params, extra, x, train=False, key=None) -> (logits, extra)``, for
      ``train.fit`` and ``train.evaluate``. Its forward values equal those of the model
      made by ``quant.activations`` with these ranges, evaluated on
      ``quant.quantize(...)(params)[0]``.

    Raises:
      ValueError: bad bits, activation quantization without the model or without ranges,
        or ranges naming layers the model does not have.
    """
    quant.code_range(bits, symmetric)

    def weight_fn(params):
        return qat_params(params, bits=bits, axis=axis, group_size=group_size, symmetric=symmetric, names=names)

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

    model = model_or_apply
    if act_bits is not None or act_ranges:
        if act_bits is None:
            raise ValueError("act_ranges given without act_bits; pass act_bits=8 (say) to quantize activations.")
        ranges = quant.check_act_ranges(model, act_ranges, act_bits, act_symmetric)
        hook = quant.input_quantizer(ranges, bits=act_bits, symmetric=act_symmetric, quantizer=ste_fake_quant_range)
        model = hooks.with_hook(model, hook, names=list(ranges))
    return quant.apply_with_quantizers(model, weight_fn=weight_fn)
