"""AWQ (Lin et al. 2024): activation-aware weight quantization by per-channel scaling.

A layer ``y = x @ K`` (Flax kernel ``(in, out)``) computes the same function as
``y = (x / s) @ (diag(s) K)`` for any positive ``s`` ``(in,)``. Quantizing ``diag(s) K``
instead of ``K`` gives the input channels with large activations (large ``s``) a finer
grid relative to their weights. AWQ searches ``s = mean|x|^alpha`` (normalised so that
``max(s) * min(s) = 1``) over ``alpha`` in ``{0, 1/n, ..., (n-1)/n}`` (``n = grid``, 20 in
the paper) and keeps the ``alpha`` whose quantized layers' output error on the
calibration data,

    sum over the group's layers of ||x K - (x / s) Q(diag(s) K)||^2 = tr(D^T H D),
    D = K - diag(1/s) Q(diag(s) K),   H = sum x x^T,

is smallest (``alpha = 0``, ``s = 1``, is plain round-to-nearest, so AWQ's error is never
above RTN's on the calibration data). The division by ``s`` is folded into the layer that
produces ``x`` (:func:`apply_scales`): a norm's scale and bias, or the output columns of
a preceding Linear (``v_proj -> o_proj``, ``up_proj -> down_proj``), so the model's
function is unchanged before quantization. Which layers share an input and what produces
it is plain data the model declares (``block.scale_groups()``: a tuple of
:class:`jcompress.models.llama.ScaleGroup`, or any ``(source, targets, offset)`` triples).

The quantized kernels are round-to-nearest on the grid of ``jc.quant.quantize`` (one grid
per output unit and per ``group_size`` inputs, symmetric by default). The reference's
extra weight-clipping search is not done.

Example:
  >>> t = jc.oneshot.awq(stats, channels, groups=block.scale_groups(), bits=4, group_size=128)
  >>> params, aux = t(nnx.state(block, nnx.Param))
  >>> aux.scales['attn/q_proj/kernel'].shape    # (d,)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jcompress import tree
from jcompress.core import base, spec
from jcompress.core import grid as grid_lib
from jcompress.oneshot.calibration import _check_stats

__all__ = ["AWQAux", "ChannelStats", "apply_scales", "awq", "check_channels", "check_groups", "effective_kernel", "output_error", "quantize_kernel", "relative_output_error", "scaled_leaves"]


class ChannelStats(NamedTuple):
    """Per-input-channel statistics of one Dense layer's calibration inputs.

    Attributes:
      abs_mean: ``(in,)`` float32, mean of ``|x_j|`` over the calibration tokens (AWQ).
      abs_max: ``(in,)`` float32, max of ``|x_j|`` (SmoothQuant).
    """

    abs_mean: jax.Array
    abs_max: jax.Array


class _Group(NamedTuple):
    """One entry of ``groups``: the fields of :class:`jcompress.models.llama.ScaleGroup`.

    Attributes:
      source: path of a norm (leaves ``scale``, optional ``bias``) or a Linear (``kernel``,
        optional ``bias``) whose output channels ``[offset, offset + in)`` feed the targets.
      targets: paths of the Linears fed by it (their kernels are ``target + '/kernel'``).
      offset: first output channel of ``source`` that feeds the targets.
    """

    source: str
    targets: tuple[str, ...]
    offset: int = 0


class AWQAux(NamedTuple):
    """Aux of :func:`awq` (and :func:`jcompress.oneshot.smoothquant`).

    Attributes:
      scales: ``{kernel name: s (in,)}``: the layer now receives ``x / s``, its kernel is
        ``diag(s) K`` quantized (only scaled layers are listed; a kernel that is also a
        source has its output columns divided by the next group's scales,
        :func:`effective_kernel`).
      alphas: ``{source path: alpha}`` chosen per group.
      grids: ``{kernel name: QuantParams}`` of the stored (scaled) kernels.
      errors: ``{kernel name: ||x K - x K_eff||^2 / ||x K||^2}`` on the calibration data,
        ``K_eff`` the quantized layer's function in the original basis (:func:`effective_kernel`).
    """

    scales: dict
    alphas: dict
    grids: dict
    errors: dict


def _as_group(g) -> _Group:
    try:
        source, targets, *rest = g
    except (TypeError, ValueError):
        raise TypeError(f"groups entries must be (source, targets, offset) like a model's ScaleGroup, got {g!r}") from None
    return _Group(source, tuple(targets), *rest)


def _check_groups_type(groups, arg: str = "groups") -> None:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(
            f"{arg}={groups!r} must be a list of (source, targets, offset) entries, e.g. block.scale_groups() "
            "(an empty list scales nothing)"
        )


def check_groups(groups: Sequence, params, *, arg: str = "groups") -> tuple:
    """The groups as ``(source, targets, offset)`` named tuples, checked against ``params``' leaf names and shapes.

    Raises:
      ValueError: a source or target that is not in ``params``, a target in two groups, or
        channel ranges that do not fit (naming the group).
    """
    _check_groups_type(groups, arg)
    leaves = dict(tree.named_leaves(params))
    out, seen = [], set()
    for g in map(_as_group, groups):
        kind = "scale" if f"{g.source}/scale" in leaves else "kernel" if f"{g.source}/kernel" in leaves else None
        if kind is None:
            raise ValueError(f"{arg}: source {g.source!r} has neither {g.source}/scale nor {g.source}/kernel in params")
        if not g.targets:
            raise ValueError(f"{arg}: the group of {g.source!r} has no targets")
        widths = set()
        for t in g.targets:
            k = leaves.get(f"{t}/kernel")
            if k is None or jnp.ndim(k) != 2:
                raise ValueError(f"{arg}: target {t!r} of {g.source!r} has no 2-D {t}/kernel in params")
            if t in seen:
                raise ValueError(f"{arg}: target {t!r} appears in two groups; each layer has one input source")
            seen.add(t)
            widths.add(k.shape[0])
        if len(widths) != 1:
            raise ValueError(f"{arg}: targets {g.targets} of {g.source!r} take different input widths {sorted(widths)}")
        n = widths.pop()
        src = leaves[f"{g.source}/{kind}"]
        if not (0 <= g.offset and g.offset + n <= src.shape[-1]):
            raise ValueError(
                f"{arg}: {g.source!r} has {src.shape[-1]} output channels; channels [{g.offset}, {g.offset + n}) "
                f"cannot feed {g.targets}"
            )
        out.append(g)
    return tuple(out)


def check_channels(channels: dict, names: Sequence[str], *, arg: str = "channels") -> dict[str, ChannelStats]:
    """``channels`` restricted to ``names``, each a :class:`ChannelStats`; errors name the missing layer."""
    if not isinstance(channels, dict):
        raise TypeError(f"{arg} must be a dict {{kernel name: ChannelStats}}, got {type(channels).__name__}")
    out = {}
    for n in names:
        c = channels.get(n)
        if c is not None and not isinstance(c, ChannelStats):
            raise TypeError(f"{arg}[{n!r}] must be a ChannelStats(abs_mean, abs_max), got {type(c).__name__}")
        if c is None:
            raise ValueError(
                f"{arg} has no ChannelStats for {n}; collect them with jc.blockwise.compress (BlockCalibration.channels)"
            )
        tree.check_finite({f"{n}/abs_mean": c.abs_mean, f"{n}/abs_max": c.abs_max}, arg)
        out[n] = c
    return out


def apply_scales(params, groups: Sequence, scales: dict):
    """Fold per-channel scales into ``params``: sources' channels divided, targets' kernel rows multiplied.

    Args:
      params: a block's parameter tree (names relative to the block, as in ``groups``).
      groups: ``(source, targets, offset)`` triples (a model's ``scale_groups()``).
      scales: ``{source path: s (in,)}`` positive scales, for some or all groups.

    Returns:
      the new params: for a norm source ``scale[j] /= s_j`` (and ``bias``); for a Linear
      source its output columns ``offset + j`` of ``kernel`` and ``bias`` divided by
      ``s_j``; every target's ``kernel[j, :] *= s_j``. The block's function is unchanged
      (up to float rounding).

    Example:
      >>> params = apply_scales(params, block.scale_groups(), {'attn_norm': s})
    """
    groups = check_groups(groups, params)
    leaves = dict(tree.named_leaves(params))
    updates = {}
    for g in groups:
        if g.source not in scales:
            continue
        s = jnp.asarray(scales[g.source], jnp.float32)
        n = s.shape[0]
        for leaf in ("scale", "bias", "kernel"):
            name = f"{g.source}/{leaf}"
            if name in leaves:
                v = updates.get(name, leaves[name])
                cols = v[..., g.offset : g.offset + n]
                updates[name] = v.at[..., g.offset : g.offset + n].set((cols / s).astype(v.dtype))
        for t in g.targets:
            name = f"{t}/kernel"
            k = leaves[name]
            if k.shape[0] != n:
                raise ValueError(f"scales[{g.source!r}] has {n} entries but {name} takes {k.shape[0]} inputs")
            updates[name] = (k * s[:, None]).astype(k.dtype)
    return tree.set_by_name(params, updates)


def scaled_leaves(hs: dict, groups: Sequence):
    """The ``leaves(params)`` rule of a scaling transform: the calibrated kernels, then the
    leaves of every source whose targets are all calibrated (they are rescaled)."""
    _check_groups_type(groups)

    def leaves(params):
        gs = check_groups(groups, params)
        names = list(hs)
        present = {n for n, _ in tree.named_leaves(params)}
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"stats names {missing[:5]} are not leaves of params (leaves: {sorted(present)[:8]} ...)")
        for g in gs:
            if all(f"{t}/kernel" in hs for t in g.targets):
                names += [n for n in (f"{g.source}/scale", f"{g.source}/bias", f"{g.source}/kernel") if n in present]
        return names

    return leaves


def effective_kernel(q, name: str, groups: Sequence, scales: dict):
    """The kernel a folded, quantized layer applies to its original inputs: ``diag(1/s) q diag(t)``.

    ``s`` are the scales of the group ``name``'s layer is a target of (its inputs arrive
    divided by ``s``), ``t`` those of groups whose source it is (its output channels
    ``[offset, offset + len(t))`` were divided by ``t``, so the next layers see them
    scaled back). Scales missing from ``scales`` count as 1.
    """
    layer = name.removesuffix("/kernel")
    q = q.astype(jnp.float32)
    for g in groups:
        if g.source not in scales:
            continue
        s = scales[g.source]
        if layer in g.targets:
            q = q / s[:, None]
        if g.source == layer:
            q = q.at[:, g.offset : g.offset + s.shape[0]].multiply(s[None, :])
    return q


@jax.jit
def relative_output_error(kernel, kernel_eff, h):
    """``tr(D^T H D) / tr(K^T H K)`` with ``D = K_eff - K`` (0 for an all-zero kernel kept)."""
    num, den = output_error(kernel, kernel_eff, h)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _quantize(k, *, bits, group_size, symmetric):
    return grid_lib.quantize_leaf(k, bits=bits, axis=-1, group_size=group_size, symmetric=symmetric)


# one compile per kernel shape instead of one per elementwise op
quantize_kernel = jax.jit(_quantize, static_argnames=("bits", "group_size", "symmetric"))


def output_error(kernel, kernel_eff, h):
    """``(num, den)``: ``tr(D^T H D)`` and ``tr(K^T H K)`` with ``D = K - K_eff``."""
    k = kernel.astype(jnp.float32)
    d = kernel_eff.astype(jnp.float32) - k
    return jnp.sum(d * (h @ d)), jnp.sum(k * (h @ k))


def _scaled_error(kernels, hs, s, *, bits, group_size, symmetric):
    """Summed output error of the group's kernels quantized after scaling by ``s``."""
    num = 0.0
    for k, h in zip(kernels, hs):
        q = grid_lib.dequantize(_quantize(k * s[:, None], bits=bits, group_size=group_size, symmetric=symmetric))
        num = num + output_error(k, q / s[:, None], h)[0]
    return num


_scaled_error_jit = jax.jit(_scaled_error, static_argnames=("bits", "group_size", "symmetric"))


def search_scale(kernels, hs, abs_mean, *, bits: int, group_size, symmetric: bool, grid_points: int):
    """``(alpha, s)`` minimising the group's quantized output error over the alpha grid."""
    x = jnp.maximum(abs_mean.astype(jnp.float32), 1e-8)
    best = None
    for i in range(grid_points):
        alpha = i / grid_points
        s = jnp.maximum(x**alpha, 1e-4)
        s = s / jnp.sqrt(s.max() * s.min())
        err = float(_scaled_error_jit(kernels, hs, s, bits=bits, group_size=group_size, symmetric=symmetric))
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def awq(
    stats: dict,
    channels: dict,
    *,
    groups: Sequence,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    grid: int = 20,
) -> base.Transform:
    """AWQ on the calibrated Dense kernels of one block.

    Args:
      stats: ``{kernel name: LayerStats}`` of the block's Linears (names relative to the
        params the transform is called on, e.g. ``attn/q_proj/kernel``); the transform
        quantizes these kernels.
      channels: ``{kernel name: ChannelStats}`` of the same layers (``abs_mean`` is used).
      groups: ``(source, targets, offset)`` triples (``block.scale_groups()``): where each group's scales
        are folded. A kernel in no group (or whose group has a target outside ``stats``)
        is quantized without scaling.
      bits: code width (2..8 usual).
      group_size: inputs sharing one grid (e.g. 128), or ``None`` for one grid per output.
      symmetric: the grid's convention (symmetric by default, as everywhere in jcompress).
      grid: number of alphas searched, ``alpha = i / grid`` for ``i < grid`` (20).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, AWQAux)``. The sources of the
      scaled groups come back divided by ``s``, the kernels as ``Q(diag(s) K)``
      dequantized (float, exactly on their grids).

    Raises:
      ValueError: bad bits / group size / grid, missing channel statistics, groups that
        do not fit the params (naming the argument and the layer).

    Example:
      >>> t = awq(calib.stats, calib.channels, groups=calib.groups, bits=4, group_size=128)
    """
    hs = _check_stats(stats)
    grid_lib.check_bits(bits, symmetric)
    grid_points = spec.check_value(grid, arg="grid", kind=int, lo=1)
    if group_size is not None:
        group_size = spec.check_value(group_size, arg="group_size", kind=int, lo=1)
        for name, h in hs.items():
            grid_lib.check_group_size(group_size, h.shape[0], where=f" (the {h.shape[0]} inputs of {name})")
    chans = check_channels(channels, list(hs))

    leaves = scaled_leaves(hs, groups)

    def apply(params, names, key):
        gs = check_groups(groups, params)
        chosen = set(names)
        leaves_by_name = dict(tree.named_leaves(params))
        tree.check_finite({n: leaves_by_name[n] for n in names}, "params")
        scales, alphas = {}, {}
        for g in gs:
            kernels = [f"{t}/kernel" for t in g.targets]
            if not all(k in hs and k in chosen for k in kernels):
                continue
            ks = [tree.as_float_array(leaves_by_name[k], f"params/{k}").astype(jnp.float32) for k in kernels]
            alphas[g.source], scales[g.source] = search_scale(
                ks, [hs[k] for k in kernels], chans[kernels[0]].abs_mean, bits=bits, group_size=group_size,
                symmetric=symmetric, grid_points=grid_points,
            )  # fmt: skip
        new_params = apply_scales(params, gs, scales)
        new_leaves = dict(tree.named_leaves(new_params))
        per_kernel = {f"{t}/kernel": scales[g.source] for g in gs if g.source in scales for t in g.targets}
        updates, grids, errors = {}, {}, {}
        for n in names:
            if n not in hs:
                continue  # a folded source, already updated
            k = new_leaves[n]
            qp = quantize_kernel(k.astype(jnp.float32), bits=bits, group_size=group_size, symmetric=symmetric)
            q = grid_lib.dequantize(qp)
            errors[n] = relative_output_error(leaves_by_name[n], effective_kernel(q, n, gs, scales), hs[n])
            grids[n], updates[n] = qp, q.astype(k.dtype)
        return tree.set_by_name(new_params, updates), AWQAux(per_kernel, alphas, grids, errors)

    return base.Transform(apply, "awq", leaves=leaves)

