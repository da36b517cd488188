"""Uniform quantization of weights (round to nearest) and of layer inputs (activation PTQ).

Everything here uses the one grid of :mod:`jcompress.core.grid`: integer codes, a float32
scale and an integer zero point, ``w ~= (codes - zero_point) * scale``, symmetric (zero
point 0, signed codes) or min-max affine (unsigned codes); see that module for the
conventions, the granularities (per tensor, per channel, groups) and the rounding.

* :func:`quantize`: the transform, ``quantize(bits=8)(params) -> (params, GridAux)``;
  the touched leaves come back dequantized (float, exactly on the grid) and
  ``aux.grids[name]`` holds the integer codes to store (``jc.compressed.compress``).
* :func:`quantize_leaf` / :func:`dequantize` / :func:`fake_quant`: one array.
* :func:`activations`: a model transform that calibrates the input range of every
  ``nnx.Linear`` / ``nnx.Conv`` on calibration inputs and returns a model whose layers
  quantize their inputs on that fixed grid (simulated in float: the arithmetic is the
  dequantized one, which is what integer kernels compute up to accumulator rounding).

Example:
  >>> params8, aux = jc.quant.quantize(bits=8)(params)         # per-output-channel int8
  >>> qmodel, ranges = jc.chain(jc.quant.quantize(bits=8), jc.quant.activations(x_cal))(model)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.core import base, spec
from jcompress.core.grid import (
    ROUNDINGS,
    QuantParams,
    check_bits,
    code_range,
    dequantize,
    grid_from_range,
    quantize_leaf,
    round_codes,
)
from jcompress.nnx import hooks

__all__ = [
    "QuantParams",
    "activations",
    "calibrate_ranges",
    "check_act_ranges",
    "code_range",
    "dequantize",
    "fake_quant",
    "fake_quant_range",
    "input_quantizer",
    "quantize",
    "quantize_leaf",
]

METHODS = ("minmax", "percentile", "mse")


def fake_quant(
    w: jax.Array,
    *,
    bits: int,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """``dequantize(quantize_leaf(w, ...))`` in ``w``'s dtype: the values a quantized model computes with.

    Idempotent for round-to-nearest (up to float rounding of the recomputed scale).
    Arguments as in :func:`jcompress.core.grid.quantize_leaf`.

    Example:
      >>> w8 = fake_quant(kernel, bits=8)          # per output channel, symmetric
    """
    qp = quantize_leaf(w, bits=bits, axis=axis, group_size=group_size, symmetric=symmetric, rounding=rounding, key=key)
    return dequantize(qp, dtype=jnp.asarray(w).dtype)


def fake_quant_range(x: jax.Array, act_range, *, bits: int, symmetric: bool = False) -> jax.Array:
    """Quantize-dequantize ``x`` on the fixed grid of a calibrated range ``(lo, hi)`` (outside: clipped).

    Used for activations, whose range comes from calibration rather than from the tensor
    itself. The range is widened to contain 0, so zeros stay exact. Shape and dtype of ``x``.
    """
    scale, zp = grid_from_range(act_range[0], act_range[1], bits=bits, symmetric=symmetric)
    codes = round_codes(x.astype(jnp.float32), scale, zp, bits=bits, symmetric=symmetric)
    return ((codes - zp).astype(jnp.float32) * scale).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# The weight transform
# ----------------------------------------------------------------------------------------


def _check_bits_spec(bits, symmetric: bool) -> None:
    values = [v for _, v in spec.pairs(bits, arg="bits")] if spec.is_pairs(bits) else [bits]
    for v in values:
        check_bits(v, symmetric)


def quantize(
    *,
    bits: spec.Spec = 8,
    axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    rounding: str = "nearest",
) -> base.Transform:
    """Round-to-nearest quantization of the kernels (the RTN baseline of the one-shot papers).

    Args:
      bits: code width per leaf, 1..16 (2..16 symmetric): a value or a ``{regex: bits}``
        spec over leaf names (:func:`jcompress.core.spec.resolve`).
      axis: channel axis of the scales (default the last: one grid per output unit of a
        Dense or conv kernel); ``None`` for one scale per leaf.
      group_size: elements per group along the reduction axis, or ``None``.
      symmetric: symmetric signed codes (default) or min-max affine codes.
      rounding: ``'nearest'``, or ``'stochastic'`` (needs ``key`` at call time; leaf ``i``
        of the touched leaves uses ``fold_in(key, i)``).

    Returns:
      a :class:`~jcompress.core.base.Transform`; ``t(params, key=None) -> (params,
      GridAux)``. The touched leaves (Dense and conv kernels unless :func:`masked`) are
      replaced by their dequantized values in their own dtype; the others pass through.
      ``aux.errors[name] = ||dW||^2 / ||W||^2``.

    Raises:
      ValueError / TypeError naming the argument or the leaf (bad bits, a group size that
      does not divide a leaf's reduction size, NaN/Inf or integer leaves).

    Example:
      >>> params4, aux = jc.quant.quantize(bits={'fc3': 8, '.*': 4}, group_size=64)(params)
      >>> aux.grids['fc1/kernel'].codes.dtype
      dtype('int32')
    """
    _check_bits_spec(bits, symmetric)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}.")
    if group_size is not None:
        spec.check_value(group_size, arg="group_size", kind=int, lo=1)

    def apply(params, names, key):
        if rounding == "stochastic":
            base.require_key(key, what="quantize(rounding='stochastic')")
        per_leaf = spec.resolve(bits, names, arg="bits")
        leaves = dict(tree.named_leaves(params))
        grids, errors, updates = {}, {}, {}
        for i, name in enumerate(names):
            w = leaves[name]
            k = None if key is None else jax.random.fold_in(key, i)
            try:
                w = tree.as_float_array(w, "w")
                if w.size == 0:
                    raise ValueError(f"w is empty (shape {tuple(w.shape)}); there is nothing to quantize")
                qp = quantize_leaf(
                    w, bits=per_leaf[name], axis=axis, group_size=group_size, symmetric=symmetric,
                    rounding=rounding, key=k,
                )  # fmt: skip
            except (ValueError, TypeError) as e:
                raise type(e)(f"leaf {name!r}: {e}") from None
            w_hat = dequantize(qp, dtype=w.dtype)
            grids[name], errors[name], updates[name] = qp, base.relative_error(w, w_hat), w_hat
        return tree.set_by_name(params, updates), base.GridAux(grids, errors)

    return base.Transform(apply, "quantize")


# ----------------------------------------------------------------------------------------
# Activations: calibrated input ranges and a model that quantizes its layer inputs
# ----------------------------------------------------------------------------------------


def _as_batches(inputs) -> list:
    """A list of input arrays from one array, a list of arrays or a list of ``(x, y)`` tuples."""
    if hasattr(inputs, "shape"):
        inputs = [inputs]
    return [b[0] if isinstance(b, (tuple, list)) else b for b in inputs]


def calibrate_ranges(
    model: nnx.Module,
    inputs,
    *,
    layers: Iterable[str] | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
    bits: int = 8,
    symmetric: bool = False,
    max_samples: int = 1 << 20,
    key: jax.Array | None = None,
) -> dict[str, tuple[float, float]]:
    """Input range ``(lo, hi)`` of ``nnx.Linear`` / ``nnx.Conv`` layers over calibration inputs.

    Args:
      model: an NNX model called as ``model(x)`` (eval mode); not modified.
      inputs: one input array, or a list of arrays or of ``(x, y)`` tuples.
      layers: layer names (``'fc1'``, ``'blocks/0/conv1'``); default every hookable layer.
      method: ``'minmax'`` (running min and max), ``'percentile'`` (the ``100 - p`` and
        ``p`` percentiles of all recorded values), or ``'mse'`` (the range ``alpha * [lo,
        hi]`` over 100 values of ``alpha`` in (0, 1] minimising the mean squared error of
        ``bits``-bit quantization of the recorded values).
      percentile: ``p`` for the percentile method, in (50, 100].
      bits, symmetric: the activation grid the mse method optimises for.
      max_samples: the percentile and mse methods keep a uniform random subsample of at
        most this many values per layer, drawn with ``key`` (needed only then).

    Returns:
      ``{layer name: (lo, hi)}`` (Python floats).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}.")
    spec.check_value(percentile, arg="percentile", kind=float, lo=50.0, hi=100.0, lo_open=True)
    check_bits(bits, symmetric)
    graphdef, state = nnx.split(model)
    wanted = None if layers is None else list(layers)

    @jax.jit
    def record(state, x):
        m = nnx.merge(graphdef, state)
        seen: dict = {}

        def grab(name, v, op):
            seen.setdefault(name, v)
            return op(v)

        with hooks.intercept(m, grab, names=wanted):
            m(x)
        if method == "minmax":
            return {n: (jnp.min(v), jnp.max(v)) for n, v in seen.items()}
        return {n: v.ravel() for n, v in seen.items()}

    recorded: dict[str, list] = {}
    for x in _as_batches(inputs):
        for n, v in record(state, jnp.asarray(x)).items():
            recorded.setdefault(n, []).append(jax.device_get(v))
    if not recorded:
        raise ValueError("inputs is empty (or the model calls no nnx.Linear / nnx.Conv layer); pass calibration inputs.")
    out = {}
    for i, (n, vals) in enumerate(recorded.items()):
        if method == "minmax":
            out[n] = (float(min(v[0] for v in vals)), float(max(v[1] for v in vals)))
            continue
        v = np.concatenate(vals)
        if v.size > max_samples:
            k = base.require_key(key, what=f"subsampling the {v.size} recorded inputs of {n} to max_samples")
            v = np.asarray(v)[np.asarray(jax.random.choice(jax.random.fold_in(k, i), v.size, (max_samples,), replace=False))]
        if method == "percentile":
            out[n] = (float(np.percentile(v, 100.0 - percentile)), float(np.percentile(v, percentile)))
        else:
            out[n] = _mse_range(v, bits, symmetric)
    return out


def _mse_range(v: np.ndarray, bits: int, symmetric: bool) -> tuple[float, float]:
    lo, hi = float(v.min()), float(v.max())
    alphas = jnp.linspace(0.01, 1.0, 100)
    x = jnp.asarray(v, jnp.float32)
    errs = jax.lax.map(
        lambda a: jnp.mean((fake_quant_range(x, (a * lo, a * hi), bits=bits, symmetric=symmetric) - x) ** 2), alphas
    )
    a = float(alphas[int(jnp.argmin(errs))])
    return (a * lo, a * hi)


def check_act_ranges(model: nnx.Module, act_ranges: dict, bits: int, symmetric: bool) -> dict:
    """``act_ranges`` as ``{layer: (lo, hi)}`` floats, checked against the model's layers and the grid."""
    check_bits(bits, symmetric, arg="act_bits")
    if not act_ranges:
        raise ValueError("act_ranges is empty; take them from quant.activations(inputs)(model)[1].ranges")
    known = set(hooks.layers(model))
    unknown = sorted(set(act_ranges) - known)
    if unknown:
        raise ValueError(f"act_ranges names layers {unknown} that the model does not have; its layers are {sorted(known)}.")
    out = {}
    for n, r in act_ranges.items():
        lo, hi = float(r[0]), float(r[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"act_ranges[{n!r}] = {tuple(r)} must be finite with lo <= hi.")
        out[n] = (lo, hi)
    return out


def input_quantizer(ranges: dict, *, bits: int, symmetric: bool, quantizer: Callable = fake_quant_range):
    """The layer hook ``(name, x, op) -> op(quantizer(x, ranges[name], ...))`` (layers without a range: float)."""

    def hook(name, x, op):
        if name not in ranges:
            return op(x)
        return op(quantizer(x, ranges[name], bits=bits, symmetric=symmetric))

    return hook


def activations(
    inputs,
    *,
    bits: int = 8,
    method: str = "minmax",
    percentile: float = 99.99,
    symmetric: bool = False,
    max_samples: int = 1 << 20,
) -> base.ModelTransform:
    """Activation PTQ: calibrate the layer inputs and quantize them on the calibrated grids.

    Args:
      inputs: calibration inputs: one array, or a list of arrays or of ``(x, y)`` tuples.
      bits: activation code width (1..16).
      method, percentile, max_samples: the range estimate, as in :func:`calibrate_ranges`.
      symmetric: symmetric activation grid (default asymmetric, which suits ReLU outputs
        and [0, 1] pixels).

    Returns:
      a :class:`~jcompress.core.base.ModelTransform`: ``t(model, key=None) -> (new_model,
      ActRangeAux)``. The layers touched are those whose kernel is a touched leaf (every
      ``nnx.Linear`` / ``nnx.Conv`` unless :func:`masked`; other selected leaves, such as
      biases, do not add layers); each is calibrated on the
      model as given (put it after a weight transform in a :func:`chain` to calibrate
      the quantized model) and in ``new_model`` quantizes its input on the fixed grid of
      its range. ``aux.ranges = {layer name: (lo, hi)}``. ``key`` is needed only when the
      percentile or mse method subsamples. Parameters are unchanged and keep their names.

    Example:
      >>> qmodel, aux = jc.chain(jc.quant.quantize(bits=8), jc.quant.activations(x_train[:1000]))(model)
      >>> aux[1].ranges['fc1']
      (0.0, 1.0)
    """
    check_bits(bits, symmetric)
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}.")
    batches = _as_batches(inputs)
    if not batches:
        raise ValueError("inputs is empty; pass calibration inputs (an array or a list of batches)")

    def apply(model, names, key):
        layer_of = {n + "/kernel": n for n in hooks.layers(model)}
        layers = [layer_of[n] for n in names if n in layer_of]
        if not layers:
            raise ValueError(
                f"activations quantizes the inputs of nnx.Linear / nnx.Conv layers, and none of {list(names)[:5]} "
                f"is one of their kernels {list(layer_of)[:5]}; select kernels with jc.masked"
            )
        ranges = calibrate_ranges(
            model, batches, layers=layers, method=method, percentile=percentile, bits=bits, symmetric=symmetric,
            max_samples=max_samples, key=key,
        )  # fmt: skip
        hook = input_quantizer(ranges, bits=bits, symmetric=symmetric)
        return hooks.with_hook(model, hook, names=list(ranges)), base.ActRangeAux(ranges)

    return base.ModelTransform(apply, "activations")
