"""Honest size, FLOP and latency accounting for a model's parameters.

Two kinds of numbers are kept apart:

* **real**: array sizes, the bytes a file really takes on disk (``file_bytes``, from
  ``os.path.getsize``), the FLOPs the model really executes with its current dense
  shapes, and measured latency. Only surgery (hard pruning, factorisation) or a
  compressed file changes these.
* **potential**: nonzeros, and the FLOPs a sparse kernel would execute (dense FLOPs x
  density). A mask or fake quantization changes these and nothing else; the report
  labels them so.

``layer_flops(model, input_shape)`` counts per-example FLOPs (2 per multiply-add) of every
``nnx.Linear`` and ``nnx.Conv`` by tracing the model once with ``jax.eval_shape``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.nnx import hooks

__all__ = ["layer_flops", "param_report", "format_table", "save_json", "dir_size"]


def layer_flops(model: nnx.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs per example of each Dense/Conv layer, keyed by its kernel's leaf name.

    A Dense layer applied to ``t`` positions (tokens) costs ``2 * t * in * out``; a conv
    costs ``2 * prod(kernel.shape) * prod(output spatial dims)``. Biases and elementwise
    work are not counted. Traced with ``jax.eval_shape``: no computation runs.

    Example:
      >>> layer_flops(models.create('lenet300', input_shape=(28, 28, 1), num_classes=10), (28, 28, 1))
      {'fc1/kernel': 470400, 'fc2/kernel': 60000, 'fc3/kernel': 2000}
    """
    shapes: dict = {}

    def record(name, x, op):
        y = op(x)
        shapes[name] = y.shape
        return y

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with hooks.intercept(model, record) as layers:
        jax.eval_shape(lambda inp: model(inp), x)
    out = {}
    for name, yshape in shapes.items():
        kshape = layers[name].kernel.get_value().shape
        positions = int(np.prod(yshape[1:-1])) if len(yshape) > 2 else 1
        out[f"{name}/kernel"] = int(2 * np.prod(kshape) * positions)
    return out


def param_report(
    params: Any,
    *,
    flops: dict[str, int] | None = None,
    storage_bits: dict[str, int] | None = None,
    file_bytes: int | None = None,
    dense_params: int | None = None,
) -> dict:
    """Per-layer and total parameters, nonzeros, bits per weight, bytes and FLOPs.

    Args:
      params: the parameter pytree as it is now (masked or not).
      flops: ``layer_flops`` of the model as it is now (real, executed FLOPs per example).
      storage_bits: exact bits each leaf takes in a compressed file (from the compressed
        leaf types); without it, leaves are counted at their in-memory dtype size.
      file_bytes: the real size of the written file, if one was written.
      dense_params: parameter count of the original dense model (for the compression ratio
        and bits per *original* weight); defaults to the current count.

    Returns:
      ``{'layers': [...], 'total': {...}, 'notes': [...]}`` (JSON-serialisable).
    """
    rows = []
    for name, leaf in tree.named_leaves(params):
        arr = np.asarray(leaf)
        size = int(arr.size)
        nnz = int(np.count_nonzero(arr))
        bits = int(storage_bits[name]) if storage_bits and name in storage_bits else size * arr.dtype.itemsize * 8
        f = int(flops.get(name, 0)) if flops else 0
        rows.append(
            {
                "name": name,
                "shape": list(arr.shape),
                "params": size,
                "nonzeros": nnz,
                "density": nnz / size if size else 0.0,
                "bits_per_weight": bits / size if size else 0.0,
                "bytes": bits / 8,
                "flops": f,
                "flops_if_sparse": int(round(f * (nnz / size))) if size else 0,
            }
        )
    n = sum(r["params"] for r in rows)
    dense = dense_params or n
    total_bytes = file_bytes if file_bytes is not None else sum(r["bytes"] for r in rows)
    total = {
        "params": n,
        "nonzeros": sum(r["nonzeros"] for r in rows),
        "bytes": total_bytes,
        "bytes_source": "file on disk" if file_bytes is not None else ("compressed leaf bits" if storage_bits else "arrays in memory"),
        "bits_per_weight": total_bytes * 8 / dense if dense else 0.0,
        "flops": sum(r["flops"] for r in rows),
        "flops_if_sparse": sum(r["flops_if_sparse"] for r in rows),
        "compression_ratio": (dense * 4) / total_bytes if total_bytes else float("inf"),
    }
    notes = [
        "params, bytes and flops are real: they change only when arrays shrink (surgery) or a compressed file is written.",
        "nonzeros and flops_if_sparse are potential: a mask zeroes weights but executes the same dense FLOPs.",
    ]
    return {"layers": rows, "total": total, "notes": notes}


def format_table(report: dict) -> str:
    """The report as a fixed-width text table."""
    head = f"{'layer':<28}{'params':>10}{'nonzeros':>10}{'bits/w':>8}{'bytes':>12}{'FLOPs':>12}{'FLOPs@sparse':>14}"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        lines.append(
            f"{r['name']:<28}{r['params']:>10}{r['nonzeros']:>10}{r['bits_per_weight']:>8.2f}"
            f"{r['bytes']:>12.0f}{r['flops']:>12}{r['flops_if_sparse']:>14}"
        )
    t = report["total"]
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<28}{t['params']:>10}{t['nonzeros']:>10}{t['bits_per_weight']:>8.2f}"
        f"{t['bytes']:>12.0f}{t['flops']:>12}{t['flops_if_sparse']:>14}"
    )
    lines.append(f"bytes from: {t['bytes_source']}; compression vs float32 dense: {t['compression_ratio']:.1f}x")
    return "\n".join(lines)


def save_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as JSON atomically (temporary file, then rename)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"cannot serialise {type(x).__name__}")


def dir_size(path: str | Path) -> int:
    """Total bytes of all files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
