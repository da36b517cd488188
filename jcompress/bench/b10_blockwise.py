"""B10: one-shot compression of a decoder, block by block: seconds and peak memory per block.

Problem: random-weight Llama decoders (:class:`jcompress.models.llama.Llama`, float32)
with hidden size 512, MLP size 1,408, 8 query and 2 key/value heads (GQA), vocabulary 512,
at 4 and at 8 layers, compressed by :func:`jcompress.blockwise.compress` on 64 calibration
sequences of 128 tokens (batches of 8) with GPTQ (4 bits, groups of 128) and SparseGPT (50%
unstructured). Quick mode: SparseGPT only, hidden size 64, every projection 64 x 64 (4
heads, one solver program), vocabulary 128, 2 and 4 layers, 16 sequences of 32 tokens, in
one process (cold at 2 layers, then warm at 2 and 4).

Every configuration (method, layer count) runs in a fresh Python process (:func:`measure`),
so that its compilation and its memory are its own, without a persistent compilation
cache, and with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, unless
set by the caller) so that the RSS follows the live buffers rather than what the
allocator keeps in its heaps. In that process:

1. the model and the calibration ids are built, freed heap memory is handed back to the
   system (``malloc_trim``) and the resident set size is read: the **baseline** (the
   interpreter, JAX, the model and the ids);
2. the kernel's peak-RSS counter is reset to the current RSS (``/proc/self/clear_refs``),
   the model is compressed, and the peak RSS minus the baseline is the **peak extra
   memory** of the compression: memory it needs beyond the model it is given. The first
   (**cold**) run includes XLA's compilation and the compiled programs;
3. a fresh model with the same weights is built and the baseline and peak are taken again
   for a second (**warm**) run in the same process (programs compiled).

Seconds per block are the wall time of :func:`~jcompress.blockwise.compress` divided by
the number of layers. The configurations run in interleaved rounds (``gptq/4, gptq/8,
sparsegpt/4, sparsegpt/8, gptq/4, ...``; ``FULL["rounds"]``, 1 by default: a round takes
about 25 minutes on a busy 2-core machine); each figure is the median over rounds, with
its min-max.

Figures:

* ``memory probe``: the first process also measures a warm run that writes a NumPy array
  of known size (64 MiB; 32 MiB quick) while it is measured; (peak with it - peak without) / its size,
  target ``0.9-1.1``: the instrument sees memory the run holds.

Per method:

* ``peak extra memory, 8 layers / 4 layers (warm)``: target ``<= 1.2``: the memory the
  compression needs does not grow with the depth of the model.
* ``peak extra memory / (block params + calibration states), L layers (warm)``: the peak
  against one block's parameter bytes plus the calibration hidden states
  ``num_sequences * seq_len * hidden * 4`` bytes (the states of all sequences are kept for
  one block at a time); reported (no target). The row also gives the cold figures.
* ``seconds per block, 8 layers / 4 layers`` (warm, target ``0.9-1.1``: every block costs
  the same) and cold (reported: the compilation is paid once, so it spreads over more
  blocks at 8 layers).

Linux only (``/proc``); the memory figures are host RSS (the CPU backend keeps device
buffers in host memory).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

__all__ = ["FULL", "QUICK", "measure", "run"]

FULL = {
    "hidden": 512,
    "intermediate": 1408,
    "group_size": 128,
    "heads": 8,
    "kv_heads": 2,
    "vocab": 512,
    "layers": (4, 8),
    "num_sequences": 64,
    "seq_len": 128,
    "batch_size": 8,
    "rounds": 1,
    "methods": ("gptq", "sparsegpt"),
    "one_process": False,
    "probe_bytes": 64 << 20,
}
QUICK = {
    "hidden": 64,
    "intermediate": 64,
    "group_size": 32,
    "heads": 4,
    "kv_heads": 4,
    "vocab": 128,
    "layers": (2, 4),
    "num_sequences": 16,
    "seq_len": 32,
    "batch_size": 8,
    "rounds": 1,
    "methods": ("sparsegpt",),
    "one_process": True,
    "probe_bytes": 32 << 20,
}
METHODS = {
    "gptq": ("GPTQ 4-bit", {"bits": 4}),
    "sparsegpt": ("SparseGPT 50%", {"sparsity": 0.5}),
}
_KIB = 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _settle() -> int:
    """Collect garbage, hand freed heap pages back to the system; the RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _status_kib("VmRSS") * _KIB


def _reset_peak() -> None:
    """Set the kernel's peak-RSS counter (VmHWM, ``ru_maxrss``) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(spec: dict, num_layers: int):
    """A random-weight float32 Llama (numpy initialisation: no XLA compilation)."""
    import jax.numpy as jnp
    from flax import nnx

    from jcompress import tree
    from jcompress.models.llama import Llama

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(_config(spec, num_layers), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def init(name, s):
        if name.endswith("scale"):
            return jnp.asarray(1 + 0.1 * rng.normal(size=s.shape), s.dtype)
        z = rng.normal(size=s.shape).astype(np.float32)
        return jnp.asarray(z / np.sqrt(s.shape[0]) if name.endswith("kernel") else z, s.dtype)

    return nnx.merge(graphdef, tree.map_with_names(init, state))


def _config(spec: dict, num_layers: int):
    from jcompress.models.llama import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        num_layers=num_layers,
        num_heads=spec["heads"],
        num_kv_heads=spec["kv_heads"],
        intermediate_size=spec["intermediate"],
        max_position=spec["seq_len"],
    )


def _one_run(spec: dict, factory, ids, num_layers: int, extra_bytes: int = 0) -> dict:
    """Build a model, take the baseline, compress it.

    Returns ``{"seconds", "baseline_bytes", "peak_extra_bytes", "block_peaks"}``; ``block_peaks``:
    the peak extra bytes so far as each block finishes (flat when nothing accumulates).
    """
    import jax
    from flax import nnx

    from jcompress import blockwise

    model = _build(spec, num_layers)
    jax.block_until_ready(nnx.state(model))
    baseline = _settle()
    _reset_peak()
    extra = np.ones(extra_bytes // 8, np.float64) if extra_bytes else None  # written: resident
    block_peaks = []
    progress = lambda r: block_peaks.append(_status_kib("VmHWM") * _KIB - baseline)
    t0 = time.perf_counter()
    model, _ = blockwise.compress(model, ids, factory, batch_size=spec["batch_size"], progress=progress)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * _KIB
    del extra, model
    return {"seconds": seconds, "baseline_bytes": baseline, "peak_extra_bytes": peak - baseline, "block_peaks": block_peaks}


def block_bytes(spec: dict) -> int:
    """Parameter bytes of one decoder block of ``spec`` (float32)."""
    import jax
    from flax import nnx

    from jcompress.models.llama import Llama

    model = nnx.eval_shape(lambda: Llama(_config(spec, 1), rngs=nnx.Rngs(0)))
    params = nnx.state(model.layers[0], nnx.Param)
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def measure(spec: dict, method: str, layers, *, probe_bytes: int = 0) -> dict:
    """Runs of one method in this process (call it in a fresh one).

    The first run (``cold``: compilation included) compresses a ``layers[0]``-block model,
    untimed runs compile for the other counts (the embedding's program is compiled per
    model); then one ``warm`` run per entry of ``layers``, each on a freshly built model; then,
    with ``probe_bytes``, one more warm run at ``layers[0]`` that writes a NumPy array of
    ``probe_bytes`` bytes while it is measured (a known allocation, to check the
    measurement).

    Args:
      spec: sizes (:data:`FULL` or :data:`QUICK`).
      method: a key of :data:`METHODS`.
      layers: decoder block counts, e.g. ``[4]`` or ``[2, 4]``.
      probe_bytes: size of the probe array (0: no probe run).

    Returns:
      ``{"cold": run, "warm": {str(layers): run}, "probe": run or None}``, each run
      ``{"seconds", "baseline_bytes", "peak_extra_bytes"}``.

    Example:
      >>> measure(QUICK, "sparsegpt", [2, 4])["warm"]["4"]["peak_extra_bytes"]
    """
    from jcompress import blockwise

    ids = np.random.default_rng(1).integers(0, spec["vocab"], (spec["num_sequences"], spec["seq_len"]))
    kwargs = dict(METHODS[method][1], **({"group_size": spec["group_size"]} if method == "gptq" else {}))
    factory = blockwise.method(method, **kwargs)
    out = {"cold": _one_run(spec, factory, ids, layers[0])}
    for n in layers[1:]:  # each model's embedding is compiled for it: compile before the warm runs
        _one_run(spec, factory, ids, n)
    out["warm"] = {str(n): _one_run(spec, factory, ids, n) for n in layers}
    out["probe"] = _one_run(spec, factory, ids, layers[0], probe_bytes) if probe_bytes else None
    return out


def _child_env() -> dict:
    """This environment without a persistent compilation cache (cold means compiling), and
    with glibc's mmap threshold fixed at 64 KiB unless the caller set it: buffers above it
    are mapped on allocation and unmapped on free, so the RSS follows the live buffers
    instead of what the allocator keeps in its heaps (the default threshold rises to 32 MiB
    after the first large free)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 10))
    return env


def measure_in_child(spec: dict, method: str, layers, *, probe_bytes: int = 0, timeout: float = 1800) -> dict:
    """:func:`measure` in a fresh ``python -m jcompress.bench.b10_blockwise`` process."""
    arg = json.dumps({"spec": spec, "method": method, "layers": list(layers), "probe_bytes": probe_bytes})
    done = subprocess.run(
        [sys.executable, "-m", "jcompress.bench.b10_blockwise", arg],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        env=_child_env(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"B10 child ({method}, {list(layers)} layers) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> tuple[float, list[float]]:
    return float(statistics.median(values)), [float(min(values)), float(max(values))]


def _collect(spec: dict) -> tuple[dict, dict]:
    """``({(method, layers): [(cold run or None, warm run)] per round}, probe)``.

    Full: one fresh process per (method, layer count) and round, rounds interleaved.
    Quick: one process per method (cold at the smaller count; warm at both).
    """
    methods = spec["methods"]
    runs: dict = {(m, n): [] for m in methods for n in spec["layers"]}
    probe = None
    for r in range(spec["rounds"]):
        for m in methods:
            groups = [spec["layers"]] if spec["one_process"] else [[n] for n in spec["layers"]]
            for layers in groups:
                want_probe = r == 0 and m == methods[0] and layers[0] == spec["layers"][0]
                got = measure_in_child(spec, m, layers, probe_bytes=spec["probe_bytes"] if want_probe else 0)
                probe = got["probe"] or probe
                for n in layers:
                    cold = got["cold"] if n == layers[0] else None
                    runs[(m, n)].append((cold, got["warm"][str(n)], got["warm"][str(layers[0])]))
    return runs, probe


def run(quick: bool) -> list[dict]:
    spec = QUICK if quick else FULL
    small, large = spec["layers"]
    runs, probe = _collect(spec)
    unit_params = block_bytes(spec)
    states = spec["num_sequences"] * spec["seq_len"] * spec["hidden"] * 4
    unit = unit_params + states
    size = f"hidden {spec['hidden']}, MLP {spec['intermediate']}, {spec['num_sequences']}x{spec['seq_len']} tokens"
    process = "one process per method" if spec["one_process"] else "fresh process per configuration"
    common = {
        "hidden": spec["hidden"],
        "intermediate": spec["intermediate"],
        "num_sequences": spec["num_sequences"],
        "seq_len": spec["seq_len"],
        "batch_size": spec["batch_size"],
        "rounds": spec["rounds"],
        "processes": process,
        "block_param_bytes": unit_params,
        "calibration_state_bytes": states,
    }
    rows = []
    if probe is not None:
        base = runs[(spec["methods"][0], small)][0][2]["peak_extra_bytes"]
        seen = (probe["peak_extra_bytes"] - base) / spec["probe_bytes"]
        rows.append(
            {
                "name": f"B10 memory probe: (peak with a {spec['probe_bytes'] >> 20} MiB array - peak without) / its size",
                "ratio": seen,
                "target": "0.9-1.1",
                "met": bool(0.9 <= seen <= 1.1),
                "probe_bytes": spec["probe_bytes"],
                "peak_extra_with_probe_bytes": probe["peak_extra_bytes"],
                "peak_extra_without_bytes": base,
                **common,
            }
        )
    for method in spec["methods"]:
        label, kwargs = METHODS[method]
        kw = dict(kwargs, **({"group_size": spec["group_size"]} if method == "gptq" else {}))
        label = f"{label} g{spec['group_size']}" if method == "gptq" else label
        ctx = {"method": method, **kw, **common}
        fig: dict = {}
        for n in spec["layers"]:
            got = runs[(method, n)]
            fig[n] = {"peak_warm": _summary([w["peak_extra_bytes"] for _, w, _ in got])}
            fig[n]["per_block_warm"] = _summary([w["seconds"] / n for _, w, _ in got])
            fig[n]["baseline_warm"] = float(statistics.median(w["baseline_bytes"] for _, w, _ in got))
            fig[n]["block_peaks"] = got[0][1].get("block_peaks")
            colds = [c for c, _, _ in got if c is not None]
            fig[n]["peak_cold"] = _summary([c["peak_extra_bytes"] for c in colds]) if colds else None
            fig[n]["per_block_cold"] = _summary([c["seconds"] / n for c in colds]) if colds else None
        growth = fig[large]["peak_warm"][0] / fig[small]["peak_warm"][0]
        cold_growth = fig[large]["peak_cold"][0] / fig[small]["peak_cold"][0] if fig[large]["peak_cold"] else None
        rows.append(
            {
                "name": f"B10 {label} peak extra memory, {large} layers / {small} layers ({size}), warm",
                "ratio": growth,
                "target": "<= 1.2",
                "met": bool(growth <= 1.2),
                "ratio_cold": cold_growth,
                **{f"peak_extra_warm_bytes_{n}": fig[n]["peak_warm"][0] for n in spec["layers"]},
                **{f"peak_extra_warm_min_max_{n}": fig[n]["peak_warm"][1] for n in spec["layers"]},
                **ctx,
            }
        )
        for n in spec["layers"]:
            f = fig[n]
            rows.append(
                {
                    "name": f"B10 {label} peak extra memory / (block params + calibration states), {n} layers, warm",
                    "ratio": f["peak_warm"][0] / unit,
                    "target": "report",
                    "met": None,
                    "ratio_cold": f["peak_cold"][0] / unit if f["peak_cold"] else None,
                    "peak_extra_warm_bytes": f["peak_warm"][0],
                    "peak_extra_warm_min_max": f["peak_warm"][1],
                    "peak_extra_cold_bytes": f["peak_cold"][0] if f["peak_cold"] else None,
                    "peak_extra_cold_min_max": f["peak_cold"][1] if f["peak_cold"] else None,
                    "baseline_rss_bytes": f["baseline_warm"],
                    "peak_extra_after_each_block_bytes": f["block_peaks"],
                    "num_layers": n,
                    **ctx,
                }
            )
        phases = [("warm", "0.9-1.1")] + ([("cold", "report")] if fig[large]["per_block_cold"] else [])
        for phase, target in phases:
            ratio = fig[large][f"per_block_{phase}"][0] / fig[small][f"per_block_{phase}"][0]
            rows.append(
                {
                    "name": f"B10 {label} seconds per block, {large} layers / {small} layers, {phase}"
                    + (" (compilation included, no persistent cache)" if phase == "cold" else ""),
                    "ratio": ratio,
                    "target": target,
                    "met": bool(0.9 <= ratio <= 1.1) if phase == "warm" else None,
                    **{f"seconds_per_block_{n}": fig[n][f"per_block_{phase}"][0] for n in spec["layers"]},
                    **{f"seconds_per_block_min_max_{n}": fig[n][f"per_block_{phase}"][1] for n in spec["layers"]},
                    **ctx,
                }
            )
    return rows


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(json.dumps(measure(job["spec"], job["method"], job["layers"], probe_bytes=job["probe_bytes"])))
