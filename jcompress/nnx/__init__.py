"""NNX-level operations: the layer-input hook, generic model
surgery (hard pruning, factorised layers) and packed low-bit layers.

Submodules load on first access (``jc.nnx.surgery.hard_prune``):

  surgery    hard pruning of any NNX model, coupled units found by tracing its forward pass
  coupling   the tracing behind it: which units of which layers are coupled
  factorize  Dense and conv layers replaced by two thin factorised ones
  hooks      the layer-input hook, and finding and replacing layers by name
  packed     Dense layers whose kernels stay packed int8 / int4 codes at run time
"""

import importlib

__all__ = ["coupling", "factorize", "hooks", "packed", "surgery"]


def __getattr__(name: str):
    """Import ``jcompress.nnx.<name>`` on first access and cache it in the package namespace."""
    if name not in __all__:
        raise AttributeError(f"module 'jcompress.nnx' has no attribute {name!r}")
    module = importlib.import_module(f"jcompress.nnx.{name}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
