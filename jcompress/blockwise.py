"""Block-by-block one-shot compression of decoder language models across a device mesh.

One-shot methods (GPTQ, SparseGPT, Wanda, AWQ, SmoothQuant) need, for every Linear of a
decoder, statistics of its inputs on calibration text. For a large model those inputs do
not fit beside the model many times over, so :func:`compress` walks the decoder one block
at a time (the papers' procedure):

1. ``h = model.embed_inputs(ids)`` for the calibration sequences ``(num, seq_len)``, kept
   as batches sharded over the mesh's ``data`` axis (activations ``(batch, seq, d)``);
2. for block ``i``: run the block on every batch with the layer hook
   (:mod:`jcompress.nnx.hooks`) recording, per Linear, ``H = sum x x^T``, the token count,
   ``sum |x_j|`` and ``max |x_j|``; the batch is sharded, so each device sums its own rows
   and XLA adds the partial sums across devices;
3. ``transform_for_block(calib)`` builds a transform from the block's statistics
   (:class:`BlockCalibration`), which runs on the block's parameters (on the mesh's first
   device). With ``solver_devices='all'`` (the default) each Linear's statistics are put
   on one of the mesh's devices, the largest Linears first, each onto the device with the
   least assigned so far; the per-layer solvers (GPTQ, SparseGPT, Wanda, OBS: every
   :func:`jcompress.oneshot.calibration.layer_transform`) solve a Linear on the device
   of its statistics and JAX dispatches asynchronously, so on ``n`` devices up to ``n``
   Linears solve at once and a device holds only its own Linears' ``H`` and solver
   buffers. Transforms that combine Linears (AWQ, SmoothQuant: their scale groups span
   several) take the statistics gathered on the parameters' device
   (:meth:`BlockCalibration.on_one_device`, which :func:`method` applies for them);
4. the block's inputs are run through the compressed block (with its activation
   quantization, for SmoothQuant) and replace the inputs: block ``i + 1`` is calibrated
   on the outputs of the compressed blocks before it, so later blocks absorb earlier
   blocks' errors.

Peak memory is the calibration activations (one ``(num, seq_len, d)`` array, plus one
batch of a block's intermediates) and one block's parameters, twice (original and
compressed); the model is updated in place, never copied. The model's own parameter
placement (for example FSDP-sharded by :func:`jcompress.models.hf_lm.load`) is kept: a
block is gathered onto the mesh for its passes and its new parameters are put back with
the original shardings.

:func:`method` builds ``transform_for_block`` for the methods the ``jcompress oneshot``
command offers.

Example:
  >>> model, tok, cfg = jc.models.hf_lm.load('llama-folder')
  >>> ids = jc.lm.sample_windows(jc.lm.corpus_ids(tok, 'calibration'), num=128, seq_len=512)
  >>> model, report = compress(model, ids, lambda c: jc.oneshot.gptq(c.stats, bits=4, group_size=128),
  ...                          mesh=jc.parallel.data_mesh())
  >>> report.blocks[0].output_error, report.layer_errors['layers/0/mlp/down_proj/kernel']
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jcompress import oneshot, parallel, pruning, quant, tree
from jcompress.core import base
from jcompress.core.patterns import NM, Unstructured
from jcompress.nnx import hooks
from jcompress.oneshot.awq import AWQAux, ChannelStats, awq
from jcompress.oneshot.calibration import LayerStats
from jcompress.oneshot.smoothquant import SmoothQuantAux, act_quantizer, fake_quant_input, smoothquant

__all__ = ["METHODS", "SOLVER_DEVICES", "BlockCalibration", "BlockReport", "Report", "compress", "method", "with_act_quant"]

METHODS = ("gptq", "sparsegpt", "wanda", "magnitude", "rtn", "awq", "smoothquant")
SOLVER_DEVICES = ("all", "one")


class BlockCalibration(NamedTuple):
    """What ``transform_for_block`` receives for one decoder block.

    Attributes:
      index: the block's position in ``model.layers``.
      prefix: its parameters' name prefix in the model, ``'layers/<index>/'``.
      stats: ``{kernel name: LayerStats(h (in, in), count)}`` of the block's Linears,
        names relative to the block (``'attn/q_proj/kernel'``), as the transform sees them.
      channels: ``{kernel name: ChannelStats(abs_mean (in,), abs_max (in,))}``.
      groups: the block's ``scale_groups()`` (where AWQ / SmoothQuant fold their scales).
      device: the device that holds the block's parameters when the transform runs; with
        ``solver_devices='all'`` each Linear's ``stats`` and ``channels`` lie on the device
        chosen for it, which may be another.
    """

    index: int
    prefix: str
    stats: dict
    channels: dict
    groups: tuple
    device: Any = None

    def on_one_device(self) -> BlockCalibration:
        """This calibration with every statistic on :attr:`device`, for a transform that
        combines several Linears (AWQ, SmoothQuant).

        Example:
          >>> def awq_for_block(c):
          ...     c = c.on_one_device()
          ...     return jc.oneshot.awq(c.stats, c.channels, groups=c.groups, bits=4)
        """
        if self.device is None:
            return self
        return self._replace(stats=jax.device_put(self.stats, self.device), channels=jax.device_put(self.channels, self.device))


class BlockReport(NamedTuple):
    """One block's result.

    Attributes:
      index: the block.
      seconds: wall time of the block (statistics, transform and the output pass).
      output_error: ``||f'(h) - f(h)||^2 / ||f(h) - h||^2`` over the calibration inputs ``h``
        of the block (``f`` float, ``f'`` compressed): the error relative to what the
        block adds to the residual stream.
      layer_errors: ``{kernel name in the model: ||x K - x K'||^2 / ||x K||^2}`` on the
        block's calibration inputs (``K'`` in the original input basis when a transform
        folded scales into it).
    """

    index: int
    seconds: float
    output_error: float
    layer_errors: dict


class Report(NamedTuple):
    """The result of :func:`compress`.

    Attributes:
      blocks: one :class:`BlockReport` per block, in order.
      act_quant: ``{layer path in the model: ActQuant}`` of layers whose inputs the
        compressed model quantizes (SmoothQuant); apply it with :func:`with_act_quant`.
      num_sequences, seq_len: the calibration set's shape.
      seconds: total wall time.
      grids: ``{kernel name in the model: QuantParams}`` of the quantized kernels when
        :func:`compress` was asked to keep them (``keep_grids=True``), else empty.
    """

    blocks: list
    act_quant: dict
    num_sequences: int
    seq_len: int
    seconds: float
    grids: dict

    @property
    def layer_errors(self) -> dict:
        """``{kernel name: relative output error}`` over all blocks."""
        return {n: e for b in self.blocks for n, e in b.layer_errors.items()}


def _check_ids(calib_ids) -> np.ndarray:
    ids = np.asarray(calib_ids)
    if ids.ndim != 2:
        raise ValueError(
            f"calib_ids has shape {ids.shape}; it must be (num_sequences, seq_len) token ids. Cut windows "
            "from a token stream with jc.lm.sample_windows(ids, num=..., seq_len=...)"
        )
    if ids.size == 0:
        raise ValueError(f"calib_ids has shape {ids.shape}; give at least one sequence of at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"calib_ids must hold integer token ids, got dtype {ids.dtype}")
    return ids.astype(np.int32)


def _check_batch(num: int, batch_size: int | None, n_data: int) -> int:
    if batch_size is None:
        batch_size = min(num, 8 * n_data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if batch_size % n_data:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the mesh's data axis ({n_data} devices): each device takes "
            "an equal share of every batch"
        )
    if num % batch_size:
        raise ValueError(
            f"the {num} calibration sequences do not split into batches of batch_size={batch_size}; use a number of "
            "sequences that is a multiple of batch_size"
        )
    return int(batch_size)


def _on_mesh(state, mesh: Mesh):
    """Leaves already placed on ``mesh`` as they are; others replicated over it."""
    replicated = NamedSharding(mesh, P())
    devices = set(mesh.devices.flat)

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        if mesh.size == 1 and s is not None and s.device_set == devices:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, state)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, ids, positions):
    return nnx.merge(graphdef, state).embed_inputs(ids, positions)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _block_stats(graphdef, params, rest, h, positions):
    """Per Linear of the block: ``(H, count, sum |x|, max |x|)`` of this batch."""
    block = nnx.merge(graphdef, params, rest)
    sink: dict = {}

    def record(name, x, op):
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        a = jnp.abs(x2)
        got = (x2.T @ x2, jnp.float32(x2.shape[0]), a.sum(0), a.max(0))
        prev = sink.get(name)
        sink[name] = got if prev is None else (prev[0] + got[0], prev[1] + got[1], prev[2] + got[2], jnp.maximum(prev[3], got[3]))
        return op(x)

    with hooks.intercept(block, record):
        block(h, positions)
    return sink


@functools.partial(jax.jit, static_argnames=("graphdef", "act"))
def _block_outputs(graphdef, params, new_params, rest, h, positions, absmax, act):
    """``(compressed outputs, sum ||y' - y||^2, sum ||y - h||^2)`` of one batch."""
    y, _ = nnx.merge(graphdef, params, rest)(h, positions)
    block = nnx.merge(graphdef, new_params, rest)
    if act:
        per_layer = {name: (bits, per_token) for name, bits, per_token in act}

        def quantize_input(name, x, op):
            bits, per_token = per_layer[name]
            return op(fake_quant_input(x, bits=bits, per_token=per_token, absmax=absmax[name]))

        with hooks.intercept(block, quantize_input, names=list(per_layer)):
            y_new, _ = block(h, positions)
    else:
        y_new, _ = block(h, positions)
    d = (y_new - y).astype(jnp.float32)
    r = (y - h).astype(jnp.float32)
    return y_new, jnp.sum(d * d), jnp.sum(r * r)


def _reduce(total, got):
    if total is None:
        return got
    return {n: (t[0] + g[0], t[1] + g[1], t[2] + g[2], jnp.maximum(t[3], g[3])) for (n, t), g in zip(total.items(), got.values())}


def _check_solver_devices(solver_devices) -> str:
    if not isinstance(solver_devices, str) or solver_devices not in SOLVER_DEVICES:
        raise ValueError(
            f"solver_devices={solver_devices!r} must be 'all' (the block's Linears solve spread over the mesh's "
            "devices) or 'one' (every solve on the mesh's first device)"
        )
    return solver_devices


def _assign_devices(shapes: dict, devices: list) -> dict:
    """``{kernel name: device}``: the largest solve first (``H`` (in, in) plus the kernel
    (in, out)), each onto the device with the fewest elements assigned so far (ties: the
    earlier device, the earlier kernel)."""
    size = {n: n_in * (n_in + n_out) for n, (n_in, n_out) in shapes.items()}
    load = [0] * len(devices)
    out = {}
    for name in sorted(size, key=lambda n: -size[n]):
        i = load.index(min(load))
        out[name] = devices[i]
        load[i] += size[name]
    return out


def _layer_errors(prefix, stats, params, new_params, aux) -> dict:
    """Relative output errors of the block's Linears (computed where each ``H`` lies); a
    transform that folds scales (``aux.scales``: AWQ, SmoothQuant) reports them itself in
    the original input basis."""
    if isinstance(aux, (AWQAux, SmoothQuantAux)):
        return {prefix + n: float(e) for n, e in aux.errors.items()}
    old, new = dict(tree.named_leaves(params)), dict(tree.named_leaves(new_params))
    errors = {}
    for n, s in stats.items():
        k, k_new = jax.device_put((old[n], new[n]), s.h.sharding)
        errors[prefix + n] = base.relative_error(k, k_new, s.h)
    return {n: float(e) for n, e in errors.items()}


def _grids_of(aux) -> dict:
    """``{kernel name: QuantParams}`` of every grid an aux (or a chain of auxes) holds."""
    out = {}
    for a in base.all_auxes(aux):
        if isinstance(a, (base.GridAux, AWQAux, SmoothQuantAux)):
            out.update(a.grids)
    return out


def _run_transform(transform, params, key, *, spread: bool):
    try:
        return transform(params, key=key)
    except ValueError as e:
        if spread and "incompatible devices" in str(e):
            raise ValueError(
                "the block's transform combines Linears whose statistics lie on different devices "
                "(solver_devices='all'); build it from calib.on_one_device() (as method() does for awq and "
                "smoothquant) or pass solver_devices='one'"
            ) from e
        raise


def compress(
    model: nnx.Module,
    calib_ids,
    transform_for_block: Callable[[BlockCalibration], Any],
    *,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    progress: Callable[[BlockReport], None] | None = None,
    keep_grids: bool = False,
    solver_devices: str = "all",
) -> tuple[nnx.Module, Report]:
    """Compress a decoder block by block, each block calibrated on the compressed blocks' outputs.

    Args:
      model: a decoder with ``embed_inputs``, ``layers`` and blocks that have
        ``scale_groups()`` (:class:`~jcompress.models.llama.Llama`,
        :class:`~jcompress.models.gpt2.GPT2`). Updated in place and returned.
      calib_ids: ``(num_sequences, seq_len)`` int token ids (e.g. from
        :func:`jcompress.lm.sample_windows`).
      transform_for_block: ``calib -> Transform`` for each block, given its
        :class:`BlockCalibration`, e.g. ``lambda c: jc.oneshot.gptq(c.stats, bits=4)``
        (or :func:`method`); the transform is called on the block's ``nnx.Param`` state.
      mesh: a mesh with a ``'data'`` axis over which calibration batches are sharded
        (default: one device).
      batch_size: sequences per calibration batch, a multiple of the ``data`` axis size
        that divides ``num_sequences`` (default ``min(num, 8 * data devices)``).
      key: split into one key per block for random transforms.
      progress: called with each :class:`BlockReport` as its block finishes.
      keep_grids: keep the quantized kernels' grids (``Report.grids``, to write the
        codes); their int32 codes take as much memory as the float kernels.
      solver_devices: ``'all'``: each Linear's statistics go to one of the mesh's devices
        (largest first onto the least-loaded), so per-layer solvers run concurrently and
        each device holds only its Linears' ``H`` and solver buffers; ``'one'``: all on
        the mesh's first device. The compressed weights and the report are the same.

    Returns:
      ``(model, Report)``.

    Raises:
      ValueError: ids not ``(num, seq_len)``, a batch size that does not fit, a mesh
        without a ``data`` axis, a model without decoder blocks, ``solver_devices`` not
        ``'all'`` or ``'one'``.

    Example:
      >>> model, report = compress(model, ids, method('sparsegpt', sparsity=0.5), batch_size=8)
    """
    start = time.perf_counter()
    ids = _check_ids(calib_ids)
    mesh = parallel.data_mesh(1) if mesh is None else mesh
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; block-by-block calibration shards batches over a 'data' axis")
    batch_size = _check_batch(ids.shape[0], batch_size, mesh.shape["data"])
    solver_devices = _check_solver_devices(solver_devices)
    blocks = getattr(model, "layers", None)
    if blocks is None or not hasattr(model, "embed_inputs") or not len(blocks):
        raise ValueError(
            f"{type(model).__name__} is not a decoder with embed_inputs and layers (jcompress.models.llama.Llama, gpt2.GPT2)"
        )
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    data = NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(model)
    hidden = [
        jax.device_put(_embed(graphdef, state, jnp.asarray(ids[i : i + batch_size]), positions), data)
        for i in range(0, ids.shape[0], batch_size)
    ]
    del state
    positions_m = jax.device_put(positions, NamedSharding(mesh, P()))
    keys = [None] * len(blocks) if key is None else list(jax.random.split(key, len(blocks)))
    solver_device = mesh.devices.flat[0]
    devices = list(mesh.devices.flat) if solver_devices == "all" else [solver_device]
    reports, act_quant, grids = [], {}, {}
    for index, block in enumerate(blocks):
        t0 = time.perf_counter()
        prefix = f"layers/{index}/"
        gd, params, rest = nnx.split(block, nnx.Param, ...)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        params_m, rest_m = _on_mesh(params, mesh), _on_mesh(rest, mesh)
        total = None
        for h in hidden:
            total = _reduce(total, _block_stats(gd, params_m, rest_m, h, positions_m))
        kernels = dict(tree.named_leaves(params))
        place = _assign_devices({f"{n}/kernel": kernels[f"{n}/kernel"].shape for n in total}, devices)
        total = {f"{n}/kernel": jax.device_put(v, place[f"{n}/kernel"]) for n, v in total.items()}
        stats = {n: LayerStats(v[0], v[1]) for n, v in total.items()}
        channels = {n: ChannelStats(v[2] / v[1], v[3]) for n, v in total.items()}
        groups = tuple(block.scale_groups()) if hasattr(block, "scale_groups") else ()
        calib = BlockCalibration(index, prefix, stats, channels, groups, solver_device)
        params_1 = jax.device_put(params, solver_device)
        new_params, aux = _run_transform(transform_for_block(calib), params_1, keys[index], spread=len(devices) > 1)
        layer_errors = _layer_errors(prefix, stats, params_1, new_params, aux)
        act = getattr(aux, "act", None) or {}
        act_static = tuple(sorted((n, a.bits, a.per_token) for n, a in act.items()))
        absmax = {n: jnp.float32(a.absmax) for n, a in act.items()}
        new_m = _on_mesh(jax.device_put(new_params, solver_device), mesh)
        num = den = 0.0
        for i, h in enumerate(hidden):
            hidden[i], d2, r2 = _block_outputs(gd, params_m, new_m, rest_m, h, positions_m, absmax, act_static)
            num, den = num + float(d2), den + float(r2)
        nnx.update(block, jax.tree.map(jax.device_put, new_params, shardings))
        act_quant.update({prefix + n: a for n, a in act.items()})
        if keep_grids:
            grids.update({prefix + n: g for n, g in _grids_of(aux).items()})
        output_error = num / den if den > 0 else (np.inf if num > 0 else 0.0)
        report = BlockReport(index, time.perf_counter() - t0, output_error, layer_errors)
        reports.append(report)
        if progress is not None:
            progress(report)
    return model, Report(reports, act_quant, int(ids.shape[0]), int(ids.shape[1]), time.perf_counter() - start, grids)


def with_act_quant(model: nnx.Module, act_quant: dict) -> nnx.Module:
    """A copy of ``model`` whose layers in ``act_quant`` fake-quantize their inputs (``Report.act_quant``).

    Returns ``model`` itself when ``act_quant`` is empty (weight-only methods).
    """
    if not act_quant:
        return model
    return hooks.with_hook(model, act_quantizer(act_quant), names=list(act_quant))


def _awq(c: BlockCalibration, **kw):
    return awq(c.stats, c.channels, groups=c.groups, **kw)


def _smoothquant(c: BlockCalibration, **kw):
    return smoothquant(c.stats, c.channels, groups=c.groups, **kw)


def _nm(n_m) -> NM | None:
    if n_m is None:
        return None
    try:
        n, m = (int(v) for v in n_m)
    except (TypeError, ValueError):
        raise ValueError(f"n_m={n_m!r} must be a pair (n, m) such as (2, 4)") from None
    return NM(n, m)


def method(
    name: str,
    *,
    bits: int = 4,
    group_size: int | None = None,
    act_order: bool = False,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    alpha: float = 0.5,
    act_scale: str = "token",
    static_groups: bool | None = None,
    clip: bool | Mapping[str, bool] = False,
) -> Callable[[BlockCalibration], Any]:
    """``transform_for_block`` for one of :data:`METHODS`, with its hyperparameters.

    Args:
      name: ``'gptq'``, ``'rtn'``, ``'awq'`` (weights on ``bits`` with ``group_size``;
        GPTQ also ``act_order`` and ``static_groups``, AWQ also ``clip``: a bool, or
        ``{regex: bool}`` over the block's kernel paths), ``'sparsegpt'``,
        ``'wanda'``, ``'magnitude'`` (``sparsity`` or ``n_m``), ``'smoothquant'`` (W8A8
        with ``alpha`` and ``act_scale``).
      bits, group_size, act_order, static_groups, clip, sparsity, n_m, alpha, act_scale: as in the factories
        (:func:`jcompress.oneshot.gptq`, :func:`jcompress.quant.quantize`,
        :func:`jcompress.oneshot.awq`, :func:`jcompress.oneshot.sparsegpt`,
        :func:`jcompress.oneshot.wanda`, :func:`jcompress.pruning.magnitude`,
        :func:`jcompress.oneshot.smoothquant`); ``n_m=(2, 4)`` is the pattern ``NM(2, 4)``.

    Raises:
      ValueError: an unknown method, or a pruning method without ``sparsity`` or ``n_m``.

    Example:
      >>> model, report = compress(model, ids, method('gptq', bits=4, group_size=128, act_order=True))
    """
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not one of {METHODS}")
    pattern = _nm(n_m)
    if name in ("sparsegpt", "wanda", "magnitude"):
        if pattern is None and sparsity is None:
            raise ValueError(f"{name} needs sparsity= (e.g. 0.5) or n_m= (e.g. (2, 4))")
        prune_kw = {"pattern": pattern, "sparsity": None} if pattern is not None else {"sparsity": sparsity}
    if name == "gptq":
        return lambda c: oneshot.gptq(
            c.stats, bits=bits, group_size=group_size, act_order=act_order, static_groups=static_groups
        )
    if name == "rtn":
        return lambda c: quant.quantize(bits=bits, group_size=group_size)
    if name == "awq":
        return lambda c: _awq(c.on_one_device(), bits=bits, group_size=group_size, clip=clip)
    if name == "smoothquant":
        return lambda c: _smoothquant(c.on_one_device(), alpha=alpha, act_scale=act_scale)
    if name == "sparsegpt":
        return lambda c: oneshot.sparsegpt(c.stats, **prune_kw)
    if name == "wanda":
        return lambda c: oneshot.wanda(c.stats, **prune_kw)
    kw = dict(prune_kw)
    kw.setdefault("pattern", Unstructured())
    return lambda c: pruning.magnitude(**kw)
