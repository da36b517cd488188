"""Candidate recipes: each builds, writes and reads back one compressed model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jcompress import report, tree
from jcompress.advisor.records import Built, Candidate, Subject

__all__ = [
    "deep_compression_candidate",
    "default_candidates",
    "dense_candidate",
    "distillation_candidate",
    "lowrank_candidate",
    "pruning_candidate",
    "quantization_candidate",
    "sharing_candidate",
    "structured_candidate",
]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _write(subject: Subject, name: str, ctree) -> tuple[Any, Path]:
    """Write ``ctree`` with ``jcompress.export`` and read the params back from the file."""
    from jcompress import export

    path = subject.workdir / f"{_slug(name)}.jcz"
    export.write(path, ctree, meta={"candidate": name})
    return export.load_params(path), path


def _write_dense(subject: Subject, name: str, params) -> tuple[Any, Path]:
    from jcompress import export

    path = subject.workdir / f"{_slug(name)}.jcz"
    export.write_dense(path, params, meta={"candidate": name})
    return export.load_params(path), path


def _finetune(subject: Subject, apply_fn: Callable, params, tx) -> Any:
    if subject.finetune_fn is None or subject.epochs == 0:
        return params
    return subject.finetune_fn(apply_fn, params, tx=tx, epochs=subject.epochs)


def _pruned(subject: Subject, sparsity: float, lr: float, score_fn: Callable | None = None, **mask_kw):
    """Pruning of the kernels by ``score_fn(subject)`` (default magnitude), then a fine-tune keeping the masks."""
    import optax

    from jcompress.pruning import masks as masks_lib
    from jcompress.pruning import optim

    if score_fn is None:
        pruned, aux = jax.jit(masks_lib.magnitude(sparsity=sparsity, scope="global"))(subject.params)
    else:
        kw = {"scope": "global", **mask_kw}
        pruned, aux = jax.jit(masks_lib.by_scores(score_fn(subject), sparsity=sparsity, **kw))(subject.params)
    tx = optax.chain(optax.adam(lr), optim.keep_masked(aux.masks))
    tuned = _finetune(subject, subject.apply_fn, pruned, tx)
    return masks_lib.apply_masks(tuned, aux.masks), aux


def _share_bits(name: str, leaf) -> int:
    """Deep Compression's widths: 8-bit codebooks for conv kernels, 5-bit for Dense kernels."""
    return 8 if np.ndim(leaf) > 2 else 5


def _shared(subject: Subject, params, lr: float):
    """K-means sharing (``2**b - 1`` centroids plus the zero) and centroid fine-tuning."""
    import re

    import optax

    from jcompress import pipeline, tree
    from jcompress.core.base import chain, default_leaves, masked
    from jcompress.sharing import kmeans

    leaves = dict(tree.named_leaves(params))
    nonzero = {n: int(np.count_nonzero(np.asarray(leaves[n]))) for n in default_leaves(params)}
    # a kernel that global pruning emptied has no weights to share: it stays as it is (zeros)
    k = [(f"^{re.escape(n)}$", min(2 ** _share_bits(n, leaves[n]) - 1, c)) for n, c in nonzero.items() if c > 0]
    if not k:
        raise ValueError("k-means sharing: every kernel is all zeros; prune less")
    stages = [masked(kmeans(k=k, init="linear"), [pattern for pattern, _ in k])]
    if subject.finetune_fn is not None and subject.epochs > 0:
        # pipeline.finetune trains the centroids (assignment fixed) and returns the new codebooks.
        stages.append(pipeline.finetune(lambda p, wrap: _finetune(subject, subject.apply_fn, p, wrap(optax.adam(lr)))))
    shared, auxes = chain(*stages)(params)
    return shared, auxes[-1]


def dense_candidate() -> Candidate:
    """The reference: every leaf stored as float32 in the same container."""

    def build(s: Subject) -> Built:
        params, path = _write_dense(s, "dense float32", s.params)
        return Built(params, s.apply_fn, path, {})

    return Candidate("dense float32", "dense", True, build)


def pruning_candidate(
    sparsity: float, *, lr: float = 1e-3, score_fn: Callable | None = None, label: str = "prune", **mask_kw
) -> Candidate:
    """Global pruning to ``sparsity``, fine-tuned with masks kept, stored sparse (relative indices).

    Args:
      sparsity: fraction of the kernel weights removed.
      lr: Adam learning rate of the fine-tune.
      score_fn: ``score_fn(subject) -> score tree`` (``jcompress.pruning.scores``: Taylor,
        SNIP, OBD...); default magnitude.
      label: the name's prefix (``'<label> 90%'``).
      **mask_kw: passed to ``jc.pruning.by_scores`` (``pattern=``, ``scope=``, ``allow_empty=``).
    """

    def build(s: Subject) -> Built:
        from jcompress import compressed

        params, aux = _pruned(s, sparsity, lr, score_fn, **mask_kw)
        back, path = _write(s, name, compressed.compress(params, aux))
        return Built(back, s.apply_fn, path, {"sparsity": sparsity})

    name = f"{label} {sparsity:.0%}"
    return Candidate(name, "pruning", True, build)


def quantization_candidate(bits: int, *, qat: bool = False, lr: float = 1e-3) -> Candidate:
    """Per-output-channel symmetric ``bits``-bit weights: post-training, or after QAT fine-tuning."""

    def build(s: Subject) -> Built:
        import optax

        from jcompress import compressed, quant
        from jcompress import qat as qat_lib

        params = s.params
        if qat:
            q_apply = lambda p, x: s.apply_fn(qat_lib.qat_params(p, bits=bits, axis=-1), x)
            params = _finetune(s, q_apply, params, optax.adam(lr))
        qparams, aux = jax.jit(quant.quantize(bits=bits, axis=-1))(params)
        back, path = _write(s, name, compressed.compress(qparams, aux))
        return Built(back, s.apply_fn, path, {"bits": bits, "qat": qat})

    name = f"int{bits} {'QAT' if qat else 'PTQ'}"
    return Candidate(name, "quantization", True, build)


def sharing_candidate(*, lr: float = 1e-3) -> Candidate:
    """K-means weight sharing (conv 8 bits, fc 5 bits) with centroid fine-tuning, Huffman-coded indices."""

    def build(s: Subject) -> Built:
        from jcompress import compressed

        params, aux = _shared(s, s.params, lr)
        back, path = _write(s, name, compressed.compress(params, aux, huffman=True))
        return Built(back, s.apply_fn, path, {"bits": "conv 8 / fc 5"})

    name = "k-means sharing"
    return Candidate(name, "sharing", True, build)


def deep_compression_candidate(sparsity: float, *, lr: float = 1e-3) -> Candidate:
    """Deep Compression: prune + fine-tune, k-means sharing + centroid fine-tune, Huffman coding."""

    def build(s: Subject) -> Built:
        from jcompress import compressed

        pruned, paux = _pruned(s, sparsity, lr)
        params, saux = _shared(s, pruned, lr)
        back, path = _write(s, name, compressed.compress(params, paux, saux, huffman=True))
        return Built(back, s.apply_fn, path, {"sparsity": sparsity, "bits": "conv 8 / fc 5"})

    name = f"prune {sparsity:.0%} + share + Huffman"
    return Candidate(name, "combination", True, build)


def lowrank_candidate(rank_fraction: float, *, lr: float = 1e-3) -> Candidate:
    """Truncated-SVD factorisation of the hidden Dense layers (surgery) and a fine-tune; needs the NNX model.

    Each Dense layer but the output one gets rank ``round(rank_fraction * min(in, out))``
    when that makes it smaller; the layers are new, so the fine-tune uses a full learning rate.
    """

    def build(s: Subject) -> Built:
        import optax

        from jcompress import models
        from jcompress.core.base import masked
        from jcompress.nnx import factorize

        if s.model is None or s.input_shape is None:
            raise ValueError("low-rank factorisation changes the layers: pass the NNX model and inputs= to advise")
        # Dense layers in call order; the last one produces the logits and keeps its full rank.
        order = [n[: -len("/kernel")] for n in report.layer_flops(s.model, s.input_shape)]
        layers = {n: np.shape(tree.get_by_name(s.params, n + "/kernel")) for n in order}
        dense = [n for n in order if len(layers[n]) == 2][:-1]
        ranks = {n: max(1, round(rank_fraction * min(layers[n]))) for n in dense}
        ranks = {n: r for n, r in ranks.items() if r * sum(layers[n]) < layers[n][0] * layers[n][1]}
        if not ranks:
            raise ValueError(f"no hidden Dense layer gets smaller at rank fraction {rank_fraction}")
        kernels = [f"^{n}/kernel$" for n in ranks]
        small, aux = masked(factorize.factorize(rank=dict(zip(kernels, ranks.values()))), kernels)(s.model)
        fn = models.functional(small)
        apply = lambda p, x: fn.apply(p, fn.extra, x)[0]
        params = _finetune(s, apply, fn.params, optax.adam(lr))
        back, path = _write_dense(s, name, params)
        return Built(back, apply, path, {"ranks": {k: int(v) for k, v in aux.ranks.items()}})

    name = f"SVD rank {rank_fraction:.0%}"
    return Candidate(name, "lowrank", False, build)


def structured_candidate(
    fraction: float, *, lr: float = 1e-3, score_fn: Callable | None = None, label: str = "remove neurons"
) -> Candidate:
    """Structured hard pruning: drop ``fraction`` of the hidden units (surgery), then fine-tune.

    Units of the hidden layers (the layers whose units ``nnx.coupling.coupling`` finds
    removable and that write their units alone, so not the output nor a residual stream)
    are ranked by the L2 norm of their kernel column, or by ``score_fn(subject)`` (a score
    tree, e.g. ``scores.unit_scores`` of neuron entropies), and the lowest are removed with
    their biases and norm entries: the new model is really smaller and faster. Needs the
    NNX model and inputs.

    Args:
      fraction: fraction of the units of each hidden layer removed, in [0, 1).
      lr, score_fn, label: fine-tune rate, unit scores, name prefix.
    """

    def build(s: Subject) -> Built:
        import optax

        from jcompress import models
        from jcompress.core.patterns import Units
        from jcompress.nnx import surgery
        from jcompress.nnx.coupling import coupling
        from jcompress.pruning import masks as masks_lib
        from jcompress.pruning import scores as scores_lib

        if s.model is None or s.input_shape is None:
            raise ValueError("structured hard pruning builds a smaller model: pass the NNX model and inputs= to advise")
        groups = coupling(s.model, input_shape=s.input_shape)
        layers = [g.producers[0] for g in groups if g.reason is None and len(g.producers) == 1]
        scores = scores_lib.magnitude_scores(s.params) if score_fn is None else score_fn(s)
        masks = masks_lib.make_masks(scores, layers, sparsity=fraction, pattern=Units(norm="l2"))
        masks = surgery.complete_masks(s.model, masks, input_shape=s.input_shape)
        small, _ = surgery.hard_prune(masks, input_shape=s.input_shape)(s.model)
        fn = models.functional(small)
        apply = lambda p, x: fn.apply(p, fn.extra, x)[0]
        params = _finetune(s, apply, fn.params, optax.adam(lr))
        back, path = _write_dense(s, name, params)
        return Built(
            back,
            apply,
            path,
            {"fraction": fraction, "widths": [int(np.shape(tree.get_by_name(params, k))[-1]) for k in layers]},
        )

    name = f"{label} {fraction:.0%}"
    return Candidate(name, "structured", False, build)


def distillation_candidate(width_fraction: float) -> Candidate:
    """A student with ``width_fraction`` of the hidden widths, trained on the model's soft targets."""

    def build(s: Subject) -> Built:
        if s.distill_fn is None:
            raise ValueError("distillation needs distill_fn (a student trainer); pass distill_fn= to advise")
        params, apply = s.distill_fn(width_fraction)
        back, path = _write_dense(s, name, params)
        return Built(back, apply, path, {"width_fraction": width_fraction})

    name = f"distill x{width_fraction:g} widths"
    return Candidate(name, "distillation", False, build)


def default_candidates(*, quick: bool = False, model: bool = True, distill: bool = True) -> list[Candidate]:
    """The recipes :func:`advise` tries when none are given.

    Args:
      quick: a short list (dense, prune 90%, int8, prune 90% + sharing + Huffman, the
        smallest student) for tests and a first look.
      model: include recipes that need the NNX model (low-rank factorisation).
      distill: include distillation into smaller students.
    """
    if quick:
        out = [dense_candidate(), pruning_candidate(0.9), quantization_candidate(8), deep_compression_candidate(0.9)]
        return out + ([distillation_candidate(0.25)] if distill else [])
    out = [dense_candidate()]
    out += [pruning_candidate(s) for s in (0.8, 0.9, 0.95)]
    out += [quantization_candidate(8), quantization_candidate(4), quantization_candidate(4, qat=True)]
    out.append(sharing_candidate())
    out += [deep_compression_candidate(s) for s in (0.9, 0.95)]
    if model:
        out += [lowrank_candidate(f) for f in (0.5, 0.25)]
    if distill:
        out += [distillation_candidate(f) for f in (0.5, 0.25)]
    return out
