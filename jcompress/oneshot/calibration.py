"""Calibration statistics for one-shot compression: each Dense layer's input second moment.

One-shot methods (OBS/OBC, SparseGPT, GPTQ, Wanda) compress a layer ``y = x @ K`` (Flax
kernel ``K`` of shape ``(in, out)``) so that its outputs on calibration data change as
little as possible. All they need from the data is

    H = sum over calibration tokens of x x^T        (in, in), float32

and the token count. :func:`linear_input_stats` streams batches through a model and adds
up ``H`` for every selected ``nnx.Linear``; activations are never kept, only one
``(in, in)`` matrix per selected layer.

How inputs are captured: while the forward pass is traced under ``jax.jit``,
``nnx.Linear.__call__`` is temporarily wrapped so that each call of a selected layer adds
``x^T x`` (over the tokens that ``token_mask`` marks as real, so padding never counts)
to an output of the jitted function, keyed by the kernel's name (``layers/0/query/kernel``).
Because only those sums leave the function, XLA drops the part of the network after the
last selected layer.

:func:`sequential` runs the calibrate -> compress loop as SparseGPT and GPTQ do: the layers
are compressed group by group (for a transformer, one block at a time, see
:func:`jcompress.models.bert.layer_groups`) and each group is calibrated on the outputs of
the already-compressed groups before it, so later layers correct earlier layers' errors.

:func:`relative_error` is the per-layer figure every solver reports:
``||X K - X K'||^2 / ||X K||^2 = tr(dK^T H dK) / tr(K^T H K)``.

Example:
  >>> fwd = lambda m, batch: m(batch[0], batch[1])
  >>> stats = linear_input_stats(model, fwd, batches, token_mask=lambda b: b[1])
  >>> stats['layers/0/query/kernel'].h.shape
  (384, 384)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jcompress import tree

__all__ = [
    "LayerStats",
    "SequentialAux",
    "layer_items",
    "linear_input_stats",
    "map_layers",
    "relative_error",
    "sequential",
]


class LayerStats(NamedTuple):
    """Calibration statistic of one Dense layer.

    Attributes:
      h: ``(in, in)`` float32, the sum over tokens of ``x x^T`` (Flax inputs ``x`` of the
        layer whose kernel is ``(in, out)``).
      count: number of tokens summed (float32 scalar; masked-out tokens do not count).
    """

    h: jax.Array
    count: jax.Array


class SequentialAux(NamedTuple):
    """What :func:`sequential` returns besides the compressed model.

    Attributes:
      errors: ``{kernel name: relative output error}`` over all groups, measured on
        each layer's own calibration inputs.
      steps: the solver's aux for each group, in order.
    """

    errors: dict
    steps: list


@contextlib.contextmanager
def _capture_linear_inputs(model: nnx.Module, wanted: set[str], weights: jax.Array | None, sink: dict):
    """Within the block, calls of the selected ``nnx.Linear`` layers add x^T x to ``sink``."""
    names = {id(node): "/".join(str(p) for p in path) + "/kernel" for path, node in nnx.iter_graph(model)}
    original = nnx.Linear.__call__

    def call(self, x, *args, **kwargs):
        name = names.get(id(self))
        if name in wanted:
            x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            if weights is None:
                w = jnp.ones((x2.shape[0],), jnp.float32)
            else:
                if weights.size != x2.shape[0]:
                    raise ValueError(
                        f"token_mask has {weights.size} entries but {name} sees inputs of shape {x.shape}; "
                        "the mask must cover every leading position of each Linear's input"
                    )
                w = weights.reshape(-1).astype(jnp.float32)
            h = (x2 * w[:, None]).T @ x2
            prev = sink.get(name)
            sink[name] = LayerStats(h, w.sum()) if prev is None else LayerStats(prev.h + h, prev.count + w.sum())
        return original(self, x, *args, **kwargs)

    nnx.Linear.__call__ = call
    try:
        yield
    finally:
        nnx.Linear.__call__ = original


def _selected_kernels(model: nnx.Module, include, exclude) -> list[str]:
    params = nnx.state(model, nnx.Param)
    linear = {
        "/".join(str(p) for p in path) + "/kernel"
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    selected = tree.selected_names(params, tree.select(params, include, exclude))
    leaves = dict(tree.named_leaves(params))
    not_linear = [n for n in selected if n not in linear and tree.default_selection(n, leaves[n])]
    if not_linear:
        raise ValueError(
            f"selection picks {not_linear[:5]}, which are not kernels of nnx.Linear layers; one-shot "
            "calibration captures Dense inputs only. Narrow include= or add these to exclude=."
        )
    chosen = [n for n in selected if n in linear]  # biases and norms in the selection are ignored
    if not chosen:
        raise ValueError(
            f"include={include!r} exclude={exclude!r} selects no nnx.Linear kernel; they are {sorted(linear)[:8]}"
        )
    return chosen


def linear_input_stats(
    model: nnx.Module,
    forward: Callable[[nnx.Module, Any], Any],
    batches: Iterable[Any],
    *,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    token_mask: Callable[[Any], jax.Array] | None = None,
) -> dict[str, LayerStats]:
    """Sum ``x x^T`` over calibration data for every selected ``nnx.Linear``.

    Args:
      model: the NNX model (not modified).
      forward: ``forward(model, batch)`` runs the model on one batch (its result is
        ignored); it is traced with ``jax.jit``.
      batches: an iterable of batches (any pytrees of arrays).
      include: which kernels to calibrate (regexes over names such as
        ``layers/0/query/kernel``, a predicate, or ``None`` for all Dense/conv kernels);
        every selected leaf must be the kernel of an ``nnx.Linear`` that ``forward`` calls.
      exclude: kernels to leave out (wins over ``include``).
      token_mask: ``token_mask(batch)`` gives, for every leading position of the Linear
        inputs (``(batch, seq)`` for a transformer), 1 for tokens to count and 0 for
        padding; ``None`` counts every position.

    Returns:
      ``{kernel name: LayerStats(h (in, in) float32, count)}``.

    Raises:
      ValueError: empty ``batches``, a selection that is not Linear kernels, or a selected
        layer that ``forward`` never calls.
    """
    wanted = _selected_kernels(model, include, exclude)
    graphdef, state = nnx.split(model)
    wanted_set = set(wanted)

    @jax.jit
    def batch_stats(state, batch):
        m = nnx.merge(graphdef, state)
        sink: dict = {}
        weights = None if token_mask is None else jnp.asarray(token_mask(batch))
        with _capture_linear_inputs(m, wanted_set, weights, sink):
            forward(m, batch)
        return sink

    total: dict | None = None
    for batch in batches:
        got = batch_stats(state, batch)
        total = got if total is None else jax.tree.map(jnp.add, total, got)
    if total is None:
        raise ValueError("batches is empty; pass at least one calibration batch")
    missing = [n for n in wanted if n not in total]
    if missing:
        raise ValueError(f"forward never called the Linear layers {missing[:5]}; check forward= or include=")
    return {n: total[n] for n in wanted}


def relative_error(kernel: jax.Array, new_kernel: jax.Array, h: jax.Array) -> jax.Array:
    """``||X K - X K'||^2 / ||X K||^2`` from ``H = X^T X``; kernels ``(in, out)``, float32 scalar."""
    k = kernel.astype(jnp.float32)
    d = new_kernel.astype(jnp.float32) - k
    num = jnp.sum(d * (h @ d))
    den = jnp.sum(k * (h @ k))
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


def layer_items(
    params: tree.PyTree, stats: dict, include: tree.Selection = None
) -> list[tuple[str, jax.Array, jax.Array]]:
    """``[(name, kernel, h)]`` for the leaves a solver compresses, after validating them.

    The layers are those named in ``stats``, narrowed by ``include`` when given.

    Raises:
      KeyError: a name in ``stats`` is not a leaf of ``params``.
      ValueError: empty stats, a kernel that is not 2-D, an ``h`` whose shape is not
        ``(in, in)``, non-finite values, or ``include`` matching none of the layers.
      TypeError: integer kernels or statistics.
    """
    if not stats:
        raise ValueError("stats is empty; compute it with linear_input_stats(...)")
    leaves = dict(tree.named_leaves(params))
    missing = [n for n in stats if n not in leaves]
    if missing:
        raise KeyError(f"stats names {missing[:5]} are not leaves of params (leaves: {list(leaves)[:8]} ...)")
    names = list(stats)
    if include is not None:
        picked = set(tree.selected_names(params, include))
        names = [n for n in names if n in picked]
        if not names:
            raise ValueError(f"include={include!r} matches none of the calibrated layers {list(stats)[:6]}")
    items = []
    for name in names:
        kernel = tree.as_float_array(leaves[name], f"params/{name}")
        h = stats[name].h if isinstance(stats[name], LayerStats) else stats[name]
        h = tree.as_float_array(h, f"stats/{name}")
        if kernel.ndim != 2:
            raise ValueError(
                f"params/{name} has shape {kernel.shape}; one-shot solvers need a 2-D Dense kernel (in, out)"
            )
        if h.shape != (kernel.shape[0],) * 2:
            raise ValueError(
                f"stats/{name} has shape {h.shape} but the kernel {kernel.shape} needs ({kernel.shape[0]}, {kernel.shape[0]})"
            )
        tree.check_finite({name: kernel}, "params")
        tree.check_finite({name: h}, "stats")
        items.append((name, kernel, h))
    return items


def map_layers(
    params: tree.PyTree,
    stats: dict | None,
    include: tree.Selection,
    fn: Callable[[str, jax.Array, jax.Array | None], tuple[jax.Array, dict]],
) -> tuple[tree.PyTree, dict[str, dict]]:
    """Apply ``fn(name, kernel, h) -> (new_kernel, extras)`` to each layer a solver compresses.

    With ``stats``, the layers are those of :func:`layer_items` and ``extras['error']`` is
    added (:func:`relative_error` against the undamped ``h``). Without stats (data-free
    baselines such as magnitude pruning and round-to-nearest), the layers are the 2-D
    kernels that ``include`` selects and ``fn`` gets ``h=None``.

    Returns the params with those kernels replaced (same structure and dtypes; other leaves
    untouched) and ``{name: extras}``.
    """
    if stats is None:
        items = []
        for name, kernel in tree.iter_selected(params, include):
            kernel = tree.as_float_array(kernel, f"params/{name}")
            if kernel.ndim != 2:
                raise ValueError(
                    f"params/{name} has shape {kernel.shape}; only 2-D Dense kernels (in, out) are handled"
                )
            tree.check_finite({name: kernel}, "params")
            items.append((name, kernel, None))
    else:
        items = layer_items(params, stats, include)
    updates, extras = {}, {}
    for name, kernel, h in items:
        new_kernel, extra = fn(name, kernel, h)
        updates[name] = new_kernel.astype(kernel.dtype)
        extras[name] = extra if h is None else {**extra, "error": relative_error(kernel, new_kernel, h)}
    return tree.set_by_name(params, updates), extras


def sequential(
    model: nnx.Module,
    forward: Callable[[nnx.Module, Any], Any],
    batches: Sequence[Any],
    *,
    solver: Callable[[dict, dict], tuple[dict, Any]],
    groups: Sequence[str],
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    token_mask: Callable[[Any], jax.Array] | None = None,
) -> tuple[nnx.Module, SequentialAux]:
    """Calibrate and compress group after group, each on the already-compressed model.

    Args:
      model: the NNX model (not modified; a new one is returned).
      forward, token_mask: as in :func:`linear_input_stats`.
      batches: a sequence (it is read once per group).
      solver: ``solver(params, stats) -> (params, aux)`` on the model's params as a pure
        dict, compressing the layers named in ``stats`` (for example
        ``functools.partial(sparsegpt.prune, sparsity=0.5)``); ``aux.errors`` must map
        names to errors.
      groups: regexes over kernel names, in network order; group ``g`` holds the selected
        kernels that match ``groups[g]`` and no earlier group (for BERT,
        ``bert.layer_groups(cfg)``: one transformer layer each).
      include, exclude: the kernels to compress.

    Returns:
      ``(compressed model, SequentialAux)``.
    """
    import re

    if isinstance(batches, Iterable) and not isinstance(batches, Sequence):
        raise TypeError("batches must be a sequence (list/tuple); sequential() reads it once per group")
    chosen = _selected_kernels(model, include, exclude)
    patterns = [re.compile(g) for g in groups]
    remaining = list(chosen)
    work = nnx.clone(model)  # the caller's model keeps its weights
    errors: dict = {}
    steps = []
    for pat in patterns:
        members = [n for n in remaining if pat.search(n)]
        if not members:
            continue
        remaining = [n for n in remaining if n not in members]
        picked = set(members)
        stats = linear_input_stats(work, forward, batches, include=lambda n, _, p=picked: n in p, token_mask=token_mask)
        p_state = nnx.state(work, nnx.Param)
        new_params, aux = solver(nnx.to_pure_dict(p_state), stats)
        nnx.replace_by_pure_dict(p_state, new_params)
        nnx.update(work, p_state)
        errors.update({n: float(e) for n, e in aux.errors.items()})
        steps.append(aux)
    if remaining:
        raise ValueError(
            f"kernels {remaining[:5]} match no entry of groups={list(groups)[:4]}...; add a group for them"
        )
    return work, SequentialAux(errors, steps)
