"""Quantization-aware training (QAT) with the straight-through estimator (STE).

The forward pass uses quantized weights (and optionally quantized layer inputs); the
backward pass treats the quantizer as the identity:

    ste(w) = w + stop_gradient(fake_quant(w) - w)

so ``ste(w) == fake_quant(w)`` in value, and ``d loss(ste(w)) / d w`` equals the float
gradient ``d loss / d v`` evaluated at the quantized point ``v = fake_quant(w)``. The
float weights are the optimizer's "shadow" weights; they accumulate the small updates
that a round-to-nearest grid would swallow.

:func:`qat_apply` wraps a model's apply function so that ``train.fit`` trains through the
weight quantizers unchanged; :func:`quantize_inputs` gives a model whose layer inputs are
quantized with straight-through gradients (the training twin of ``quant.activations``). After training, :func:`jcompress.quant.quantize` with the
same hyperparameters gives the deployable codes of exactly the network QAT trained.

Example:
  >>> fn = models.functional(model)
  >>> qat = qat_apply(fn.apply, bits=4, axis=-1)
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

__all__ = ["qat_apply", "qat_params", "quantize_inputs", "ste_fake_quant", "ste_fake_quant_range"]


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


def quantize_inputs(model: nnx.Module, act_ranges: dict, *, bits: int, symmetric: bool = False) -> nnx.Module:
    """A copy of ``model`` whose layers fake-quantize their inputs with straight-through gradients.

    Args:
      model: an NNX model (not modified).
      act_ranges: ``{layer name: (lo, hi)}``, e.g. ``quant.activations(x)(model)[1].ranges``
        or ``quant.calibrate_ranges(model, x)``; layers without a range stay float.
      bits, symmetric: the activation grid (asymmetric by default, as ``quant.activations``).

    Returns:
      the model (same parameter names) whose forward values equal those of
      ``quant.activations`` with these ranges; the input quantizers pass gradients through.

    Raises:
      ValueError: bad bits, empty ranges, or ranges naming layers the model does not have.
    """
    ranges = quant.check_act_ranges(model, act_ranges, bits, symmetric)
    hook = quant.input_quantizer(ranges, bits=bits, symmetric=symmetric, quantizer=ste_fake_quant_range)
    return hooks.with_hook(model, hook, names=list(ranges))


def qat_apply(
    apply_fn: Callable,
    *,
    bits: int,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    names: Sequence[str] | None = None,
) -> Callable:
    """An apply function that trains through weight quantizers.

    Args:
      apply_fn: ``apply(params, extra, x, train=False, key=None) -> (logits, extra)``, for
        example ``models.functional(model).apply``; for quantized layer inputs too, the
        model of :func:`quantize_inputs`: ``models.functional(quantize_inputs(model, ranges, bits=8)).apply``.
      bits, axis, group_size, symmetric, names: the weight quantizer (as in :func:`qat_params`).

    Returns:
      ``apply(params, extra, x, train=False, key=None) -> (logits, extra)``, for
      ``train.fit`` and ``train.evaluate``: ``apply_fn`` on :func:`qat_params` of the params.
      Its forward values are those of ``apply_fn`` on ``quant.quantize(...)(params)[0]``.

    Raises:
      ValueError: bad bits. TypeError: ``apply_fn`` is not callable.
    """
    quant.code_range(bits, symmetric)
    if not callable(apply_fn) or isinstance(apply_fn, nnx.Module):
        raise TypeError(
            f"apply_fn must be an apply function such as models.functional(model).apply, got {type(apply_fn).__name__}"
        )

    def apply(params, extra, x, train: bool = False, key: jax.Array | None = None):
        params = qat_params(params, bits=bits, axis=axis, group_size=group_size, symmetric=symmetric, names=names)
        return apply_fn(params, extra, x, train=train, key=key)

    return apply
