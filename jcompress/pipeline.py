"""Chaining compression stages, and the Deep Compression recipe.

:func:`chain` composes stages the way ``optax.chain`` composes gradient
transformations: ``chain(s1, s2, ...)(params) -> (params, (aux1, aux2, ...))``. A stage
is either a transform ``fn(params) -> (params, aux)`` (``magnitude_pruning(...)``,
``functools.partial(kmeans_share, k=31)``, ``quant.weight_quantization(...)``) or a
:func:`finetune` stage wrapping the user's training function. A fine-tune stage looks
at the auxes of the stages before it and keeps their structure while training: after
k-means sharing it trains the centroids with the assignment fixed
(:func:`jcompress.sharing.centroid_finetune`) and returns the new ``SharingAux``; after
pruning it keeps the masks (``pruning.optim.keep_masked``).

:func:`deep_compression` (Han et al. 2016) is the chain prune -> fine-tune with masks ->
k-means sharing (``2**bits - 1`` centroids plus the zero: conv 8 bits, fc 5 bits) ->
fine-tune centroids -> Huffman coding -> file. Every stage writes a real file (float32
for the dense model, the compressed container otherwise) and reports one row: stage,
nonzeros, bits per weight, file bytes, ratio to the dense file, seconds, and whatever
``eval_fn`` returns. The last row evaluates the params read back from the final file.

Example:
  >>> def train_fn(params, wrap):
  ...     return train.fit(apply, params, extra, ds, tx=wrap(optax.adam(1e-4)), epochs=2).params
  >>> result = deep_compression(sparsity=0.9, finetune_fn=train_fn, eval_fn=evaluate)(params)
  >>> result.rows[-1]['bytes'], result.path
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jcompress import compressed, export, tree
from jcompress.sharing import finetune as sharing_finetune
from jcompress.sharing.kmeans import SharingAux, kmeans_share

__all__ = [
    "DeepCompressionResult",
    "FinetuneAux",
    "Pipeline",
    "Stage",
    "chain",
    "deep_compression",
    "finetune",
    "stage",
]


class Stage(NamedTuple):
    """A named pipeline stage: ``fn(params, previous_auxes) -> (params, aux)``."""

    name: str
    fn: Callable


class FinetuneAux(NamedTuple):
    """Aux of a fine-tune stage that did not train centroids: what it kept and how long it took."""

    kept: str  # 'masks' or 'nothing'
    seconds: float


def stage(fn: Callable, *, name: str | None = None) -> Stage:
    """A stage from a transform ``fn(params) -> (params, aux)``."""
    if isinstance(fn, Stage):
        return fn
    if not callable(fn):
        raise TypeError(f"a stage must be callable (params) -> (params, aux), got {type(fn).__name__}")
    label = name or getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "stage")
    return Stage(label, lambda params, auxes: fn(params))


def _latest(auxes: Sequence, attr: str):
    for a in reversed(auxes):
        if hasattr(a, attr):
            return a
    return None


def finetune(train_fn: Callable, *, name: str = "finetune") -> Stage:
    """A stage that trains the params with the structure of the previous stages kept.

    Args:
      train_fn: ``train_fn(params, wrap) -> params``; ``wrap(tx) -> tx`` must be applied
        to the optimizer the function trains with (it adds centroid training or mask
        keeping). For example
        ``lambda p, wrap: train.fit(apply, p, extra, ds, tx=wrap(optax.adam(1e-4)), epochs=2).params``.
      name: the stage's name.

    Returns:
      a :class:`Stage`. Its aux is the updated ``SharingAux`` when a sharing stage came
      before it (the latest one wins), else a :class:`FinetuneAux`.

    Raises:
      ValueError: after sharing, when the trained params are not ``codebook[indices]``
        (``train_fn`` did not train with ``wrap(tx)``).
    """

    def fn(params, auxes):
        t0 = time.perf_counter()
        sharing = _latest(auxes, "codebooks")
        pruning = _latest(auxes, "masks")
        # Training loops may donate their input buffers (train.fit does), so the function
        # gets copies and the auxes of earlier stages stay readable.
        own = _copy(params)
        if sharing is not None:
            new = train_fn(own, lambda tx: sharing_finetune.centroid_finetune(tx, _copy(sharing)))
            return new, _codebooks_from_params(new, sharing)
        if pruning is not None:
            from jcompress.pruning.optim import keep_masked

            new = train_fn(own, lambda tx: optax.chain(tx, keep_masked(_copy(pruning.masks))))
            return new, FinetuneAux("masks", time.perf_counter() - t0)
        return train_fn(own, lambda tx: tx), FinetuneAux("nothing", time.perf_counter() - t0)

    return Stage(name, fn)


def _copy(x):
    return jax.tree.map(lambda a: jax.numpy.array(a, copy=True), x)


def _codebooks_from_params(params, aux: SharingAux) -> SharingAux:
    """Read the trained codebooks back from params that are ``codebook[indices]``."""
    flat = dict(tree.named_leaves(params))
    books = {}
    for g, members in aux.indices.items():
        cb = np.array(aux.codebooks[g])
        for name, idx in members.items():
            cb[np.asarray(idx).reshape(-1)] = np.asarray(flat[name]).reshape(-1)
        for name, idx in members.items():
            if not np.array_equal(cb[np.asarray(idx)], np.asarray(flat[name])):
                raise ValueError(
                    f"after fine-tuning, params/{name} is no longer codebook[indices]; train_fn must train with "
                    "the optimizer wrap(tx) it is given"
                )
        books[g] = jax.numpy.asarray(cb)
    return SharingAux(books, aux.indices, aux.inertia)


class Pipeline(NamedTuple):
    """Stages run in order; call it as ``pipeline(params, callback=None)``."""

    stages: tuple

    def __call__(self, params, *, callback: Callable | None = None):
        """Run every stage; return ``(params, auxes)``.

        Args:
          params: parameter pytree.
          callback: optional ``callback(stage_name, params, auxes)`` after each stage.
        """
        auxes: list = []
        for s in self.stages:
            params, aux = s.fn(params, tuple(auxes))
            auxes.append(aux)
            if callback is not None:
                callback(s.name, params, tuple(auxes))
        return params, tuple(auxes)


def chain(*stages) -> Pipeline:
    """Compose stages (transforms ``fn(params) -> (params, aux)`` or :class:`Stage`)."""
    if not stages:
        raise ValueError("chain needs at least one stage")
    return Pipeline(tuple(stage(s) for s in stages))


class DeepCompressionResult(NamedTuple):
    """Result of the Deep Compression pipeline.

    Attributes:
      params: the final params (read back from the final file).
      compressed: the tree of compressed leaves written to ``path``.
      rows: one dict per stage (stage, nonzeros, bits_per_weight, bytes, ratio, seconds, metrics).
      auxes: the aux of every stage.
      path: the final compressed file.
      dense_path: the float32 dense baseline file.
    """

    params: Any
    compressed: Any
    rows: list
    auxes: tuple
    path: Path
    dense_path: Path


def _bits_for(bits: Mapping[str, int], name: str, leaf) -> int:
    kind = "conv" if np.ndim(leaf) > 2 else "fc"
    if kind not in bits:
        raise ValueError(f"bits must give a width for {kind!r} layers (needed by {name!r}), got {dict(bits)}")
    b = bits[kind]
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 16:
        raise ValueError(f"bits[{kind!r}]={b!r} must be an int in [1, 16]")
    return int(b)


def deep_compression(
    *,
    sparsity: float | Mapping[str, float],
    bits: Mapping[str, int] | None = None,
    index_bits: Mapping[str, int] | None = None,
    finetune_fn: Callable | None = None,
    centroid_finetune_fn: Callable | None = None,
    eval_fn: Callable[[Any], dict] | None = None,
    include: tree.Selection = None,
    exclude: tree.Selection = None,
    init: str = "linear",
    iters: int = 300,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
) -> Callable[[Any], DeepCompressionResult]:
    """The Deep Compression pipeline (prune, fine-tune, share, fine-tune, Huffman, file).

    Args:
      sparsity: fraction of each selected layer pruned by magnitude, or ``{leaf: sparsity}``.
      bits: codebook index width per layer type, ``{'conv': 8, 'fc': 5}`` by default;
        a layer gets ``2**bits - 1`` centroids plus the zero (conv = kernel with ndim > 2).
      index_bits: relative sparse index width per type, ``{'conv': 8, 'fc': 5}`` by default.
      finetune_fn: ``train_fn(params, wrap) -> params`` for both fine-tune stages (see
        :func:`finetune`); ``None`` skips fine-tuning.
      centroid_finetune_fn: a different ``train_fn`` for the centroid stage (default:
        ``finetune_fn``).
      eval_fn: ``eval_fn(params) -> dict`` of metrics added to each row.
      include, exclude: the layers compressed (default: Dense and conv kernels).
      init, iters: k-means initialisation and maximum iterations.
      out_dir: where the files go (``dense.jcz``, one ``<stage>.jcz`` per stage and
        ``deep_compression.jcz``); a temporary directory when ``None``.
      meta: JSON metadata stored in the final file's header.

    Returns:
      ``run(params) -> DeepCompressionResult``.
    """
    from jcompress.pruning.masks import magnitude_pruning

    bits = dict(bits or {"conv": 8, "fc": 5})
    index_bits = dict(index_bits or {"conv": 8, "fc": 5})

    def ib(name, leaf):
        return _bits_for(index_bits, name, leaf)

    pruners: dict = {}

    def run(params) -> DeepCompressionResult:
        params = tree.to_pure_dict(params)
        names = tree.selected_names(params, tree.select(params, include, exclude))
        spars = sparsity if isinstance(sparsity, Mapping) else {n: sparsity for n in names}
        chosen = set(names)

        def picked(n, leaf):
            return n in chosen

        def k_of(n, leaf):
            return 2 ** _bits_for(bits, n, leaf) - 1

        plan = (tuple(names), tuple(sorted(spars.items())))
        if plan not in pruners:  # one compiled pruning function per layer set, reused by later calls
            pruners[plan] = jax.jit(magnitude_pruning(sparsity=dict(spars), include=picked))
        stages = [stage(pruners[plan], name="pruned")]
        if finetune_fn is not None:
            stages.append(finetune(finetune_fn, name="pruned + fine-tuned"))
        stages.append(
            stage(functools.partial(kmeans_share, k=k_of, include=picked, init=init, iters=iters), name="clustered")
        )
        if centroid_finetune_fn is not None or finetune_fn is not None:
            stages.append(finetune(centroid_finetune_fn or finetune_fn, name="centroids fine-tuned"))
        directory = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="jcompress-dc-"))
        directory.mkdir(parents=True, exist_ok=True)
        n_params = tree.tree_size(params)
        rows: list = []
        clock = [time.perf_counter()]

        def record(label, p, nbytes, extra=None):
            now = time.perf_counter()
            row = {
                "stage": label,
                "nonzeros": int(sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(p))),
                "bits_per_weight": round(8 * nbytes / n_params, 4),
                "bytes": int(nbytes),
                "ratio": round(rows[0]["bytes"] / nbytes, 2) if rows else 1.0,
                "seconds": round(now - clock[0], 3),
            }
            row.update(extra or {})
            if eval_fn is not None:
                row.update({k: (float(v) if np.ndim(v) == 0 else v) for k, v in dict(eval_fn(p)).items()})
            rows.append(row)
            clock[0] = time.perf_counter()

        dense_path = directory / "dense.jcz"
        record("dense (float32)", params, export.write_dense(dense_path, params, meta={"stage": "dense"}))

        def callback(label, p, auxes):
            shared = _latest(auxes, "codebooks") is not None
            ctree = compressed.compress(p, *auxes, index_bits=ib, huffman=False)
            fname = directory / (label.replace(" + ", "_").replace(" ", "_") + ".jcz")
            record(label + (" (fixed-width)" if shared else ""), p, export.write(fname, ctree, meta={"stage": label}))

        final, auxes = chain(*stages)(params, callback=callback)
        ctree = compressed.compress(final, *auxes, index_bits=ib, huffman=True)
        path = directory / "deep_compression.jcz"
        size = export.write(
            path, ctree, meta={**(meta or {}), "stage": "huffman", "bits": bits, "index_bits": index_bits}
        )
        loaded = export.load_params(path)
        leaves = dict(tree.named_leaves(ctree, is_leaf=compressed.is_compressed))
        kernel_bits = sum(leaves[n].nbits() for n in names)
        kernel_weights = sum(math.prod(np.shape(tree.get_by_name(params, n))) for n in names)
        record(
            "huffman (file read back)", loaded, size, {"kernel_bits_per_weight": round(kernel_bits / kernel_weights, 4)}
        )
        return DeepCompressionResult(loaded, ctree, rows, auxes, path, dense_path)

    return run
