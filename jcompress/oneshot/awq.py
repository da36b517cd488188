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

With grouped-query attention one value channel feeds the ``o_proj`` inputs of every query
head that shares its key/value head, so ``v_proj -> o_proj`` can be folded only with a
scale that is equal across those heads: a group with ``heads=(num_heads, num_kv_heads)``
(a fourth entry of the triple) searches such a scale (the activation means of the heads
sharing a key/value head are averaged) and folds one entry per value channel into
``v_proj``.

The quantized kernels are round-to-nearest on the grid of ``jc.quant.quantize`` (one grid
per output unit and per ``group_size`` inputs, symmetric by default). With ``clip``, the
reference's weight-clipping search follows the scale search: for every output unit and
group of inputs of the scaled kernel, the weights are clipped to ``ratio * max |w|``
for ``ratio = 1 - i / clip_grid``, ``i < int(max_shrink * clip_grid)`` (1, 0.95, ...,
0.55 by default, the reference's grid), quantized, and the ratio with the smallest error
of that group's share of the output, ``d_g^T H_gg d_g`` (``d_g`` the group's weight
change, ``H_gg`` its diagonal block of ``H``, in the scaled basis), is kept (ties: the
larger ratio; ratio 1 is plain rounding, so clipping never raises this error). The
reference skips the query and key projections (their outputs meet in ``q k^T``, which
this error does not see): ``clip={r'[qk]_proj': False, '.*': True}``. It measures the
error on 512 sampled tokens; here ``H`` holds every calibration token.

Example:
  >>> t = jc.oneshot.awq(stats, channels, groups=block.scale_groups(), bits=4, group_size=128)
  >>> params, aux = t(nnx.state(block, nnx.Param))
  >>> aux.scales['attn/q_proj/kernel'].shape    # (d,)
  >>> t = jc.oneshot.awq(stats, channels, groups=block.scale_groups(), bits=4, group_size=128,
  ...                    clip={r'[qk]_proj': False, '.*': True})
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jcompress import tree
from jcompress.core import base, spec
from jcompress.core import grid as grid_lib
from jcompress.oneshot.calibration import _check_stats

__all__ = ["AWQAux", "ChannelStats", "apply_scales", "awq", "check_channels", "check_groups", "clip_ratios", "clip_search", "effective_kernel", "group_output_errors", "output_error", "quantize_kernel", "relative_output_error", "scaled_leaves", "source_scale"]


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
      heads: ``None`` (target input ``j`` is source channel ``offset + j``) or
        ``(num_heads, num_kv_heads)`` for values under grouped-query attention: the
        targets' ``num_heads * head_dim`` inputs are ``num_heads`` blocks of ``head_dim``,
        block ``h`` fed by source block ``h // (num_heads // num_kv_heads)``
        (``num_kv_heads * head_dim`` source channels from ``offset``).
    """

    source: str
    targets: tuple[str, ...]
    offset: int = 0
    heads: tuple[int, int] | None = None


class AWQAux(NamedTuple):
    """Aux of :func:`awq` (and :func:`jcompress.oneshot.smoothquant`).

    Attributes:
      scales: ``{kernel name: s (in,)}``: the layer now receives ``x / s``, its kernel is
        ``diag(s) K`` quantized (only scaled layers are listed; a kernel that is also a
        source has its output columns divided by the next group's scales,
        :func:`effective_kernel`).
      alphas: ``{source path: alpha}`` chosen per group (float32 scalars).
      grids: ``{kernel name: QuantParams}`` of the stored (scaled) kernels.
      errors: ``{kernel name: ||x K - x K_eff||^2 / ||x K||^2}`` on the calibration data,
        ``K_eff`` the quantized layer's function in the original basis (:func:`effective_kernel`).
      clips: ``{kernel name: ratio (in // group_size, out)}``: the clipping ratio chosen for
        each group of inputs and output unit (only kernels searched with ``clip``).
    """

    scales: dict
    alphas: dict
    grids: dict
    errors: dict
    clips: dict


def _as_group(g) -> _Group:
    try:
        source, targets, *rest = g
        if len(rest) > 2:
            raise ValueError
    except (TypeError, ValueError):
        raise TypeError(
            f"groups entries must be (source, targets, offset) or (source, targets, offset, heads) like a model's "
            f"ScaleGroup, got {g!r}"
        ) from None
    return _Group(source, tuple(targets), *rest)


def _check_heads(g: _Group, n: int, arg: str) -> int:
    """The number of source channels feeding the ``n`` target inputs (``n`` without ``heads``)."""
    if g.heads is None:
        return n
    try:
        h, kv = g.heads
    except (TypeError, ValueError):
        raise TypeError(f"{arg}: heads={g.heads!r} of {g.source!r} must be (num_heads, num_kv_heads) or None") from None
    h = spec.check_value(h, arg=f"{arg}: heads[0] (num_heads) of {g.source!r}", kind=int, lo=1)
    kv = spec.check_value(kv, arg=f"{arg}: heads[1] (num_kv_heads) of {g.source!r}", kind=int, lo=1)
    if h % kv or n % h:
        raise ValueError(
            f"{arg}: heads=({h}, {kv}) of {g.source!r} needs num_heads a multiple of num_kv_heads and the targets' "
            f"{n} inputs a multiple of num_heads"
        )
    return n // h * kv


def _kv_view(g: _Group, v: jax.Array) -> jax.Array:
    """A target-sized vector ``(heads * head_dim,)`` as ``(kv_heads, heads // kv_heads, head_dim)``."""
    h, kv = g.heads
    return v.reshape(kv, h // kv, v.shape[0] // h)


def _tied(g: _Group, v: jax.Array) -> jax.Array:
    """``v`` averaged over the query heads that share a key/value head (unchanged without ``heads``)."""
    if g.heads is None:
        return v
    m = _kv_view(g, v)
    return jnp.broadcast_to(m.mean(axis=1, keepdims=True), m.shape).reshape(-1)


def source_scale(g, s: jax.Array) -> jax.Array:
    """The scale on the source's channels of a group's target-sized scale ``s``.

    ``s`` itself without ``heads``; with ``heads`` one entry per value channel (``s`` must
    be equal across the query heads sharing a key/value head; the first is taken).
    """
    g = _as_group(g)
    return s if g.heads is None else _kv_view(g, s)[:, 0, :].reshape(-1)


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
        n = _check_heads(g, widths.pop(), arg)
        src = leaves[f"{g.source}/{kind}"]
        if not (0 <= g.offset and g.offset + n <= src.shape[-1]):
            hint = (
                " (under grouped-query attention give heads=(num_heads, num_kv_heads) as the group's fourth entry)"
                if g.heads is None and kind == "kernel"
                else ""
            )
            raise ValueError(
                f"{arg}: {g.source!r} has {src.shape[-1]} output channels; channels [{g.offset}, {g.offset + n}) "
                f"cannot feed {g.targets}{hint}"
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
      (up to float rounding). For a group with ``heads`` the source's channels are divided
      by :func:`source_scale` and ``s`` must be equal across the query heads that share a
      key/value head (checked when ``s`` is concrete).

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
        if g.heads is not None and not isinstance(s, jax.core.Tracer):
            m = _kv_view(g, s)
            if not bool(jnp.all(m == m[:, :1, :])):
                raise ValueError(
                    f"scales[{g.source!r}] differ between query heads that share a key/value head (heads={g.heads}); "
                    "one value channel feeds all of them, so its scale must be the same for each"
                )
        s_src = source_scale(g, s)
        for leaf in ("scale", "bias", "kernel"):
            name = f"{g.source}/{leaf}"
            if name in leaves:
                v = updates.get(name, leaves[name])
                cols = v[..., g.offset : g.offset + s_src.shape[0]]
                updates[name] = v.at[..., g.offset : g.offset + s_src.shape[0]].set((cols / s_src).astype(v.dtype))
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
            t = source_scale(g, s)
            q = q.at[:, g.offset : g.offset + t.shape[0]].multiply(t[None, :])
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


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "grid_points"))
def search_scale(kernels, hs, abs_mean, *, bits: int, group_size, symmetric: bool, grid_points: int):
    """``(alpha, s)`` minimising the group's quantized output error over the alpha grid.

    ``s = abs_mean ** alpha`` (normalised by ``sqrt(max s * min s)``) for ``alpha = i /
    grid_points``, ``i < grid_points``; the alphas are tried one after another
    (``lax.map``) and the first minimum is kept. ``abs_mean`` ``(in,)``: a vector equal
    across tied channels (heads sharing a key/value head) gives a scale equal across them.
    Returns a float32 scalar and ``(in,)`` float32.
    """
    x = jnp.maximum(abs_mean.astype(jnp.float32), 1e-8)

    def scale(alpha):
        s = jnp.maximum(x**alpha, 1e-4)
        return s / jnp.sqrt(s.max() * s.min())

    alphas = jnp.arange(grid_points, dtype=jnp.float32) / grid_points
    errs = jax.lax.map(
        lambda a: _scaled_error(kernels, hs, scale(a), bits=bits, group_size=group_size, symmetric=symmetric), alphas
    )
    best = alphas[jnp.argmin(errs)]
    return best, scale(best)


def clip_ratios(clip_grid: int = 20, max_shrink: float = 0.5) -> tuple[float, ...]:
    """The clipping ratios searched: ``1 - i / clip_grid`` for ``i < int(max_shrink * clip_grid)``.

    Raises:
      ValueError / TypeError: ``clip_grid`` not an int >= 1, ``max_shrink`` outside [0, 1),
        or a grid with no ratio.

    Example:
      >>> clip_ratios()   # (1.0, 0.95, ..., 0.55): the reference's grid
    """
    clip_grid = spec.check_value(clip_grid, arg="clip_grid", kind=int, lo=1)
    max_shrink = spec.check_value(max_shrink, arg="max_shrink", kind=float, lo=0.0, hi=1.0, hi_open=True)
    n = int(max_shrink * clip_grid)
    if n < 1:
        raise ValueError(
            f"max_shrink={max_shrink} with clip_grid={clip_grid} searches no ratio (int(max_shrink * clip_grid) = 0); "
            "raise either"
        )
    return tuple(1.0 - i / clip_grid for i in range(n))


def _blocks(k, h, group_size):
    """``k`` ``(in, out)`` as ``(G, g, out)`` and the ``G`` diagonal ``(g, g)`` blocks of ``h``."""
    n_in, n_out = k.shape
    g = n_in if group_size is None else group_size
    idx = jnp.arange(n_in // g)
    return k.reshape(n_in // g, g, n_out), h.reshape(n_in // g, g, n_in // g, g)[idx, :, idx, :]


@functools.partial(jax.jit, static_argnames=("group_size",))
def group_output_errors(kernel, new_kernel, h, *, group_size=None):
    """``d_g^T H_gg d_g`` for every group of inputs ``g`` and output unit, ``(in // group_size, out)``.

    ``d = new_kernel - kernel`` ``(in, out)``; ``H_gg`` the diagonal ``(group_size,
    group_size)`` block of ``h`` (the whole ``h`` for ``group_size=None``): the error of the
    group's share of the output, ``||x_g (K_g - K'_g)||^2`` summed over tokens.
    """
    d, hb = _blocks(new_kernel.astype(jnp.float32) - kernel.astype(jnp.float32), h.astype(jnp.float32), group_size)
    return jnp.einsum("aic,aij,ajc->ac", d, hb, d)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "ratios"))
def _clip_search(k, h, *, bits, group_size, symmetric, ratios):
    kg, hb = _blocks(k, h, group_size)
    amax = jnp.max(jnp.abs(kg), axis=1, keepdims=True)  # (G, 1, out)

    def clipped(r):
        return jnp.clip(kg, -r * amax, r * amax).reshape(k.shape)

    def error(r):
        q = grid_lib.dequantize(_quantize(clipped(r), bits=bits, group_size=group_size, symmetric=symmetric))
        d = q.reshape(kg.shape) - kg
        return jnp.einsum("aic,aij,ajc->ac", d, hb, d)

    grid = jnp.asarray(ratios, jnp.float32)
    errs = jax.vmap(error)(grid)  # (ratios, G, out)
    best = jnp.argmin(errs, axis=0)  # the first minimum: the larger ratio on ties
    ratio = grid[best]
    return clipped(ratio[:, None, :]), ratio, jnp.take_along_axis(errs, best[None], axis=0)[0]


def clip_search(
    kernel: jax.Array,
    h: jax.Array,
    *,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AWQ's weight-clipping search on one kernel: a max-value ratio per output unit and group.

    Args:
      kernel: ``(in, out)`` float, the kernel to quantize (after AWQ's scaling).
      h: ``(in, in)`` float32 ``sum x x^T`` of the inputs it sees.
      bits, group_size, symmetric: the grid, as in :func:`awq`.
      clip_grid, max_shrink: the ratios :func:`clip_ratios` (1, 0.95, ..., 0.55 by default).

    Returns:
      ``(clipped (in, out) float32, ratio (in // group_size, out), error (in // group_size, out))``:
      every group of ``group_size`` inputs of every output clipped to ``ratio * max |w|``
      (not yet quantized), the ratio of the smallest :func:`group_output_errors` of the
      quantized group, and that error.

    Example:
      >>> clipped, ratio, err = clip_search(kernel, h, bits=4, group_size=128)
      >>> q = jc.core.grid.dequantize(quantize_kernel(clipped, bits=4, group_size=128, symmetric=True))
    """
    bits = grid_lib.check_bits(bits, symmetric)
    symmetric = spec.check_flag(symmetric, arg="symmetric")
    if group_size is not None:
        group_size = grid_lib.check_group_size(group_size, kernel.shape[0], where=f" (the {kernel.shape[0]} inputs)")
    ratios = clip_ratios(clip_grid, max_shrink)
    k = jnp.asarray(kernel, jnp.float32)
    return _clip_search(k, jnp.asarray(h, jnp.float32), bits=bits, group_size=group_size, symmetric=symmetric, ratios=ratios)


def awq(
    stats: dict,
    channels: dict,
    *,
    groups: Sequence,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    grid: int = 20,
    clip: spec.Spec = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
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
      clip: run the weight-clipping search (:func:`clip_search`) after the scale search:
        ``False`` (default), ``True`` for every kernel, or a ``{regex: bool}`` spec over the
        kernel names (the reference: ``{r'[qk]_proj': False, '.*': True}``).
      clip_grid, max_shrink: the clipping ratios ``1 - i / clip_grid``, ``i < int(max_shrink
        * clip_grid)`` (the reference's 20 and 0.5: 1, 0.95, ..., 0.55).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``(params, AWQAux)``. The sources of the
      scaled groups come back divided by ``s``, the kernels as ``Q(diag(s) K)``
      (``Q(clip(diag(s) K))`` with ``clip``) dequantized (float, exactly on their grids).

    Raises:
      ValueError: bad bits / group size / grid / clip settings, missing channel
        statistics, groups that do not fit the params (naming the argument and the layer).

    Example:
      >>> t = awq(calib.stats, calib.channels, groups=calib.groups, bits=4, group_size=128)
      >>> t = awq(calib.stats, calib.channels, groups=calib.groups, bits=4, group_size=128, clip=True)
    """
    hs = _check_stats(stats)
    grid_lib.check_bits(bits, symmetric)
    grid_points = spec.check_value(grid, arg="grid", kind=int, lo=1)
    if group_size is not None:
        group_size = spec.check_value(group_size, arg="group_size", kind=int, lo=1)
        for name, h in hs.items():
            grid_lib.check_group_size(group_size, h.shape[0], where=f" (the {h.shape[0]} inputs of {name})")
    chans = check_channels(channels, list(hs))
    if spec.is_pairs(clip):
        clip_of = {n: spec.check_flag(c, arg=f"clip (its value for {n})") for n, c in spec.resolve(clip, list(hs), arg="clip").items()}
    else:
        clip_of = dict.fromkeys(hs, spec.check_flag(clip, arg="clip"))
    ratios = clip_ratios(clip_grid, max_shrink)

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
                ks, [hs[k] for k in kernels], _tied(g, chans[kernels[0]].abs_mean), bits=bits, group_size=group_size,
                symmetric=symmetric, grid_points=grid_points,
            )  # fmt: skip
        new_params = apply_scales(params, gs, scales)
        new_leaves = dict(tree.named_leaves(new_params))
        per_kernel = {f"{t}/kernel": scales[g.source] for g in gs if g.source in scales for t in g.targets}
        updates, grids, errors, clips = {}, {}, {}, {}
        for n in names:
            if n not in hs:
                continue  # a folded source, already updated
            k = new_leaves[n].astype(jnp.float32)
            if clip_of[n]:
                s = per_kernel.get(n)
                h_scaled = hs[n] if s is None else hs[n] / (s[:, None] * s[None, :])  # the inputs x / s
                k, clips[n], _ = _clip_search(
                    k, h_scaled, bits=bits, group_size=group_size, symmetric=symmetric, ratios=ratios
                )
            qp = quantize_kernel(k, bits=bits, group_size=group_size, symmetric=symmetric)
            q = grid_lib.dequantize(qp)
            errors[n] = relative_output_error(leaves_by_name[n], effective_kernel(q, n, gs, scales), hs[n])
            grids[n], updates[n] = qp, q.astype(new_leaves[n].dtype)
        return tree.set_by_name(new_params, updates), AWQAux(per_kernel, alphas, grids, errors, clips)

    return base.Transform(apply, "awq", leaves=leaves)

