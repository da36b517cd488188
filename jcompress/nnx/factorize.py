"""Factorised layers: replace Dense and conv layers of any NNX model by two thin ones.

:func:`jcompress.lowrank.svd` replaces a kernel ``W`` by its rank-``r`` truncation
``W_r = US V`` but keeps the shape, so it saves nothing by itself. :func:`factorize` is
the model transform that cashes it in: each chosen ``nnx.Linear`` becomes a
:class:`FactorizedLinear` (``x -> (x US) V``, ``r (in + out)`` weights instead of
``in * out``) and each ``nnx.Conv`` a :class:`FactorizedConv` (a ``kh x kw`` conv to ``r``
channels, then a 1x1 conv). Layers are chosen by their kernel leaves: the layer of
``fc1/kernel`` is ``fc1``; ``jc.masked(factorize(...), selection)`` picks some of them.

Saving and loading: save the factorised model's state with ``checkpoint.save_model`` and
``aux.ranks`` in its metadata; :func:`rebuild` gives the structure to restore into::

  checkpoint.save_model(d, config, params, extra, meta={'factorize': {'ranks': aux.ranks}})
  model, config, meta = checkpoint.load_model(
      d, build=lambda meta: rebuild(models.create(**meta['model']), meta['factorize']['ranks']))

Example:
  >>> small, aux = jc.masked(factorize(rank={'fc1': 64, 'fc2': 32}), r'fc[12]/kernel')(model)
  >>> aux.ranks
  {'fc1/kernel': 64, 'fc2/kernel': 32}
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import lowrank, tree
from jcompress.core import base
from jcompress.core import spec as spec_lib
from jcompress.nnx import hooks

__all__ = ["FactorizedConv", "FactorizedLinear", "compare_latency", "factorize", "rebuild"]


class FactorizedLinear(nnx.Module):
    """``x -> v(u(x))``: a Dense layer ``in -> out`` through a rank-``r`` bottleneck.

    ``u`` is an ``nnx.Linear(in, rank, use_bias=False)`` and ``v`` an
    ``nnx.Linear(rank, out, use_bias=use_bias)``, so the parameters are named
    ``u/kernel`` ``(in, rank)``, ``v/kernel`` ``(rank, out)`` and ``v/bias`` ``(out,)``:
    ``rank * (in + out)`` weights instead of ``in * out``. Inputs ``(..., in)``, outputs ``(..., out)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.u = nnx.Linear(in_features, rank, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(rank, out_features, use_bias=use_bias, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.v(self.u(x))


class FactorizedConv(nnx.Module):
    """``x -> v(u(x))``: a convolution ``cin -> cout`` through ``rank`` channels.

    ``u`` is an ``nnx.Conv(cin, rank)`` with the original kernel size, strides, padding and
    dilations and no bias; ``v`` a 1x1 ``nnx.Conv(rank, cout)`` with the bias. Its output
    equals the original convolution with the kernel ``(kh, kw, cin, cout)`` replaced by
    ``reshape(U V)``, where ``U V`` factors the matrix ``(kh*kw*cin, cout)``:
    ``rank * (kh*kw*cin + cout)`` weights instead of ``kh*kw*cin*cout``.
    """

    def __init__(self, conv: nnx.Conv, rank: int, *, rngs: nnx.Rngs):
        self.rank = int(rank)
        dtype = conv.kernel.get_value().dtype
        self.u = nnx.Conv(
            conv.in_features,
            rank,
            conv.kernel_size,
            conv.strides,
            padding=conv.padding,
            input_dilation=conv.input_dilation,
            kernel_dilation=conv.kernel_dilation,
            use_bias=False,
            param_dtype=dtype,
            rngs=rngs,
        )
        ones = (1,) * len(conv.kernel_size)
        self.v = nnx.Conv(
            rank, conv.out_features, ones, padding="VALID", use_bias=conv.use_bias, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.v(self.u(x))


def _layers(model: nnx.Module) -> dict[str, nnx.Linear | nnx.Conv]:
    """The factorisable layers by path: every ``nnx.Linear``, and every ``nnx.Conv`` without
    groups or a kernel mask (a grouped kernel is not one matrix)."""
    return {
        "/".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
        or (isinstance(node, nnx.Conv) and node.feature_group_count == 1 and node.mask is None)
    }


def _check_leaves(layers: dict, names) -> None:
    for name in names:
        layer = spec_lib.layer_of(name)
        if layer not in layers or not name.endswith("/kernel"):
            raise ValueError(
                f"leaf {name!r} is not the kernel of an nnx.Linear or ungrouped nnx.Conv, so it cannot be factorised; "
                f"the factorisable kernels are {sorted(n + '/kernel' for n in layers)[:12]}"
            )


def rebuild(model: nnx.Module, ranks: Mapping[str, int]) -> nnx.Module:
    """A copy of ``model`` with the named layers swapped for factorised ones (placeholder weights).

    Args:
      model: an NNX model; not modified.
      ranks: ``{kernel leaf name: rank}``, as ``FactorAux.ranks`` (``{'fc1/kernel': 32}``).

    Returns:
      the structure to restore saved weights into: ``nnx.Linear`` layers become
      :class:`FactorizedLinear`, ``nnx.Conv`` layers :class:`FactorizedConv`.

    Raises:
      ValueError: a name that is not a factorisable kernel, or a rank outside 1..min(m, n).
    """
    layers = _layers(model)
    _check_leaves(layers, ranks)
    new = nnx.clone(model)
    rngs = nnx.Rngs(0)
    for name, r in ranks.items():
        layer = layers[spec_lib.layer_of(name)]
        k = layer.kernel.get_value()
        full = min(int(np.prod(k.shape[:-1])), int(k.shape[-1]))
        r = spec_lib.check_value(r, arg=f"rank of {name!r}", kind=int, lo=1, hi=full)
        if isinstance(layer, nnx.Conv):
            hooks.replace(new, spec_lib.layer_of(name), FactorizedConv(layer, r, rngs=rngs))
        else:
            hooks.replace(
                new,
                spec_lib.layer_of(name),
                FactorizedLinear(k.shape[0], k.shape[1], r, use_bias=layer.bias is not None, dtype=k.dtype, rngs=rngs),
            )
    return new


def factorize(
    *,
    rank: spec_lib.Spec = None,
    energy: spec_lib.Spec = None,
    budget: spec_lib.Spec = None,
    method: str = "exact",
) -> base.ModelTransform:
    """Replace Dense and conv layers by their rank-``r`` SVD factorisation (model surgery).

    Args:
      rank, energy, budget: exactly one rank rule of :func:`jcompress.lowrank.svd`, as a
        spec over kernel leaf names: one value, or ``{regex: value}`` / ``[(regex, value)]``
        (``{'fc1': 64, 'fc2': 32}``; first match wins, every chosen kernel covered).
      method: ``'exact'`` or ``'randomized'`` (then call the transform with ``key=``).

    Returns:
      a :class:`~jcompress.core.base.ModelTransform`; ``t(model, *, key=None)`` returns
      ``(new_model, FactorAux)``. The chosen kernels are every Dense and conv kernel
      (``jc.masked`` picks some); each ``nnx.Linear`` becomes a :class:`FactorizedLinear`
      with ``u/kernel = U_r S_r`` and ``v/kernel = V_r^T`` (and the original bias in ``v``),
      each ``nnx.Conv`` a :class:`FactorizedConv` with the same factors reshaped to a
      ``kh x kw`` conv and a 1x1 conv. Each layer computes what the original computes with
      its kernel replaced by the rank-``r`` truncation. ``aux`` is ``lowrank.svd``'s,
      keyed by kernel leaf (``'fc1/kernel'``); ``model`` is not modified.

    Raises:
      ValueError: a chosen leaf that is not the kernel of an ``nnx.Linear`` or an
        ungrouped ``nnx.Conv``, and every error of ``lowrank.svd`` (bad rank rules).

    Example:
      >>> small, aux = jc.masked(factorize(rank=32), r'fc[12]/kernel')(model)
      >>> sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param)))  # fewer weights
    """
    svd = lowrank.svd(rank=rank, energy=energy, budget=budget, method=method)

    def apply(model, names, key):
        layers = _layers(model)
        _check_leaves(layers, names)
        params = nnx.state(model, nnx.Param)
        tree.check_finite({n: v for n, v in tree.named_leaves(params) if n in names}, "model")
        _, aux = svd.apply(params, names, key)
        new = rebuild(model, aux.ranks)
        new_layers = _layers(new)
        for name in names:
            layer = spec_lib.layer_of(name)
            kernel = layers[layer].kernel.get_value()
            us, v = aux.factors[name]
            u_layer, v_layer = new_layers[layer + "/u"], new_layers[layer + "/v"]
            u_layer.kernel.set_value(us.reshape(u_layer.kernel.shape).astype(kernel.dtype))
            v_layer.kernel.set_value(v.reshape(v_layer.kernel.shape).astype(kernel.dtype))
            if layers[layer].bias is not None:
                v_layer.bias.set_value(layers[layer].bias.get_value())
        return new, aux

    return base.ModelTransform(apply, "factorize")


def compare_latency(
    dense: nnx.Module, factorized: nnx.Module, x: jax.Array, *, warmup: int = 3, repeats: int = 20
) -> dict[str, float]:
    """Median jitted forward time, parameter count and FLOPs of two models on the same input.

    Args:
      dense, factorized: NNX models (e.g. the input and output of :func:`factorize`).
      x: a batch ``(N, *input_shape)``.
      warmup, repeats: untimed and timed calls of each model, interleaved
        (``jcompress.timing.compare``).

    Returns:
      ``{'dense_s', 'factorized_s', 'speedup', 'dense_params', 'factorized_params',
      'dense_flops', 'factorized_flops'}`` (FLOPs per example of the traced forward pass,
      :func:`jcompress.nnx.surgery.forward_flops`; times after compilation).
    """
    from jcompress import timing
    from jcompress.nnx import surgery

    out: dict[str, float] = {}
    calls = {}
    for label, model in (("dense", dense), ("factorized", factorized)):
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, inp, g=graphdef: nnx.merge(g, s)(inp))
        calls[label] = lambda fwd=fwd, state=state: fwd(state, x)
        out[f"{label}_params"] = base.params_count(nnx.state(model, nnx.Param))
        out[f"{label}_flops"] = sum(surgery.forward_flops(model, tuple(x.shape[1:]), dtype=x.dtype).values())
    for label, t in timing.compare(calls, repeats=repeats, warmup=warmup).items():
        out[f"{label}_s"] = t.median
    out["speedup"] = out["dense_s"] / out["factorized_s"]
    return out
