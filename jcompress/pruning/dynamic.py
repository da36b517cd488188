"""Dynamic sparse training: RigL and SET as optax transformations.

The network is sparse from the first step and stays at the same per-layer number of
active weights; every ``delta_t`` steps the connectivity changes:

1. **drop** the ``k`` active weights of smallest magnitude,
2. **grow** ``k`` inactive ones: those with the largest gradient magnitude (RigL, Evci
   et al. 2020) or chosen uniformly at random (SET, Mocanu et al. 2018),

with ``k = floor(f(t) * n_active)`` per layer and the cosine-decayed update fraction
``f(t) = alpha / 2 * (1 + cos(pi * t / end_step))``; no updates from ``end_step`` on.
Grown weights start at exactly 0 and their optimizer moments are reset to 0 (every
moment tree in the wrapped optimizer's state that has the params' structure is
masked); dropped weights are set to exactly 0. Candidates for growth are all weights
inactive after the drop, so a just-dropped weight can be grown back (it then keeps its
value, as in the RigL reference code).

Both wrap the optimizer (``rigl(optax.adam(1e-3), masks=...)``) because they must reach
into its state. The gradient they see is dense: ``jax.grad`` of the loss at sparse
params has entries for inactive weights too, which is what RigL's growth criterion uses.

Example:
  >>> params, aux = jc.pruning.random(sparsity=0.9, distribution='erk')(params, key=k)
  >>> masks = aux.masks
  >>> tx = rigl(optax.adam(1e-3), masks=masks, delta_t=100, end_step=7500)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jcompress import tree as jtree
from jcompress.core.base import default_leaves
from jcompress.core.topk import keep_largest
from jcompress.pruning.optim import as_mask_tree

__all__ = ["DynamicSparseState", "rigl", "sparse_evolutionary", "update_fraction"]

PyTree = Any


class DynamicSparseState(NamedTuple):
    """State of :func:`rigl` / :func:`sparse_evolutionary`.

    Attributes:
      count: int32 number of updates done.
      masks: current bool masks (params structure, True = active).
      key: raw uint32 PRNG key data (used by SET to draw the grown weights).
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    masks: PyTree
    key: jax.Array
    inner_state: optax.OptState


def update_fraction(step, *, drop_fraction: float, end_step: int) -> jax.Array:
    """Cosine-decayed fraction ``alpha / 2 * (1 + cos(pi * t / end_step))``, 0 from ``end_step`` on."""
    t = jnp.asarray(step, jnp.float32)
    f = 0.5 * drop_fraction * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, end_step) / end_step))
    return jnp.where(t < end_step, f, 0.0)


def _check(delta_t: int, end_step: int, drop_fraction: float) -> None:
    for name, v in (("delta_t", delta_t), ("end_step", end_step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int (optimizer steps)")
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 < drop_fraction <= 1:
        raise ValueError(f"drop_fraction={drop_fraction!r} must be in (0, 1]")


def _dynamic(
    inner: optax.GradientTransformation,
    masks: PyTree,
    *,
    delta_t: int,
    end_step: int,
    drop_fraction: float,
    grow: str,
    key: jax.Array | None,
) -> optax.GradientTransformation:
    _check(delta_t, end_step, drop_fraction)
    key_data = jax.random.key_data(key) if key is not None else jnp.zeros((2,), jnp.uint32)

    def init(params):
        m = as_mask_tree(params, masks)
        names = default_leaves(params)
        for n in names:
            jtree.as_float_array(jtree.get_by_name(params, n), f"params/{n}")
        return DynamicSparseState(jnp.zeros((), jnp.int32), m, key_data, inner.init(params))

    def regrow(params, grads, masks_tree, t, key_raw):
        names = default_leaves(params)
        w, g, old = (dict(jtree.named_leaves(x)) for x in (params, grads, masks_tree))
        frac = update_fraction(t, drop_fraction=drop_fraction, end_step=end_step)
        new = {}
        for i, n in enumerate(names):
            mask = old[n]
            n_active = jnp.sum(mask, dtype=jnp.int32)
            k = jnp.floor(frac * n_active.astype(jnp.float32)).astype(jnp.int32)
            kept = keep_largest(jnp.where(mask, jnp.abs(w[n]).astype(jnp.float32), -jnp.inf), n_active - k)
            if grow == "gradient":
                score = jnp.abs(g[n]).astype(jnp.float32)
            else:
                leaf_key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_raw), t), i)
                score = jax.random.uniform(leaf_key, jnp.shape(mask), jnp.float32)
            grown = keep_largest(jnp.where(kept, -jnp.inf, score), k) & ~kept
            new[n] = kept | grown
        return jtree.map_with_names(lambda n, m: new.get(n, m), masks_tree)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("rigl / sparse_evolutionary need the current params: call tx.update(grads, state, params)")
        t = state.count
        is_update = (t > 0) & (t % delta_t == 0) & (t < end_step)
        old = state.masks
        new_masks = lax.cond(is_update, lambda: regrow(params, updates, old, t, state.key), lambda: old)
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), updates, old)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params)
        inner_state = optax.tree_utils.tree_map_params(
            inner,
            lambda s, m: jnp.where(m, s, jnp.zeros((), s.dtype)) if jnp.shape(s) == jnp.shape(m) else s,
            inner_state,
            new_masks,
        )
        # Weights active before and after take their update; all others go to exactly 0
        # (grown ones start at 0, dropped ones are zeroed).
        out = jax.tree.map(
            lambda u, m0, m1, p: jnp.where(m0 & m1, u, -p).astype(u.dtype), inner_updates, old, new_masks, params
        )
        return out, DynamicSparseState(t + 1, new_masks, state.key, inner_state)

    return optax.GradientTransformation(init, update)


def rigl(
    inner: optax.GradientTransformation,
    *,
    masks: PyTree,
    delta_t: int = 100,
    end_step: int,
    drop_fraction: float = 0.3,
) -> optax.GradientTransformation:
    """RigL (Evci et al. 2020): drop by magnitude, grow by gradient magnitude.

    Args:
      inner: the optimizer to wrap (its moments of grown and dropped weights are reset).
      masks: initial bool masks (params structure or its pure dict; True = active),
        e.g. the random ERK masks of ``jc.pruning.random(sparsity=0.9, distribution='erk')``.
        Apply them to the params before training.
      delta_t: steps between connectivity updates (the paper uses 100).
      end_step: ``T_end``; no updates from this step on (the paper: 75% of training).
      drop_fraction: ``alpha``, the fraction updated at step 0 of the cosine decay (0.3).
      The Dense and conv kernels are rewired; other leaves keep their masks (usually
      all True) and are only masked.

    Returns:
      an optax GradientTransformation (state :class:`DynamicSparseState`) that replaces
      ``inner`` in the chain; it needs ``params`` in ``update``. The number of active
      weights of every leaf stays exactly what ``masks`` set.

    Example:
      >>> tx = rigl(optax.sgd(0.1, momentum=0.9), masks=masks, delta_t=100, end_step=30000)
    """
    return _dynamic(
        inner,
        masks,
        delta_t=delta_t,
        end_step=end_step,
        drop_fraction=drop_fraction,
        grow="gradient",
        key=None,
    )


def sparse_evolutionary(
    inner: optax.GradientTransformation,
    *,
    masks: PyTree,
    key: jax.Array,
    delta_t: int = 100,
    end_step: int,
    drop_fraction: float = 0.3,
) -> optax.GradientTransformation:
    """SET (Mocanu et al. 2018): drop by magnitude, grow uniformly at random.

    Arguments as :func:`rigl`, plus ``key``: a ``jax.random.key`` from which the grown
    positions are drawn (folded with the step and the leaf index, so runs are
    reproducible and resumable from a checkpointed state).

    Example:
      >>> tx = sparse_evolutionary(optax.adam(1e-3), masks=masks, key=jax.random.key(0), end_step=5000)
    """
    if key is None or not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key must be a typed PRNG key from jax.random.key(seed)")
    return _dynamic(
        inner,
        masks,
        delta_t=delta_t,
        end_step=end_step,
        drop_fraction=drop_fraction,
        grow="random",
        key=key,
    )
