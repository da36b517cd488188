"""Pytree utilities shared by every transform: leaf paths, selection, NNX adapters.

Every transform in jcompress takes a parameter pytree: a plain nested dict of arrays
(a Linen ``variables['params']``), an NNX ``State`` from ``nnx.split``, or any pytree.
Leaves are named by their slash-joined path, for example ``fc1/kernel`` or
``layers/0/kernel``; the ``value`` wrapper of NNX variables is not part of the name, so
the same regex selects the same leaf in an NNX State and in its pure dict.

Selection is data: :func:`select` turns regexes, a predicate ``(path, leaf) -> bool`` or
a bool pytree into a bool pytree with the structure of the params.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Predicate = Callable[[str, Any], bool]
Selection = Union[None, str, Sequence[str], Predicate, PyTree]

__all__ = [
    "path_str",
    "named_leaves",
    "map_with_names",
    "select",
    "default_selection",
    "selected_names",
    "check_same_structure",
    "check_finite",
    "to_pure_dict",
    "from_pure_dict",
    "get_by_name",
    "set_by_name",
    "tree_size",
    "as_float_array",
    "iter_selected",
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


def select(params: PyTree, include: Selection = None, exclude: Selection = None) -> PyTree:
    """A bool pytree (structure of ``params``) saying which leaves a transform touches.

    Args:
      params: the parameter pytree.
      include: ``None`` for :func:`default_selection`; a regex or list of regexes
        matched with ``re.search`` against each leaf's name; a predicate
        ``(name, leaf) -> bool``; or a bool pytree of the same structure, returned as is.
      exclude: same forms (``None`` excludes nothing); wins over ``include``.

    Raises:
      ValueError: when the selection matches no leaf (almost always a wrong regex), or a
        regex does not compile, or a bool pytree does not match the params.

    Example:
      >>> sel = select({'fc1': {'kernel': w, 'bias': b}}, include=r'fc\\d/kernel')
    """
    inc = _as_predicate(include, params, "include", default=default_selection)
    exc = _as_predicate(exclude, params, "exclude", default=lambda n, x: False)
    mask = map_with_names(lambda n, x: bool(inc(n, x) and not exc(n, x)), params)
    if not any(jax.tree.leaves(mask)):
        names = [n for n, _ in named_leaves(params)]
        raise ValueError(
            f"selection include={include!r} exclude={exclude!r} matches no leaf; the leaves are "
            f"{names[:12]}{' ...' if len(names) > 12 else ''}. Fix the regex (it is matched with "
            "re.search against these slash-joined names) or pass a predicate."
        )
    return mask


def _as_predicate(sel: Selection, params: PyTree, arg: str, default: Predicate) -> Predicate:
    if sel is None:
        return default
    if isinstance(sel, str):
        sel = [sel]
    if isinstance(sel, (list, tuple)) and all(isinstance(s, str) for s in sel):
        try:
            patterns = [re.compile(s) for s in sel]
        except re.error as e:
            raise ValueError(f"{arg}: regex {e.pattern!r} does not compile: {e}") from None
        return lambda n, x: any(p.search(n) for p in patterns)
    if callable(sel):
        return lambda n, x: bool(sel(n, x))
    check_same_structure(params, sel, "params", arg)
    lookup = dict(named_leaves(sel))
    return lambda n, x: bool(lookup[n])


def selected_names(params: PyTree, selection: Selection = None) -> list[str]:
    """Names of the leaves that ``selection`` (any form accepted by :func:`select`) picks."""
    return [n for n, s in named_leaves(select(params, selection)) if s]


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
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(
                f"{arg}/{name} contains NaN or Inf; compression of non-finite weights is undefined. "
                "Check the training run that produced these params."
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


def iter_selected(params: PyTree, selection: Selection = None) -> Iterable[tuple[str, Any]]:
    """``(name, leaf)`` for each leaf that ``selection`` picks, in flattening order."""
    picked = set(selected_names(params, selection))
    return [(n, leaf) for n, leaf in named_leaves(params) if n in picked]
