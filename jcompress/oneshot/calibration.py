"""Calibration statistics for one-shot compression, and the layer-by-layer driver.

One-shot methods (OBS, SparseGPT, GPTQ, Wanda) compress a layer ``y = x @ K`` (Flax
kernel ``K`` of shape ``(in, out)``) so that its outputs on calibration data change as
little as possible. All they need from the data is

    H = sum over calibration tokens of x x^T        (in, in), float32

and the token count. :func:`calibrate` streams batches through a model and adds up ``H``
for every ``nnx.Linear`` (through the layer hook :mod:`jcompress.nnx.hooks`, under
``jax.jit``: only the sums leave the compiled function, so activations are never kept
and XLA drops the part of the network after the last calibrated layer). Statistics are
keyed by kernel leaf name (``layers/0/query/kernel``), the names every transform uses.

:func:`sequential` runs the calibrate -> compress loop as SparseGPT and GPTQ do: the
layers are compressed group by group (one layer each by default, in the order the
forward pass calls them; for a transformer, one block at a time with
:func:`jcompress.models.bert.layer_groups`) and each group is calibrated on the outputs
of the already-compressed groups before it, so later layers correct earlier layers' errors.

:func:`layer_transform` is how every one-shot factory becomes a transform: it validates
the statistics, runs a per-layer solver on the calibrated kernels and reports
``errors[name] = ||X K - X K'||^2 / ||X K||^2 = tr(dK^T H dK) / tr(K^T H K)``; each layer
is solved on the device that holds its ``H``.

Example:
  >>> stats = jc.oneshot.calibrate(model, batches, forward=lambda m, b: m(b[0], b[1]), token_mask=lambda b: b[1])
  >>> stats['layers/0/query/kernel'].h.shape
  (384, 384)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jcompress import tree
from jcompress.core import base, spec
from jcompress.nnx import hooks

__all__ = ["LayerStats", "calibrate", "layer_transform", "linear_kernels", "mask_tree", "merge_auxes", "per_layer", "sequential"]


class LayerStats(NamedTuple):
    """Calibration statistic of one Dense layer.

    Attributes:
      h: ``(in, in)`` float32, the sum over tokens of ``x x^T`` (Flax inputs ``x`` of the
        layer whose kernel is ``(in, out)``).
      count: number of tokens summed (float32 scalar; masked-out tokens do not count).
    """

    h: jax.Array
    count: jax.Array


def linear_kernels(model: nnx.Module) -> dict[str, str]:
    """``{kernel leaf name: layer name}`` of every ``nnx.Linear`` of ``model``, in graph order."""
    return {f"{n}/kernel": n for n, m in hooks.layers(model).items() if isinstance(m, nnx.Linear)}


def _check_names(model: nnx.Module, names) -> list[str]:
    kernels = linear_kernels(model)
    if names is None:
        if not kernels:
            raise ValueError("the model has no nnx.Linear layer; one-shot calibration captures Dense inputs")
        return list(kernels)
    names = list(names)
    bad = [n for n in names if n not in kernels]
    if bad:
        raise ValueError(
            f"names {bad[:5]} are not kernels of nnx.Linear layers; one-shot calibration captures Dense inputs. "
            f"The Linear kernels are {list(kernels)[:8]}"
        )
    if not names:
        raise ValueError("names is empty; give the kernels to calibrate or None for all nnx.Linear kernels")
    return names


def _as_batches(inputs) -> list:
    if hasattr(inputs, "shape"):
        return [inputs]
    return list(inputs)


def _default_forward(model, batch):
    return model(batch)


def calibrate(
    model: nnx.Module,
    inputs,
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    token_mask: Callable[[Any], jax.Array] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, LayerStats]:
    """Sum ``x x^T`` over calibration data for the ``nnx.Linear`` kernels of ``model``.

    Args:
      model: the NNX model (not modified).
      inputs: one input array (one batch), or a list (any iterable) of batches; a batch
        is whatever ``forward`` takes.
      forward: ``forward(model, batch)`` runs the model on one batch (its result is
        ignored; traced with ``jax.jit``); default ``model(batch)``.
      token_mask: ``token_mask(batch)`` gives, for every leading position of the Linear
        inputs (``(batch, seq)`` for a transformer), 1 for tokens to count and 0 for
        padding; ``None`` counts every position.
      names: the kernel leaf names to calibrate (default: every ``nnx.Linear`` kernel).

    Returns:
      ``{kernel name: LayerStats(h (in, in) float32, count)}`` in ``names`` order.

    Raises:
      ValueError: empty inputs; names that are not Linear kernels; a layer ``forward``
        never calls; inputs whose width does not fit a layer (naming the layer); a layer
        that saw no token (every position masked out).

    Example:
      >>> stats = calibrate(model, [x[:256], x[256:512]])
      >>> stats['fc1/kernel'].count
      Array(512., dtype=float32)
    """
    wanted = _check_names(model, names)
    batches = _as_batches(inputs)
    if not batches:
        raise ValueError("inputs is empty; pass at least one calibration batch")
    forward = _default_forward if forward is None else forward
    graphdef, state = nnx.split(model)
    kernels = linear_kernels(model)
    layer_names = [kernels[n] for n in wanted]

    @jax.jit
    def batch_stats(state, batch):
        m = nnx.merge(graphdef, state)
        widths = {n: layer.in_features for n, layer in hooks.layers(m).items()}
        weights = None if token_mask is None else jnp.asarray(token_mask(batch))
        sink: dict = {}

        def add(name, x, op):
            if x.shape[-1] != widths[name]:
                raise ValueError(
                    f"layer {name} gets calibration inputs of width {x.shape[-1]} (shape {tuple(x.shape)}) but its kernel "
                    f"takes {widths[name]} inputs; check the shape of the calibration inputs and forward="
                )
            x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            if weights is None:
                w = jnp.ones((x2.shape[0],), jnp.float32)
            elif weights.size != x2.shape[0]:
                raise ValueError(
                    f"token_mask has {weights.size} entries but layer {name} sees inputs of shape {x.shape}; "
                    "the mask must cover every leading position of each Linear's input"
                )
            else:
                w = weights.reshape(-1).astype(jnp.float32)
            h = (x2 * w[:, None]).T @ x2
            prev = sink.get(name)
            sink[name] = LayerStats(h, w.sum()) if prev is None else LayerStats(prev.h + h, prev.count + w.sum())
            return op(x)

        with hooks.intercept(m, add, names=layer_names):
            forward(m, batch)
        return sink

    total: dict | None = None
    for batch in batches:
        got = batch_stats(state, batch)
        total = got if total is None else jax.tree.map(jnp.add, total, got)
    missing = [n for n in wanted if kernels[n] not in total]
    if missing:
        raise ValueError(f"forward never called the Linear layers of {missing[:5]}; check forward= or names=")
    stats = {n: total[kernels[n]] for n in wanted}
    empty = [n for n, s in stats.items() if float(s.count) == 0]
    if empty:
        raise ValueError(f"no calibration token reached {empty[:5]} (token_mask is 0 everywhere); check token_mask")
    return stats


# ----------------------------------------------------------------------------------------
# From a per-layer solver to a transform
# ----------------------------------------------------------------------------------------


def _check_stats(stats: dict) -> dict[str, jax.Array]:
    """``{name: h}`` from ``{name: LayerStats or (in, in) array}``; refuses empty or zero-token statistics."""
    if not isinstance(stats, dict) or not stats:
        raise ValueError("stats is empty; compute it with jc.oneshot.calibrate(model, inputs)")
    out = {}
    for name, s in stats.items():
        h = s.h if isinstance(s, LayerStats) else s
        h = tree.as_float_array(h, f"stats/{name}")
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"stats/{name} has shape {h.shape}; it must be a square (in, in) matrix")
        if isinstance(s, LayerStats) and not isinstance(s.count, jax.core.Tracer) and float(s.count) <= 0:
            raise ValueError(
                f"stats/{name} counts {float(s.count)} calibration tokens; calibrate on inputs with at least one "
                "real token (check token_mask)"
            )
        tree.check_finite({name: h}, "stats")
        if not isinstance(h, jax.core.Tracer) and not bool(jnp.any(h != 0)):
            raise ValueError(f"stats/{name} is all zero (no calibration input reached the layer); recalibrate")
        out[name] = h
    return out


def _single_device(x):
    """The device of an array that lies whole on one device; None otherwise (sharded, or a tracer)."""
    devices = getattr(getattr(x, "sharding", None), "device_set", ())
    return next(iter(devices)) if len(devices) == 1 and not isinstance(x, jax.core.Tracer) else None


def layer_transform(
    stats: dict,
    solve: Callable[[str, jax.Array, jax.Array], tuple[jax.Array, dict]],
    make_aux: Callable[[Any, dict, dict], Any],
    *,
    name: str,
) -> base.Transform:
    """A transform running ``solve(name, kernel, h) -> (new_kernel, extras)`` on the calibrated kernels.

    Args:
      stats: ``{kernel name: LayerStats}`` (or ``{name: H}``); the transform's leaves are
        these names (narrowed by :func:`jcompress.core.base.masked`).
      solve: the per-layer solver; ``kernel`` is the 2-D float kernel ``(in, out)``,
        ``h`` its ``(in, in)`` statistic. ``new_kernel`` is cast to the kernel's dtype.
      make_aux: ``make_aux(params, extras, errors) -> aux`` with ``extras = {name: extras}``
        and ``errors = {name: relative output error}`` (:func:`jcompress.core.base.relative_error`).
      name: the transform's label.

    Returns:
      a :class:`~jcompress.core.base.Transform`.

    Placement: each layer is solved on the device that holds its statistic ``h`` (when
    ``h`` lies whole on one device): the kernel is copied there, and the new kernel is
    put back with the kernel's own sharding, while the extras and the error stay on the
    solving device. Calls are dispatched asynchronously, so statistics spread over
    several devices (:func:`jcompress.blockwise.compress` does this) let the layers
    solve concurrently.
    """
    hs = _check_stats(stats)

    def leaves(params):
        present = {n for n, _ in tree.named_leaves(params)}
        missing = [n for n in hs if n not in present]
        if missing:
            raise ValueError(f"stats names {missing[:5]} are not leaves of params (leaves: {sorted(present)[:8]} ...)")
        return list(hs)

    def apply(params, names, key):
        leaves_by_name = dict(tree.named_leaves(params))
        updates, extras, errors = {}, {}, {}
        for n in names:
            if n not in hs:
                raise ValueError(f"{name}: no calibration statistics for {n}; calibrate it (jc.oneshot.calibrate) or leave it out")
            kernel = tree.as_float_array(leaves_by_name[n], f"params/{n}")
            h = hs[n]
            if kernel.ndim != 2:
                raise ValueError(f"params/{n} has shape {kernel.shape}; one-shot solvers need a 2-D Dense kernel (in, out)")
            if kernel.size == 0:
                raise ValueError(f"params/{n} is empty (shape {kernel.shape}); there is nothing to compress. Leave it out with jc.masked")
            if h.shape != (kernel.shape[0],) * 2:
                raise ValueError(
                    f"stats/{n} has shape {h.shape} but the kernel {kernel.shape} needs ({kernel.shape[0]}, {kernel.shape[0]})"
                )
            tree.check_finite({n: kernel}, "params")
            traced = isinstance(kernel, jax.core.Tracer)  # under jax.jit the program's placement decides
            home, device = (None, None) if traced else (kernel.sharding, _single_device(h))
            moved = device is not None and home.device_set != {device}
            if moved:
                kernel = jax.device_put(kernel, device)  # solve where the statistic lies
            new_kernel, extras[n] = solve(n, kernel, h)
            errors[n] = base.relative_error(kernel, new_kernel, h)
            new_kernel = new_kernel.astype(kernel.dtype)
            updates[n] = jax.device_put(new_kernel, home) if moved else new_kernel
        new_params = tree.set_by_name(params, updates)
        return new_params, make_aux(new_params, extras, errors)

    return base.Transform(apply, name, leaves=leaves)


_UNCOVERED = object()


def per_layer(value: spec.Spec, stats: dict, *, arg: str) -> Callable[[str], Any]:
    """``name -> value`` of a spec over the calibrated kernels (:func:`jcompress.core.spec.resolve`).

    A kernel that no pattern covers is an error only when it is compressed, so a spec may
    cover just the kernels a :func:`jcompress.core.masked` transform touches.
    """
    resolved = spec.resolve(value, list(stats), arg=arg, default=_UNCOVERED)

    def get(name: str):
        if resolved[name] is _UNCOVERED:
            raise ValueError(f"{arg}: no pattern covers {name}; add a catch-all pattern '.*' or leave it out with jc.masked")
        return resolved[name]

    return get


def mask_tree(params, masks: dict) -> Any:
    """The params-shaped bool tree: ``masks[name]`` where given, all True elsewhere."""
    return tree.map_with_names(lambda n, x: masks[n] if n in masks else jnp.ones(jnp.shape(x), bool), params)


# ----------------------------------------------------------------------------------------
# Sequential (layer by layer) calibration
# ----------------------------------------------------------------------------------------


def merge_auxes(auxes: Sequence[Any]) -> Any:
    """One aux from the auxes of the groups of :func:`sequential` (same type, disjoint layers).

    Masks are combined with AND (each group's masks are all True outside its layers),
    grids and errors are united; a :class:`ChainAux` is merged stage by stage.
    """
    first = auxes[0]
    if isinstance(first, base.ChainAux):
        return base.ChainAux(first.names, tuple(merge_auxes([a.auxes[i] for a in auxes]) for i in range(len(first))))
    errors = None if first.errors is None else {n: e for a in auxes for n, e in a.errors.items()}
    if isinstance(first, base.MaskAux):
        masks = jax.tree.map(lambda *m: jnp.logical_and.reduce(jnp.stack(m)), *[a.masks for a in auxes])
        return base.MaskAux(masks, None, errors)
    if isinstance(first, base.GridAux):
        return base.GridAux({n: g for a in auxes for n, g in a.grids.items()}, errors)
    raise TypeError(f"sequential merges MaskAux, GridAux and ChainAux of them; the transform returned {type(first).__name__}")


def _call_order(model: nnx.Module, batch, forward, layer_names: list[str]) -> list[str]:
    """The layers of ``layer_names`` in the order ``forward`` calls them (traced once, not run)."""
    order: list[str] = []

    def note(name, x, op):
        if name not in order:
            order.append(name)
        return op(x)

    graphdef, state = nnx.split(model)

    def run(state):
        m = nnx.merge(graphdef, state)
        with hooks.intercept(m, note, names=layer_names):
            forward(m, batch)
        return 0

    jax.eval_shape(run, state)
    return order


def sequential(
    model: nnx.Module,
    inputs,
    make_transform: Callable[[dict], Any],
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    token_mask: Callable[[Any], jax.Array] | None = None,
    names: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    key: jax.Array | None = None,
) -> tuple[nnx.Module, Any]:
    """Calibrate and compress group after group, each on the already-compressed model.

    Args:
      model: the NNX model (not modified; a new one is returned).
      inputs, forward, token_mask: as in :func:`calibrate` (inputs are read once per group).
      make_transform: ``stats -> transform``, called with each group's statistics, e.g.
        ``lambda stats: jc.oneshot.sparsegpt(stats, sparsity=0.5)`` (or a :func:`chain` of
        one-shot transforms on the same statistics).
      names: the kernels to compress (default: every ``nnx.Linear`` kernel).
      groups: regexes over kernel names, in network order; group ``g`` holds the kernels
        that match ``groups[g]`` and no earlier group (for BERT, ``bert.layer_groups(cfg)``:
        one transformer layer each). Default: one kernel per group, in the order the
        forward pass calls the layers.
      key: split into one key per group for the transforms.

    Returns:
      ``(compressed model, aux)``: the groups' auxes merged (:func:`merge_auxes`), so
      ``errors`` covers every kernel, measured on its own calibration inputs.

    Example:
      >>> model4, aux = sequential(model, batches, lambda s: jc.oneshot.gptq(s, bits=4))
    """
    wanted = _check_names(model, names)
    batches = _as_batches(inputs)
    if not batches:
        raise ValueError("inputs is empty; pass at least one calibration batch")
    fwd = _default_forward if forward is None else forward
    if groups is None:
        kernels = linear_kernels(model)
        order = _call_order(model, batches[0], fwd, [kernels[n] for n in wanted])
        layer_to_kernel = {kernels[n]: n for n in wanted}
        members = [[layer_to_kernel[layer]] for layer in order]
        called = {n for g in members for n in g}
        remaining = [n for n in wanted if n not in called]
        if remaining:
            raise ValueError(f"forward never called the Linear layers of {remaining[:5]}; check forward= or names=")
    else:
        remaining = list(wanted)
        members = []
        for g in groups:
            pat = re.compile(g)
            picked = [n for n in remaining if pat.search(n)]
            if picked:
                members.append(picked)
                remaining = [n for n in remaining if n not in picked]
        if remaining:
            raise ValueError(f"kernels {remaining[:5]} match no entry of groups={list(groups)[:4]}...; add a group for them")
    keys = [None] * len(members) if key is None else list(jax.random.split(key, len(members)))
    work = nnx.clone(model)  # the caller's model keeps its weights
    auxes = []
    for group, k in zip(members, keys):
        stats = calibrate(work, batches, forward=forward, token_mask=token_mask, names=group)
        graphdef, params, rest = nnx.split(work, nnx.Param, ...)
        new_params, aux = make_transform(stats)(params, key=k)
        work = nnx.merge(graphdef, new_params, rest)
        auxes.append(aux)
    return work, merge_auxes(auxes)
