"""B2: applying a mask and per-channel int8 quantize-dequantize at memory speed.

Problem: 256 MB of float32 kernels (four 4096 x 4096 leaves; quick mode: 32 MB) and a
bool mask per leaf (50% kept). The work is ``fake_quant(where(mask, w, 0))`` with int8
symmetric codes and one scale per output channel (last axis), and, separately, the mask
alone (``jcompress.pruning.apply_masks``).

Figures (measured side by side in the same run, best of 3 after a warm-up):

* ``B2 mask + per-channel int8 fake-quant``: the library call a user writes,
  ``jax.jit(lambda w, m: quant.fake_quant(jnp.where(m, w, 0), bits=8, axis=-1),
  donate_argnums=0)`` over the tree; achieved bandwidth (bytes read + written: weights
  in, mask in, weights out = 9 bytes per weight, divided by seconds) as a fraction of a
  numpy copy's bandwidth (``np.copyto`` of the same 256 MB: 2 x 256 MB per copy time);
  target ``>= 0.5``. The same call without donating the weights is reported beside it
  (its output needs fresh pages, which the kernel must fault in and zero).
* ``B2 apply_masks``: the same ratio for masking alone (``jcompress.pruning.apply_masks``,
  donated); target ``>= 0.5``.

What keeps the quantizer at memory speed (see ``jcompress.quant``): a symmetric grid's
range is one ``max |w|`` reduction per channel (not a min and a max), and the
quantize-dequantize pass of a per-channel grid runs over the 2-D ``(rows, channels)``
view of the kernel; XLA's CPU loops over the equivalent 3-D view ran about 3x slower.

Run: ``python -m jcompress.bench --only b2_elementwise``.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from jcompress import timing

__all__ = ["run"]

_SHAPES_FULL = [(4096, 4096)] * 4  # 256 MB of float32
_SHAPES_QUICK = [(1024, 2048)] * 4  # 32 MB


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

    def masked_fq(ws, ms):
        return jax.tree.map(lambda w, m: quant.fake_quant(jnp.where(m, w, 0), bits=8, axis=-1), ws, ms)

    fast_fq = jax.jit(masked_fq, donate_argnums=0)
    fast_mask = jax.jit(apply_masks, donate_argnums=0)
    not_donated = jax.jit(masked_fq)

    # Checked against numpy: every output is on its column's int8 grid and within half a
    # step of the masked input; the codes are compared with numpy's (they can differ only
    # at ties, through float rounding of x / scale).
    worst, off_grid, mismatches = 0.0, 0.0, 0
    result = fast_fq(jax.tree.map(jnp.asarray, weights), masks_j)
    for name, got in result.items():
        x = np.where(masks[name]["kernel"], weights[name]["kernel"], np.float32(0))
        scale = np.max(np.abs(x), axis=0, keepdims=True) / np.float32(127)
        got = np.asarray(got["kernel"])
        steps = got / scale
        worst = max(worst, float(np.max(np.abs(got - x) / scale)))
        off_grid = max(off_grid, float(np.max(np.abs(steps - np.round(steps)))), float(np.max(np.abs(steps))) - 127)
        mismatches += int(np.count_nonzero(np.round(steps) != np.clip(np.round(x / scale), -127, 127)))
    correct = worst <= 0.5 + 1e-4 and off_grid <= 1e-3
    del result

    state = {}

    def donated(fn):  # feeds each call's output back in, as an in-place update would
        def call():
            state["w"] = jax.block_until_ready(fn(state["w"], masks_j))

        return call

    state["w"] = jax.tree.map(jnp.asarray, weights)
    fresh = jax.tree.map(jnp.asarray, weights)
    ts = timing.compare(
        {
            "copy": lambda: np.copyto(dst, src),
            "fast": donated(fast_fq),
            "mask": donated(fast_mask),
            "plain": lambda: not_donated(fresh, masks_j),
        },
        repeats=3,
    )
    t_copy, t_fast, t_mask, t_plain = (ts[k].median for k in ("copy", "fast", "mask", "plain"))
    bw_copy = 2 * src.nbytes / t_copy
    frac = lambda t: moved / t / bw_copy
    size = f"{src.nbytes / 2**20:.0f} MB"
    common = {"bytes_counted": moved, "seconds_numpy_copy": t_copy, "numpy_copy_gb_s": bw_copy / 1e9}
    return [
        {
            "name": f"B2 mask + per-channel int8 fake-quant, {size}: bandwidth / numpy copy",
            "ratio": frac(t_fast),
            "target": ">= 0.5",
            "met": bool(frac(t_fast) >= 0.5 and correct),
            "seconds": t_fast,
            "gb_s": moved / t_fast / 1e9,
            "max_error_in_steps": worst,
            "codes_differing_from_numpy": mismatches,
            "not_donated_ratio": frac(t_plain),
            "seconds_not_donated": t_plain,
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
