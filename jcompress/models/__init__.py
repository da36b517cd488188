"""Flax NNX models used by the experiments, and a functional view of any NNX model.

``create(name, input_shape=..., num_classes=..., seed=...)`` builds a model from a
registry name; ``functional(model)`` splits it into an ``apply`` function and two plain
dicts (trainable ``params`` and the ``extra`` state such as BatchNorm statistics), which
is the form every jcompress transform and the train step work on.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jcompress import tree
from jcompress.models.cnn1d import CNN1D
from jcompress.models.lenet import LeNet5
from jcompress.models.mlp import MLP, lenet300
from jcompress.models.resnet import ResNet

__all__ = ["MLP", "LeNet5", "CNN1D", "ResNet", "create", "from_meta", "functional", "feature_shapes", "Functional", "NAMES", "merge"]


def _mlp(input_shape, num_classes, rngs, widths=(1200, 1200), **kw):
    return MLP(math.prod(input_shape), tuple(widths), num_classes, rngs=rngs, **kw)


_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "lenet300": lambda s, c, rngs, **kw: lenet300(math.prod(s), c, rngs=rngs, **kw),
    "lenet5": lambda s, c, rngs, **kw: LeNet5(s, c, rngs=rngs, **kw),
    "mlp": _mlp,
    "cnn1d": lambda s, c, rngs, **kw: CNN1D(s[0], c, rngs=rngs, **kw),
    "resnet": lambda s, c, rngs, **kw: ResNet(s, c, rngs=rngs, **kw),
}
NAMES = tuple(_REGISTRY)


def create(name: str, *, input_shape: Sequence[int], num_classes: int, seed: int = 0, **kwargs: Any) -> nnx.Module:
    """Build a registered model.

    Args:
      name: one of ``lenet300``, ``lenet5``, ``mlp`` (``widths=``, ``dropout=``,
        ``input_dropout=``), ``cnn1d`` (``channels=``), ``resnet`` (``widths=``).
      input_shape: one example's shape without the batch axis, e.g. ``(28, 28, 1)``.
      num_classes: number of logits.
      seed: parameter initialisation seed.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}")
    return _REGISTRY[name](tuple(int(d) for d in input_shape), int(num_classes), nnx.Rngs(seed), **kwargs)


def from_meta(meta: dict) -> nnx.Module:
    """The registered model a checkpoint's metadata describes: ``create(**meta['model'])``.

    The ``build`` hook of ``jcompress.checkpoint.load_model`` for checkpoints written by
    ``train.fit`` or ``checkpoint.save_model`` with a ``create`` config.
    """
    if "model" not in meta or "name" not in meta["model"]:
        raise ValueError("the checkpoint metadata has no model config with a 'name'; pass load_model a build= hook")
    return create(**meta["model"])


class Functional(NamedTuple):
    """A model as pure pieces: ``apply(params, extra, x, train=False, key=None) -> (out, extra)``.

    ``out`` is the logits, or ``(logits, {name: activation})`` when the view was built with
    ``features``.
    """

    apply: Callable
    params: dict
    extra: dict
    graphdef: Any


def functional(model: nnx.Module, *, features: Sequence[str] = ()) -> Functional:
    """Split an NNX model into a pure apply function, its params dict and its extra state.

    ``params`` holds every ``nnx.Param`` as a nested dict (names such as ``fc1/kernel``);
    ``extra`` holds everything else (BatchNorm statistics). ``apply`` rebuilds the model
    from the graph definition on each call, so it can be jitted and differentiated with
    respect to ``params``. Dropout draws from ``key`` when ``train`` is true.

    Args:
      model: any NNX model called as ``model(x, train=..., rngs=...)``.
      features: named intermediate activations to return beside the logits (for hint and
        attention distillation). ``fc1`` is the output of the submodule ``fc1`` (before its
        activation function), ``features`` the output of the model's ``features`` method;
        a module called ``k > 1`` times gives ``name/0 ... name/k-1``. :func:`feature_shapes`
        lists them. With features, ``apply`` returns ``((logits, {name: array}), extra)``.

    Example:
      >>> f = functional(model, features=['conv2'])
      >>> (logits, feats), extra = f.apply(f.params, f.extra, x)
    """
    names = tuple(features)
    graphdef, p_state, e_state = nnx.split(model, nnx.Param, ...)

    def apply(params, extra, x, train: bool = False, key: jax.Array | None = None):
        m = nnx.merge(graphdef, tree.from_pure_dict(p_state, params), tree.from_pure_dict(e_state, extra))
        rngs = nnx.Rngs(dropout=key) if key is not None else None
        if names:
            forward = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)
            logits, captured = forward(x, train=train, rngs=rngs)
            found = _feature_names(nnx.to_pure_dict(captured))
            missing = [n for n in names if n not in found]
            if missing:
                raise KeyError(f"{type(model).__name__} has no activation named {missing}; it has {sorted(found)}")
            out = (logits, {n: found[n] for n in names})
        else:
            out = m(x, train=train, rngs=rngs)
        _, _, new_extra = nnx.split(m, nnx.Param, ...)
        return out, nnx.to_pure_dict(new_extra)

    return Functional(apply, nnx.to_pure_dict(p_state), nnx.to_pure_dict(e_state), graphdef)


def _feature_names(captured: Any) -> dict[str, jax.Array]:
    """Name captured method outputs: ``conv1`` for ``conv1.__call__``, ``features`` for a method."""
    groups: dict[str, list] = {}
    for name, value in tree.named_leaves(captured):
        parts = name.split("/")
        base = "/".join(p for p in parts[:-1] if p != "__call__")
        groups.setdefault(base, []).append(value)
    out = {}
    for base, values in groups.items():
        if base == "":  # the top-level __call__: the logits themselves
            continue
        if len(values) == 1:
            out[base] = values[0]
        else:
            out.update({f"{base}/{i}": v for i, v in enumerate(values)})
    return out


def feature_shapes(model: nnx.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Every activation name ``functional(model, features=...)`` can return, with its per-example shape.

    Example:
      >>> feature_shapes(create('lenet5', input_shape=(28, 28, 1), num_classes=10), (28, 28, 1))
      {'conv1': (24, 24, 20), 'conv2': (8, 8, 50), 'fc1': (500,), 'fc2': (10,), 'features': (4, 4, 50)}
    """
    graphdef, p_state, e_state = nnx.split(model, nnx.Param, ...)

    def run(x):
        m = nnx.merge(graphdef, p_state, e_state)
        _, captured = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        return _feature_names(nnx.to_pure_dict(captured))

    shapes = jax.eval_shape(run, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return {k: tuple(v.shape[1:]) for k, v in sorted(shapes.items())}


def merge(model: nnx.Module, params: dict, extra: dict | None = None) -> nnx.Module:
    """A new NNX model with the structure of ``model`` holding ``params`` (and ``extra``)."""
    graphdef, p_state, e_state = nnx.split(model, nnx.Param, ...)
    e_state = e_state if extra is None else tree.from_pure_dict(e_state, extra)
    return nnx.merge(graphdef, tree.from_pure_dict(p_state, params), e_state)
