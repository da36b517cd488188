"""Importance scores for pruning: a float tree with the params' structure, higher = keep.

Every function here is pure and returns a tree shaped like ``params`` (dict, NNX State,
or any pytree); :func:`jcompress.pruning.by_scores` prunes by such a tree and
:func:`jcompress.pruning.masks.make_masks` turns it into masks. With ``names`` (a list of
slash-joined leaf names) only those leaves are scored and the others get zeros; without
it every leaf must be floating and gets a score. The pruning transforms
(``jc.pruning.magnitude``, ``taylor``, ``snip``, ``obd``, ``random``) call these.

Scores, by the information they use:

* weights only: :func:`magnitude_scores` ``|w|`` (Han et al. 2015), :func:`random_scores`;
* one gradient: :func:`taylor_scores` ``|w * g|`` (first-order Taylor, Molchanov et al.),
  :func:`snip_scores` connection sensitivity at initialisation (Lee et al. 2019);
* second order: :func:`obd_scores` ``h_kk w_k^2 / 2`` (LeCun et al. 1990) with a Hessian
  diagonal from :func:`fisher_diagonal` (per-example squared gradients),
  :func:`hutchinson_diagonal` (``E[z * Hz]`` with Rademacher ``z``) or the running
  :func:`grad_squared_accumulator` over a training window;
* activations: :func:`neuron_entropy` (histogram entropy per neuron over a calibration
  set) and :func:`unit_scores`, which spreads per-neuron scores over the kernels that
  produce those neurons.

Example:
  >>> s = taylor_scores(params, grads, names=['fc1/kernel', 'fc2/kernel'])
  >>> h = hutchinson_diagonal(loss_fn, params, batch, key=jax.random.key(0), num_samples=64)
  >>> s2 = obd_scores(params, h)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jcompress import tree as jtree

__all__ = [
    "GradSquaredState",
    "fisher_diagonal",
    "grad_squared_accumulator",
    "grad_squared_mean",
    "hutchinson_diagonal",
    "magnitude_scores",
    "neuron_entropy",
    "obd_scores",
    "random_scores",
    "snip_scores",
    "taylor_scores",
    "unit_scores",
]

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]


def _score_map(
    fn: Callable, params: PyTree, *rest: PyTree, names: Sequence[str] | None = None, arg: str = "params"
) -> PyTree:
    """``fn(name, w, *r)`` on the scored leaves; zeros (float32) on the others.

    The leaves in ``names`` are scored (all of them when ``names`` is None); a scored
    leaf must be floating, else TypeError naming it. The ``rest`` trees are matched to
    ``params`` by leaf name (a pure dict of gradients works with an NNX State).
    """
    picked = None if names is None else _check_names(params, names)
    others = [dict(jtree.named_leaves(r)) for r in rest]

    def one(name, w):
        if picked is not None and name not in picked:
            return jnp.zeros(jnp.shape(w), jnp.float32)
        w = jtree.as_float_array(w, f"{arg}/{name}")
        return fn(name, w, *(o[name] for o in others))

    return jtree.map_with_names(one, params)


def _check_names(params: PyTree, names: Sequence[str]) -> set[str]:
    if isinstance(names, str):
        raise TypeError(f"names={names!r} must be a list of leaf names, not one string")
    leaves = {n for n, _ in jtree.named_leaves(params)}
    unknown = [n for n in names if n not in leaves]
    if unknown:
        raise ValueError(f"names {unknown} are not leaves of params; leaves are {sorted(leaves)[:12]}")
    return set(names)


def magnitude_scores(params: PyTree, *, names: Sequence[str] | None = None) -> PyTree:
    """``|w|`` per entry (same dtype as each leaf).

    Example:
      >>> magnitude_scores({'fc1': {'kernel': jnp.array([[-2., 1.]])}})  # {'fc1': {'kernel': [[2., 1.]]}}
    """
    return _score_map(lambda n, w: jnp.abs(w), params, names=names)


def random_scores(params: PyTree, *, key: jax.Array, names: Sequence[str] | None = None) -> PyTree:
    """Uniform ``[0, 1)`` float32 scores, independent per leaf (random-pruning baseline).

    The leaf at position ``i`` in flattening order uses ``jax.random.fold_in(key, i)``,
    so the score of a leaf does not depend on the other leaves' shapes.
    """
    index = {n: i for i, (n, _) in enumerate(jtree.named_leaves(params))}
    return _score_map(
        lambda n, w: jax.random.uniform(jax.random.fold_in(key, index[n]), w.shape, jnp.float32),
        params,
        names=names,
    )


def taylor_scores(params: PyTree, grads: PyTree, *, names: Sequence[str] | None = None) -> PyTree:
    """First-order Taylor importance ``|w * g|``: the loss change from removing ``w``.

    Args:
      params: parameter tree.
      grads: gradient tree with the same structure (e.g. accumulated over a few batches).
    """
    jtree.check_same_structure(params, grads, "params", "grads")
    return _score_map(lambda n, w, g: jnp.abs(w * g), params, grads, names=names)


def snip_scores(loss_fn: LossFn, params: PyTree, batch: Any, *, names: Sequence[str] | None = None) -> PyTree:
    """SNIP connection sensitivity (Lee et al. 2019) from one batch, usually at init.

    ``s = |dL/dw * w| / sum(|dL/dw * w|)``, the sum running over every scored entry, so the
    scores are fractions summing to 1.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter tree (the initialisation).
      batch: one batch, passed to ``loss_fn`` as is.
    """
    grads = jax.grad(loss_fn)(params, batch)
    raw = taylor_scores(params, grads, names=names)
    total = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(raw))
    return jax.tree.map(lambda x: x / jnp.maximum(total, jnp.finfo(jnp.float32).tiny), raw)


def obd_scores(params: PyTree, hessian_diag: PyTree, *, names: Sequence[str] | None = None) -> PyTree:
    """Optimal Brain Damage saliency ``h_kk * w_k^2 / 2`` (LeCun et al. 1990).

    Args:
      params: parameter tree.
      hessian_diag: Hessian diagonal estimate with the same structure, e.g. from
        :func:`fisher_diagonal`, :func:`hutchinson_diagonal` or :func:`grad_squared_mean`.
    """
    jtree.check_same_structure(params, hessian_diag, "params", "hessian_diag")
    return _score_map(lambda n, w, h: 0.5 * h * jnp.square(w), params, hessian_diag, names=names)


def fisher_diagonal(loss_fn: LossFn, params: PyTree, batches: Iterable[Any]) -> PyTree:
    """Exact diagonal of the empirical Fisher ``mean_i g_i^2`` from per-example gradients.

    Each example's gradient is computed separately (``jax.vmap`` of ``jax.grad`` over the
    batch axis, each example passed to ``loss_fn`` as a batch of one), squared, and
    averaged over all examples of all batches. For a model whose labels follow its own
    predictive distribution this is the Gauss-Newton matrix's diagonal, a positive
    approximation of the Hessian diagonal.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
      params: parameter tree.
      batches: an iterable of batches (pytrees of arrays with a leading batch axis);
        pass ``[batch]`` for a single one.

    Returns:
      float32 tree with the params' structure.
    """

    def example_loss(p, example):
        return loss_fn(p, jax.tree.map(lambda x: x[None], example))

    @jax.jit
    def batch_sum(p, batch):
        g = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(p, batch)
        return jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=0), g)

    total, count = None, 0
    for batch in batches:
        s = batch_sum(params, batch)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        count += int(jax.tree.leaves(batch)[0].shape[0])
    if total is None:
        raise ValueError("batches is empty; pass at least one batch (a list like [batch])")
    return jax.tree.map(lambda x: x / count, total)


def hutchinson_diagonal(
    loss_fn: LossFn, params: PyTree, batch: Any, *, key: jax.Array, num_samples: int = 64
) -> PyTree:
    """Hutchinson estimate of the Hessian diagonal: ``mean_s z_s * (H z_s)``.

    ``z`` has independent Rademacher (+-1) entries; ``H z`` is a Hessian-vector product
    (``jax.jvp`` of ``jax.grad``), so the Hessian is never formed. The estimate is
    unbiased; its variance per entry is ``sum_{j != k} H_kj^2 / num_samples``, and it is
    exact when the Hessian is diagonal.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter tree (floating leaves).
      batch: the batch the Hessian is taken on.
      key: PRNG key for the probe vectors.
      num_samples: number of probes (static, >= 1).

    Returns:
      float32 tree with the params' structure.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive int")
    leaves, treedef = jax.tree.flatten(params)
    for name, leaf in jtree.named_leaves(params):
        jtree.as_float_array(leaf, f"params/{name}")
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))

    def probe(acc, k):
        ks = jax.random.split(k, len(leaves))
        z = jax.tree.unflatten(
            treedef, [jax.random.rademacher(kk, jnp.shape(x), jnp.float32).astype(x.dtype) for kk, x in zip(ks, leaves)]
        )
        hz = jax.jvp(grad_fn, (params,), (z,))[1]
        return jax.tree.map(lambda a, zi, h: a + (zi * h).astype(jnp.float32), acc, z, hz), None

    zero = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    acc, _ = jax.lax.scan(probe, zero, jax.random.split(key, num_samples))
    return jax.tree.map(lambda a: a / num_samples, acc)


class GradSquaredState(NamedTuple):
    """Running sum of squared gradients and the number of steps summed."""

    sum_sq: PyTree
    count: jax.Array


def grad_squared_accumulator() -> optax.GradientTransformation:
    """An optax transformation that passes updates through and sums their squares.

    Put it first in ``optax.chain`` (where updates are still raw gradients) to collect
    the empirical Fisher diagonal over a training window; read it with
    :func:`grad_squared_mean`. Reset by re-running ``init``.

    Example:
      >>> tx = optax.chain(grad_squared_accumulator(), optax.adam(1e-3))
      >>> state = tx.init(params); ...; fisher = grad_squared_mean(state[0])
    """

    def init(params):
        return GradSquaredState(
            jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params), jnp.zeros((), jnp.int32)
        )

    def update(updates, state, params=None):
        del params
        sum_sq = jax.tree.map(lambda s, g: s + jnp.square(g.astype(jnp.float32)), state.sum_sq, updates)
        return updates, GradSquaredState(sum_sq, state.count + 1)

    return optax.GradientTransformation(init, update)


def grad_squared_mean(state: GradSquaredState) -> PyTree:
    """Mean squared gradient per entry from a :func:`grad_squared_accumulator` state."""
    return jax.tree.map(lambda s: s / jnp.maximum(state.count, 1), state.sum_sq)


def neuron_entropy(activations_list: Sequence[jax.Array], *, bins: int = 32) -> list[jax.Array]:
    """Information carried by each neuron: entropy (bits) of its activation histogram.

    For every layer's activations over a calibration set, each neuron's values are
    binned into ``bins`` equal-width bins between that neuron's min and max, and the
    Shannon entropy ``-sum p log2 p`` of the bin frequencies is its importance. A neuron
    whose output never changes has entropy 0; the maximum is ``log2(bins)``.

    Args:
      activations_list: one array per layer, shape ``(N, ..., units)``: all axes but the
        last are samples (e.g. ``MLP.hidden(x)`` gives ``(N, width)`` per hidden layer;
        conv feature maps ``(N, H, W, C)`` give one entropy per channel).
      bins: number of histogram bins (static, >= 2).

    Returns:
      list of float32 arrays of shape ``(units,)``, one per layer.

    Example:
      >>> ent = neuron_entropy(model.hidden(x_calib))
      >>> s = unit_scores(params, {'fc1/kernel': ent[0], 'fc2/kernel': ent[1]})
    """
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins={bins!r} must be an int >= 2")
    out = []
    for i, acts in enumerate(activations_list):
        a = jtree.as_float_array(acts, f"activations_list[{i}]")
        if a.ndim < 2:
            raise ValueError(f"activations_list[{i}] has shape {a.shape}; expected (N, ..., units)")
        a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
        lo, hi = jnp.min(a, axis=0), jnp.max(a, axis=0)
        width = jnp.where(hi > lo, hi - lo, 1.0)
        idx = jnp.clip(jnp.floor((a - lo) / width * bins).astype(jnp.int32), 0, bins - 1)
        units = a.shape[-1]
        flat = (jnp.arange(units, dtype=jnp.int32)[None, :] * bins + idx).reshape(-1)
        counts = jnp.zeros((units * bins,), jnp.float32).at[flat].add(1.0).reshape(units, bins)
        p = counts / a.shape[0]
        out.append(-jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=1))
    return out


def unit_scores(params: PyTree, per_unit: Mapping[str, jax.Array], *, axis: int = -1) -> PyTree:
    """Spread per-unit importances over kernels: entry scores equal to their unit's.

    Args:
      params: parameter tree.
      per_unit: ``{kernel name: (units,) importance}``, where ``units`` is the size of
        ``axis`` of that kernel (its output neurons / filters for ``axis=-1``).
      axis: the kernel axis the units index.

    Returns:
      float32 tree with the params' structure; named kernels get their unit's score at
      every entry, all other leaves zeros, so prune only the named kernels:
      ``jc.masked(jc.pruning.by_scores(s, sparsity=0.5, pattern=jc.Units()), list(per_unit))``.
    """
    names = {n: leaf for n, leaf in jtree.named_leaves(params)}
    unknown = sorted(set(per_unit) - set(names))
    if unknown:
        raise ValueError(f"per_unit names {unknown} are not leaves of params; leaves are {sorted(names)}")

    def one(name, w):
        if name not in per_unit:
            return jnp.zeros(jnp.shape(w), jnp.float32)
        shape = jnp.shape(w)
        ax = axis % len(shape)
        u = jnp.asarray(per_unit[name], jnp.float32)
        if u.shape != (shape[ax],):
            raise ValueError(
                f"per_unit[{name!r}] has shape {u.shape}; kernel {shape} needs ({shape[ax]},) along axis {axis}"
            )
        view = [1] * len(shape)
        view[ax] = shape[ax]
        return jnp.broadcast_to(u.reshape(view), shape)

    return jtree.map_with_names(one, params)
