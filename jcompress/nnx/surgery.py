"""Hard pruning of any NNX model: physically remove output units, found by tracing the model.

A mask only zeroes weights; the arrays keep their shapes and the model runs as many FLOPs
as before. :func:`hard_prune` removes whole output units of Dense and conv layers (the
last axis of a kernel) and every parameter indexed by the same units, and returns a
smaller model of the same classes.

Which units are coupled (removed together from every layer that writes or reads them),
which ops the tracer follows, and how a module declares its units where tracing cannot
decide (``coupled_units``) is :mod:`jcompress.nnx.coupling`. This module turns masks into
a plan of removed units per group, checks that removing them is exact, and builds the
sliced model (:func:`hard_prune`, :func:`complete_masks`, :func:`unit_masks`), and sizes
and measures models (:func:`leaf_shapes`, :func:`resize`, :func:`forward_flops`,
:func:`hard_prune_report`).

**Exactness.** The new model computes what the masked model (``params * masks``)
computes. The tracer follows which values of the masked model are known without the
input: a removed unit of a Dense layer with a bias outputs ``act(bias)``, after an
eval-mode BatchNorm ``act(beta - gamma * mean / sqrt(var + eps))``. Where a consumer sees
such a constant the same way at every position (a Dense layer, a flattened feature map, a
VALID convolution) its contribution is folded into the consumer's bias; a padded
convolution sees it differently at the border, and there :func:`hard_prune` raises:
mask the unit's bias and norm scale/bias too (:func:`complete_masks`). Tracing sees ops,
not the Python code around them, so a model whose code reads array sizes (attention's
``1 / sqrt(head size)``) could change when its arrays shrink: the new model is run
against the masked model on a random batch, and a difference is an error.

Example:
  >>> hidden = jc.masked(jc.pruning.magnitude(sparsity=0.5, pattern=jc.Units()), r'fc[12]/kernel')
  >>> masks = hidden(nnx.state(model, nnx.Param))[1].masks
  >>> masks = complete_masks(model, masks, input_shape=(28, 28, 1))
  >>> small, aux = hard_prune(masks, input_shape=(28, 28, 1))(model)
  >>> aux.kept['fc1'], aux.params_after
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.core import base
from jcompress.core import spec as spec_lib
from jcompress.nnx.coupling import (
    _CALLS,
    _ELEMENTWISE,
    _REDUCTIONS,
    _SHAPE_OPS,
    UnitGroup,
    _Contraction,
    _groups,
    _inner,
    _shape,
    _Trace,
    _trace,
)

__all__ = [
    "complete_masks",
    "forward_flops",
    "hard_prune",
    "hard_prune_report",
    "leaf_shapes",
    "resize",
    "unit_masks",
]

PyTree = Any


# ----------------------------------------------------------------------------------------
# Which values of the masked model are known without the input
# ----------------------------------------------------------------------------------------


def _bind(eqn, *args):
    return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))


class _Known:
    """Evaluates the traced forward pass on the masked leaves with the input unknown.

    Each value is ``(val, unk)``: the array (0 where unknown) and a bool array marking the
    entries that depend on the input. At every contraction it checks what the removed
    units contribute: nothing (exact), a constant the same at every position (folded into
    the consumer's bias) or anything else (an error).
    """

    def __init__(self, tr: _Trace, removed_mask, layer_of_root):
        self.tr = tr
        self.removed_mask = removed_mask
        self.layer_of_root = layer_of_root
        self.i = 0
        self.folds: dict[str, np.ndarray] = {}

    def run(self, jaxpr, consts, ins) -> None:
        env: dict = {}

        def get(v):
            if isinstance(v, jcore.Literal):
                val = jnp.asarray(v.val)
                return val, np.zeros(val.shape, bool)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = (jnp.asarray(c), np.zeros(np.shape(c), bool))
        for v, x in zip(jaxpr.invars, ins):
            env[v] = x
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            args = [get(v) for v in eqn.invars]
            inner = _inner(eqn) if name in _CALLS else None
            if inner is not None:
                outs = self.run(inner[0], inner[1], args)
            elif name in ("dot_general", "conv_general_dilated"):
                outs = [self.contraction(eqn, *args[:2])]
            elif not any(u.any() for _, u in args):
                res = _bind(eqn, *[v for v, _ in args])
                res = res if eqn.primitive.multiple_results else [res]
                outs = [(r, np.zeros(np.shape(r), bool)) for r in res]
            else:
                outs = self.partial(eqn, args)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [get(v) for v in jaxpr.outvars]

    def partial(self, eqn, args) -> list:
        name = eqn.primitive.name
        vals = [v for v, _ in args]
        unks = [u for _, u in args]
        out_shape = _shape(eqn.outvars[0])
        try:
            val = _bind(eqn, *vals)
        except Exception:  # noqa: BLE001  (an op that cannot run on placeholder zeros: all unknown)
            val = None
        if eqn.primitive.multiple_results or val is None:
            return [
                (jnp.zeros(_shape(v), getattr(v.aval, "dtype", jnp.float32)), np.ones(_shape(v), bool))
                for v in eqn.outvars
            ]
        if name in _ELEMENTWISE:
            bshape = lambda u: np.broadcast_to(u, out_shape)
            if name == "mul":
                (a, ua), (b, ub) = args
                za, zb = ~ua & (np.asarray(a) == 0), ~ub & (np.asarray(b) == 0)
                unk = (bshape(ua) & ~bshape(zb)) | (bshape(ub) & ~bshape(za))
            else:
                unk = np.zeros(out_shape, bool)
                for u in unks:
                    unk = unk | bshape(u)
        elif name in _REDUCTIONS:
            unk = np.any(unks[0], axis=tuple(eqn.params["axes"]))
        elif name in _SHAPE_OPS or name in ("pad", "slice", "concatenate"):
            unk = np.asarray(_bind(eqn, *[jnp.asarray(u, jnp.float32) for u in unks])) > 0
        elif name.startswith("reduce_window") and name != "reduce_window":
            p = eqn.params
            unk = (
                np.asarray(
                    jax.lax.reduce_window(
                        jnp.asarray(unks[0], jnp.float32),
                        0.0,
                        jax.lax.max,
                        p["window_dimensions"],
                        p["window_strides"],
                        p["padding"],
                        p["base_dilation"],
                        p["window_dilation"],
                    )
                )
                > 0
            )
        else:
            unk = np.ones(out_shape, bool)
        return [(val, np.asarray(unk, bool).reshape(out_shape))]

    def contraction(self, eqn, lhs, rhs):
        c = self.tr.contractions[self.i]
        self.i += 1
        (a, ua), (b, ub) = lhs, rhs
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        za = np.where(ua, 0, np.asarray(a))
        zb = np.where(ub, 0, np.asarray(b))
        nza, nzb = ua | (za != 0), ub | (zb != 0)
        val = _bind(eqn, jnp.asarray(za, a.dtype), jnp.asarray(zb, b.dtype))
        count = lambda x, y: np.asarray(_bind(eqn, f32(x), f32(y))) > 0
        unk = count(ua, nzb) | count(nza, ub)
        # the entries of the lhs that belong to removed units, on any contracted axis
        keep = np.ones(np.shape(a), bool)
        roots = []
        for ax, node in zip(c.lhs_axes, [c.lhs[k] for k in c.lhs_axes]):
            m = self.removed_mask(node)
            if m is not None:
                shape = [1] * keep.ndim
                shape[ax] = -1
                keep = keep & ~m.reshape(shape)
                roots.append(node)
        if roots:
            drop = ~keep
            declared = any(a in self.tr.declared for r in roots for a in self.tr.nodes.reach(r))
            if (count(ua & drop, nzb) | count(nza & drop, ub)).any():
                if declared:  # the module vouches that its removed units output 0
                    return val, unk
                raise ValueError(
                    f"the removed units of {self.layer_of_root(roots[0])} carry input-dependent values into "
                    f"{spec_lib.layer_of(c.kernel) if c.kernel else eqn.primitive.name}; hard pruning would change the outputs"
                )
            d = np.asarray(_bind(eqn, f32(np.where(drop, za, 0)), f32(zb)), np.float64)
            if np.any(d != 0):
                self.fold(c, d, roots[0])
        return val, unk

    def fold(self, c: _Contraction, d: np.ndarray, root) -> None:
        layer = self.layer_of_root(root)
        consumer = spec_lib.layer_of(c.kernel) if c.kernel else "a contraction"
        rows = np.moveaxis(d, c.out_feature_axis, -1).reshape(-1, d.shape[c.out_feature_axis])
        scale = max(1.0, float(np.max(np.abs(rows))))
        uniform = np.allclose(rows, rows[:1], rtol=0, atol=1e-6 * scale)
        if not uniform or c.bias is None:
            why = (
                f"{consumer} sees that constant differently at different positions (a padded convolution)"
                if not uniform
                else f"{consumer} has no bias to absorb it"
            )
            raise ValueError(
                f"removed units of {layer} output a nonzero constant (their bias or norm parameters are not masked, "
                f"up to {float(np.max(np.abs(d))):.4g} in {consumer}'s outputs) and {why}, so removing them would "
                "change the outputs. Mask their bias and norm scale/bias too: complete_masks(model, masks, "
                "input_shape=...), or unit_masks(...), which remove units entirely."
            )
        self.folds[c.bias] = self.folds.get(c.bias, 0.0) + rows[0]


# ----------------------------------------------------------------------------------------
# Hard pruning
# ----------------------------------------------------------------------------------------


def _mask_dict(trace: _Trace, masks: PyTree | None) -> dict[str, np.ndarray]:
    if masks is None:
        return {}
    flat = {n: np.asarray(m, bool) for n, m in tree.named_leaves(masks)}
    missing = sorted(trace.param_names - set(flat))
    extra = sorted(set(flat) - trace.param_names)
    if missing or extra:
        raise ValueError(
            f"masks must have the structure of the model's nnx.Param state (a bool tree, e.g. MaskAux.masks); "
            f"missing {missing[:5]}, unknown {extra[:5]}"
        )
    leaves = dict(tree.named_leaves(nnx.to_pure_dict(trace.state)))
    for n, m in flat.items():
        if m.shape != tuple(jnp.shape(leaves[n])):
            raise ValueError(f"masks[{n!r}] has shape {m.shape}, the leaf has {tuple(jnp.shape(leaves[n]))}")
    return flat


def _removed_units(group: UnitGroup, leaves: dict, masks: dict) -> np.ndarray:
    """True for the units every producer has removed (column all False in masks, or all 0)."""
    out = np.ones(group.size, bool)
    for k in group.producers:
        col = masks[k] if masks else np.asarray(leaves[k]) != 0
        out &= ~col.reshape(-1, group.size).any(axis=0)
    return out


class _Plan(NamedTuple):
    trace: _Trace
    groups: dict  # root -> UnitGroup
    removed: dict  # root -> bool array over the group's units


def _plan(model, names, masks, input_shape, dtype, allow_empty) -> _Plan:
    tr = _trace(model, input_shape, dtype)
    mdict = _mask_dict(tr, masks)
    leaves = dict(tree.named_leaves(nnx.to_pure_dict(tr.state)))
    n = tr.nodes
    groups = {
        n.find(tr.leaf_nodes[(g.producers[0], len(jnp.shape(leaves[g.producers[0]])) - 1)]): g for g in _groups(tr)
    }
    chosen = set(names)
    removed = {}
    for r, g in groups.items():
        if not chosen & set(g.producers):
            continue
        gone = _removed_units(g, leaves, mdict)
        if not gone.any():
            continue
        if g.reason is not None:
            raise ValueError(
                f"cannot remove units of {g.layer} ({', '.join(g.producers)}): they {g.reason}. Leave this layer out "
                "(jc.masked(..., selection) over the other layers), or declare its units with a coupled_units() "
                "method on the module (see jcompress.nnx.coupling)."
            )
        if gone.all() and not allow_empty:
            raise ValueError(
                f"the masks remove every unit of {g.layer} ({', '.join(g.producers)}), which would leave an empty "
                "layer; keep at least one unit or pass allow_empty=True"
            )
        removed[r] = gone
    return _Plan(tr, groups, removed)


def _removed_mask_fn(plan: _Plan):
    n = plan.trace.nodes

    def removed_mask(node):
        hit = n.reach(node) & set(plan.removed)
        if not hit:
            return None
        out = np.zeros(n.size[n.find(node)], bool)
        for g in hit:
            idx = n.unit_index(node, g)
            out |= (idx >= 0) & plan.removed[g][np.maximum(idx, 0)]
        return out

    return removed_mask


def _fix_sizes(model: nnx.Module) -> None:
    """Set the size attributes of Linear, LinearGeneral, Conv and norm layers from their (new) arrays."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Linear):
            m.in_features, m.out_features = (int(d) for d in m.kernel.shape)
        elif isinstance(m, nnx.LinearGeneral):
            shape, n_in, n_out = m.kernel.shape, len(m.in_features), len(m.out_features)
            m.in_features = tuple(int(d) for d in shape[len(shape) - n_out - n_in : len(shape) - n_out])
            m.out_features = tuple(int(d) for d in shape[len(shape) - n_out :])
        elif isinstance(m, nnx.Conv):
            m.in_features = int(m.kernel.shape[-2]) * m.feature_group_count
            m.out_features = int(m.kernel.shape[-1])
        elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
            arr = next((getattr(m, a) for a in ("scale", "bias", "mean") if getattr(m, a, None) is not None), None)
            if arr is not None:
                m.num_features = int(arr.shape[-1])


def _with_leaves(trace: _Trace, values: dict) -> nnx.Module:
    state = tree.from_pure_dict(trace.state, _unflatten(trace.state, values))
    new = nnx.merge(trace.graphdef, state)
    _fix_sizes(new)
    return new


def _unflatten(state, values: dict):
    pure = nnx.to_pure_dict(state)
    return tree.map_with_names(lambda n, x: values[n], pure)


def _eval_forward(model: nnx.Module):
    graphdef, state = nnx.split(model)

    def forward(st, x):
        m = nnx.merge(graphdef, st)
        m.eval()
        return m(x)

    return jax.jit(forward), state


def _check_same(new: nnx.Module, masked: nnx.Module, input_shape, dtype) -> None:
    """Raise a ValueError when the pruned model does not compute what the masked model computes.

    Tracing sees the ops, not the Python code around them: a model whose code reads array
    sizes (attention's ``1 / sqrt(head size)``, a check that key and value heads have one
    size) changes when its arrays shrink. Both models are run on one random batch (normal
    floats, or integers in {0, 1} such as token ids).
    """
    if jnp.issubdtype(dtype, jnp.floating):
        x = jax.random.normal(jax.random.key(0), (2, *input_shape), dtype)
    else:
        x = jax.random.randint(jax.random.key(0), (2, *input_shape), 0, 2).astype(dtype)
    fwd, state = _eval_forward(masked)
    want = jax.tree.leaves(fwd(state, x))
    fwd, state = _eval_forward(new)
    try:
        got = jax.tree.leaves(fwd(state, x))
    except Exception as e:  # any error of the model's own code
        raise ValueError(
            f"the pruned model does not run: {type(e).__name__}: {e}. Its code checks sizes that tracing cannot "
            "see (e.g. attention needs equal key and value head sizes); leave those layers out with jc.masked."
        ) from e
    for g, w in zip(got, want):
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        diff = float(jnp.max(jnp.abs(g - w))) if g.shape == w.shape else float("inf")
        if not diff <= 1e-4 * scale:
            raise ValueError(
                f"the pruned model computes something else than the masked model (largest difference {diff:.3g} on "
                "a random input): its code uses the sizes of its arrays (e.g. attention scales by 1 / sqrt(head "
                "size)), which tracing cannot see; leave those layers out with jc.masked."
            )


def _prune(model: nnx.Module, names, masks, input_shape, dtype, allow_empty) -> tuple[nnx.Module, base.UnitsAux]:
    plan = _plan(model, names, masks, input_shape, dtype, allow_empty)
    tr = plan.trace
    mdict = _mask_dict(tr, masks)
    leaves = {n: jnp.asarray(v) for n, v in tree.named_leaves(nnx.to_pure_dict(tr.state))}
    masked_leaves = {n: (jnp.where(mdict[n], v, 0) if n in mdict else v) for n, v in leaves.items()}
    masked_model = _with_leaves(tr, masked_leaves)
    removed_mask = _removed_mask_fn(plan)
    if plan.removed:
        layer_of_root = lambda node: next(
            (plan.groups[a].layer for a in tr.nodes.reach(node) if a in plan.groups), "a layer"
        )
        known = _Known(tr, removed_mask, layer_of_root)
        x = jnp.zeros((2, *input_shape), dtype)
        ins = [(masked_leaves[n], np.zeros(jnp.shape(masked_leaves[n]), bool)) for n in tr.names]
        known.run(tr.jaxpr, tr.consts, [*ins, (x, np.ones(x.shape, bool))])
        for b, shift in known.folds.items():
            v = masked_leaves[b]
            masked_leaves[b] = (np.asarray(v, np.float64) + shift.reshape(np.shape(v))).astype(v.dtype)
    new_leaves = {}
    for name in tr.names:
        v = masked_leaves[name]
        for axis in range(np.ndim(v)):
            m = removed_mask(tr.leaf_nodes[(name, axis)])
            if m is not None:
                v = jnp.take(jnp.asarray(v), np.flatnonzero(~m), axis=axis)
        new_leaves[name] = jnp.asarray(v)
    new = _with_leaves(tr, new_leaves)
    _check_same(new, masked_model, input_shape, dtype)
    kept = {}
    for r, g in plan.groups.items():
        if r in plan.removed:
            for p in g.producers:
                kept[spec_lib.layer_of(p)] = np.flatnonzero(~plan.removed[r])
    before = base.params_count(nnx.state(model, nnx.Param))
    after = base.params_count(nnx.state(new, nnx.Param))
    return new, base.UnitsAux(kept, before, after)


def hard_prune(
    masks: PyTree | None = None, *, input_shape: Sequence[int], dtype=jnp.float32, allow_empty: bool = False
) -> base.ModelTransform:
    """Remove the output units of Dense and conv layers that are zero, or that ``masks`` remove.

    Works on any NNX model: the coupled dimensions are found by tracing its forward pass
    (see the module docstring). Unit ``j`` of a group of coupled layers is removed when
    column ``j`` (``kernel[..., j]``) is all False in ``masks`` (or, without masks, all 0)
    in every kernel writing the group; then every leaf axis indexed by the group is sliced:
    the kernels' columns and biases, norm scales, biases and running statistics, the input
    rows of the layers reading them (strided rows after a flatten).

    Args:
      masks: a bool tree with the structure of the model's ``nnx.Param`` state (True =
        kept), e.g. ``MaskAux.masks`` of a ``Units`` pattern; None to remove the units
        whose kernel columns are already all zero.
      input_shape: one example's shape without the batch axis, to trace the model.
      dtype: the input dtype.
      allow_empty: allow a group to lose all its units (zero-width arrays) instead of raising.

    Returns:
      a :class:`~jcompress.core.base.ModelTransform`; ``t(model)`` returns ``(new_model,
      UnitsAux)``. ``new_model`` has the classes and graph of ``model`` with smaller
      arrays and computes, in eval mode, what ``model`` with its params multiplied by
      ``masks`` computes (to float32 rounding); masked entries that are not removed stay 0.
      ``aux.kept[layer]`` are the kept unit indices of each layer that lost units. The
      groups considered are those of the transform's leaves (Dense and conv kernels; see
      :func:`jcompress.core.base.masked`). ``model`` is not modified.

    Raises:
      ValueError: masks not shaped like the params; units removed from a group that
        cannot be pruned (names the layer and the reason, e.g. a LayerNorm over them or
        the model's outputs); a group emptied without ``allow_empty``; removed units that
        output a nonzero constant seen differently at different positions (mask their
        bias and norm parameters too: :func:`complete_masks`).

    Example:
      >>> _, aux = jc.masked(jc.pruning.magnitude(sparsity=0.5, pattern=jc.Units()), r'fc[12]')(params)
      >>> small, units = hard_prune(aux.masks, input_shape=(28, 28, 1))(model)
      >>> units.params_after < units.params_before
      True
    """
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(
            f"input_shape={input_shape!r} must be one example's shape without the batch axis, e.g. (28, 28, 1)"
        )
    shape = tuple(int(spec_lib.check_value(d, arg="input_shape", kind=int, lo=1)) for d in input_shape)
    allow_empty = spec_lib.check_flag(allow_empty, arg="allow_empty")

    def apply(model, names, key):
        return _prune(model, names, masks, shape, dtype, allow_empty)

    return base.ModelTransform(apply, "hard_prune")


def complete_masks(model: nnx.Module, masks: PyTree, *, input_shape: Sequence[int], dtype=jnp.float32) -> PyTree:
    """``masks`` plus every parameter entry of the units they remove (biases, norm scale/bias, rows).

    A unit whose kernel column is masked still outputs a constant (its bias, its norm's
    shift); masked this way it outputs 0, so :func:`hard_prune` is exact for any consumer,
    padded convolutions included. Use it before fine-tuning with structured masks.

    Returns:
      a bool tree with the structure of ``masks``.
    """
    return _unit_masks(model, masks, None, tuple(input_shape), dtype)


def unit_masks(
    model: nnx.Module, keep: Mapping[str, Sequence[int]], *, input_shape: Sequence[int], dtype=jnp.float32
) -> PyTree:
    """Masks that remove whole units: all but ``keep[layer]`` of each named layer's units.

    Args:
      model: any NNX model.
      keep: ``{layer: kept unit indices}``; a layer is a kernel's layer name (``'fc1'``,
        ``'blocks/0/conv1'``; ``'fc1/kernel'`` is accepted) and must produce a prunable group.
      input_shape: one example's shape, to trace the model.

    Returns:
      a bool tree with the structure of the model's ``nnx.Param`` state, False on every
      entry indexed by a removed unit (kernel column, bias, norm scale/bias, consumer rows).
    """
    return _unit_masks(model, None, keep, tuple(input_shape), dtype)


def _unit_masks(model, masks, keep, input_shape, dtype):
    tr = _trace(model, input_shape, dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = dict(tree.named_leaves(params))
    groups = _groups(tr)
    n = tr.nodes
    root = lambda g: n.find(tr.leaf_nodes[(g.producers[0], np.ndim(leaves[g.producers[0]]) - 1)])
    removed = {}
    if keep is not None:
        by_layer = {spec_lib.layer_of(p): g for g in groups for p in g.producers}
        for layer, idx in keep.items():
            base_name = layer.removesuffix("/kernel")
            if base_name not in by_layer:
                raise ValueError(
                    f"keep names {layer!r}, which is not a layer with a kernel; the layers are {sorted(by_layer)}"
                )
            g = by_layer[base_name]
            arr = np.asarray(idx)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"keep[{layer!r}] must be a 1-D list of unit indices, got {idx!r}")
            if arr.size == 0:
                raise ValueError(f"keep[{layer!r}] is empty: a layer must keep at least one unit")
            if arr.min() < 0 or arr.max() >= g.size or len(np.unique(arr)) != arr.size:
                raise ValueError(f"keep[{layer!r}] must hold distinct indices in [0, {g.size}), got {idx!r}")
            if g.reason is not None:
                raise ValueError(f"cannot remove units of {g.layer}: they {g.reason}")
            gone = np.ones(g.size, bool)
            gone[arr] = False
            removed[root(g)] = gone
    else:
        mdict = _mask_dict(tr, masks)
        for g in groups:
            gone = _removed_units(g, leaves, mdict)
            if gone.any() and g.reason is None:
                removed[root(g)] = gone
    plan = _Plan(tr, {root(g): g for g in groups}, removed)
    removed_mask = _removed_mask_fn(plan)

    def one(name, w):
        keep_ = np.ones(np.shape(w), bool)
        for axis in range(np.ndim(w)):
            m = removed_mask(tr.leaf_nodes[(name, axis)])
            if m is not None:
                shape = [1] * np.ndim(w)
                shape[axis] = -1
                keep_ &= ~m.reshape(shape)
        return jnp.asarray(keep_)

    made = tree.map_with_names(one, params)
    if masks is None:
        return made
    return tree.map_with_names(lambda nm, m: jnp.logical_and(m, jnp.asarray(dict(tree.named_leaves(made))[nm])), masks)


# ----------------------------------------------------------------------------------------
# Shapes for checkpoints, FLOPs and the before/after report
# ----------------------------------------------------------------------------------------


def leaf_shapes(model: nnx.Module) -> dict[str, list[int]]:
    """``{leaf name: shape}`` of every leaf of the model's state (JSON-ready, for checkpoint metadata)."""
    return {n: [int(d) for d in jnp.shape(v)] for n, v in tree.named_leaves(nnx.to_pure_dict(nnx.state(model)))}


def resize(model: nnx.Module, shapes: Mapping[str, Sequence[int]]) -> nnx.Module:
    """A copy of ``model`` whose leaves have ``shapes`` (zeros) and whose layer sizes match.

    The structure to restore a hard-pruned checkpoint into: save ``leaf_shapes(small)``
    in the metadata, and rebuild with ``checkpoint.load_model(dir, build=lambda meta:
    resize(models.create(**meta['model']), meta['shapes']))``.

    Raises:
      ValueError: ``shapes`` names a leaf the model lacks, or misses one.
    """
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    names = {n for n, _ in tree.named_leaves(pure)}
    if set(shapes) != names:
        raise ValueError(
            f"shapes must name every leaf of the model: missing {sorted(names - set(shapes))[:5]}, "
            f"unknown {sorted(set(shapes) - names)[:5]}"
        )
    values = tree.map_with_names(lambda n, x: jnp.zeros(tuple(shapes[n]), jnp.result_type(x)), pure)
    new = nnx.merge(graphdef, tree.from_pure_dict(state, values))
    _fix_sizes(new)
    return new


def forward_flops(model: nnx.Module, input_shape: Sequence[int], *, dtype=jnp.float32) -> dict[str, int]:
    """FLOPs per example of every Dense, conv and other contraction in the traced forward pass.

    Keyed by the kernel leaf a contraction reads (``'fc1/kernel'``), or ``'dot_general_<i>'``
    for contractions between activations (attention). A contraction costs 2 FLOPs per
    multiply-add; elementwise work is not counted.
    """
    out: dict[str, int] = {}
    for i, c in enumerate(_trace(model, tuple(input_shape), dtype).contractions):
        key = c.kernel or f"dot_general_{i}"
        out[key] = out.get(key, 0) + c.flops // 2
    return out


def hard_prune_report(
    before: nnx.Module, after: nnx.Module, input_shape: Sequence[int], *, batch_size: int = 256, repeats: int = 20
) -> dict:
    """Parameters, FLOPs and measured latency of two models, and their ratios.

    FLOPs are :func:`forward_flops` per example; latency is the median of ``repeats``
    interleaved calls (``jcompress.timing.compare``, after a warm-up call) of the jitted
    eval-mode forward pass on a ``(batch_size, *input_shape)`` float32 batch.

    Returns:
      ``{'before': {...}, 'after': {...}, 'params_ratio', 'flops_ratio', 'latency_ratio',
      'batch_size'}`` with each ratio ``before / after``.
    """
    from jcompress import timing

    x = jnp.zeros((batch_size, *input_shape), jnp.float32)
    calls = {}
    out = {}
    for label, model in (("before", before), ("after", after)):
        fwd, state = _eval_forward(model)
        calls[label] = lambda fwd=fwd, state=state: fwd(state, x)
        out[label] = {
            "params": base.params_count(nnx.state(model, nnx.Param)),
            "flops": int(sum(forward_flops(model, input_shape).values())),
        }
    for label, t in timing.compare(calls, repeats=repeats).items():
        out[label]["latency_s"] = t.median
    b, a = out["before"], out["after"]
    ratio = lambda k: b[k] / a[k] if a[k] else math.inf
    return {
        "before": b,
        "after": a,
        "params_ratio": ratio("params"),
        "flops_ratio": ratio("flops"),
        "latency_ratio": ratio("latency_s"),
        "batch_size": batch_size,
    }
