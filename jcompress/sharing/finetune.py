"""Centroid fine-tuning for shared weights (Deep Compression, section 3.3).

After k-means sharing every weight of a shared layer is ``codebook[index]``. Training
keeps the assignment fixed and learns the centroids: the gradient of centroid ``c`` is
the sum of ``dL/dW`` over the weights assigned to it. :func:`centroid_finetune` wraps an
optax optimizer so that:

* the weight gradients of each codebook group are summed per cluster (a segment sum
  over the indices; the zero cluster, index 0, gets no gradient and stays exactly 0);
* the inner optimizer updates the centroids, which live in this transform's state;
* the emitted updates move every weight of a cluster by the same delta, so after
  ``optax.apply_updates`` the params equal ``codebook[indices]`` **exactly**, with the
  codebook read back from the params (:func:`codebook_aux`). Exactness: all weights of a
  cluster hold the same value and receive the same delta, so they stay equal. The
  centroids the inner optimizer sees are re-read from the params at every step (XLA may
  fuse the final addition differently in ``apply_updates`` than inside this transform,
  so a separately stored copy could drift from the params by one rounding).

Leaves that are not shared (biases, norms) are trained by the same inner optimizer
unless ``train_others=False``. Use the transform as the whole optimizer passed to
``train.fit`` (do not chain transforms after it: they would change the updates).

Example:
  >>> shared, aux = kmeans(k=31)(params)
  >>> tx = centroid_finetune(optax.adam(1e-4), aux)
  >>> res = train.fit(apply, shared, extra, ds, tx=tx, epochs=2)
  >>> aux2 = codebook_aux(res.params, aux)   # the fine-tuned codebooks
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress import tree
from jcompress.core.base import CodebookAux

__all__ = ["CentroidState", "centroid_finetune", "centroid_gradients", "codebook_aux"]


class CentroidState(NamedTuple):
    """State of :func:`centroid_finetune`.

    Attributes:
      centroids: ``{group: (k + 1,) array}``, the current codebooks (entry 0 is 0).
      indices: ``{group: {leaf: int32 array}}``, the fixed assignment (held in the state,
        not closed over, so that XLA does not try to constant-fold the cluster sums).
      inner_state: the inner optimizer's state over ``{'centroids': ..., 'others': ...}``.
    """

    centroids: dict
    indices: dict
    inner_state: Any


def _shared_names(aux: CodebookAux) -> dict[str, str]:
    return {name: g for g, members in aux.indices.items() for name in members}


def centroid_gradients(grads, aux: CodebookAux) -> dict:
    """``{group: (k + 1,) array}``: per-cluster sums of the weight gradients; entry 0 is 0.

    Args:
      grads: gradient pytree with the params' structure.
      aux: the ``CodebookAux`` whose indices define the clusters.
    """
    flat = dict(tree.named_leaves(grads))
    out = {}
    for g, members in aux.indices.items():
        size = aux.codebooks[g].shape[0]
        total = jnp.zeros((size,), jnp.float32)
        for name, idx in members.items():
            total = total + jax.ops.segment_sum(
                flat[name].reshape(-1).astype(jnp.float32), idx.reshape(-1), num_segments=size
            )
        out[g] = total.at[0].set(0.0).astype(aux.codebooks[g].dtype)
    return out


def centroid_finetune(
    inner: optax.GradientTransformation, aux: CodebookAux, *, train_others: bool = True
) -> optax.GradientTransformation:
    """Wrap ``inner`` so that it trains the centroids of ``aux`` with the assignment fixed.

    Args:
      inner: the optimizer for the centroids (and the unshared leaves), e.g. ``optax.adam(1e-4)``.
      aux: the ``CodebookAux`` of :func:`jcompress.sharing.kmeans`; the params passed
        to ``init`` must equal ``codebook[indices]`` on its leaves (checked when concrete).
      train_others: also train the leaves ``aux`` does not cover (else they stay fixed).

    Returns:
      an optax ``GradientTransformation``; its ``update`` needs ``params``.

    Raises:
      ValueError: a leaf of ``aux`` missing from the params, a shape mismatch, params not
        equal to ``codebook[indices]``, or ``update`` called without params.
    """
    shared = _shared_names(aux)

    def split(tree_):
        flat = dict(tree.named_leaves(tree_))
        return {n: v for n, v in flat.items() if n not in shared} if train_others else {}

    def init(params):
        flat = dict(tree.named_leaves(params))
        for name, g in shared.items():
            if name not in flat:
                raise ValueError(
                    f"CodebookAux names leaf {name!r} which the params do not have; leaves: {sorted(flat)}"
                )
            idx = aux.indices[g][name]
            if flat[name].shape != idx.shape:
                raise ValueError(f"params/{name} has shape {flat[name].shape} but its indices have {idx.shape}")
            w = flat[name]
            if not isinstance(w, jax.core.Tracer) and not np.array_equal(
                np.asarray(aux.codebooks[g])[np.asarray(idx)], np.asarray(w)
            ):
                raise ValueError(
                    f"params/{name} is not codebook[indices] of the CodebookAux; pass the params that kmeans returned"
                )
        # copies: a training loop that donates its state must not delete the caller's aux
        centroids = {g: jnp.array(c, copy=True) for g, c in aux.codebooks.items()}
        indices = jax.tree.map(lambda i: jnp.array(i, jnp.int32, copy=True), aux.indices)
        return CentroidState(centroids, indices, inner.init({"centroids": centroids, "others": split(params)}))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("centroid_finetune needs params in update(grads, state, params)")
        now = CodebookAux(state.centroids, state.indices, None)
        current = _read_centroids(params, now, state.centroids)
        inner_grads = {"centroids": centroid_gradients(grads, now), "others": split(grads)}
        inner_params = {"centroids": current, "others": split(params)}
        upd, inner_state = inner.update(inner_grads, state.inner_state, inner_params)
        deltas = {g: upd["centroids"][g].astype(c.dtype).at[0].set(0) for g, c in current.items()}
        centroids = {g: c + deltas[g] for g, c in current.items()}
        others = upd["others"]

        def one(name, gleaf):
            if name in shared:
                return deltas[shared[name]][state.indices[shared[name]][name]]
            if name in others:
                return others[name]
            return jnp.zeros_like(gleaf)

        return tree.map_with_names(one, grads), CentroidState(centroids, state.indices, inner_state)

    return optax.GradientTransformation(init, update)


def _read_centroids(params, aux: CodebookAux, fallback: dict) -> dict:
    """The codebooks as the params hold them: the value of each cluster's weights.

    All weights of a cluster are equal, so their maximum is that value; a cluster with
    no weights keeps its ``fallback`` value. Entry 0 is the zero.
    """
    flat = dict(tree.named_leaves(params))
    out = {}
    for g, members in aux.indices.items():
        size = fallback[g].shape[0]
        vals = jnp.concatenate([flat[n].reshape(-1) for n in members])
        idx = jnp.concatenate([i.reshape(-1) for i in members.values()])
        top = jax.ops.segment_max(vals, idx, num_segments=size)
        seen = jax.ops.segment_sum(jnp.ones_like(idx), idx, num_segments=size) > 0
        out[g] = jnp.where(seen, top, fallback[g]).astype(fallback[g].dtype).at[0].set(0)
    return out


def codebook_aux(params, aux: CodebookAux) -> CodebookAux:
    """``aux`` with the codebooks that fine-tuned ``params`` hold (params are ``codebook[indices]``).

    The indices and inertia are those of ``aux``; ``errors`` is None (the clustering
    errors do not describe trained weights).

    Raises:
      ValueError: when the weights of a cluster are no longer tied (the params were not
        trained with :func:`centroid_finetune` as the whole optimizer).
    """
    books = _read_centroids(params, aux, aux.codebooks)
    flat = dict(tree.named_leaves(params))
    for g, members in aux.indices.items():
        for name, idx in members.items():
            if not np.array_equal(np.asarray(books[g])[np.asarray(idx)], np.asarray(flat[name])):
                raise ValueError(f"params/{name} is not codebook[indices]: its shared weights are no longer tied")
    return CodebookAux(books, aux.indices, aux.inertia, None)
