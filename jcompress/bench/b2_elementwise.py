"""B2: applying a mask and per-channel int8 quantize-dequantize at memory speed.

Problem: 256 MB of float32 kernels (four 4096 x 4096 leaves; quick mode: 32 MB) and a
bool mask per leaf (50% kept). The work is ``fake_quant(where(mask, w, 0))`` with int8
symmetric codes and one scale per output channel (last axis), and, separately, the mask
alone (``jcompress.pruning.apply_masks``).

Figures (measured side by side in the same run, best of 3 after a warm-up):

* ``B2 mask + per-channel int8 fake-quant``: achieved bandwidth (bytes read + written:
  weights in, mask in, weights out = 9 bytes per weight, divided by seconds) as a
  fraction of a numpy copy's bandwidth (``np.copyto`` of the same 256 MB: 2 x 256 MB per
  copy time); target ``>= 0.5``. ``met`` also requires the result to equal
  ``jcompress.quant.fake_quant(where(mask, w, 0), bits=8, axis=-1)`` exactly.
* ``B2 apply_masks``: the same ratio for masking alone; target ``>= 0.5``.

How the fast version streams (see :func:`masked_fake_quant`): the per-channel range is
a column maximum, which XLA's CPU reduction would read from a materialised copy of the
masked weights; scanning over row blocks of a few hundred kilobytes keeps each block in
cache, so the range costs one streaming read. The quantize-dequantize pass is one fused
elementwise loop (``jcompress.quant.fake_quant_range`` with the per-channel range), and
the input buffers are donated so the output reuses their memory instead of faulting in
fresh pages. A plain ``jax.jit`` of the same expression is reported for comparison.

Run: ``python -m jcompress.bench --only b2_elementwise``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

__all__ = ["masked_fake_quant", "run"]

_SHAPES_FULL = [(4096, 4096)] * 4  # 256 MB of float32
_SHAPES_QUICK = [(1024, 2048)] * 4  # 32 MB
_BLOCK_ELEMENTS = 1 << 20  # elements per row block of the range scan (4 MB of float32)


def _row_block(rows: int, cols: int) -> int:
    """Largest divisor of ``rows`` with at most ``_BLOCK_ELEMENTS // cols`` rows (>= 1)."""
    target = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    return max(d for d in range(1, min(rows, target) + 1) if rows % d == 0)


def masked_fake_quant(w, mask, *, bits: int = 8):
    """``fake_quant(where(mask, w, 0), bits=bits, axis=-1)`` computed in two streaming passes.

    Args:
      w: float array ``(..., channels)``; every axis but the last is reduced for the range.
      mask: bool array of ``w``'s shape (True = keep).
      bits: code width (symmetric codes, one scale per channel of the last axis).

    Returns:
      array like ``w``: pruned entries exactly 0, kept ones on their channel's int grid.
    """
    import jax.numpy as jnp
    from jax import lax

    from jcompress import quant

    cols = w.shape[-1]
    w2, m2 = w.reshape(-1, cols), mask.reshape(-1, cols)
    rows = _row_block(w2.shape[0], cols)
    blocks = (w2.reshape(-1, rows, cols), m2.reshape(-1, rows, cols))

    def block_max(running, block):
        x, keep = block
        return jnp.maximum(running, jnp.max(jnp.where(keep, jnp.abs(x), 0), axis=0)), None

    amax, _ = lax.scan(block_max, jnp.zeros((cols,), w.dtype), blocks)
    out = quant.fake_quant_range(jnp.where(m2, w2, 0), (-amax, amax), bits=bits, symmetric=True)
    return out.reshape(w.shape)


def _best(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jcompress import quant
    from jcompress.pruning import apply_masks

    shapes = _SHAPES_QUICK if quick else _SHAPES_FULL
    rng = np.random.default_rng(0)
    weights = {f"fc{i}": {"kernel": rng.standard_normal(s, dtype=np.float32)} for i, s in enumerate(shapes)}
    masks = {k: {"kernel": rng.random(v["kernel"].shape) < 0.5} for k, v in weights.items()}
    n = sum(v["kernel"].size for v in weights.values())
    moved = n * 4 * 2 + n  # weights read and written, mask read
    src = np.concatenate([v["kernel"].ravel() for v in weights.values()])
    dst = np.empty_like(src)
    masks_j = jax.tree.map(jnp.asarray, masks)

    def plain_fq(ws, ms):
        return jax.tree.map(lambda w, m: quant.fake_quant(jnp.where(m, w, 0), bits=8, axis=-1), ws, ms)

    fast_fq = jax.jit(lambda ws, ms: jax.tree.map(masked_fake_quant, ws, ms), donate_argnums=0)
    fast_mask = jax.jit(apply_masks, donate_argnums=0)
    plain_jit = jax.jit(plain_fq)

    reference = plain_jit(jax.tree.map(jnp.asarray, weights), masks_j)
    state = {"w": jax.tree.map(jnp.asarray, weights)}
    result = fast_fq(state["w"], masks_j)  # donated: state["w"] is consumed
    max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference)))
    del result

    def donated(fn):  # feeds each call's output back in, as an in-place update would
        def call():
            state["w"] = jax.block_until_ready(fn(state["w"], masks_j))

        return call

    state["w"] = jax.tree.map(jnp.asarray, weights)
    fresh = jax.tree.map(jnp.asarray, weights)
    t_copy = _best(lambda: np.copyto(dst, src))
    t_fast = _best(donated(fast_fq))
    t_mask = _best(donated(fast_mask))
    t_plain = _best(lambda: jax.block_until_ready(plain_jit(fresh, masks_j)))
    t_copy = min(t_copy, _best(lambda: np.copyto(dst, src)))
    bw_copy = 2 * src.nbytes / t_copy
    frac = lambda t: moved / t / bw_copy
    size = f"{src.nbytes / 2**20:.0f} MB"
    common = {"bytes_counted": moved, "seconds_numpy_copy": t_copy, "numpy_copy_gb_s": bw_copy / 1e9}
    return [
        {
            "name": f"B2 mask + per-channel int8 fake-quant, {size}: bandwidth / numpy copy",
            "ratio": frac(t_fast),
            "target": ">= 0.5",
            "met": bool(frac(t_fast) >= 0.5 and max_diff == 0.0),
            "seconds": t_fast,
            "gb_s": moved / t_fast / 1e9,
            "max_abs_diff_vs_quant_fake_quant": max_diff,
            "plain_jit_ratio": frac(t_plain),
            "seconds_plain_jit": t_plain,
            **common,
        },
        {
            "name": f"B2 apply_masks (donated), {size}: bandwidth / numpy copy",
            "ratio": frac(t_mask),
            "target": ">= 0.5",
            "met": bool(frac(t_mask) >= 0.5),
            "seconds": t_mask,
            "gb_s": moved / t_mask / 1e9,
            **common,
        },
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
