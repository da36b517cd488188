"""The transform protocol and the aux types: what every technique in jcompress returns.

A **params transform** is a pure function over a parameter pytree (a nested dict, an NNX
``State`` or a Linen ``variables['params']``)::

    new_params, aux = t(params, *, key=None)

A **model transform** does the same to an NNX module, for the operations that change a
model's structure (hard pruning, factorised layers, activation quantization)::

    new_model, aux = t(model, *, key=None)

Every technique is a factory that takes its hyperparameters (keyword-only, data such as
calibration statistics positional) and returns one of these as a :class:`Transform` or a
:class:`ModelTransform`. A transform touches the Dense and conv kernels by default;
:func:`masked` restricts it to the leaves a selection spec names (as ``optax.masked``
does); :func:`chain` composes any sequence of both kinds and reports every stage.

The aux is one of a few typed records, each field with one meaning everywhere:

- :class:`MaskAux`: ``masks``, a bool tree with the params' structure (True = kept; the
  leaves a transform did not touch are all True).
- :class:`CodebookAux`: k-means codebooks and the indices of every shared leaf.
- :class:`GridAux`: ``grids``, ``{leaf name: QuantParams}`` (integer codes, scale and
  zero point of one quantization grid).
- :class:`FactorAux`: low-rank factors ``{leaf name: (us, v)}``.
- :class:`UnitsAux`, :class:`ActRangeAux`: what a model transform kept or calibrated.
- :class:`ChainAux`: the named auxes of the stages of a :func:`chain`.

``errors`` means the same in every aux: ``{leaf name: relative squared error}``,
``tr(dW^T H dW) / tr(W^T H W)`` for a kernel ``W`` (inputs first) changed by ``dW``. With
calibration statistics ``H = X^T X`` this is the relative error of the layer's outputs on
the calibration inputs; without them ``H = I`` and it is ``||dW||_F^2 / ||W||_F^2``.

Example:
  >>> t = jc.chain(jc.pruning.magnitude(sparsity=0.9), jc.sharing.kmeans(k=31))
  >>> params, aux = t(params)
  >>> jc.export.write('m.jcz', jc.compressed.compress(params, aux))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jcompress import tree
from jcompress.core import spec as spec_lib

__all__ = [
    "ActRangeAux",
    "ChainAux",
    "CodebookAux",
    "FactorAux",
    "GridAux",
    "MaskAux",
    "ModelTransform",
    "Transform",
    "UnitsAux",
    "all_auxes",
    "chain",
    "default_leaves",
    "masked",
    "relative_error",
    "require_key",
]

PyTree = Any

# ----------------------------------------------------------------------------------------
# Aux types
# ----------------------------------------------------------------------------------------


class MaskAux(NamedTuple):
    """Pruning masks.

    Attributes:
      masks: bool tree with the structure of the params; True where a weight is kept.
      scores: the float score tree the masks were made from (params-shaped), or None.
      errors: ``{leaf name: relative squared error}`` (see the module docstring), or None.
    """

    masks: PyTree
    scores: PyTree = None
    errors: dict | None = None


class CodebookAux(NamedTuple):
    """Weight sharing: every shared leaf is ``codebooks[group][indices[group][name]]``.

    Attributes:
      codebooks: ``{group: (k + 1,) array}``; entry 0 is the exact zero (pruned weights),
        entries ``1..k`` the sorted centroids, in the dtype of the group's leaves.
      indices: ``{group: {leaf name: int32 array of the leaf's shape}}``.
      inertia: ``{group: scalar}`` within-cluster sum of squares of the nonzero weights.
      errors: ``{leaf name: relative squared error}``, or None.
    """

    codebooks: dict
    indices: dict
    inertia: dict
    errors: dict | None = None


class GridAux(NamedTuple):
    """Quantization: every quantized leaf equals ``grids[name].dequantize()``.

    Attributes:
      grids: ``{leaf name: QuantParams}`` (``jcompress.core.grid``): integer codes, scale,
        zero point, bits and the grouping.
      errors: ``{leaf name: relative squared error}``, or None.
    """

    grids: dict
    errors: dict | None = None


class FactorAux(NamedTuple):
    """Low-rank factors: the matrix view of each factorised leaf is ``us @ v``.

    Attributes:
      factors: ``{leaf name: (us, v)}``, ``us`` ``(m, r)``, ``v`` ``(r, n)``.
      ranks: ``{leaf name: r}`` (Python ints).
      errors: ``{leaf name: relative squared error}``.
    """

    factors: dict
    ranks: dict
    errors: dict | None = None


class UnitsAux(NamedTuple):
    """What a hard-pruning model transform kept.

    Attributes:
      kept: ``{layer name: int array of the kept output units}`` (layer = leaf name
        without its last component, ``fc1/kernel`` -> ``fc1``).
      params_before, params_after: parameter counts of the model before and after.
    """

    kept: dict
    params_before: int
    params_after: int


class ActRangeAux(NamedTuple):
    """Calibrated activation ranges of a model transform, ``{layer name: (lo, hi)}``."""

    ranges: dict


@functools.partial(jax.tree_util.register_dataclass, data_fields=["auxes"], meta_fields=["names"])
@dataclasses.dataclass(frozen=True)
class ChainAux:
    """The auxes of a :func:`chain`'s stages, in order, with the stages' names."""

    names: tuple
    auxes: tuple

    def __getitem__(self, i):
        return self.auxes[i]

    def __len__(self) -> int:
        return len(self.auxes)

    def __iter__(self):
        return iter(self.auxes)


def all_auxes(*auxes) -> list:
    """The auxes flattened out of any :class:`ChainAux` (and tuples of auxes), in order."""
    out: list = []
    for a in auxes:
        if a is None:
            continue
        if isinstance(a, (ChainAux, tuple)) and not hasattr(a, "_fields"):
            out.extend(all_auxes(*a))
        else:
            out.append(a)
    return out


def relative_error(w: jax.Array, new_w: jax.Array, h: jax.Array | None = None) -> jax.Array:
    """``tr(dW^T H dW) / tr(W^T H W)`` for a 2-D kernel (inputs first); ``H = I`` when None.

    Returns 0 for an all-zero ``w`` left unchanged.
    """
    w = jnp.asarray(w, jnp.float32)
    d = jnp.asarray(new_w, jnp.float32) - w
    if h is None:
        num, den = jnp.sum(d * d), jnp.sum(w * w)
    else:
        w2, d2 = w.reshape(h.shape[0], -1), d.reshape(h.shape[0], -1)
        num, den = jnp.sum(d2 * (h @ d2)), jnp.sum(w2 * (h @ w2))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


# ----------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------


def default_leaves(params: PyTree) -> list[str]:
    """The leaves a transform touches by default: Dense and conv kernels (ndim >= 2).

    Raises ValueError when the tree has none (pass a selection with :func:`masked`).
    """
    return spec_lib.select_names(params, None)


def require_key(key, *, what: str):
    """``key`` if it is given, else a ValueError saying that ``what`` needs one."""
    if key is None:
        raise ValueError(f"{what} is random: pass key=jax.random.key(seed) when calling the transform")
    return key


@dataclasses.dataclass(frozen=True)
class Transform:
    """A params transform ``t(params, *, key=None) -> (new_params, aux)``.

    Attributes:
      apply: ``apply(params, names, key) -> (new_params, aux)``: the work, on the leaves
        ``names`` (slash-joined) of ``params``; the leaves not named pass through.
      name: a short label (``'magnitude'``), used by :func:`chain` in its report.
      leaves: ``leaves(params) -> names``: the leaves touched when called directly
        (:func:`default_leaves`; :func:`masked` replaces it).
      with_history: for a stage that adapts to what the stages before it did (a
        fine-tune stage keeps their masks or codebooks): ``with_history(auxes) ->
        Transform``; :func:`chain` calls it with the earlier auxes. None for the rest.
    """

    apply: Callable
    name: str
    leaves: Callable = default_leaves
    with_history: Callable | None = None

    def __call__(self, params: PyTree, *, key: jax.Array | None = None):
        return self.apply(params, tuple(self.leaves(params)), key)


@dataclasses.dataclass(frozen=True)
class ModelTransform:
    """A model transform ``t(model, *, key=None) -> (new_model, aux)`` over NNX modules.

    Attributes:
      apply: ``apply(model, names, key) -> (new_model, aux)``; ``names`` are leaf names of
        the model's ``nnx.Param`` state (a layer is named by its leaves: ``fc1/kernel``).
        The input model is never modified.
      name: a short label.
      leaves: ``leaves(params) -> names`` over the model's params (default: kernels).
    """

    apply: Callable
    name: str
    leaves: Callable = default_leaves

    def __call__(self, model, *, key: jax.Array | None = None):
        from flax import nnx

        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"{self.name} is a model transform: call it on an NNX module, got {type(model).__name__}. "
                "Params transforms take parameter trees; model transforms take the model."
            )
        return self.apply(model, tuple(self.leaves(_params_of(model))), key)


def _params_of(model) -> PyTree:
    from flax import nnx

    return nnx.state(model, nnx.Param)


def masked(transform: Transform | ModelTransform, selection: spec_lib.Spec):
    """``transform`` restricted to the leaves that ``selection`` picks (as ``optax.masked``).

    Args:
      transform: a :class:`Transform` or :class:`ModelTransform` (a factory's result).
      selection: a regex, a list of regexes, ``(regex, bool)`` pairs (first match wins),
        a predicate ``(name, leaf) -> bool`` or a bool tree; see
        :func:`jcompress.core.spec.select_names`. Any leaf may be selected, kernels or not.

    Returns:
      a transform of the same kind whose leaves are the selected ones (a transform with
      its own leaf rule, such as an already masked one, gets the intersection).

    Example:
      >>> t = jc.masked(jc.pruning.magnitude(sparsity=0.9), [('head', False), ('kernel', True)])
    """
    if not isinstance(transform, (Transform, ModelTransform)):
        raise TypeError(
            f"masked needs a transform made by a jcompress factory (Transform or ModelTransform), got "
            f"{type(transform).__name__}; build your own with jc.Transform(apply, name) where "
            "apply(params, names, key) -> (params, aux)"
        )
    inner_leaves = transform.leaves

    def leaves(params):
        chosen = spec_lib.select_names(params, selection)
        if inner_leaves is default_leaves:
            return chosen
        inner = set(inner_leaves(params))
        return [n for n in chosen if n in inner]

    return dataclasses.replace(transform, leaves=leaves)


def _stage_name(t, i: int) -> str:
    return getattr(t, "name", None) or getattr(t, "__name__", None) or f"stage{i}"


@dataclasses.dataclass(frozen=True)
class Chain:
    """Stages run in order: ``chain(params_or_model, *, key=None, callback=None)``.

    Called on a parameter tree, every stage must be a params transform (a
    :class:`Transform` or any callable ``(params, *, key=None) -> (params, aux)``). Called
    on an NNX module, model transforms get the model and params transforms get its
    ``nnx.Param`` state, merged back into the model after the stage. Returns
    ``(result, ChainAux)``.
    """

    stages: tuple
    names: tuple
    name: str = "chain"

    def __call__(self, x, *, key: jax.Array | None = None, callback: Callable | None = None):
        from flax import nnx

        is_model = isinstance(x, nnx.Module)
        if not is_model:
            for t, n in zip(self.stages, self.names):
                if isinstance(t, ModelTransform):
                    raise TypeError(
                        f"stage {n!r} is a model transform; call the chain on the NNX model, not on its params"
                    )
        keys = list(jax.random.split(key, len(self.stages))) if key is not None else [None] * len(self.stages)
        auxes: list = []
        for t, n, k in zip(self.stages, self.names, keys):
            if isinstance(t, Transform) and t.with_history is not None:
                t = t.with_history(tuple(auxes))
            if isinstance(t, ModelTransform):
                x, aux = t(x, key=k)
            elif is_model:
                graphdef, params, rest = nnx.split(x, nnx.Param, ...)
                new_params, aux = t(params, key=k)
                x = nnx.merge(graphdef, new_params, rest)
            else:
                x, aux = t(x, key=k)
            auxes.append(aux)
            if callback is not None:
                callback(n, x, ChainAux(tuple(self.names[: len(auxes)]), tuple(auxes)))
        return x, ChainAux(tuple(self.names), tuple(auxes))


def chain(*stages, names: Sequence[str] | None = None) -> Chain:
    """Compose transforms (params or model level) into one, as ``optax.chain`` does.

    Args:
      *stages: :class:`Transform`, :class:`ModelTransform`, another chain, or any callable
        ``(params, *, key=None) -> (params, aux)``.
      names: one label per stage (default: each transform's ``name``).

    Returns:
      a :class:`Chain`; ``chain(...)(params)`` returns ``(params, ChainAux)``. A ``key``
      is split into one key per stage.

    Example:
      >>> t = jc.chain(jc.oneshot.sparsegpt(stats, sparsity=0.5), jc.oneshot.gptq(stats, bits=4))
      >>> params, aux = t(params)
    """
    if not stages:
        raise ValueError("chain needs at least one stage")
    for i, t in enumerate(stages):
        if not callable(t):
            raise TypeError(f"chain stage {i} must be a transform (callable), got {type(t).__name__}")
    labels = tuple(names) if names is not None else tuple(_stage_name(t, i) for i, t in enumerate(stages))
    if len(labels) != len(stages):
        raise ValueError(f"names has {len(labels)} entries for {len(stages)} stages")
    return Chain(tuple(stages), labels)


def params_count(x: PyTree) -> int:
    """Number of scalars in a pytree (for aux records)."""
    return int(tree.tree_size(x))
