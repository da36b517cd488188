"""The layer hook: run an NNX model with every Dense and conv layer's contraction intercepted.

``nnx.Linear`` computes ``self.dot_general(x, kernel, ...)`` and ``nnx.Conv``
``self.conv_general_dilated(x, kernel, ...)``: both ops are attributes of the layer
instance, set at construction. The hook replaces that attribute on the layers of one
model instance with a wrapper that calls ``fn(name, x, op)``, where ``op(x)`` is the
original contraction with the layer's kernel and arguments bound. ``fn`` may record ``x``
(calibration), transform it (activation quantization: ``op(q(x))``) or inspect the result
(FLOP counts). Nothing global is patched: other models, other instances of the classes
and other threads are unaffected.

* :func:`intercept`: a context manager; the hook is removed on exit. Use it on a model
  built inside a traced function (``nnx.merge`` under ``jax.jit``) or around
  ``jax.eval_shape``.
* :func:`with_hook`: a copy of the model with the hook kept; the hook is part of the
  model's static graph, so the copy survives ``nnx.split`` / ``nnx.merge`` and ``jax.jit``,
  and its parameter names are those of the original.

Layer names are the module paths (``'fc1'``, ``'layers/0/query'``); the kernel's leaf
name is ``name + '/kernel'``. The input ``x`` is what the op receives: for ``nnx.Conv``
after the layer's own reshaping of extra batch axes and its explicit (circular, reflect,
causal) padding.

Example:
  >>> seen = {}
  >>> def record(name, x, op):
  ...     seen[name] = x.shape
  ...     return op(x)
  >>> with intercept(model, record):
  ...     model(x)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
from flax import nnx

__all__ = ["LAYER_TYPES", "intercept", "layers", "replace", "with_hook"]

# the attribute that holds each layer type's contraction op
_OP_ATTR = {nnx.Linear: "dot_general", nnx.Conv: "conv_general_dilated"}
LAYER_TYPES = tuple(_OP_ATTR)

Hook = Callable[[str, jax.Array, Callable[[jax.Array], jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Hooked:
    """The wrapped op of one layer: ``fn(name, x, op)`` (hashable, so it can live in a graphdef)."""

    op: Callable
    name: str
    fn: Callable

    def __call__(self, x, *args, **kwargs):
        return self.fn(self.name, x, lambda v: self.op(v, *args, **kwargs))


def _attr(layer) -> str:
    for cls, attr in _OP_ATTR.items():
        if isinstance(layer, cls):
            return attr
    raise TypeError(f"{type(layer).__name__} is not a hookable layer (nnx.Linear or nnx.Conv)")


def layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """``{layer name: module}`` of every ``nnx.Linear`` and ``nnx.Conv`` in ``model``, in graph order."""
    return {
        "/".join(str(p) for p in path): node for path, node in nnx.iter_graph(model) if isinstance(node, LAYER_TYPES)
    }


def replace(model: nnx.Module, name: str, new: nnx.Module) -> None:
    """Put ``new`` in place of the layer named ``name`` (a :func:`layers` name) in ``model``, in place."""
    *parents, last = name.split("/")
    node = model
    for p in parents:
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    if last.isdigit():
        node[int(last)] = new
    else:
        setattr(node, last, new)


def _install(model: nnx.Module, fn: Hook, names) -> list[tuple[str, nnx.Module, str, Callable]]:
    """Hook the layers; return ``(name, layer, op attribute, original op)`` of each."""
    found = layers(model)
    if names is not None:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise ValueError(f"the model has no nnx.Linear / nnx.Conv layers {unknown[:5]}; its layers are {list(found)[:8]}")
        found = {n: m for n, m in found.items() if n in set(names)}
    installed = []
    for name, layer in found.items():
        attr = _attr(layer)
        op = getattr(layer, attr)
        installed.append((name, layer, attr, op))
        setattr(layer, attr, _Hooked(op, name, fn))
    return installed


@contextlib.contextmanager
def intercept(model: nnx.Module, fn: Hook, *, names=None):
    """Within the block, the layers of ``model`` compute ``fn(name, x, op)`` instead of ``op(x)``.

    Args:
      model: the NNX module (its layers' op attributes are restored on exit).
      fn: ``fn(layer name, x, op) -> y``; ``op(x)`` is the layer's own contraction.
      names: the layer names to hook (default: every ``nnx.Linear`` and ``nnx.Conv``).

    Yields:
      ``{layer name: module}`` of the hooked layers.
    """
    installed = _install(model, fn, names)
    try:
        yield {name: layer for name, layer, _, _ in installed}
    finally:
        for _, layer, attr, op in installed:
            setattr(layer, attr, op)


def with_hook(model: nnx.Module, fn: Hook, *, names=None) -> nnx.Module:
    """A copy of ``model`` whose layers compute ``fn(name, x, op)``; ``model`` is not modified.

    Args and names as in :func:`intercept`. The copy's parameters and other state are
    copies of the original's, under the same names.

    Example:
      >>> clipped = with_hook(model, lambda name, x, op: op(jnp.clip(x, -1, 1)))
    """
    copy = nnx.clone(model)
    _install(copy, fn, names)
    return copy
