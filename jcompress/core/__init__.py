"""The core every technique builds on: the transform protocol (``base``), specs (``spec``)
and sparsity patterns (``patterns``)."""

from jcompress.core.base import (
    ActRangeAux,
    ChainAux,
    CodebookAux,
    FactorAux,
    GridAux,
    MaskAux,
    ModelTransform,
    Transform,
    UnitsAux,
    all_auxes,
    chain,
    default_leaves,
    masked,
    relative_error,
)
from jcompress.core.patterns import NM, Block, Units, Unstructured
from jcompress.core.spec import resolve, select_names

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
    "all_auxes",
    "chain",
    "default_leaves",
    "masked",
    "relative_error",
    "resolve",
    "select_names",
]
