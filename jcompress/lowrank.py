"""Low-rank factorisation of weight matrices by truncated SVD, and factorised Dense layers.

A weight matrix ``W`` of shape ``(m, n)`` with singular values ``s_1 >= s_2 >= ...`` is
replaced by its best rank-``r`` approximation ``W_r = (U_r S_r) V_r^T`` (Eckart-Young);
the relative squared error is exactly ``sum_{i > r} s_i^2 / sum_i s_i^2``. Conv kernels
``(kh, kw, cin, cout)`` are factorised as the matrix ``(kh*kw*cin, cout)``.

:func:`svd` is the params transform: it returns dense leaves of the same shapes holding
``W_r``, plus the factors (:class:`jcompress.core.base.FactorAux`). It saves nothing by
itself; it tells how much accuracy a rank costs. The model surgery that really swaps a
layer for two thin ones lives with the other model-level operations.

The rank is chosen per leaf by a fixed ``rank``, by the fraction ``energy`` of the
singular-value energy ``sum s_i^2`` to keep, or by a parameter ``budget``
(``r (m + n) <= budget * m * n``); each is a spec (one value, or ``{regex: value}``).
``method='randomized'`` uses the randomised range finder of Halko, Martinsson & Tropp
(2011) with oversampling and power iterations, which costs ``O(m n (r + p))`` instead of
a full SVD.

Example:
  >>> new_params, aux = svd(energy=0.9)(params)      # aux.ranks: {'fc1/kernel': r1, ...}
  >>> new_params, aux = svd(rank={'fc1': 64, 'fc2': 32})(params)
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.core import base
from jcompress.core import spec as spec_lib

__all__ = [
    "FactorizedConv",
    "FactorizedLinear",
    "LowRankAux",
    "choose_rank",
    "compare_latency",
    "factorize_dense",
    "load",
    "randomized_svd",
    "rebuild",
    "save",
    "svd",
]

METHODS = ("exact", "randomized")
RULES = ("rank", "energy", "budget")


class LowRankAux(NamedTuple):
    """What :func:`factorize_dense` did, keyed by leaf name.

    Attributes:
      factors: ``{name: (US, V)}`` with ``US`` ``(m, r)`` (left singular vectors times the
        singular values) and ``V`` ``(r, n)``, so that the matrix view of the leaf is
        approximated by ``US @ V``.
      ranks: ``{name: r}`` (Python ints).
      errors: ``{name: ||W - W_r||_F}`` (scalar arrays).
      discarded_energy: ``{name: 1 - sum_{i<=r} s_i^2 / ||W||_F^2}`` (scalar arrays).
    """

    factors: dict
    ranks: dict
    errors: dict
    discarded_energy: dict


# ----------------------------------------------------------------------------------------
# Rank selection and the SVDs
# ----------------------------------------------------------------------------------------


def _check_rule(rank=None, energy=None, budget=None) -> None:
    given = [n for n, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of rank=, energy=, budget= (got {given or 'none'}).")
    if rank is not None:
        spec_lib.check_value(rank, arg="rank", kind=int, lo=1)
    if energy is not None:
        spec_lib.check_value(energy, arg="energy", kind=float, lo=0.0, hi=1.0, lo_open=True)
    if budget is not None:
        spec_lib.check_value(budget, arg="budget", kind=float, lo=0.0, hi=1.0, lo_open=True)


def choose_rank(
    shape: tuple[int, int],
    s: jax.Array | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: float | None = None,
) -> int:
    """The rank for a matrix of ``shape = (m, n)`` by exactly one rule.

    Args:
      shape: the matrix shape.
      s: its singular values (descending); needed for ``energy`` only.
      rank: a fixed rank, 1..min(m, n).
      energy: the smallest ``r`` with ``sum_{i<=r} s_i^2 >= energy * sum s_i^2``.
      budget: the largest ``r`` with ``r (m + n) <= budget * m * n`` (capped at min(m, n)).

    Raises:
      ValueError: for a rank outside 1..min(m, n), energy outside (0, 1], a budget that
        leaves no rank, or energy under ``jit`` (the rank would depend on traced values).
    """
    _check_rule(rank, energy, budget)
    m, n = shape
    full = min(m, n)
    if rank is not None:
        if rank > full:
            raise ValueError(f"rank={rank} exceeds min{tuple(shape)} = {full}.")
        return int(rank)
    if budget is not None:
        r = min(int(np.floor(budget * m * n / (m + n))), full)
        if r < 1:
            raise ValueError(
                f"budget={budget} leaves less than one rank for shape {tuple(shape)} (rank 1 needs "
                f"budget >= {(m + n) / (m * n):.4g})."
            )
        return r
    if isinstance(s, jax.core.Tracer):
        raise ValueError("energy= picks a data-dependent rank, which jax.jit cannot trace; call eagerly or pass rank=.")
    sq = np.asarray(s, np.float64) ** 2
    total = sq.sum()
    if total == 0.0:
        return 1
    cum = np.cumsum(sq) / total
    return int(min(np.searchsorted(cum, energy - 1e-12) + 1, full))


def randomized_svd(
    a: jax.Array, k: int, *, key: jax.Array, power_iters: int = 2
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Approximate top-``k`` SVD of ``a`` ``(m, n)`` (Halko et al. 2011, Algorithms 4.4 and 5.1).

    A Gaussian test matrix ``(n, k)`` samples the range of ``a``; ``power_iters`` rounds of
    re-orthonormalised power iteration sharpen it when the spectrum decays slowly.

    Returns:
      ``(u (m, k), s (k,), vt (k, n))`` with orthonormal columns of ``u`` / rows of ``vt``.
    """
    omega = jax.random.normal(key, (a.shape[1], k), a.dtype)
    q, _ = jnp.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(a.T @ q)
        q, _ = jnp.linalg.qr(a @ z)
    ub, s, vt = jnp.linalg.svd(q.T @ a, full_matrices=False)
    return q @ ub, s, vt


def _truncate_matrix(a, *, rank, energy, budget, method, key, oversample, power_iters):
    """``(a_r, (US, V), r, error, discarded energy fraction)`` for one matrix."""
    m, n = a.shape
    if method == "exact":
        u, s, vt = jnp.linalg.svd(a, full_matrices=False)
        r = choose_rank((m, n), s, rank=rank, energy=energy, budget=budget)
    else:
        r = choose_rank((m, n), None, rank=rank, budget=budget)
        u, s, vt = randomized_svd(a, min(r + oversample, m, n), key=key, power_iters=power_iters)
    us, v = u[:, :r] * s[:r], vt[:r]
    a_r = us @ v
    total = jnp.sum(jnp.square(a))
    kept = jnp.sum(jnp.square(s[:r]))
    discarded = jnp.where(total > 0, jnp.clip(1.0 - kept / jnp.where(total > 0, total, 1.0), 0.0, 1.0), 0.0)
    return a_r, (us, v), r, jnp.linalg.norm((a - a_r).ravel()), discarded


def svd(
    *,
    rank: spec_lib.Spec = None,
    energy: spec_lib.Spec = None,
    budget: spec_lib.Spec = None,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
) -> base.Transform:
    """Replace each kernel (or conv kernel) by its rank-``r`` truncated SVD.

    Args:
      rank, energy, budget: exactly one rank rule (see :func:`choose_rank`), as a spec: one
        value for every leaf, or ``{regex: value}`` / ``[(regex, value)]`` over leaf names
        (first match wins; every touched leaf must be covered).
      method: ``'exact'`` (``jnp.linalg.svd``) or ``'randomized'`` (Halko et al.; the
        transform then needs ``key`` at call time; not with ``energy``, whose rank is
        unknown before the SVD). Leaf ``i`` of the touched leaves uses ``fold_in(key, i)``.
      oversample, power_iters: extra sample columns and power iterations of the randomised SVD.

    Returns:
      a :class:`~jcompress.core.base.Transform`; ``t(params, *, key=None)`` returns
      ``(new_params, FactorAux)``. ``new_params`` has the structure, shapes and dtypes of
      ``params``; a touched leaf of shape ``(..., n)`` (Dense and conv kernels by default,
      see :func:`jcompress.core.base.masked`) holds ``W_r`` computed on its matrix view
      ``(prod(...), n)``; other leaves are unchanged. ``aux.factors[name] = (us, v)``,
      ``us`` ``(m, r)`` and ``v`` ``(r, n)`` float32; ``aux.ranks[name] = r``;
      ``aux.errors[name] = ||W - W_r||_F^2 / ||W||_F^2``. Jit-able with ``rank`` or ``budget``.

    Raises:
      ValueError naming the argument or the leaf: bad rule values, a rank above
        min(m, n), a touched leaf with fewer than two dimensions, NaN/Inf; TypeError for
        integer leaves.

    Example:
      >>> new_params, aux = jc.masked(svd(rank=32), 'fc1/kernel')(params)
      >>> us, v = aux.factors['fc1/kernel']   # (784, 32), (32, 300)
    """
    given = [(n, v) for n, v in zip(RULES, (rank, energy, budget)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of rank=, energy=, budget= (got {[n for n, _ in given] or 'none'}).")
    rule, rule_spec = given[0]
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}.")
    if method == "randomized" and rule == "energy":
        raise ValueError("method='randomized' cannot choose a rank by energy; pass rank= or budget=, or method='exact'.")
    oversample = spec_lib.check_value(oversample, arg="oversample", kind=int, lo=0)
    power_iters = spec_lib.check_value(power_iters, arg="power_iters", kind=int, lo=0)
    if not spec_lib.is_pairs(rule_spec):
        _check_rule(**{rule: rule_spec})

    def apply(params, names, key):
        if method == "randomized":
            key = base.require_key(key, what="svd(method='randomized')")
        values = spec_lib.resolve(rule_spec, names, arg=rule)
        leaves = dict(tree.named_leaves(params))
        tree.check_finite({n: leaves[n] for n in names})
        factors, ranks, errors = {}, {}, {}
        updates = {}
        for i, name in enumerate(names):
            w = tree.as_float_array(leaves[name], name)
            if w.ndim < 2:
                raise ValueError(f"leaf {name!r} has shape {tuple(w.shape)}; low-rank needs a matrix or a conv kernel.")
            a = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
            try:
                _check_rule(**{rule: values[name]})
                a_r, (us, v), r, _, _ = _truncate_matrix(
                    a,
                    **{k: values[name] if k == rule else None for k in RULES},
                    method=method,
                    key=None if key is None else jax.random.fold_in(key, i),
                    oversample=oversample,
                    power_iters=power_iters,
                )
            except (TypeError, ValueError) as e:
                raise type(e)(f"leaf {name!r}: {e}") from None
            factors[name], ranks[name] = (us, v), r
            errors[name] = base.relative_error(a, a_r)
            updates[name] = a_r.reshape(w.shape).astype(w.dtype)
        return tree.set_by_name(params, updates), base.FactorAux(factors, ranks, errors)

    return base.Transform(apply, "svd")


# ----------------------------------------------------------------------------------------
# Surgery: nnx.Linear -> FactorizedLinear
# ----------------------------------------------------------------------------------------


class FactorizedLinear(nnx.Module):
    """``x -> v(u(x))``: a Dense layer ``in -> out`` through a rank-``r`` bottleneck.

    ``u`` is an ``nnx.Linear(in, rank, use_bias=False)`` and ``v`` an
    ``nnx.Linear(rank, out, use_bias=use_bias)``, so the parameters are named
    ``u/kernel`` ``(in, rank)``, ``v/kernel`` ``(rank, out)`` and ``v/bias`` ``(out,)``:
    ``rank * (in + out)`` weights instead of ``in * out``. Inputs ``(..., in)``, outputs ``(..., out)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.u = nnx.Linear(in_features, rank, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(rank, out_features, use_bias=use_bias, rngs=rngs)

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
        self.u = nnx.Conv(
            conv.in_features,
            rank,
            conv.kernel_size,
            conv.strides,
            padding=conv.padding,
            input_dilation=conv.input_dilation,
            kernel_dilation=conv.kernel_dilation,
            use_bias=False,
            rngs=rngs,
        )
        ones = (1,) * len(conv.kernel_size)
        self.v = nnx.Conv(rank, conv.out_features, ones, padding="VALID", use_bias=conv.use_bias, rngs=rngs)

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


def _matrix_shape(layer) -> tuple[int, int]:
    """The kernel as the matrix that is factorised: ``(fan_in, out)``."""
    k = layer.kernel.shape
    return int(np.prod(k[:-1])), int(k[-1])


def _replace(model: nnx.Module, name: str, new: nnx.Module) -> None:
    *parents, last = name.split("/")
    node = model
    for p in parents:
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    if last.isdigit():
        node[int(last)] = new
    else:
        setattr(node, last, new)


def _layer_ranks(layers: dict, ranks, rank_fraction, include, exclude) -> dict[str, int]:
    if (ranks is None) == (rank_fraction is None):
        raise ValueError("pass exactly one of ranks={layer: rank} or rank_fraction=.")
    if ranks is not None:
        unknown = sorted(set(ranks) - set(layers))
        if unknown:
            raise ValueError(
                f"ranks names {unknown}, which are not nnx.Linear or nnx.Conv layers; the layers are {sorted(layers)}."
            )
        chosen = dict(ranks)
    else:
        if not 0.0 < rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction={rank_fraction!r} must be in (0, 1].")
        sel = tree.select({n: 0 for n in layers}, include if include is not None else ".*", exclude)
        chosen = {}
        for n, picked in tree.named_leaves(sel):
            if picked:
                chosen[n] = max(1, round(rank_fraction * min(_matrix_shape(layers[n]))))
    for n, r in chosen.items():
        k = _matrix_shape(layers[n])
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= min(k):
            raise ValueError(
                f"rank {r!r} for layer {n!r} must be an integer in 1..{min(k)} (kernel as a {k[0]}x{k[1]} matrix)."
            )
    return {n: int(r) for n, r in chosen.items()}


def rebuild(model: nnx.Module, ranks: dict[str, int], *, seed: int = 0) -> nnx.Module:
    """A copy of ``model`` with the named layers swapped for fresh factorised ones.

    ``nnx.Linear`` layers become :class:`FactorizedLinear`, ``nnx.Conv`` layers
    :class:`FactorizedConv`. The new layers are randomly initialised (from ``seed``); this
    gives the structure to restore saved weights into (see :func:`load`). ``model`` is not
    modified.
    """
    layers = _layers(model)
    ranks = _layer_ranks(layers, ranks, None, None, None)
    new = nnx.clone(model)
    rngs = nnx.Rngs(seed)
    for name, r in ranks.items():
        layer = layers[name]
        if isinstance(layer, nnx.Conv):
            _replace(new, name, FactorizedConv(layer, r, rngs=rngs))
        else:
            k = layer.kernel.shape
            _replace(new, name, FactorizedLinear(k[0], k[1], r, use_bias=layer.bias is not None, rngs=rngs))
    return new


def factorize_dense(
    model: nnx.Module,
    *,
    ranks: dict[str, int] | None = None,
    rank_fraction: float | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> tuple[nnx.Module, LowRankAux]:
    """Replace Dense and conv layers by their rank-``r`` SVD factorisation (model surgery).

    Args:
      model: an NNX model; not modified.
      ranks: ``{layer name: r}`` with names as paths in the model (``'fc1'``, ``'blocks/0/mlp'``).
      rank_fraction: instead of ``ranks``, ``r = round(rank_fraction * min(in, out))`` for
        every ``nnx.Linear`` and ``nnx.Conv`` matched by ``include`` (regexes over layer
        names; default all) and not by ``exclude``; for a conv ``in = kh*kw*cin``.

    Returns:
      ``(new_model, LowRankAux)``: a copy of ``model`` where each chosen ``nnx.Linear`` is
      a :class:`FactorizedLinear` with ``u/kernel = U_r S_r`` and ``v/kernel = V_r^T`` (and
      the original bias in ``v``), and each ``nnx.Conv`` a :class:`FactorizedConv` with the
      same factors reshaped to a ``kh x kw`` conv and a 1x1 conv; each output equals the
      original layer with its kernel replaced by the exact rank-``r`` truncation. ``aux``
      is keyed by ``'<layer>/kernel'``.

    Raises:
      ValueError: for unknown layer names, ranks outside 1..min(in, out), both or neither
        of ``ranks`` / ``rank_fraction``.

    Example:
      >>> small, aux = factorize_dense(model, ranks={'fc1': 32, 'fc2': 32})
      >>> sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param)))  # fewer weights
    """
    layers = _layers(model)
    chosen = _layer_ranks(layers, ranks, rank_fraction, include, exclude)
    new = rebuild(model, chosen)
    new_layers = _layers(new)
    aux = LowRankAux({}, {}, {}, {})
    for name, r in chosen.items():
        kernel = layers[name].kernel.get_value()
        tree.check_finite({name: kernel}, "model")
        _, factors, _, err, disc = _truncate_matrix(
            kernel.reshape(_matrix_shape(layers[name])).astype(jnp.float32),
            rank=r,
            energy=None,
            budget=None,
            method="exact",
            key=None,
            oversample=0,
            power_iters=0,
        )
        u, v = new_layers[name + "/u"], new_layers[name + "/v"]
        u.kernel.set_value(factors[0].reshape(u.kernel.shape).astype(kernel.dtype))
        v.kernel.set_value(factors[1].reshape(v.kernel.shape).astype(kernel.dtype))
        if layers[name].bias is not None:
            v.bias.set_value(layers[name].bias.get_value())
        key = f"{name}/kernel"
        aux.factors[key], aux.ranks[key], aux.errors[key], aux.discarded_energy[key] = factors, r, err, disc
    return new, aux


# ----------------------------------------------------------------------------------------
# Saving, loading and timing a factorised model
# ----------------------------------------------------------------------------------------


def save(directory: str | Path, model: nnx.Module, *, config: dict, ranks: dict[str, int], step: int = 0) -> None:
    """Save a factorised model with orbax: its params/extra plus ``{'model': config, 'lowrank': {'ranks': ranks}}``.

    ``config`` holds the arguments of ``models.create`` for the *base* model (before
    factorisation); ``ranks`` is the dict given to :func:`factorize_dense` (or ``aux.ranks``
    with the ``/kernel`` suffixes removed).
    """
    from jcompress import checkpoint, models

    fn = models.functional(model)
    checkpoint.save_model(directory, config, fn.params, fn.extra, step=step, meta={"lowrank": {"ranks": dict(ranks)}})


def load(directory: str | Path, step: int | None = None) -> tuple[nnx.Module, dict, dict]:
    """Rebuild a model saved by :func:`save`: ``models.create(**config)``, :func:`rebuild`, restore.

    Returns:
      ``(model, config, meta)`` like ``checkpoint.load_model``.
    """
    from jcompress import checkpoint, models

    def build(meta):
        if "lowrank" not in meta:
            raise ValueError(f"{directory} was not written by jcompress.lowrank.save (no rank dict in its metadata)")
        return rebuild(models.create(**meta["model"]), meta["lowrank"]["ranks"])

    return checkpoint.load_model(directory, step, build=build)


def compare_latency(
    dense: nnx.Module, factorized: nnx.Module, x: jax.Array, *, warmup: int = 3, repeats: int = 20
) -> dict[str, float]:
    """Median jitted forward time, parameter count and FLOPs of two models on the same input.

    Args:
      dense, factorized: NNX models (e.g. the input and output of :func:`factorize_dense`).
      x: a batch ``(N, *input_shape)``.

    Returns:
      ``{'dense_s', 'factorized_s', 'speedup', 'dense_params', 'factorized_params',
      'dense_flops', 'factorized_flops'}`` (FLOPs per example from ``report.layer_flops``;
      times from ``report.measure_latency`` after compilation).
    """
    from jcompress import report

    out: dict[str, float] = {}
    for label, model in (("dense", dense), ("factorized", factorized)):
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, inp, g=graphdef: nnx.merge(g, s)(inp))
        out[f"{label}_s"] = report.measure_latency(fwd, state, x, warmup=warmup, repeats=repeats)
        out[f"{label}_params"] = tree.tree_size(nnx.state(model, nnx.Param))
        out[f"{label}_flops"] = sum(report.layer_flops(model, tuple(x.shape[1:])).values())
    out["speedup"] = out["dense_s"] / out["factorized_s"]
    return out
