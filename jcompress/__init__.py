"""jcompress: neural-network compression as pure transforms over JAX parameter pytrees.

Every technique lives in a module named after it:

  tree        leaf names, ``select`` (regex / predicate / bool tree), NNX <-> dict adapters
  pruning     scores, exact masks (layer/global, ERK, N:M, block, structured), the linear-time
              global threshold, mask-keeping optax transforms, gradual (Zhu-Gupta), RigL/SET,
              lottery tickets, iterative pruning, hard pruning (surgery)
  lowrank     SVD truncation (exact / randomised) and factorised Dense layers
  sharing     k-means codebooks and centroid fine-tuning
  huffman     Huffman coding and Deep Compression's relative sparse indices
  quant, qat  quantize-dequantize, PTQ with calibrated activations, QAT (straight-through)
  oneshot     calibration statistics, OBS, SparseGPT, Wanda, GPTQ
  distill     Hinton / MSE / FitNets / attention losses and the data-parallel distillation step
  compressed, export, pipeline
              compressed leaf types, the compressed file, ``chain`` and Deep Compression
  data, models, train, checkpoint, parallel, report
              datasets, NNX models, the train loop, orbax checkpoints, meshes, honest reports

Example:
  >>> import jcompress as jc
  >>> params, aux = jc.chain(jc.pruning.magnitude(sparsity=0.9), jc.sharing.kmeans(k=31))(params)
  >>> jc.export.write('model.jcz', jc.compressed.compress(params, aux))
"""

from jcompress import tree  # noqa: I001  (first: everything else builds on it)
from jcompress import data, models, parallel, report, train, checkpoint
from jcompress import bitpack, compressed, export, huffman, lowrank, qat, quant, sharing
from jcompress import pruning, pipeline, oneshot, distill
from jcompress.core.base import chain, masked
from jcompress.pipeline import deep_compression
from jcompress.tree import from_pure_dict, named_leaves, select, to_pure_dict

__version__ = "0.1.0"

__all__ = [
    "bitpack",
    "chain",
    "checkpoint",
    "compressed",
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
    "oneshot",
    "parallel",
    "pipeline",
    "pruning",
    "qat",
    "quant",
    "report",
    "select",
    "sharing",
    "to_pure_dict",
    "train",
    "tree",
]
