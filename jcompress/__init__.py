"""jcompress: neural-network compression as pure transforms over JAX parameter pytrees.

Every technique lives in a module named after it:

  core        the transform protocol (``Transform``, ``ModelTransform``, ``chain``, ``masked``),
              the aux types, per-leaf specs, sparsity patterns, top-k masks, the quantization grid
  tree        leaf names, NNX <-> dict adapters
  pruning     scores, exact masks (layer/global, ERK, N:M, block, structured), the linear-time
              global threshold, mask-keeping optax transforms, gradual (Zhu-Gupta), RigL/SET,
              lottery tickets, iterative pruning
  lowrank     SVD truncation (exact / randomised)
  sharing     k-means codebooks and centroid fine-tuning
  huffman     Huffman coding and Deep Compression's relative sparse indices
  quant, qat  quantize-dequantize, PTQ with calibrated activations, QAT (straight-through)
  oneshot     calibration statistics, OBS, SparseGPT, Wanda, GPTQ
  nnx         model transforms on NNX modules: hard pruning (surgery), factorised layers, the layer hook
  distill     Hinton / MSE / FitNets / attention losses and the data-parallel distillation step
  compressed, export, pipeline
              compressed leaf types, the compressed file, Deep Compression
  data, models, train, checkpoint, parallel, report, timing
              datasets, NNX models, the train loop, orbax checkpoints, meshes, honest reports, timers

Submodules load on first use (PEP 562), so ``import jcompress.pruning`` loads neither
orbax nor TensorFlow; ``jc.checkpoint`` imports orbax the first time it is touched.

Example:
  >>> import jcompress as jc
  >>> params, aux = jc.chain(jc.pruning.magnitude(sparsity=0.9), jc.sharing.kmeans(k=31))(params)
  >>> jc.export.write('model.jcz', jc.compressed.compress(params, aux))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Re-exported names: name -> the module that defines it.
_ATTRIBUTES = {
    "ActRangeAux": "jcompress.core.base",
    "Block": "jcompress.core.patterns",
    "ChainAux": "jcompress.core.base",
    "CodebookAux": "jcompress.core.base",
    "FactorAux": "jcompress.core.base",
    "GridAux": "jcompress.core.base",
    "MaskAux": "jcompress.core.base",
    "ModelTransform": "jcompress.core.base",
    "NM": "jcompress.core.patterns",
    "Transform": "jcompress.core.base",
    "Units": "jcompress.core.patterns",
    "UnitsAux": "jcompress.core.base",
    "Unstructured": "jcompress.core.patterns",
    "chain": "jcompress.core.base",
    "deep_compression": "jcompress.pipeline",
    "from_pure_dict": "jcompress.tree",
    "masked": "jcompress.core.base",
    "named_leaves": "jcompress.tree",
    "select_names": "jcompress.core.spec",
    "to_pure_dict": "jcompress.tree",
}

__all__ = [
    "NM",
    "ActRangeAux",
    "Block",
    "ChainAux",
    "CodebookAux",
    "FactorAux",
    "GridAux",
    "MaskAux",
    "ModelTransform",
    "Transform",
    "Units",
    "UnitsAux",
    "Unstructured",
    "bitpack",
    "chain",
    "checkpoint",
    "compressed",
    "core",
    "data",
    "deep_compression",
    "distill",
    "export",
    "from_pure_dict",
    "huffman",
    "lowrank",
    "masked",
    "models",
    "named_leaves",
    "nnx",
    "oneshot",
    "parallel",
    "pipeline",
    "pruning",
    "qat",
    "quant",
    "report",
    "select_names",
    "sharing",
    "timing",
    "to_pure_dict",
    "train",
    "tree",
]

# Subpackages and modules reachable as ``jc.<name>``: everything public that is not re-exported.
_SUBMODULES = frozenset(__all__) - set(_ATTRIBUTES)


def __getattr__(name: str):
    """Import ``jc.<name>`` on first access and cache it in the package namespace."""
    if name in _SUBMODULES:
        value = importlib.import_module(f"jcompress.{name}")
    elif name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    else:
        raise AttributeError(f"module 'jcompress' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
