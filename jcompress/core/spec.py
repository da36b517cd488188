"""One way to say "which leaves, and how much": ordered ``(regex, value)`` specs.

Every per-leaf setting in jcompress (which leaves a transform touches, sparsity, k,
bits, index bits, ranks) is a *spec*, resolved over slash-joined leaf names such as
``fc1/kernel`` or ``blocks/0/conv1/kernel`` by :func:`resolve`:

- a plain value (``0.9``, ``4``, ``NM(2, 4)``) means that value for every leaf;
- a mapping ``{regex: value}`` or a sequence of ``(regex, value)`` pairs is ordered: each
  leaf takes the value of the first regex that matches it (``re.search``);
- a leaf that no pattern covers is an error unless a ``default`` is given, and so is a
  pattern that covers no leaf (almost always a typo); the error lists both.

A *selection* is a spec whose values are bools: a regex or a list of regexes (the leaves
they match), a ``(regex, bool)`` list (first match wins, so ``[('head', False),
('kernel', True)]`` excludes the head), a predicate ``(name, leaf) -> bool``, or a bool
tree with the params' structure. :func:`select_names` resolves one.

Example:
  >>> resolve({'fc3': 0.5, 'fc': 0.9}, ['fc1/kernel', 'fc3/kernel'], arg='sparsity')
  {'fc1/kernel': 0.9, 'fc3/kernel': 0.5}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jcompress import tree

__all__ = ["MISSING", "Spec", "check_flag", "check_value", "is_pairs", "layer_of", "pairs", "resolve", "select_names", "selection_tree"]

Spec = Any
MISSING = object()


def is_pairs(spec: Any) -> bool:
    """True when ``spec`` is a ``{regex: value}`` mapping or a sequence of ``(regex, value)`` pairs.

    A mapping with a mapping among its values is a tree (a bool tree selection), not pairs.
    """
    if isinstance(spec, Mapping):
        return not any(isinstance(v, Mapping) for v in spec.values())
    if isinstance(spec, (list, tuple)) and spec and not hasattr(spec, "_fields"):
        return all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in spec)
    return False


def pairs(spec: Any, *, arg: str) -> list[tuple[re.Pattern, Any]]:
    """The compiled ``(regex, value)`` pairs of a mapping or pair-sequence spec, in order."""
    items = list(spec.items()) if isinstance(spec, Mapping) else [tuple(p) for p in spec]
    out = []
    for pattern, value in items:
        if not isinstance(pattern, str):
            raise TypeError(f"{arg}: the patterns of a spec are regexes (str), got {pattern!r}")
        try:
            out.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f"{arg}: regex {pattern!r} does not compile: {e}") from None
    return out


def _short(names: Sequence[str], n: int = 12) -> str:
    names = list(names)
    return f"{names[:n]}{f' ... ({len(names)} in all)' if len(names) > n else ''}"


def resolve(spec: Spec, names: Sequence[str], *, arg: str, default: Any = MISSING) -> dict[str, Any]:
    """``{name: value}`` for every name in ``names``, from a spec (see the module docstring).

    Args:
      spec: a plain value, a ``{regex: value}`` mapping or a sequence of ``(regex, value)`` pairs.
      names: the leaf names to resolve (usually a transform's selected leaves).
      arg: the argument's name, used in error messages (``'sparsity'``).
      default: the value of a leaf that no pattern covers; without it such a leaf is an error.

    Raises:
      ValueError: listing the uncovered leaves and the unused patterns.
    """
    names = list(names)
    if not is_pairs(spec):
        return {n: spec for n in names}
    compiled = pairs(spec, arg=arg)
    out, used, uncovered = {}, set(), []
    for n in names:
        for i, (p, v) in enumerate(compiled):
            if p.search(n):
                out[n] = v
                used.add(i)
                break
        else:
            if default is MISSING:
                uncovered.append(n)
            else:
                out[n] = default
    unused = [p.pattern for i, (p, _) in enumerate(compiled) if i not in used]
    if uncovered or unused:
        parts = []
        if uncovered:
            parts.append(f"no pattern covers {_short(uncovered)}")
        if unused:
            parts.append(f"the patterns {unused} match none of the leaves")
        raise ValueError(
            f"{arg}: {'; '.join(parts)}. The leaves are {_short(names)}; patterns are regexes tried in order "
            "(re.search, first match wins); add a catch-all pattern such as '.*' last, or fix the regex."
        )
    return out


def select_names(params: Any, selection: Spec, *, arg: str = "selection") -> list[str]:
    """Names of the leaves of ``params`` that a selection picks, in flattening order.

    Args:
      params: the parameter pytree.
      selection: ``None`` for :func:`jcompress.tree.default_selection` (Dense and conv
        kernels); a regex or list of regexes; ``(regex, bool)`` pairs or a flat
        ``{regex: bool}`` mapping (first match wins, uncovered leaves not selected); a
        predicate ``(name, leaf) -> bool``; or a bool tree with the structure of ``params``
        (nested, as the params are).
      arg: the argument's name in error messages.

    Raises:
      ValueError: when nothing is selected, a regex matches no leaf, or a bool tree does
        not match the params.
    """
    named = tree.named_leaves(params)
    names = [n for n, _ in named]
    if selection is None:
        picked = [n for n, x in named if tree.default_selection(n, x)]
    elif isinstance(selection, str) or (
        isinstance(selection, (list, tuple)) and selection and all(isinstance(s, str) for s in selection)
    ):
        regexes = [selection] if isinstance(selection, str) else list(selection)
        chosen = resolve([(r, True) for r in regexes], names, arg=arg, default=False)
        picked = [n for n in names if chosen[n]]
    elif is_pairs(selection):
        chosen = resolve(selection, names, arg=arg, default=False)
        picked = [n for n in names if bool(chosen[n])]
    elif callable(selection) and not isinstance(selection, Mapping):
        picked = [n for n, x in named if bool(selection(n, x))]
    else:
        tree.check_same_structure(params, selection, "params", arg)
        flags = dict(tree.named_leaves(selection))
        picked = [n for n in names if bool(flags[n])]
    if not picked:
        raise ValueError(
            f"{arg}={_describe(selection)} selects no leaf; the leaves are {_short(names)}. Fix the regex (matched "
            "with re.search against these slash-joined names) or pass a predicate (name, leaf) -> bool."
        )
    return picked


def _describe(selection: Any) -> str:
    if selection is None or isinstance(selection, (str, list, tuple, Mapping)) or callable(selection):
        text = repr(selection) if not callable(selection) else getattr(selection, "__name__", "<predicate>")
        return text if len(text) < 200 else text[:200] + "..."
    return f"<bool tree with {len(jax.tree.leaves(selection))} leaves>"


def layer_of(name: str) -> str:
    """The layer of a leaf: its name without the last component (``fc1/kernel`` -> ``fc1``)."""
    return name.rsplit("/", 1)[0] if "/" in name else name


def check_flag(value: Any, *, arg: str) -> bool:
    """``value`` as a bool; a TypeError naming ``arg`` for anything else.

    A flag given as a string or a number is refused rather than read by its truth value:
    ``allow_empty="False"`` would otherwise mean True.
    """
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{arg}={value!r} must be True or False")


def check_value(value: Any, *, arg: str, kind: type | tuple, lo=None, hi=None, lo_open=False, hi_open=False):
    """``value`` as a Python number of ``kind``, accepting numpy and JAX scalars; checked against a range.

    Raises:
      TypeError / ValueError naming ``arg`` and the accepted range.
    """
    import numbers

    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg}={value!r} must be a number, not a bool")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{arg} must be a concrete number (a hyperparameter), got a traced value")
    if hasattr(value, "shape") and getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    want_int = kind is int or kind == (int,)
    if want_int:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{arg}={value!r} must be an integer")
        value = int(value)
    else:
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{arg}={value!r} must be a real number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{arg}={value!r} must be finite")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{arg}={value!r} must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}")
    return value



def selection_tree(selection: Spec, *, arg: str = "selection") -> Callable[[Any], Any]:
    """``params -> bool tree``: a selection as the mask argument of ``optax.masked``.

    Example:
      >>> tx = optax.masked(jc.pruning.l2(1e-4), selection_tree(r'kernel$'))
    """

    def fn(params):
        chosen = set(select_names(params, selection, arg=arg))
        return tree.map_with_names(lambda n, x: n in chosen, params)

    return fn
