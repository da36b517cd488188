"""Low-rank factorisation of weight matrices by truncated SVD.

A weight matrix ``W`` of shape ``(m, n)`` with singular values ``s_1 >= s_2 >= ...`` is
replaced by its best rank-``r`` approximation ``W_r = (U_r S_r) V_r^T`` (Eckart-Young);
the relative squared error is exactly ``sum_{i > r} s_i^2 / sum_i s_i^2``. Conv kernels
``(kh, kw, cin, cout)`` are factorised as the matrix ``(kh*kw*cin, cout)``.

:func:`svd` is the params transform: it returns dense leaves of the same shapes holding
``W_r``, plus the factors (:class:`jcompress.core.base.FactorAux`). It saves nothing by
itself; it tells how much accuracy a rank costs. The model surgery that really swaps a
layer for two thin ones is ``jcompress.nnx.factorize``.

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

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree
from jcompress.core import base
from jcompress.core import spec as spec_lib

__all__ = [
    "choose_rank",
    "randomized_svd",
    "svd",
]

METHODS = ("exact", "randomized")
RULES = ("rank", "energy", "budget")


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
    """``(a_r, (US, V), r)`` for one matrix: its rank-``r`` truncation and the factors."""
    m, n = a.shape
    if method == "exact":
        u, s, vt = jnp.linalg.svd(a, full_matrices=False)
        r = choose_rank((m, n), s, rank=rank, energy=energy, budget=budget)
    else:
        r = choose_rank((m, n), None, rank=rank, budget=budget)
        u, s, vt = randomized_svd(a, min(r + oversample, m, n), key=key, power_iters=power_iters)
    us, v = u[:, :r] * s[:r], vt[:r]
    return us @ v, (us, v), r


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
        min(m, n), a touched leaf with fewer than two dimensions or no entries, NaN/Inf; TypeError for
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
        raise ValueError(
            "method='randomized' cannot choose a rank by energy; pass rank= or budget=, or method='exact'."
        )
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
            if w.size == 0:
                raise ValueError(
                    f"leaf {name!r} is empty (shape {tuple(w.shape)}); there is nothing to factorise. "
                    "Leave it out with jc.masked."
                )
            a = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
            try:
                _check_rule(**{rule: values[name]})
                a_r, (us, v), r = _truncate_matrix(
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
