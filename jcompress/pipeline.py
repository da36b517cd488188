"""The fine-tune stage of a chain, and the Deep Compression recipe.

A chain of transforms (:func:`jcompress.core.base.chain`) runs its stages in order and
reports each one's aux. :func:`finetune` wraps the user's training function as a stage
that keeps what the stages before it did: after k-means sharing it trains the
centroids with the assignment fixed (:func:`jcompress.sharing.centroid_finetune`) and
returns the new ``CodebookAux``; after pruning it keeps the masks
(``pruning.optim.keep_masked``) and returns them as a ``MaskAux``.

:func:`deep_compression` (Han et al. 2016) is the chain prune -> fine-tune with masks ->
k-means sharing (``2**bits - 1`` centroids plus the zero: conv 8 bits, fc 5 bits) ->
fine-tune centroids -> Huffman coding -> file. Every stage writes a real file (float32
for the dense model, the compressed container otherwise) and reports one row: stage,
nonzeros, bits per weight, file bytes, ratio to the dense file, seconds, and whatever
``eval_fn`` returns. The last row evaluates the params read back from the final file.

Example:
  >>> def train_fn(params, wrap):
  ...     return train.fit(apply, params, extra, ds, tx=wrap(optax.adam(1e-4)), epochs=2).params
  >>> t = jc.chain(jc.pruning.magnitude(sparsity=0.9), finetune(train_fn), jc.sharing.kmeans(k=31), finetune(train_fn))
  >>> params, aux = t(params)
  >>> result = deep_compression(sparsity=0.9, finetune_fn=train_fn, eval_fn=evaluate)(params)
  >>> result.rows[-1]['bytes'], result.path
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jcompress import compressed, export, tree
from jcompress.core import base
from jcompress.core import spec as spec_lib
from jcompress.sharing import finetune as sharing_finetune
from jcompress.sharing.kmeans import kmeans

__all__ = ["DeepCompressionResult", "deep_compression", "finetune"]


def _latest(auxes, kind: type):
    for a in reversed(base.all_auxes(*auxes)):
        if isinstance(a, kind):
            return a
    return None


def _copy(x):
    return jax.tree.map(lambda a: jax.numpy.array(a, copy=True), x)


def finetune(train_fn: Callable, *, name: str = "finetune") -> base.Transform:
    """A stage that trains the params with the structure of the earlier stages kept.

    Args:
      train_fn: ``train_fn(params, wrap) -> params``; ``wrap(tx) -> tx`` must be applied
        to the optimizer the function trains with (it adds centroid training or mask
        keeping). For example
        ``lambda p, wrap: train.fit(apply, p, extra, ds, tx=wrap(optax.adam(1e-4)), epochs=2).params``.
      name: the stage's name.

    Returns:
      a :class:`~jcompress.core.base.Transform` with ``with_history``: inside a
      :func:`~jcompress.core.base.chain` it looks at the auxes of the stages before it.
      After a ``CodebookAux`` (the latest wins) it trains the centroids and its aux is
      the ``CodebookAux`` with the trained codebooks; else after a ``MaskAux`` it keeps
      the masks and its aux is ``MaskAux(masks)``; else (or called alone) it trains
      freely and its aux is None. The function gets copies of the params (training loops
      may donate their inputs), so the earlier auxes stay readable.

    Raises:
      ValueError: after sharing, when the trained params are not ``codebook[indices]``
        (``train_fn`` did not train with ``wrap(tx)``).
    """
    if not callable(train_fn):
        raise TypeError(f"train_fn must be a function (params, wrap) -> params, got {type(train_fn).__name__}")

    def with_history(auxes) -> base.Transform:
        sharing = _latest(auxes, base.CodebookAux)
        pruning = _latest(auxes, base.MaskAux)

        def apply(params, names, key):
            own = _copy(params)
            if sharing is not None:
                new = train_fn(own, lambda tx: sharing_finetune.centroid_finetune(tx, _copy(sharing)))
                try:
                    return new, sharing_finetune.codebook_aux(new, sharing)
                except ValueError as e:
                    raise ValueError(f"{e}; train_fn must train with the optimizer wrap(tx) it is given") from None
            if pruning is not None:
                from jcompress.pruning.optim import keep_masked

                new = train_fn(own, lambda tx: optax.chain(tx, keep_masked(_copy(pruning.masks))))
                return new, base.MaskAux(pruning.masks)
            return train_fn(own, lambda tx: tx), None

        return base.Transform(apply, name, with_history=with_history)

    return with_history(())


class DeepCompressionResult(NamedTuple):
    """Result of the Deep Compression pipeline.

    Attributes:
      params: the final params (read back from the final file).
      compressed: the tree of compressed leaves written to ``path``.
      rows: one dict per stage (stage, nonzeros, bits_per_weight, bytes, ratio, seconds, metrics).
      auxes: the :class:`~jcompress.core.base.ChainAux` of the stages.
      path: the final compressed file.
      dense_path: the float32 dense baseline file.
    """

    params: Any
    compressed: Any
    rows: list
    auxes: base.ChainAux
    path: Path
    dense_path: Path


def _anchored(name: str) -> str:
    """The regex that matches exactly the leaf ``name``."""
    return f"^{re.escape(name)}$"


def deep_compression(
    *,
    sparsity: spec_lib.Spec,
    bits: spec_lib.Spec = None,
    index_bits: spec_lib.Spec = None,
    finetune_fn: Callable | None = None,
    centroid_finetune_fn: Callable | None = None,
    eval_fn: Callable[[Any], dict] | None = None,
    leaves: spec_lib.Spec = None,
    init: str = "linear",
    iters: int = 300,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
) -> Callable[[Any], DeepCompressionResult]:
    """The Deep Compression pipeline (prune, fine-tune, share, fine-tune, Huffman, file).

    Args:
      sparsity: fraction of each layer pruned by magnitude, as a spec (``0.9`` or
        ``{regex: sparsity}``).
      bits: codebook index width, as a spec; a layer gets ``2**bits - 1`` centroids plus
        the zero. Leaves the spec does not cover get the paper's 8 bits for conv kernels
        (ndim > 2) and 5 for fc.
      index_bits: relative sparse index width, as a spec, with the same default.
      finetune_fn: ``train_fn(params, wrap) -> params`` for both fine-tune stages (see
        :func:`finetune`); ``None`` skips fine-tuning.
      centroid_finetune_fn: a different ``train_fn`` for the centroid stage (default:
        ``finetune_fn``).
      eval_fn: ``eval_fn(params) -> dict`` of metrics added to each row.
      leaves: the leaves compressed, a selection spec as in :func:`jcompress.core.base.masked`
        (default: Dense and conv kernels).
      init, iters: k-means initialisation and maximum iterations.
      out_dir: where the files go (``dense.jcz``, one ``<stage>.jcz`` per stage and
        ``deep_compression.jcz``); a temporary directory when ``None``.
      meta: JSON metadata stored in the final file's header.

    Returns:
      ``run(params) -> DeepCompressionResult``.

    Example:
      >>> result = deep_compression(sparsity={'fc3': 0.74, 'fc': 0.92}, finetune_fn=train_fn)(params)
    """
    from jcompress.pruning import magnitude

    pruners: dict = {}

    def run(params) -> DeepCompressionResult:
        params = tree.to_pure_dict(params)
        names = spec_lib.select_names(params, leaves, arg="leaves")
        k_bits = compressed.paper_widths(bits, params, names, arg="bits")
        compressed.paper_widths(index_bits, params, names, arg="index_bits")  # checked before any work
        plan = (tuple(names), repr(sparsity))
        if plan not in pruners:  # one compiled pruning function per layer set, reused by later calls
            prune = base.masked(magnitude(sparsity=sparsity), [_anchored(n) for n in names])
            pruners[plan] = jax.jit(prune)
        stages, labels = [pruners[plan]], ["pruned"]
        if finetune_fn is not None:
            stages.append(finetune(finetune_fn))
            labels.append("pruned + fine-tuned")
        share = kmeans(k=[(_anchored(n), 2**b - 1) for n, b in k_bits.items()], init=init, iters=iters)
        stages.append(base.masked(share, [_anchored(n) for n in names]))
        labels.append("clustered")
        if centroid_finetune_fn is not None or finetune_fn is not None:
            stages.append(finetune(centroid_finetune_fn or finetune_fn))
            labels.append("centroids fine-tuned")
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
            shared = _latest(auxes, base.CodebookAux) is not None
            ctree = compressed.compress(p, auxes, index_bits=index_bits, huffman=False)
            fname = directory / (label.replace(" + ", "_").replace(" ", "_") + ".jcz")
            record(label + (" (fixed-width)" if shared else ""), p, export.write(fname, ctree, meta={"stage": label}))

        final, auxes = base.chain(*stages, names=labels)(params, callback=callback)
        ctree = compressed.compress(final, auxes, index_bits=index_bits, huffman=True)
        path = directory / "deep_compression.jcz"
        widths = {"bits": bits, "index_bits": index_bits}
        widths = {k: v if v is not None else {"conv": 8, "fc": 5} for k, v in widths.items()}
        size = export.write(path, ctree, meta={**(meta or {}), "stage": "huffman", **widths})
        loaded = export.load_params(path)
        compressed_leaves = dict(tree.named_leaves(ctree, is_leaf=compressed.is_compressed))
        kernel_bits = sum(compressed_leaves[n].nbits() for n in names)
        kernel_weights = sum(math.prod(np.shape(tree.get_by_name(params, n))) for n in names)
        record(
            "huffman (file read back)", loaded, size, {"kernel_bits_per_weight": round(kernel_bits / kernel_weights, 4)}
        )
        return DeepCompressionResult(loaded, ctree, rows, auxes, path, dense_path)

    return run
