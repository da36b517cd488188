"""Honest size, FLOP and latency accounting for a model's parameters.

Two kinds of numbers are kept apart:

* **real**: array sizes, the bytes a file really takes on disk (``file_bytes``, from
  ``os.path.getsize``), the FLOPs the model really executes with its current dense
  shapes, and measured latency. Only surgery (hard pruning, factorisation), packing or
  a compressed file changes these.
* **potential**: nonzeros, and the FLOPs a sparse kernel would execute (dense FLOPs x
  density). A mask or fake quantization changes these and nothing else; the report
  labels them so.

Bytes come in two kinds, reported side by side: **device bytes**, what the arrays take in
device memory while the model runs (each array's ``nbytes`` summed over the devices that
hold a copy or a shard of it; the codes and scales of packed int8 / int4 layers from
:mod:`jcompress.nnx.packed` included), and **file bytes**, what a compressed file takes on
disk. Only packing or surgery changes device bytes.

Sparse weights run dense. A kernel with zeros is labelled with its pattern (``'2:4'`` and
other N:M patterns along the input axis, or ``'unstructured'``) and ``sparse_runtime``
says ``'none on this backend (...)'``: jcompress has no sparse matmul, so its device
bytes are dense bytes and its FLOPs dense FLOPs. XLA has no 2:4 kernel, and the general
formats of ``jax.experimental.sparse`` do not help at 2:4: a BCOO matrix holds a float32
value and two int32 indices per nonzero (1.5x the dense bytes at half density), a BCSR
one a value and a column index (1.0x); and on this CPU their jitted matmuls on 2:4
kernels of 256x256 and 512x512 took 3 to 71 times the dense matmul's time at batch 1 and
16 (medians of interleaved calls, compilation excluded).

``layer_flops(model, input_shape)`` counts per-example FLOPs (2 per multiply-add) of every
``nnx.Linear`` and ``nnx.Conv`` by tracing the model once with ``jax.eval_shape``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.nnx import hooks, packed

__all__ = [
    "device_nbytes",
    "dir_size",
    "format_table",
    "layer_flops",
    "param_report",
    "save_json",
    "sparse_runtime",
    "sparsity_pattern",
]

# N:M patterns looked for (groups of m along the input axis), smallest group first
_NM_GROUPS = (4, 8)


def layer_flops(model: nnx.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs per example of each Dense/Conv layer, keyed by its kernel's leaf name.

    A Dense layer applied to ``t`` positions (tokens) costs ``2 * t * in * out``; a conv
    costs ``2 * prod(kernel.shape) * prod(output spatial dims)``. Biases and elementwise
    work are not counted. Traced with ``jax.eval_shape``: no computation runs.

    Example:
      >>> layer_flops(models.create('lenet300', input_shape=(28, 28, 1), num_classes=10), (28, 28, 1))
      {'fc1/kernel': 470400, 'fc2/kernel': 60000, 'fc3/kernel': 2000}

    Raises:
      ValueError: the model has packed layers (:mod:`jcompress.nnx.packed`), whose
        contractions the layer hook does not see; their FLOPs are those of the model
        before packing, so count that one.
    """
    packed_layers = [
        "/".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, (packed.PackedLinear, packed.PackedConv))
    ]
    if packed_layers:
        raise ValueError(
            f"layer_flops: layers {packed_layers[:5]} are packed; pass the model before nnx.packed.pack "
            "(packing changes no FLOPs: the kernels are dequantized and multiplied in float)"
        )
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


def _device_nbytes(array) -> int:
    """Bytes ``array`` takes on the devices: its shards' ``nbytes`` summed (a replicated
    array counts once per device); a host (numpy) array counts its own ``nbytes``."""
    if isinstance(array, jax.Array):
        return int(sum(shard.data.nbytes for shard in array.addressable_shards))
    return int(np.asarray(array).nbytes)


def device_nbytes(params: Any) -> int:
    """Bytes the parameters take on the devices: each array's ``nbytes`` summed over the
    devices holding a shard or a copy of it.

    Args:
      params: a pytree of arrays, or an ``nnx.Module``: its ``nnx.Param`` arrays and the
        codes, scales and zero points of its packed layers (:mod:`jcompress.nnx.packed`);
        other state (BatchNorm statistics) is not counted.

    Example:
      >>> device_nbytes(packed.pack(aux)(model)[0]) < device_nbytes(model) / 6   # int4
      True
    """
    if isinstance(params, nnx.Module):
        kinds = (nnx.Param, packed.PackedCodes, packed.QuantScale)
        arrays = [v.get_value() for _, v in nnx.iter_graph(params) if isinstance(v, kinds)]
    else:
        arrays = jax.tree.leaves(params)
    return sum(_device_nbytes(a) for a in arrays if a is not None)


def sparsity_pattern(w) -> str | None:
    """The zero pattern of a kernel: ``'n:m'``, ``'unstructured'`` or None (no zeros).

    ``'n:m'`` when every group of ``m`` consecutive entries along the input axis (``-2``:
    the rows of a Dense kernel ``(in, out)``, ``cin`` of a conv kernel) holds at most
    ``n <= m / 2`` nonzeros, for the smallest ``m`` in (4, 8) that divides that axis; the
    pattern of ``jc.pruning`` with ``NM(n, m)``. Leaves with fewer than 2 axes (biases,
    norm scales) are never sparse kernels: None.

    Example:
      >>> sparsity_pattern(jnp.array([[1.0], [0.0], [2.0], [0.0]]))
      '2:4'
    """
    arr = np.asarray(w)
    if arr.ndim < 2 or arr.size == 0 or np.count_nonzero(arr) == arr.size:
        return None
    inputs = np.moveaxis(arr, -2, -1)  # (..., in)
    for m in _NM_GROUPS:
        if inputs.shape[-1] % m == 0:
            n = int(np.count_nonzero(inputs.reshape(-1, m), axis=-1).max())
            if n <= m // 2:
                return f"{n}:{m}"
    return "unstructured"


def sparse_runtime() -> str:
    """What runs a sparse kernel on the current backend (``sparse_runtime`` in reports)."""
    return f"none on this backend ({jax.default_backend()}): device bytes are dense bytes, the matmul runs dense"


def _row(name, shape, size, nnz, bits, flops_dense, device, pattern, runtime) -> dict:
    return {
        "name": name,
        "shape": list(shape),
        "params": size,
        "nonzeros": nnz,
        "density": nnz / size if size else 0.0,
        "bits_per_weight": bits / size if size else 0.0,
        "bytes": bits / 8,
        "device_bytes": device,
        "runtime": runtime,
        "sparsity_pattern": pattern,
        "sparse_runtime": sparse_runtime() if pattern else None,
        "flops": flops_dense,
        "flops_if_sparse": round(flops_dense * (nnz / size)) if size else 0,
    }


def _leaves(params) -> list[tuple[str, Any, str]]:
    """``(name, array or packed layer, runtime)`` of each parameter: the leaves of a pytree,
    or of a model its ``nnx.Param`` leaves and its packed layers, in graph order."""
    if not isinstance(params, nnx.Module):
        return [(name, leaf, "dense") for name, leaf in tree.named_leaves(params)]
    out = []
    for path, node in nnx.iter_graph(params):
        name = "/".join(str(p) for p in path)
        if isinstance(node, (packed.PackedLinear, packed.PackedConv)):
            out.append((f"{name}/kernel", node, f"packed int{node.bits}"))
        elif isinstance(node, nnx.Param) and node.get_value() is not None:
            out.append((name, node.get_value(), "dense"))
    return out


def param_report(
    params: Any,
    *,
    flops: dict[str, int] | None = None,
    storage_bits: dict[str, int] | None = None,
    file_bytes: int | None = None,
    dense_params: int | None = None,
) -> dict:
    """Per-layer and total parameters, nonzeros, bits per weight, device and file bytes, FLOPs.

    Args:
      params: the parameter pytree as it is now (masked or not), or the ``nnx.Module``
        itself: its ``nnx.Param`` leaves, and one row ``'<layer>/kernel'`` per packed layer
        (:mod:`jcompress.nnx.packed`) whose device bytes are its codes, scales and zero
        points.
      flops: ``layer_flops`` of the model as it is now (real, executed FLOPs per example).
      storage_bits: exact bits each leaf takes in a compressed file (from the compressed
        leaf types); without it, leaves are counted at the bytes of one copy of their
        arrays (codes and scales for a packed layer).
      file_bytes: the real size of the written file, if one was written.
      dense_params: parameter count of the original dense model (for the compression ratio
        and bits per *original* weight); defaults to the current count.

    Returns:
      ``{'layers': [...], 'total': {...}, 'notes': [...]}`` (JSON-serialisable). Each layer
      row holds ``device_bytes`` (the arrays' ``nbytes`` on the devices), ``runtime``
      (``'dense'`` or ``'packed int4'``...), ``sparsity_pattern`` (``'2:4'``,
      ``'unstructured'`` or None, see :func:`sparsity_pattern`) and ``sparse_runtime``
      (None for a kernel without zeros). ``total`` holds ``device_bytes`` and
      ``file_bytes`` (None without a file) apart, and ``bytes``: the file's bytes when
      given, else the storage bits' or device bytes.

    Example:
      >>> small, _ = jc.nnx.packed.pack(aux)(model)
      >>> r = param_report(small, file_bytes=os.path.getsize('m.jcz'))
      >>> r['total']['device_bytes'], r['total']['file_bytes']
    """
    rows = []
    for name, leaf, runtime in _leaves(params):
        if isinstance(leaf, (packed.PackedLinear, packed.PackedConv)):
            arr = np.asarray(leaf.kernel())
            arrays = [v.get_value() for v in (leaf.codes, leaf.scale, leaf.zero_point) if v is not None]
        else:
            arr, arrays = np.asarray(leaf), [leaf]
        device = sum(_device_nbytes(a) for a in arrays)
        size, nnz = int(arr.size), int(np.count_nonzero(arr))
        # without a file's bits: one copy of the arrays (device bytes count every device's copy)
        in_memory = 8 * sum(a.size * np.dtype(a.dtype).itemsize for a in arrays)
        bits = int(storage_bits[name]) if storage_bits and name in storage_bits else in_memory
        f = int(flops.get(name, 0)) if flops else 0
        rows.append(_row(name, arr.shape, size, nnz, bits, f, device, sparsity_pattern(arr), runtime))
    n = sum(r["params"] for r in rows)
    dense = dense_params or n
    total_bytes = file_bytes if file_bytes is not None else sum(r["bytes"] for r in rows)
    sparse = [r["name"] for r in rows if r["sparsity_pattern"]]
    total = {
        "params": n,
        "nonzeros": sum(r["nonzeros"] for r in rows),
        "bytes": total_bytes,
        "bytes_source": "file on disk"
        if file_bytes is not None
        else ("compressed leaf bits" if storage_bits else "arrays in memory"),
        "device_bytes": sum(r["device_bytes"] for r in rows),
        "file_bytes": file_bytes,
        "bits_per_weight": total_bytes * 8 / dense if dense else 0.0,
        "flops": sum(r["flops"] for r in rows),
        "flops_if_sparse": sum(r["flops_if_sparse"] for r in rows),
        "compression_ratio": (dense * 4) / total_bytes if total_bytes else float("inf"),
        "sparse_runtime": sparse_runtime() if sparse else None,
    }
    notes = [
        "params, bytes and flops are real: they change only when arrays shrink (surgery) or a compressed file is written.",
        "nonzeros and flops_if_sparse are potential: a mask zeroes weights but executes the same dense FLOPs.",
        (
            "device_bytes: the arrays' nbytes on the devices (packed codes and scales included); only packing or "
            "surgery changes them. file bytes are the compressed file's size on disk."
        ),
    ]
    if sparse:
        notes.append(
            f"sparse weights ({', '.join(sorted({r['sparsity_pattern'] for r in rows if r['sparsity_pattern']}))} "
            f"in {len(sparse)} kernels): sparse_runtime: {sparse_runtime()}."
        )
    return {"layers": rows, "total": total, "notes": notes}


def format_table(report: dict) -> str:
    """The report as a fixed-width text table: a line per layer, the total, then the notes
    on bytes and sparse weights."""
    head = (
        f"{'layer':<28}{'params':>10}{'nonzeros':>10}{'bits/w':>8}{'bytes':>12}{'device B':>12}"
        f"{'FLOPs':>12}{'FLOPs@sparse':>14}  runtime"
    )
    lines = [head, "-" * len(head)]

    def line(name, r, runtime):
        return (
            f"{name:<28}{r['params']:>10}{r['nonzeros']:>10}{r['bits_per_weight']:>8.2f}{r['bytes']:>12.0f}"
            f"{r['device_bytes']:>12}{r['flops']:>12}{r['flops_if_sparse']:>14}  {runtime}"
        )

    for r in report["layers"]:
        lines.append(
            line(r["name"], r, r["runtime"] + (f", {r['sparsity_pattern']} zeros" if r["sparsity_pattern"] else ""))
        )
    t = report["total"]
    lines.append("-" * len(head))
    lines.append(line("total", t, ""))
    lines.append(f"bytes from: {t['bytes_source']}; compression vs float32 dense: {t['compression_ratio']:.1f}x")
    file_bytes = "no file written" if t["file_bytes"] is None else f"{t['file_bytes']} bytes on disk"
    lines.append(f"device bytes: {t['device_bytes']} (arrays' nbytes on the devices); file: {file_bytes}")
    if t["sparse_runtime"]:
        lines.append(f"sparse weights: sparse_runtime: {t['sparse_runtime']}")
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
