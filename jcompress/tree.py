"""Pytree utilities shared by every transform: leaf names and NNX adapters.

Every transform in jcompress takes a parameter pytree: a plain nested dict of arrays
(a Linen ``variables['params']``), an NNX ``State`` from ``nnx.split``, or any pytree.
Leaves are named by their slash-joined path, for example ``fc1/kernel`` or
``layers/0/kernel``; the ``value`` wrapper of NNX variables is not part of the name, so
the same regex selects the same leaf in an NNX State and in its pure dict.

Which leaves a transform touches is a selection spec, resolved by
:func:`jcompress.core.spec.select_names`; :func:`default_selection` is its default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Predicate = Callable[[str, Any], bool]

__all__ = [
    "as_float_array",
    "check_finite",
    "check_same_structure",
    "default_selection",
    "from_pure_dict",
    "get_by_name",
    "map_with_names",
    "named_leaves",
    "path_str",
    "set_by_name",
    "to_pure_dict",
    "tree_size",
]

_WRAPPER_KEYS = ("value", "raw_value")


def path_str(path: tuple) -> str:
    """Slash-joined name of a pytree key path, without NNX's trailing ``value``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    while parts and parts[-1] in _WRAPPER_KEYS:
        parts.pop()
    return "/".join(parts)


def named_leaves(tree: PyTree, is_leaf: Callable | None = None) -> list[tuple[str, Any]]:
    """``[(name, leaf), ...]`` in the pytree's flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def map_with_names(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:
    """``jax.tree.map`` whose function also receives each leaf's slash-joined name."""
    return jax.tree.map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest, is_leaf=is_leaf)


def default_selection(name: str, leaf: Any) -> bool:
    """The leaves most transforms touch by default: Dense and conv kernels.

    A leaf is selected when its name ends in ``kernel`` or ``weight`` and it has at
    least two dimensions; biases, norm scales and embeddings are left alone.
    """
    last = name.rsplit("/", 1)[-1]
    return last in ("kernel", "weight", "w") and getattr(leaf, "ndim", 0) >= 2


def check_same_structure(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
    """Raise a ValueError naming the first differing leaf if two trees differ in structure."""
    na = [n for n, _ in named_leaves(a)]
    nb = [n for n, _ in named_leaves(b)]
    if na != nb:
        only_a = sorted(set(na) - set(nb))
        only_b = sorted(set(nb) - set(na))
        raise ValueError(
            f"{name_b} does not match the structure of {name_a}: leaves only in {name_a}: "
            f"{only_a[:6]}, only in {name_b}: {only_b[:6]}. Build {name_b} from {name_a} "
            f"(for example with jax.tree.map) so both have the same leaves."
        )


def check_finite(params: PyTree, arg: str = "params") -> None:
    """Raise a ValueError naming the first leaf that holds NaN or Inf (eager values only)."""
    for name, leaf in named_leaves(params):
        if isinstance(leaf, jax.core.Tracer):
            continue
        arr = np.asarray(leaf)
        if arr.dtype.kind != "f" and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(np.float32)  # bfloat16 and the float8 types: numpy kind 'V'
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            source = "the training run that produced these params" if arg == "params" else f"how {arg} was computed"
            raise ValueError(
                f"{arg}/{name} contains NaN or Inf; compression with non-finite values is undefined. Check {source}."
            )


def to_pure_dict(params: PyTree) -> PyTree:
    """An NNX State (or nested dict) as a nested dict of arrays; other pytrees unchanged."""
    from flax import nnx

    if isinstance(params, nnx.State):
        return nnx.to_pure_dict(params)
    return params


def from_pure_dict(template: PyTree, values: PyTree) -> PyTree:
    """Put the leaves of ``values`` (a pure dict) into the structure of ``template``.

    ``template`` is typically an NNX State; leaves are matched by name, so the result is
    a State again with every variable holding the new array.
    """
    check_same_structure(template, values, "template", "values")
    lookup = dict(named_leaves(values))
    return map_with_names(lambda n, _: lookup[n], template)


def get_by_name(tree: PyTree, name: str) -> Any:
    """The leaf called ``name`` (slash-joined); KeyError listing the names if absent."""
    for n, leaf in named_leaves(tree):
        if n == name:
            return leaf
    raise KeyError(f"no leaf named {name!r}; leaves are {[n for n, _ in named_leaves(tree)]}")


def set_by_name(tree: PyTree, updates: dict[str, Any]) -> PyTree:
    """A copy of ``tree`` with the leaves named in ``updates`` replaced."""
    names = {n for n, _ in named_leaves(tree)}
    missing = set(updates) - names
    if missing:
        raise KeyError(f"no leaves named {sorted(missing)}; leaves are {sorted(names)}")
    return map_with_names(lambda n, x: updates.get(n, x), tree)


def tree_size(tree: PyTree) -> int:
    """Total number of elements over all leaves."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def as_float_array(x: Any, name: str) -> jax.Array:
    """``x`` as a floating jax array; TypeError naming ``name`` for integer or bool input."""
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {arr.dtype}; a floating dtype is needed (cast with .astype(jnp.float32)).")
    return arr
