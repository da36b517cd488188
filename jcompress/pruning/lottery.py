"""Lottery tickets: iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019).

One round: train the masked network, prune a fraction ``rate`` of the *surviving*
weights of every layer by magnitude (Frankle & Carbin: 20% per round, 10% for the output
layer), and reset the survivors to their values at a snapshot: the initialisation, or
the weights after ``k`` steps of the first training run ("late rewinding", Frankle et al.
2019, which makes tickets appear in deeper networks). After ``r`` rounds a layer keeps
``(1 - rate)^r`` of its weights.

Controls: :func:`random_reinit` (the same masks on a fresh random initialisation) and
:func:`random_masks_like` (random masks with the same per-layer counts) are the
baselines a ticket must beat.

Example:
  >>> def train_fn(params, masks):
  ...     tx = optax.chain(optax.adam(1.2e-3), keep_masked(masks))
  ...     return train.fit(fn.apply, params, fn.extra, ds, tx=tx, epochs=5, progress=False).params
  >>> res = find_ticket(train_fn, fn.params, rounds=5, rate=0.2, output_rate=0.1, output_layer='fc3')
  >>> res.history[-1]['sparsity']   # 1 - 0.8**5 = 0.672 on the hidden layers
  >>> params, aux = prune_round(res.masks, rate=0.2)(res.params)   # one more round by hand
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.core import topk
from jcompress.core.base import MaskAux, Transform, default_leaves
from jcompress.pruning import masks as masks_lib
from jcompress.pruning import scores as scores_lib
from jcompress.pruning.optim import as_mask_tree
from jcompress.pruning.schedules import check_sparsity

__all__ = [
    "TicketResult",
    "find_ticket",
    "prune_round",
    "random_masks_like",
    "random_reinit",
    "rewind",
    "snapshot",
    "snapshot_callback",
]

PyTree = Any


def snapshot(params: PyTree) -> PyTree:
    """A copy of ``params`` (new buffers) to rewind to later.

    A copy and not the same arrays, because ``train.fit`` donates its input buffers to
    the jitted step: arrays kept by reference are deleted by the first step.
    """
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


class _Snapshot(NamedTuple):
    callback: Callable
    get: Callable[[], PyTree]


def snapshot_callback(*, epoch: int) -> _Snapshot:
    """A ``train.fit`` callback that copies the params after ``epoch`` epochs (late rewinding).

    Returns:
      ``(callback, get)``: pass ``callback`` to ``train.fit(..., callback=...)``; after
      training, ``get()`` returns the params as they were at the end of epoch ``epoch``
      (1-based), or raises if training never got there.

    Example:
      >>> snap = snapshot_callback(epoch=1)
      >>> res = train.fit(..., callback=snap.callback)
      >>> rewind_to = snap.get()
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch={epoch!r} must be an int >= 1 (epochs completed before the snapshot)")
    box: dict = {}

    def callback(state, ep):
        if ep + 1 == epoch:
            box["params"] = snapshot(state.params)
        return state

    def get():
        if "params" not in box:
            raise ValueError(f"no snapshot: training ended before epoch {epoch}")
        return box["params"]

    return _Snapshot(callback, get)


def _layer_rates(names: list[str], rate: float, output_rate: float | None, output_layer: str | None) -> dict:
    check_sparsity(rate, "rate")
    if output_layer is None:
        if output_rate is not None:
            raise ValueError("output_rate needs output_layer= (the name of the output kernel, e.g. 'fc3/kernel')")
        return {n: rate for n in names}
    check_sparsity(rate if output_rate is None else output_rate, "output_rate")
    matches = [n for n in names if n == output_layer or n == f"{output_layer}/kernel"]
    if not matches:
        raise ValueError(f"output_layer={output_layer!r} names none of the pruned leaves {names}")
    return {n: (output_rate if (n in matches and output_rate is not None) else rate) for n in names}


def prune_round(
    masks: PyTree,
    *,
    rate: float = 0.2,
    output_rate: float | None = None,
    output_layer: str | None = None,
) -> Transform:
    """One lottery round: prune ``round(rate * alive)`` of each leaf's surviving weights.

    The surviving weights with the smallest ``|w|`` go; weights pruned in ``masks`` stay
    pruned.

    Args:
      masks: the current masks (params structure or its pure dict; True = alive).
      rate: fraction of the survivors pruned per round, in ``[0, 1)``.
      output_rate: the fraction for ``output_layer`` (Frankle & Carbin use 0.1).
      output_layer: name of the output kernel (``'fc3'`` or ``'fc3/kernel'``).

    Returns:
      a :class:`~jcompress.core.base.Transform`: ``t(params) -> (pruned_params,
      MaskAux)`` with the new masks (params structure). It prunes the Dense and conv
      kernels; ``jc.masked(t, selection)`` picks other leaves.

    Example:
      >>> params, aux = prune_round(masks, rate=0.2, output_rate=0.1, output_layer='fc3')(trained)
      >>> masks = aux.masks
    """
    check_sparsity(rate, "rate")
    if output_rate is not None:
        check_sparsity(output_rate, "output_rate")

    def apply(params, names, key):
        del key
        current = as_mask_tree(params, masks)
        rates = _layer_rates(list(names), rate, output_rate, output_layer)
        old = dict(jtree.named_leaves(current))
        target = []
        for n in names:
            size = int(np.prod(old[n].shape))
            alive = int(np.sum(np.asarray(old[n])))  # the masks are concrete, also under jit
            keep = alive - topk.pruned_count(rates[n], alive)
            target.append((f"^{re.escape(n)}$", (size - keep) / size))
        scores = scores_lib.magnitude_scores(params, names=names)
        new_masks = masks_lib.make_masks(scores, names, sparsity=target, existing=current)
        return masks_lib.apply_masks(params, new_masks), MaskAux(new_masks, scores)

    return Transform(apply, "prune_round")


def rewind(snapshot_params: PyTree, masks: PyTree) -> PyTree:
    """The survivors at their snapshot values, pruned weights at 0: the ticket to retrain."""
    return masks_lib.apply_masks(snapshot_params, as_mask_tree(snapshot_params, masks))


def random_reinit(init_fn: Callable[[jax.Array], PyTree], masks: PyTree, *, key: jax.Array) -> PyTree:
    """Control: the same masks on a fresh initialisation ``init_fn(key)``.

    ``init_fn`` draws params from the original initialiser, for example
    ``lambda k: models.functional(models.create(..., seed=int(jax.random.randint(k, (), 0, 2**30)))).params``.
    """
    fresh = init_fn(key)
    return masks_lib.apply_masks(fresh, as_mask_tree(fresh, masks))


def random_masks_like(masks: PyTree, *, key: jax.Array) -> PyTree:
    """Control: random masks with exactly the per-leaf number of kept weights of ``masks``.

    Args:
      masks: bool tree (True = kept); every leaf gets a random mask with its count.
      key: PRNG key.

    Returns:
      bool tree with the structure of ``masks``.

    Example:
      >>> control = random_masks_like(ticket_masks, key=jax.random.key(1))
    """
    template = jax.tree.map(lambda m: jnp.zeros(jnp.shape(m), jnp.float32), masks)
    names = [n for n, m in jtree.named_leaves(masks) if np.size(m)]
    sparsity = [
        (f"^{re.escape(n)}$", 1.0 - float(jnp.sum(m)) / np.size(m)) for n, m in jtree.named_leaves(masks) if np.size(m)
    ]
    return masks_lib.make_masks(
        scores_lib.random_scores(template, key=key, names=names), names, sparsity=sparsity, allow_empty=True
    )


class TicketResult(NamedTuple):
    """What :func:`find_ticket` returns.

    Attributes:
      params: the params after the last training run (masked).
      masks: the final masks.
      ticket: ``rewind(rewind_params, masks)``, the winning ticket's starting point.
      rewind_params: the snapshot survivors were reset to.
      history: one dict per round: ``round``, ``sparsity`` (over the pruned leaves),
        ``density`` per leaf and whatever ``eval_fn`` returned.
    """

    params: PyTree
    masks: PyTree
    ticket: PyTree
    rewind_params: PyTree
    history: list


def find_ticket(
    train_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    *,
    rounds: int,
    rate: float = 0.2,
    output_rate: float | None = None,
    output_layer: str | None = None,
    eval_fn: Callable[[PyTree, PyTree], Any] | None = None,
    masks: PyTree | None = None,
) -> TicketResult:
    """Iterative magnitude pruning with rewinding: ``rounds`` prune-and-rewind rounds.

    Trains ``rounds + 1`` times: the dense (or ``masks``-masked) network, then after each
    pruning round the rewound ticket.

    Args:
      train_fn: ``train_fn(params, masks) -> trained_params`` or ``-> (trained_params,
        rewind_params)``; it must keep pruned weights at 0 (chain ``keep_masked(masks)``).
        Returning ``rewind_params`` in the first run (e.g. the weights after ``k`` steps,
        see :func:`snapshot_callback`) makes every later round rewind there instead of to
        ``params``.
      params: the initial params (snapshotted before the first run).
      rounds: number of pruning rounds (``>= 1``).
      rate, output_rate, output_layer: as in :func:`prune_round`. The Dense and conv
        kernels are pruned.
      eval_fn: optional ``eval_fn(params, masks) -> float or dict`` recorded per round.
      masks: optional starting masks (default: all kept).

    Returns:
      :class:`TicketResult`.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1")
    rewind_to = snapshot(params)
    if masks is None:
        masks = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    masks = as_mask_tree(params, masks)
    names = default_leaves(params)
    round_of = functools.partial(prune_round, rate=rate, output_rate=output_rate, output_layer=output_layer)
    _layer_rates(names, rate, output_rate, output_layer)  # fail before any training
    start = rewind(rewind_to, masks)
    history = []
    for r in range(rounds + 1):
        out = train_fn(start, masks)
        trained, snap = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        jtree.check_same_structure(params, trained, "params", "train_fn's result")
        if r == 0 and snap is not None:
            rewind_to = snapshot(snap)
        density = {n: float(jnp.mean(m)) for n, m in jtree.named_leaves(masks) if n in names}
        alive = sum(int(jnp.sum(m)) for n, m in jtree.named_leaves(masks) if n in names)
        total = sum(int(np.prod(jnp.shape(m))) for n, m in jtree.named_leaves(masks) if n in names)
        row = {"round": r, "sparsity": 1.0 - alive / total, "density": density}
        if eval_fn is not None:
            got = eval_fn(trained, masks)
            row.update(got if isinstance(got, dict) else {"score": float(got)})
        history.append(row)
        if r == rounds:
            break
        _, aux = round_of(masks)(trained)
        masks = aux.masks
        start = rewind(rewind_to, masks)
    return TicketResult(trained, masks, rewind(rewind_to, masks), rewind_to, history)
