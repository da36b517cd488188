"""Hard pruning: physically remove neurons, channels and filters, giving a smaller dense model.

A mask only zeroes weights: the arrays keep their shapes and the model runs exactly as
many FLOPs as before. Surgery removes whole output units of a layer (the last axis of
its kernel, its bias entries, its BatchNorm entries) *and* the matching input rows of
the layer that consumes them, and builds a new, smaller model with ``models.create``.

Which units can go, per model of :mod:`jcompress.models`:

* ``MLP`` / LeNet-300-100: hidden neurons of ``fc_i`` (rows of ``fc_{i+1}``).
* ``LeNet5``: ``conv1`` filters (input channels of ``conv2``), ``conv2`` filters (rows of
  ``fc1`` for that channel at every ``(h, w)`` of the flattened ``(h, w, c)`` features),
  ``fc1`` neurons (rows of ``fc2``).
* ``CNN1D``: ``conv_i`` channels (inputs of ``conv_{i+1}``; the last one's rows of ``fc``).
* ``ResNet``: the inner channels of each block (``conv1`` outputs with ``bn1``, inputs of
  ``conv2``); the residual stream is left alone.

Exactness. A unit whose incoming weights are all zero still outputs a constant:
``act(bias)``, or after BatchNorm (eval mode) ``act(beta - gamma * mean / sqrt(var + eps))``.
The new model matches the masked model when that constant is carried over: it is
folded into the consumer's bias when the consumer sees it the same way at every position
(a Dense layer, a flattened feature map, a VALID convolution). A padded convolution sees
a constant channel differently at the border, so there the constant must be 0: mask the
unit's bias and BatchNorm scale/bias as well (:func:`complete_masks` does this). When it
is not 0, :func:`hard_prune` raises rather than return a model that computes something
else. Leaves that cannot be removed (masked entries elsewhere, pruned residual channels)
stay in the new model as zeros.

Example:
  >>> masks = make_masks(scores.magnitude(fn.params), sparsity=0.5, pattern='structured', norm='l2',
  ...                    selection=r'fc[12]/kernel')
  >>> small = hard_prune(model, masks, config=config)
  >>> checkpoint.save_model(out, small.config, *models.functional(small.model)[1:3])
  >>> hard_prune_report(model, small.model, (28, 28, 1))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import models
from jcompress import tree as jtree
from jcompress.models.cnn1d import CNN1D
from jcompress.models.lenet import LeNet5
from jcompress.models.mlp import MLP
from jcompress.models.resnet import ResNet
from jcompress.pruning.masks import apply_masks
from jcompress.pruning.optim import as_mask_tree

__all__ = [
    "Removable",
    "SurgeryResult",
    "complete_masks",
    "hard_prune",
    "hard_prune_report",
    "keep_from_masks",
    "removable_layers",
    "unit_masks",
]

PyTree = Any


class Removable(NamedTuple):
    """A layer whose output units surgery can remove.

    Attributes:
      layer: the producing layer, e.g. ``'fc1'`` or ``'blocks/0/conv1'``.
      act: ``'relu'`` or ``'identity'``, applied to its (normalised) output.
      bn: the BatchNorm right after it, or ``None``.
      consumer: the layer reading its output.
      kind: how the consumer reads it: ``'dense'`` (rows), ``'flatten'`` (rows of the
        flattened ``(..., c)`` feature map), ``'conv_valid'`` or ``'conv_padded'`` (the
        input-channel axis ``-2`` of a conv kernel).
    """

    layer: str
    act: str
    bn: str | None
    consumer: str
    kind: str


def removable_layers(model: nnx.Module) -> list[Removable]:
    """The layers of a jcompress model whose units :func:`hard_prune` can remove, in forward order.

    Raises:
      TypeError: for models other than MLP, LeNet5, CNN1D, ResNet.
    """
    if isinstance(model, MLP):
        return [Removable(f"fc{i}", "relu", None, f"fc{i + 1}", "dense") for i in range(1, model.num_layers)]
    if isinstance(model, LeNet5):
        return [
            Removable("conv1", "identity", None, "conv2", "conv_valid"),
            Removable("conv2", "identity", None, "fc1", "flatten"),
            Removable("fc1", "relu", None, "fc2", "dense"),
        ]
    if isinstance(model, CNN1D):
        n = len(model.channels)
        convs = [Removable(f"conv{i}", "relu", None, f"conv{i + 1}", "conv_padded") for i in range(1, n)]
        return convs + [Removable(f"conv{n}", "relu", None, "fc", "flatten")]
    if isinstance(model, ResNet):
        return [
            Removable(f"blocks/{i}/conv1", "relu", f"blocks/{i}/bn1", f"blocks/{i}/conv2", "conv_padded")
            for i in range(len(model.blocks))
        ]
    raise TypeError(f"hard pruning supports MLP, LeNet5, CNN1D and ResNet models, got {type(model).__name__}")


def _layer_name(name: str, layers: Sequence[str]) -> str:
    base = name.removesuffix("/kernel")
    if base not in layers:
        raise ValueError(f"keep names {name!r}, which is not a removable layer; choose from {list(layers)}")
    return base


def keep_from_masks(model: nnx.Module, masks: PyTree) -> dict[str, list[int]]:
    """Per removable layer, the indices of output units whose kernel column is not all pruned.

    Args:
      model: a jcompress model.
      masks: bool masks (structure of ``models.functional(model).params`` or the NNX
        State; e.g. ``make_masks(..., pattern='structured')``).

    Returns:
      ``{layer: sorted kept unit indices}`` for every removable layer.
    """
    fn = models.functional(model)
    flat = dict(jtree.named_leaves(as_mask_tree(fn.params, masks)))
    out = {}
    for r in removable_layers(model):
        m = np.asarray(flat[f"{r.layer}/kernel"])
        out[r.layer] = [int(j) for j in np.flatnonzero(m.reshape(-1, m.shape[-1]).any(axis=0))]
    return out


def _checked_keep(model: nnx.Module, keep: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    fn = models.functional(model)
    flat = dict(jtree.named_leaves(fn.params))
    plan = removable_layers(model)
    layers = [r.layer for r in plan]
    out = {r.layer: list(range(flat[f"{r.layer}/kernel"].shape[-1])) for r in plan}
    for name, idx in keep.items():
        layer = _layer_name(name, layers)
        width = flat[f"{layer}/kernel"].shape[-1]
        arr = np.asarray(idx)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"keep[{name!r}] must be a 1-D list of unit indices, got {idx!r}")
        arr = np.sort(arr.astype(np.int64))
        if arr.size == 0:
            raise ValueError(f"keep[{name!r}] is empty: a layer must keep at least one unit")
        if arr[0] < 0 or arr[-1] >= width or len(np.unique(arr)) != arr.size:
            raise ValueError(f"keep[{name!r}] must hold distinct indices in [0, {width}), got {idx!r}")
        out[layer] = [int(j) for j in arr]
    return out


def unit_masks(model: nnx.Module, keep: Mapping[str, Sequence[int]]) -> PyTree:
    """Masks that remove whole units: kernel column, bias entry and BatchNorm scale/bias.

    A unit masked this way outputs exactly 0, so :func:`hard_prune` removes it exactly
    from any model. Layers not named in ``keep`` keep all their units.

    Args:
      model: a jcompress model.
      keep: ``{layer or layer/kernel: kept unit indices}``.

    Returns:
      bool masks with the structure of ``models.functional(model).params``.
    """
    keep = _checked_keep(model, keep)
    fn = models.functional(model)
    alive = {}
    for r in removable_layers(model):
        units = np.zeros(jtree.get_by_name(fn.params, f"{r.layer}/kernel").shape[-1], bool)
        units[keep[r.layer]] = True
        for owner in (r.layer, r.bn):
            if owner is not None:
                alive[owner] = units

    def one(name, w):
        owner, _, leaf = name.rpartition("/")
        if owner in alive and leaf in ("kernel", "bias", "scale"):
            return jnp.broadcast_to(jnp.asarray(alive[owner]), jnp.shape(w))
        return jnp.ones(jnp.shape(w), bool)

    return jtree.map_with_names(one, fn.params)


def complete_masks(model: nnx.Module, masks: PyTree) -> PyTree:
    """``masks`` plus the bias and BatchNorm entries of every unit whose kernel column is pruned.

    Use it before training or fine-tuning with structured masks when the model has
    padded convolutions after the pruned layer (CNN1D, ResNet), so that pruned units
    output 0 and :func:`hard_prune` is exact.
    """
    fn = models.functional(model)
    masks = as_mask_tree(fn.params, masks)
    extra = unit_masks(model, keep_from_masks(model, masks))
    return jax.tree.map(jnp.logical_and, masks, extra)


class SurgeryResult(NamedTuple):
    """What :func:`hard_prune` returns.

    Attributes:
      model: the new, smaller NNX model.
      config: its ``models.create`` arguments (JSON-ready; save it with ``checkpoint.save_model``).
      keep: ``{layer: kept unit indices of the original layer}``.
    """

    model: nnx.Module
    config: dict
    keep: dict


def _infer_config(model: nnx.Module, config: dict | None) -> dict:
    if config is not None:
        if not isinstance(config, Mapping) or "name" not in config:
            raise ValueError(
                "config must be the dict of models.create arguments (with 'name', 'input_shape', 'num_classes')"
            )
        return dict(config)
    if isinstance(model, MLP):
        out = {
            "name": "mlp",
            "input_shape": [int(model.fc1.in_features)],
            "num_classes": int(getattr(model, f"fc{model.num_layers}").out_features),
        }
        if model.dropout.rate:
            out["dropout"] = float(model.dropout.rate)
        if model.input_dropout.rate:
            out["input_dropout"] = float(model.input_dropout.rate)
        return out
    raise ValueError(
        f"pass config= for a {type(model).__name__}: the dict of models.create arguments (name, input_shape, "
        "num_classes, ...) that checkpoint.load_model returns, since the input size cannot be read from the layers"
    )


def _new_config(model: nnx.Module, config: dict, keep: dict[str, list[int]]) -> dict:
    out = dict(config)
    out["input_shape"] = [int(d) for d in out["input_shape"]]
    if isinstance(model, MLP):
        if out["name"] == "lenet300":
            out["name"] = "mlp"
        out["widths"] = [len(keep[f"fc{i}"]) for i in range(1, model.num_layers)]
    elif isinstance(model, LeNet5):
        out["channels"] = [len(keep["conv1"]), len(keep["conv2"])]
        out["hidden"] = len(keep["fc1"])
    elif isinstance(model, CNN1D):
        out["channels"] = [len(keep[f"conv{i}"]) for i in range(1, len(model.channels) + 1)]
    elif isinstance(model, ResNet):
        out["widths"] = [int(w) for w in model.widths]
        out["mids"] = [len(keep[f"blocks/{i}/conv1"]) for i in range(len(model.blocks))]
    return out


def _unit_constants(r: Removable, p: dict, e: dict, bn_eps: float, gone: np.ndarray) -> np.ndarray:
    """Output of each removed unit (incoming weights all zero), in eval mode, float64."""
    bias = p.get(f"{r.layer}/bias")
    c = np.zeros(len(gone)) if bias is None else np.asarray(bias, np.float64)[gone]
    if r.bn is not None:
        mean = np.asarray(e[f"{r.bn}/mean"], np.float64)[gone]
        var = np.asarray(e[f"{r.bn}/var"], np.float64)[gone]
        scale = np.asarray(p[f"{r.bn}/scale"], np.float64)[gone]
        beta = np.asarray(p[f"{r.bn}/bias"], np.float64)[gone]
        c = (c - mean) / np.sqrt(var + bn_eps) * scale + beta
    return np.maximum(c, 0.0) if r.act == "relu" else c


def _fold_and_slice(r: Removable, p: dict, keep: list[int], gone: np.ndarray, c: np.ndarray) -> None:
    """Fold the removed units' constants into the consumer's bias and drop its input rows (in place on ``p``)."""
    w = np.asarray(p[f"{r.consumer}/kernel"])
    bias_name = f"{r.consumer}/bias"
    nonzero = np.flatnonzero(c != 0)
    if r.kind == "dense":
        shift = c @ np.asarray(w[gone], np.float64)
        w = w[keep]
    elif r.kind == "flatten":
        channels = p[f"{r.layer}/kernel"].shape[-1]
        grid = w.reshape(-1, channels, w.shape[-1])  # (positions, channels, out): rows in (h, w, c) order
        shift = np.einsum("pjo,j->o", np.asarray(grid[:, gone], np.float64), c)
        w = grid[:, keep].reshape(-1, w.shape[-1])
    elif r.kind == "conv_valid":
        spatial = tuple(range(w.ndim - 2))
        shift = np.asarray(w[..., gone, :], np.float64).sum(axis=spatial).T @ c if len(gone) else 0.0
        w = w[..., keep, :]
    else:
        if nonzero.size:
            j = int(gone[nonzero[0]])
            raise ValueError(
                f"{r.layer} unit {j} outputs the constant {c[nonzero[0]]:.6g} once its filter is pruned, and "
                f"{r.consumer} (a padded convolution) sees a constant channel differently at the border, so "
                f"removing it would change the outputs. Mask its bias{' and ' + r.bn + ' scale/bias' if r.bn else ''} "
                "too: pass complete_masks(model, masks), or keep= lists (which remove units entirely)."
            )
        shift = 0.0
        w = w[..., keep, :]
    if nonzero.size:
        if bias_name not in p:
            raise ValueError(f"{r.consumer} has no bias to absorb the constant outputs of removed {r.layer} units")
        p[bias_name] = (np.asarray(p[bias_name], np.float64) + shift).astype(p[bias_name].dtype)
    p[f"{r.consumer}/kernel"] = w


def hard_prune(
    model: nnx.Module,
    masks: PyTree | None = None,
    *,
    keep: Mapping[str, Sequence[int]] | None = None,
    config: dict | None = None,
) -> SurgeryResult:
    """A new, smaller dense model without the pruned units of ``model``.

    Exactly one of ``masks`` and ``keep`` is given.

    * ``masks``: the new model computes what ``model`` computes with ``apply_masks(params,
      masks)`` (eval mode, BatchNorm with its running statistics), to float32 rounding.
      A unit is removed when its whole kernel column is pruned (as with
      ``make_masks(..., pattern='structured')``); all other masked entries stay as zeros.
    * ``keep``: ``{layer: kept unit indices}`` (``'fc1'`` or ``'fc1/kernel'``); the
      others are deleted entirely, i.e. the new model equals ``model`` masked with
      :func:`unit_masks`.

    Args:
      model: an ``MLP`` (LeNet-300-100), ``LeNet5``, ``CNN1D`` or ``ResNet`` from ``jcompress.models``.
      masks: bool masks (structure of ``models.functional(model).params`` or the NNX State).
      keep: per-layer kept unit indices.
      config: the ``models.create`` arguments of ``model`` (as ``checkpoint.load_model``
        returns them); inferred for MLPs, required for the others.

    Returns:
      :class:`SurgeryResult` ``(model, config, keep)``; the model's params and
      BatchNorm statistics are float32 arrays of the smaller shapes.

    Raises:
      ValueError: both or neither of ``masks``/``keep``; a layer losing all its units;
        a removed unit with a nonzero constant output before a padded convolution;
        masks or keep not matching the model; a config that does not rebuild the model.
      TypeError: an unsupported model type.
    """
    plan = removable_layers(model)
    if (masks is None) == (keep is None):
        raise ValueError("pass exactly one of masks= (bool masks) or keep= ({layer: kept unit indices})")
    fn = models.functional(model)
    if masks is not None:
        masks = as_mask_tree(fn.params, masks)
        keep = keep_from_masks(model, masks)
        for layer, idx in keep.items():
            if not idx:
                raise ValueError(f"masks prune every unit of {layer}; a layer must keep at least one unit")
    else:
        keep = _checked_keep(model, keep)
        masks = unit_masks(model, keep)
    config = _infer_config(model, config)
    p = {n: np.asarray(x) for n, x in jtree.named_leaves(apply_masks(fn.params, masks))}
    e = {n: np.asarray(x) for n, x in jtree.named_leaves(fn.extra)}
    eps = {r.bn: float(_module_at(model, r.bn).epsilon) for r in plan if r.bn is not None}
    for r in plan:
        width = p[f"{r.layer}/kernel"].shape[-1]
        kept = keep[r.layer]
        gone = np.setdiff1d(np.arange(width), kept)
        c = _unit_constants(r, p, e, eps.get(r.bn, 0.0), gone)
        _fold_and_slice(r, p, kept, gone, c)
        p[f"{r.layer}/kernel"] = p[f"{r.layer}/kernel"][..., kept]
        for owner, tree_ in ((r.layer, p), (r.bn, p), (r.bn, e)):
            for leaf in ("bias", "scale", "mean", "var"):
                name = f"{owner}/{leaf}"
                if owner is not None and name in tree_:
                    tree_[name] = tree_[name][kept]
    new_config = _new_config(model, config, keep)
    try:  # shapes only: the new arrays come from surgery, so no initialiser needs to run
        new_model = nnx.eval_shape(lambda: models.create(**new_config))
    except TypeError as err:
        raise ValueError(f"config {config!r} does not rebuild this model: {err}") from None
    new_fn = models.functional(new_model)
    for target, values, what in ((new_fn.params, p, "params"), (new_fn.extra, e, "extra")):
        for name, leaf in jtree.named_leaves(target):
            if name not in values or tuple(values[name].shape) != tuple(jnp.shape(leaf)):
                got = None if name not in values else values[name].shape
                raise ValueError(
                    f"{what}/{name}: the model built from config has shape {jnp.shape(leaf)} but surgery produced "
                    f"{got}; is config= the configuration of this model?"
                )
    new_params = jtree.map_with_names(lambda n, x: jnp.asarray(p[n], x.dtype), new_fn.params)
    new_extra = jtree.map_with_names(lambda n, x: jnp.asarray(e[n], x.dtype), new_fn.extra)
    return SurgeryResult(models.merge(new_model, new_params, new_extra), new_config, keep)


def _module_at(model: nnx.Module, path: str) -> nnx.Module:
    node = model
    for part in path.split("/"):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def hard_prune_report(
    before: nnx.Module,
    after: nnx.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 256,
    repeats: int = 20,
) -> dict:
    """Parameters, FLOPs and measured latency of two models, and their ratios.

    FLOPs are ``report.layer_flops`` per example (Dense/Conv kernels, 2 per
    multiply-add); latency is ``report.measure_latency`` (median of ``repeats``, after
    warm-up) of the jitted eval-mode forward pass on a ``(batch_size, *input_shape)``
    float32 batch.

    Returns:
      ``{'before': {...}, 'after': {...}, 'params_ratio', 'flops_ratio', 'latency_ratio'}``
      with each ratio ``before / after``.
    """
    from jcompress import report

    def measure(model):
        fn = models.functional(model)
        forward = jax.jit(lambda p, e, x: fn.apply(p, e, x)[0])
        x = jnp.zeros((batch_size, *input_shape), jnp.float32)
        return {
            "params": jtree.tree_size(fn.params),
            "flops": int(sum(report.layer_flops(model, input_shape).values())),
            "latency_s": report.measure_latency(forward, fn.params, fn.extra, x, repeats=repeats),
        }

    b, a = measure(before), measure(after)
    ratio = lambda k: b[k] / a[k] if a[k] else math.inf
    return {
        "before": b,
        "after": a,
        "params_ratio": ratio("params"),
        "flops_ratio": ratio("flops"),
        "latency_ratio": ratio("latency_s"),
        "batch_size": batch_size,
    }
