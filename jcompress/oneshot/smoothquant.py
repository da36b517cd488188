"""SmoothQuant (Xiao et al. 2023): W8A8 with activation outliers migrated into the weights.

Activations of large language models have a few input channels with values 10-100x the
rest, so an 8-bit grid per token (or per tensor) spends its range on them and rounds the
other channels to a handful of levels. SmoothQuant divides input channel ``j`` by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over the calibration tokens, ``max|W_j|`` over the outputs of every layer
that reads the channel; ``alpha``, the migration strength, is 0.5 in the paper) and
multiplies the kernels' row ``j`` by it, folding the division into the norm or Linear that
produces the channel (:func:`jcompress.oneshot.awq.apply_scales`), so the float model's
function is unchanged. Then the weights are quantized per output unit (8 bits,
symmetric) and the layers' inputs are fake-quantized at run time by the hook of
:func:`act_quantizer`: per token (dynamic, one scale per row of ``x``) or per tensor
(static, the calibrated ``max |x / s|``).

Example:
  >>> t = jc.oneshot.smoothquant(stats, channels, groups=block.scale_groups(), alpha=0.5)
  >>> params, aux = t(nnx.state(block, nnx.Param))
  >>> w8a8 = jc.nnx.hooks.with_hook(block, act_quantizer(aux.act))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jcompress import tree
from jcompress.core import base, spec
from jcompress.core import grid as grid_lib
from jcompress.oneshot.awq import (
    apply_scales,
    check_channels,
    check_groups,
    effective_kernel,
    quantize_kernel,
    relative_output_error,
    scaled_leaves,
)
from jcompress.oneshot.calibration import _check_stats

__all__ = [
    "ACT_SCALES",
    "ActQuant",
    "SmoothQuantAux",
    "act_quantizer",
    "fake_quant_input",
    "smoothing_scales",
    "smoothquant",
]

ACT_SCALES = ("token", "tensor")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["absmax"], meta_fields=["bits", "per_token"])
@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How one layer's input is fake-quantized (symmetric, signed codes).

    A pytree whose only leaf is ``absmax`` (``bits`` and ``per_token`` are static), so
    :func:`smoothquant` runs under ``jax.jit``.

    Attributes:
      bits: code width (8 for W8A8).
      per_token: one scale per token (row of ``x``), from the token's own ``max |x|``;
        else one static scale for the tensor from ``absmax``.
      absmax: the calibrated ``max |x|`` of the (smoothed) input, used when not
        ``per_token`` (a float or a float32 scalar).
    """

    bits: int
    per_token: bool
    absmax: float | jax.Array


class SmoothQuantAux(NamedTuple):
    """Aux of :func:`smoothquant`.

    Attributes:
      scales: ``{kernel name: s (in,)}``: the layer now receives ``x / s``.
      grids: ``{kernel name: QuantParams}`` of the stored (smoothed, quantized) kernels.
      errors: ``{kernel name: relative output error}`` of the weight quantization alone
        (activations in float) on the calibration data, in the original input basis.
      act: ``{layer path: ActQuant}``: the input quantization of each layer
        (``act_quantizer(act)`` is the hook that applies it).
    """

    scales: dict
    grids: dict
    errors: dict
    act: dict


def fake_quant_input(x: jax.Array, *, bits: int, per_token: bool, absmax=None) -> jax.Array:
    """Symmetric fake quantization of ``x`` ``(..., in)``: per token (last axis) or per tensor.

    Per token the scale of each row is ``max |row| / (2^(bits-1) - 1)``; per tensor it is
    ``absmax / (2^(bits-1) - 1)`` and values beyond ``absmax`` are clipped. Shape and dtype of ``x``.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.astype(jnp.float32)
    if per_token:
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    else:
        amax = jnp.asarray(absmax, jnp.float32)
    scale = jnp.where(amax > 0, amax, 1.0) / qmax
    return (jnp.clip(jnp.round(xf / scale), -qmax, qmax) * scale).astype(x.dtype)


def act_quantizer(act: dict):
    """The layer hook ``fn(name, x, op)`` that fake-quantizes the inputs of the layers in ``act``.

    Args:
      act: ``{layer path: ActQuant}`` (``SmoothQuantAux.act``); other layers run in float.

    Example:
      >>> model8 = jc.nnx.hooks.with_hook(model, act_quantizer(aux.act), names=list(aux.act))
    """

    def hook(name, x, op):
        a = act.get(name)
        if a is None:
            return op(x)
        return op(fake_quant_input(x, bits=a.bits, per_token=a.per_token, absmax=a.absmax))

    return hook


def _head_max(g, v: jax.Array) -> jax.Array:
    """A target-sized ``v`` ``(heads * head_dim,)`` replaced by its max over the query heads sharing a key/value head.

    Under grouped-query attention (a group with ``heads=(num_heads, num_kv_heads)``) the
    value projection's channel ``c`` feeds the same input of ``num_heads // num_kv_heads``
    query heads of ``o_proj``; a scale folded into that channel must be one number for all
    of them, so the statistics it is computed from are taken over all of them.
    """
    h, kv = g.heads
    m = v.reshape(kv, h // kv, v.shape[0] // h)
    return jnp.broadcast_to(m.max(axis=1, keepdims=True), m.shape).reshape(-1)


@functools.partial(jax.jit, static_argnames=("alpha",))
def smoothing_scales(abs_max_x: jax.Array, kernels: Sequence[jax.Array], *, alpha: float) -> jax.Array:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel ``(in,)``; 1 where either max is 0."""
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(k.astype(jnp.float32)), axis=1) for k in kernels]), axis=0)
    x_max = abs_max_x.astype(jnp.float32)
    ok = (x_max > 0) & (w_max > 0)
    s = jnp.where(ok, x_max, 1.0) ** alpha / jnp.where(ok, w_max, 1.0) ** (1 - alpha)
    return jnp.where(ok, jnp.maximum(s, 1e-5), 1.0)


def smoothquant(
    stats: dict,
    channels: dict,
    *,
    groups: Sequence,
    alpha: float = 0.5,
    weight_bits: int = 8,
    act_bits: int = 8,
    act_scale: str = "token",
) -> base.Transform:
    """SmoothQuant W8A8 on the calibrated Dense kernels of one block.

    Args:
      stats: ``{kernel name: LayerStats}`` (names relative to the params the transform is
        called on, e.g. ``attn/q_proj/kernel``); these kernels are quantized.
      channels: ``{kernel name: ChannelStats}`` of the same layers (``abs_max`` is used).
      groups: ``(source, targets, offset)`` triples (``block.scale_groups()``): where the
        smoothing scales are folded. Kernels in no group are quantized unsmoothed. A
        fourth entry ``heads=(num_heads, num_kv_heads)`` folds ``v_proj -> o_proj`` under
        grouped-query attention: the scale is computed from the maxima over the query heads
        that share a key/value head, so it is one number per value channel.
      alpha: migration strength in [0, 1] (0.5): 0 leaves activations as they are
        (``s = 1 / max|W|``), 1 moves all of their range into the weights.
      weight_bits: weight code width, one symmetric grid per output unit (8).
      act_bits: activation code width (8).
      act_scale: ``'token'`` (dynamic per-token scales) or ``'tensor'`` (one static scale
        per layer from the calibrated maximum).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, SmoothQuantAux)``; apply
      ``act_quantizer(aux.act)`` to the model to quantize activations.

    Raises:
      ValueError: alpha outside [0, 1], bad bits or act_scale, missing channel statistics,
        groups that do not fit the params.

    Example:
      >>> t = smoothquant(calib.stats, calib.channels, groups=calib.groups, alpha=0.8, act_scale='tensor')
    """
    hs = _check_stats(stats)
    alpha = spec.check_value(alpha, arg="alpha", kind=float, lo=0.0, hi=1.0)
    weight_bits = grid_lib.check_bits(weight_bits, True, arg="weight_bits")
    act_bits = grid_lib.check_bits(act_bits, True, arg="act_bits")
    if act_scale not in ACT_SCALES:
        raise ValueError(f"act_scale={act_scale!r} must be one of {ACT_SCALES}")
    chans = check_channels(channels, list(hs))

    leaves = scaled_leaves(hs, groups)

    def apply(params, names, key):
        gs = check_groups(groups, params)
        chosen = set(names)
        old = dict(tree.named_leaves(params))
        tree.check_finite({n: old[n] for n in names}, "params")
        scales = {}
        for g in gs:
            kernels = [f"{t}/kernel" for t in g.targets]
            if all(k in hs and k in chosen for k in kernels):
                ks = [tree.as_float_array(old[k], f"params/{k}") for k in kernels]
                x_max = chans[kernels[0]].abs_max
                if g.heads is not None:  # one scale per value channel: the statistics' max over its query heads
                    x_max = _head_max(g, x_max)
                    ks = [_head_max(g, jnp.max(jnp.abs(k), axis=1))[:, None] for k in ks]
                scales[g.source] = smoothing_scales(x_max, ks, alpha=alpha)
        new_params = apply_scales(params, gs, scales)
        new = dict(tree.named_leaves(new_params))
        per_kernel = {f"{t}/kernel": scales[g.source] for g in gs if g.source in scales for t in g.targets}
        updates, grids, errors, act = {}, {}, {}, {}
        for n in names:
            if n not in hs:
                continue  # a folded source, already updated
            k = new[n]
            qp = quantize_kernel(k.astype(jnp.float32), bits=weight_bits, group_size=None, symmetric=True)
            q = grid_lib.dequantize(qp)
            errors[n] = relative_output_error(old[n], effective_kernel(q, n, gs, scales), hs[n])
            s = per_kernel.get(n, jnp.ones((k.shape[0],), jnp.float32))
            grids[n], updates[n] = qp, q.astype(k.dtype)
            absmax = jnp.max(chans[n].abs_max / s)
            act[n.removesuffix("/kernel")] = ActQuant(act_bits, act_scale == "token", absmax)
        return tree.set_by_name(new_params, updates), SmoothQuantAux(per_kernel, grids, errors, act)

    return base.Transform(apply, "smoothquant", leaves=leaves)
