"""Uniform quantization of weights and activations, and post-training quantization (PTQ).

A float tensor ``w`` becomes integer codes ``c`` with a scale ``s`` and an integer zero
point ``z`` so that ``w ~= (c - z) * s``:

* **symmetric** (the default for weights): ``z = 0``, ``s = max|w| / qmax`` with
  ``qmax = 2**(bits-1) - 1`` and codes in ``[-qmax, qmax]``. The code ``-2**(bits-1)`` is
  left unused so that the grid is symmetric around zero; 1-bit symmetric quantization
  (``qmax = 0``) is therefore rejected.
* **asymmetric** (min-max affine, the default for activations): the range
  ``[min(w, 0), max(w, 0)]`` is mapped onto codes ``[0, 2**bits - 1]``. Zero is always
  inside the range, and the zero point is an integer, so an exact zero (a pruned weight,
  a ReLU output) stays exactly zero after quantization.

Granularity:

* ``axis=None``: one scale for the whole tensor (per-tensor).
* ``axis=a``: one scale per index along ``a`` (per-channel; ``-1`` is the output
  channel of a Dense kernel ``(in, out)`` and of a conv kernel ``(kh, kw, cin, cout)``).
* ``axis=a, group_size=g``: the tensor is viewed as a matrix ``(K, C)`` with the channel
  axis moved last (a conv kernel becomes ``(kh*kw*cin, cout)``), and each column is cut
  into ``K // g`` groups of ``g`` consecutive elements along the reduction axis ``K``,
  each with its own scale (the GPTQ/AWQ "group size").

Scales and zero points are stored as: ``()`` per-tensor; the shape of ``w`` with every
axis but ``axis`` set to 1 per-channel (so ``codes * scale`` broadcasts); ``(K // g, C)``
for groups.

Round-to-nearest keeps every element within ``scale / 2`` of the input. Stochastic
rounding (``floor(x + u)``, ``u ~ U[0, 1)``) is unbiased on the grid's interior, at the
price of errors up to one step.

Post-training quantization of a whole model: :func:`calibrate_activations` records the
input range of every ``nnx.Linear`` / ``nnx.Conv`` over a few calibration batches, and
:func:`quantized_apply` returns an apply function that runs the model with quantized
weights and quantized layer inputs (simulated in float: the arithmetic is the
dequantized one, which is exactly what integer kernels compute up to accumulator
rounding).

Example:
  >>> qp = quantize(w, bits=4, axis=-1)          # per-output-channel int4
  >>> w_hat = dequantize(qp)                    # |w - w_hat| <= qp.scale / 2
  >>> new_params, aux = quantize_params(params, bits=8, include=r'kernel$', axis=-1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree

__all__ = [
    "ActRange",
    "QuantAux",
    "QuantParams",
    "apply_with_quantizers",
    "calibrate_activations",
    "check_act_ranges",
    "code_range",
    "dequantize",
    "fake_quant",
    "fake_quant_range",
    "intercept_layer_inputs",
    "quantize",
    "quantize_params",
    "quantized_apply",
    "weight_quantization",
]

ROUNDINGS = ("nearest", "stochastic")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale", "zero_point"],
    meta_fields=["bits", "symmetric", "axis", "group_size"],
)
@dataclasses.dataclass(frozen=True)
class QuantParams:
    """A quantized tensor: ``dequantize(qp) == (codes - zero_point) * scale`` (broadcast per group).

    Attributes:
      codes: int32, the shape of the original tensor; in ``[-qmax, qmax]`` (symmetric) or
        ``[0, 2**bits - 1]`` (asymmetric), see :func:`code_range`.
      scale: float32; ``()`` per-tensor, keepdims shape per-channel, ``(K // g, C)`` for groups.
      zero_point: int32, the shape of ``scale`` (all zero when symmetric).
      bits, symmetric, axis, group_size: the static hyperparameters (``axis`` is
        non-negative or ``None``). They are pytree metadata, so a ``QuantParams`` passes
        through ``jax.jit`` with only the three arrays traced.
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    bits: int
    symmetric: bool
    axis: int | None
    group_size: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype=dtype)


class QuantAux(NamedTuple):
    """What :func:`quantize_params` did, keyed by leaf name (selected leaves only).

    Attributes:
      qparams: ``{name: QuantParams}``, the deployable integer codes, scales and zero points.
      errors: ``{name: scalar}``, the Frobenius norm ``||w - dequantize(q)||_F`` per leaf.
    """

    qparams: dict
    errors: dict


class ActRange(NamedTuple):
    """A calibrated activation range ``[lo, hi]`` (Python floats)."""

    lo: float
    hi: float


# ----------------------------------------------------------------------------------------
# Hyperparameter checks and the grouped view of a tensor
# ----------------------------------------------------------------------------------------


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``(-(2**(bits-1) - 1), 2**(bits-1) - 1)`` symmetric, ``(0, 2**bits - 1)`` otherwise."""
    _check_bits(bits, symmetric)
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def _check_bits(bits: Any, symmetric: bool) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} must be an integer in 1..16 (8 and 4 are the usual choices).")
    if symmetric and bits == 1:
        raise ValueError(
            "bits=1 with symmetric=True leaves a single code (0); use symmetric=False for 1-bit "
            "codes {0, 1}, or bits >= 2."
        )


def _check_args(w: jax.Array, bits, symmetric, axis, group_size, rounding, key) -> int | None:
    """Validate the hyperparameters against ``w``; return ``axis`` made non-negative."""
    _check_bits(bits, symmetric)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}.")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs key=jax.random.key(...).")
    if axis is not None:
        if not isinstance(axis, (int, np.integer)) or not -w.ndim <= axis < max(w.ndim, 1):
            raise ValueError(f"axis={axis!r} is out of range for a tensor of shape {tuple(w.shape)}.")
        if w.ndim == 0:
            raise ValueError("axis must be None for a scalar tensor.")
        axis = int(axis) % w.ndim
    if group_size is not None:
        if axis is None:
            raise ValueError(
                "group_size needs a channel axis (groups run along the other axes); pass axis=-1 "
                "for a Dense kernel (in, out) or a conv kernel (kh, kw, cin, cout)."
            )
        k = int(np.prod(w.shape)) // w.shape[axis] if w.shape[axis] else 0
        if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or k % group_size:
            raise ValueError(
                f"group_size={group_size!r} must be a positive divisor of the reduction size {k} "
                f"(the elements per channel of shape {tuple(w.shape)} along axis {axis})."
            )
    return axis


def _check_values(w: jax.Array, name: str) -> jax.Array:
    w = tree.as_float_array(w, name)
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{name} contains NaN or Inf; quantization of non-finite values is undefined.")
    return w


def _grouped(w: jax.Array, axis: int | None, group_size: int | None) -> jax.Array:
    """``w`` as ``(G, g, C)``: ``C`` channels, ``G`` groups of ``g`` elements per channel."""
    if axis is None:
        return w.reshape(1, -1, 1)
    m = jnp.moveaxis(w, axis, -1)
    c = m.shape[-1]
    k = m.size // max(c, 1)
    g = k if group_size is None else group_size
    return m.reshape(k // max(g, 1), g, c)


def _one_group_2d(v: jax.Array) -> jax.Array:
    """``(1, g, C)`` -> ``(g, C)``; other shapes unchanged. Elementwise passes over a
    per-channel or per-tensor view run on the 2-D array: XLA's CPU loops over the 3-D one
    (leading axis of 1) ran about 3x slower on a 64 MB kernel."""
    return v[0] if v.ndim == 3 and v.shape[0] == 1 else v


def _ungrouped(v: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    if axis is None:
        return v.reshape(shape)
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return jnp.moveaxis(v.reshape(moved), -1, axis)


def _group_range(v: jax.Array, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` of ``v`` ``(G, g, C)`` over axis 1, each ``(G, 1, C)``.

    A symmetric grid needs only ``max |v|`` (one reduction instead of a min and a max,
    which matters when the input is computed on the fly, e.g. ``where(mask, w, 0)``).
    """
    if symmetric:
        amax = jnp.max(jnp.abs(v), axis=1, keepdims=True)
        return -amax, amax
    return v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)


def _stored_shape(shape: tuple[int, ...], axis: int | None, group_size: int | None, n_groups: int) -> tuple:
    if axis is None:
        return ()
    if group_size is None:
        return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    return (n_groups, shape[axis])


# ----------------------------------------------------------------------------------------
# The affine map and the rounding
# ----------------------------------------------------------------------------------------


def _affine(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point for the range ``[lo, hi]`` (arrays of the same shape).

    A zero range (an all-zero channel) gets scale 0 and zero point 0; the encoder divides
    by a safe scale of 1 there, so every code is 0 and the dequantized values are exactly 0.
    """
    qmin, qmax = code_range(bits, symmetric)
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    if symmetric:
        scale = jnp.maximum(-lo, hi) / qmax
        return scale, jnp.zeros(scale.shape, jnp.int32)
    scale = (hi - lo) / (qmax - qmin)
    zp = jnp.clip(jnp.round(-lo / _safe(scale)), qmin, qmax).astype(jnp.int32)
    return scale, zp


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale > 0, scale, 1.0)


def _encode(v, scale, zp, bits, symmetric, rounding, key) -> jax.Array:
    qmin, qmax = code_range(bits, symmetric)
    x = v / _safe(scale) + zp
    if rounding == "stochastic":
        x = jnp.floor(x + jax.random.uniform(key, x.shape, x.dtype))
    else:
        x = jnp.round(x)
    return jnp.clip(x, qmin, qmax).astype(jnp.int32)


def quantize(
    w: jax.Array,
    *,
    bits: int,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> QuantParams:
    """Integer codes, scales and zero points of a float tensor.

    Args:
      w: float array of any shape (not mutated).
      bits: code width, 1..16 (2..16 when ``symmetric``).
      symmetric: symmetric codes with zero point 0 (default), or min-max affine codes.
      axis: channel axis for per-channel scales; ``None`` for one scale.
      group_size: elements per group along the reduction axis (needs ``axis``; must
        divide the number of elements per channel).
      rounding: ``'nearest'`` (error <= scale / 2) or ``'stochastic'`` (unbiased).
      key: PRNG key, required for stochastic rounding.

    Returns:
      :class:`QuantParams` with int32 ``codes`` of ``w.shape``.

    Raises:
      ValueError: bits outside 1..16 or 1-bit symmetric, a bad axis, a group size that
        does not divide the reduction size, an unknown rounding, a missing key, NaN/Inf
        in ``w`` (checked for concrete arrays, not under ``jit``).
      TypeError: integer or bool ``w``.

    Example:
      >>> qp = quantize(kernel, bits=4, axis=-1, group_size=64)  # kernel (256, 128)
      >>> qp.codes.shape, qp.scale.shape
      ((256, 128), (4, 128))
    """
    w = _check_values(w, "w")
    axis = _check_args(w, bits, symmetric, axis, group_size, rounding, key)
    v = _grouped(w.astype(jnp.float32), axis, group_size)
    scale, zp = _affine(*_group_range(v, symmetric), bits, symmetric)
    codes = _encode(_one_group_2d(v), _one_group_2d(scale), _one_group_2d(zp), bits, symmetric, rounding, key)
    stored = _stored_shape(w.shape, axis, group_size, v.shape[0])
    return QuantParams(
        codes=_ungrouped(codes, w.shape, axis),
        scale=scale.reshape(stored),
        zero_point=zp.reshape(stored),
        bits=int(bits),
        symmetric=bool(symmetric),
        axis=axis,
        group_size=None if group_size is None else int(group_size),
    )


def dequantize(qp: QuantParams, *, dtype=jnp.float32) -> jax.Array:
    """``(codes - zero_point) * scale`` with each scale broadcast over its group; shape of ``codes``."""
    v = _grouped(qp.codes, qp.axis, qp.group_size)
    shape = (v.shape[0], 1, v.shape[2])
    v, zp, scale = (_one_group_2d(a) for a in (v, qp.zero_point.reshape(shape), qp.scale.reshape(shape)))
    out = (v - zp).astype(jnp.float32) * scale
    return _ungrouped(out, qp.codes.shape, qp.axis).astype(dtype)


def fake_quant(
    w: jax.Array,
    *,
    bits: int,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """``dequantize(quantize(w, ...))`` in ``w``'s dtype: the values a quantized model computes with.

    Idempotent for round-to-nearest: ``fake_quant(fake_quant(w)) == fake_quant(w)`` (up to
    float rounding of the recomputed scale). Arguments as in :func:`quantize`.
    """
    qp = quantize(w, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size, rounding=rounding, key=key)
    return dequantize(qp, dtype=jnp.asarray(w).dtype)


def fake_quant_range(x: jax.Array, act_range: ActRange, *, bits: int, symmetric: bool = False) -> jax.Array:
    """Quantize-dequantize ``x`` on the fixed grid of a calibrated range (values outside are clipped).

    Used for activations, whose range comes from calibration rather than from the tensor
    itself. The range is widened to contain 0 (so that zeros stay exact).
    """
    lo = jnp.asarray(act_range[0], jnp.float32)
    hi = jnp.asarray(act_range[1], jnp.float32)
    scale, zp = _affine(lo, hi, bits, symmetric)
    codes = _encode(x.astype(jnp.float32), scale, zp, bits, symmetric, "nearest", None)
    return ((codes - zp).astype(jnp.float32) * scale).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Whole parameter trees
# ----------------------------------------------------------------------------------------


def quantize_params(
    params: Any,
    *,
    bits: int,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> tuple[Any, QuantAux]:
    """Quantize the selected leaves of a parameter pytree.

    Args:
      params: nested dict, NNX State or any pytree of float arrays (not mutated).
      bits, symmetric, axis, group_size, rounding: as in :func:`quantize`, for every selected leaf.
      include, exclude: selection (see :func:`jcompress.tree.select`); default: Dense and
        conv kernels.
      key: for stochastic rounding; leaf ``i`` of the selection uses ``fold_in(key, i)``.

    Returns:
      ``(new_params, QuantAux)``: ``new_params`` has the structure and dtypes of ``params``
      with selected leaves replaced by their dequantized values (unselected leaves are the
      same objects); ``aux.qparams[name]`` holds the integer codes to store.

    Raises:
      ValueError / TypeError naming the leaf for bad hyperparameters, NaN/Inf or integer leaves.

    Example:
      >>> new_params, aux = quantize_params(params, bits=4, axis=-1)
      >>> aux.qparams['fc1/kernel'].codes.dtype
      dtype('int32')
    """
    selected = dict(tree.named_leaves(tree.select(params, include, exclude)))
    order = [n for n, s in selected.items() if s]
    qparams, errors = {}, {}

    def one(name: str, w):
        if not selected[name]:
            return w
        k = None if key is None else jax.random.fold_in(key, order.index(name))
        try:
            qp = quantize(w, bits=bits, symmetric=symmetric, axis=axis, group_size=group_size, rounding=rounding, key=k)
        except (ValueError, TypeError) as e:
            raise type(e)(f"leaf {name!r}: {e}") from None
        w_hat = dequantize(qp, dtype=w.dtype)
        qparams[name] = qp
        errors[name] = jnp.linalg.norm((w.astype(jnp.float32) - w_hat.astype(jnp.float32)).ravel())
        return w_hat

    new_params = tree.map_with_names(one, params)
    return new_params, QuantAux(qparams, errors)


def weight_quantization(
    *,
    bits: int,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    rounding: str = "nearest",
) -> Callable[..., tuple[Any, QuantAux]]:
    """Factory form of :func:`quantize_params`: ``fn(params, key=None) -> (new_params, QuantAux)``.

    The hyperparameters are checked here, once, so a bad value fails when the pipeline is
    built rather than when it runs.

    Example:
      >>> q8 = weight_quantization(bits=8, axis=-1)
      >>> params8, aux = jax.jit(q8)(params)
    """
    code_range(bits, symmetric)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}.")

    def fn(params, key: jax.Array | None = None):
        return quantize_params(
            params,
            bits=bits,
            include=include,
            exclude=exclude,
            symmetric=symmetric,
            axis=axis,
            group_size=group_size,
            rounding=rounding,
            key=key,
        )

    return fn


# ----------------------------------------------------------------------------------------
# Activations: intercepting layer inputs, calibration, and a quantized forward pass
# ----------------------------------------------------------------------------------------

LAYER_TYPES = (nnx.Linear, nnx.Conv)


def _layer_names(model: nnx.Module) -> dict[int, str]:
    """``{id(module): 'path/name'}`` of every ``nnx.Linear`` / ``nnx.Conv`` in ``model``."""
    return {
        id(node): "/".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, LAYER_TYPES)
    }


@contextlib.contextmanager
def intercept_layer_inputs(model: nnx.Module, fn: Callable[[str, jax.Array], jax.Array]):
    """Within the block, every ``nnx.Linear`` / ``nnx.Conv`` of ``model`` sees ``fn(name, x)`` as its input.

    ``name`` is the layer's path in the model (``'fc1'``, ``'blocks/0/conv1'``). Layers of
    other models are not affected. The classes' ``__call__`` is swapped for the duration
    of the block (and restored on exit), so use it around a single-threaded call or trace.

    Example:
      >>> seen = {}
      >>> with intercept_layer_inputs(model, lambda n, x: seen.setdefault(n, x)):
      ...     model(x)
    """
    names = _layer_names(model)
    originals = {cls: cls.__call__ for cls in LAYER_TYPES}

    def wrap(orig):
        def call(self, x, *args, **kwargs):
            name = names.get(id(self))
            return orig(self, x if name is None else fn(name, x), *args, **kwargs)

        return call

    try:
        for cls, orig in originals.items():
            cls.__call__ = wrap(orig)
        yield names
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


def _with_params(model: nnx.Module, params: Any) -> nnx.Module:
    if params is None:
        return model
    graphdef, p_state, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, tree.from_pure_dict(p_state, params), rest)


def _calibration_inputs(batches: Iterable) -> Iterable[jax.Array]:
    for b in batches:
        yield b[0] if isinstance(b, (tuple, list)) else b


def calibrate_activations(
    model: nnx.Module,
    params: Any,
    batches: Iterable,
    *,
    method: str = "minmax",
    percentile: float = 99.99,
    bits: int = 8,
    symmetric: bool = False,
    include: str | list[str] | None = None,
    max_samples: int = 1 << 20,
    seed: int = 0,
) -> dict[str, ActRange]:
    """Input range of every ``nnx.Linear`` / ``nnx.Conv`` of ``model`` over calibration batches.

    Args:
      model: an NNX model called as ``model(x)`` (eval mode); not modified.
      params: the ``nnx.Param`` values to calibrate with (pure dict or State), or ``None``
        for the model's own (pass the quantized weights to calibrate the quantized model).
      batches: iterable of input arrays or of ``(x, y)`` tuples.
      method: ``'minmax'`` (running min and max), ``'percentile'`` (the ``100 - p`` and
        ``p`` percentiles of all recorded values), or ``'mse'`` (the range ``alpha * [lo, hi]``
        over 100 values of ``alpha`` in (0, 1] minimising the mean squared error of
        ``bits``-bit quantization of the recorded values).
      percentile: ``p`` for the percentile method, in (50, 100].
      bits, symmetric: the activation quantizer the mse method optimises for.
      include: regexes over layer names (``'fc1'``); default every layer.
      max_samples: the percentile and mse methods keep a uniform random subsample of at
        most this many values per layer (drawn with ``seed``).

    Returns:
      ``{layer name: ActRange(lo, hi)}``.

    Example:
      >>> ranges = calibrate_activations(model, None, [x_cal[:500], x_cal[500:1000]], method='percentile')
      >>> ranges['fc1']
      ActRange(lo=0.0, hi=1.0)
    """
    methods = ("minmax", "percentile", "mse")
    if method not in methods:
        raise ValueError(f"method={method!r} must be one of {methods}.")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile!r} must be in (50, 100].")
    code_range(bits, symmetric)
    model = _with_params(model, params)
    graphdef, state = nnx.split(model)

    @jax.jit
    def record(state, x):
        m = nnx.merge(graphdef, state)
        seen: dict = {}
        with intercept_layer_inputs(m, lambda n, v: seen.setdefault(n, v)):
            m(x)
        if method == "minmax":
            return {n: (jnp.min(v), jnp.max(v)) for n, v in seen.items()}
        return {n: v.ravel() for n, v in seen.items()}

    recorded: dict[str, list] = {}
    for x in _calibration_inputs(batches):
        for n, v in record(state, jnp.asarray(x)).items():
            recorded.setdefault(n, []).append(jax.device_get(v))
    if not recorded:
        raise ValueError("batches is empty (or the model has no nnx.Linear / nnx.Conv layer); pass calibration inputs.")
    if include is not None:
        keep = set(tree.selected_names({n: 0 for n in recorded}, include))
        recorded = {n: v for n, v in recorded.items() if n in keep}
    rng = np.random.default_rng(seed)
    out = {}
    for n, vals in recorded.items():
        if method == "minmax":
            out[n] = ActRange(float(min(v[0] for v in vals)), float(max(v[1] for v in vals)))
            continue
        v = np.concatenate(vals)
        if v.size > max_samples:
            v = rng.choice(v, max_samples, replace=False)
        if method == "percentile":
            out[n] = ActRange(float(np.percentile(v, 100.0 - percentile)), float(np.percentile(v, percentile)))
        else:
            out[n] = _mse_range(v, bits, symmetric)
    return out


def _mse_range(v: np.ndarray, bits: int, symmetric: bool) -> ActRange:
    lo, hi = float(v.min()), float(v.max())
    alphas = jnp.linspace(0.01, 1.0, 100)
    x = jnp.asarray(v, jnp.float32)
    errs = jax.lax.map(
        lambda a: jnp.mean((fake_quant_range(x, (a * lo, a * hi), bits=bits, symmetric=symmetric) - x) ** 2), alphas
    )
    a = float(alphas[int(jnp.argmin(errs))])
    return ActRange(a * lo, a * hi)


def apply_with_quantizers(
    model: nnx.Module,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
    act_fn: Callable[[str, jax.Array], jax.Array] | None = None,
) -> Callable:
    """An apply function for ``model`` whose params and layer inputs pass through quantizers.

    Args:
      model: the NNX model (only its structure is used; params come in at call time).
      weight_fn: ``params -> params`` applied to the pure-dict params on every call.
      act_fn: ``(layer name, x) -> x`` applied to the input of every ``nnx.Linear`` /
        ``nnx.Conv`` (see :func:`intercept_layer_inputs`).

    Returns:
      ``apply(params, extra, x, train=False, key=None) -> (logits, extra)`` with the
      signature of ``models.functional(model).apply``, so it works with ``train.fit`` and
      ``train.evaluate``.
    """
    graphdef, p_state, e_state = nnx.split(model, nnx.Param, ...)

    def apply(params, extra, x, train: bool = False, key: jax.Array | None = None):
        if weight_fn is not None:
            params = weight_fn(params)
        m = nnx.merge(graphdef, tree.from_pure_dict(p_state, params), tree.from_pure_dict(e_state, extra))
        rngs = nnx.Rngs(dropout=key) if key is not None else None
        ctx = intercept_layer_inputs(m, act_fn) if act_fn is not None else contextlib.nullcontext()
        with ctx:
            logits = m(x, train=train, rngs=rngs)
        _, _, new_extra = nnx.split(m, nnx.Param, ...)
        return logits, nnx.to_pure_dict(new_extra)

    return apply


def check_act_ranges(model: nnx.Module, act_ranges: dict | None, act_bits: int | None, act_symmetric: bool) -> dict:
    """Validate activation settings against the model's layers; return the ranges as ``ActRange``."""
    if act_bits is None:
        if act_ranges:
            raise ValueError("act_ranges given without act_bits; pass act_bits=8 (say) to quantize activations.")
        return {}
    code_range(act_bits, act_symmetric)
    if not act_ranges:
        raise ValueError("act_bits needs act_ranges from calibrate_activations(model, params, batches).")
    layers = set(_layer_names(model).values())
    unknown = sorted(set(act_ranges) - layers)
    if unknown:
        raise ValueError(
            f"act_ranges names layers {unknown} that the model does not have; its layers are {sorted(layers)}."
        )
    out = {}
    for n, r in act_ranges.items():
        lo, hi = float(r[0]), float(r[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"act_ranges[{n!r}] = {tuple(r)} must be finite with lo <= hi.")
        out[n] = ActRange(lo, hi)
    return out


def quantized_apply(
    model: nnx.Module,
    *,
    bits: int | None = 8,
    act_bits: int | None = None,
    act_ranges: dict[str, ActRange] | None = None,
    symmetric: bool = True,
    axis: int | None = None,
    group_size: int | None = None,
    act_symmetric: bool = False,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
) -> Callable:
    """Evaluate ``model`` with quantized weights and (optionally) quantized layer inputs.

    The selected weights are fake-quantized with round-to-nearest (exactly the values
    ``quantize_params`` would store); the input of each layer named in ``act_ranges`` is
    quantized on the fixed grid of its calibrated range.

    Args:
      model: the NNX model (its structure; params are passed to the returned function).
      bits: weight bits, or ``None`` to keep float weights.
      act_bits: activation bits, or ``None`` for float activations.
      act_ranges: from :func:`calibrate_activations`; required with ``act_bits``.
      symmetric, axis, group_size, include, exclude: the weight quantizer, as in
        :func:`quantize_params`.
      act_symmetric: symmetric activation grid (default asymmetric, which suits ReLU
        outputs and [0, 1] pixels).

    Returns:
      ``apply(params, extra, x, train=False, key=None) -> (logits, extra)``.

    Example:
      >>> fn = models.functional(model)
      >>> ranges = calibrate_activations(model, None, [ds.x_train[:1000]])
      >>> apply8 = quantized_apply(model, bits=8, act_bits=8, act_ranges=ranges, axis=-1)
      >>> train.evaluate(apply8, fn.params, fn.extra, ds.x_test, ds.y_test)
    """
    ranges = check_act_ranges(model, act_ranges, act_bits, act_symmetric)
    weight_fn = None
    if bits is not None:
        wq = weight_quantization(
            bits=bits, include=include, exclude=exclude, symmetric=symmetric, axis=axis, group_size=group_size
        )
        weight_fn = lambda p: wq(p)[0]
    act_fn = None
    if ranges:
        act_fn = lambda n, x: (
            fake_quant_range(x, ranges[n], bits=act_bits, symmetric=act_symmetric) if n in ranges else x
        )
    return apply_with_quantizers(model, weight_fn=weight_fn, act_fn=act_fn)
