"""B6: real speed-ups from model surgery (hard pruning and SVD factorisation).

Problem: a 784-4096-4096-10 ReLU MLP (quick mode: 784-1024-1024-10) in eval mode on a
batch of 256 float32 inputs, jitted forward pass on CPU.

Figures (measured side by side in the same run; each latency is the best over 3
rounds of ``jcompress.timing.compare``, a median of 10 interleaved calls after warm-up;
quick mode: 2 rounds of 5 calls):

* ``B6 hard pruning 50% hidden neurons``: dense latency / latency of the model from
  :func:`jcompress.nnx.surgery.hard_prune` after removing the half of ``fc1`` and
  ``fc2`` neurons with the smallest L2 norm (about 3.4x fewer FLOPs); target ``>= 1.8``.
  Detail: FLOP ratio (``surgery.forward_flops``), parameter ratio, ratio of the saved
  ``checkpoint.save_model`` directories' sizes, and the largest difference between the
  small model's logits and the masked dense model's (must be float32 rounding).
* ``B6 SVD rank 1/8``: dense latency / latency of ``jcompress.nnx.factorize.factorize``
  with rank ``min(in, out) / 8`` on the hidden layers ``fc1`` and ``fc2`` (the 10-way output
  layer is left dense); target ``>= 3``. Detail as above, plus the relative logit error
  (SVD truncation is lossy, so it is reported, not required to be small).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

__all__ = ["run"]


def _latency(forwards: dict, rounds: int = 3, repeats: int = 10) -> dict[str, float]:
    """Best over ``rounds`` rounds of the median time of each forward, the forwards' calls interleaved."""
    from jcompress import timing

    best = {k: float("inf") for k in forwards}
    for _ in range(rounds):
        calls = {k: functools.partial(fn, *args) for k, (fn, args) in forwards.items()}
        ts = timing.compare(calls, warmup=2, repeats=repeats)
        for k, t in ts.items():
            best[k] = min(best[k], t.median)
    return best


def _forward(model):
    import jax

    from jcompress import models

    fn = models.functional(model)
    return jax.jit(lambda p, e, x: fn.apply(p, e, x)[0]), fn


def _saved_bytes(directory: Path, config: dict, model, meta: dict | None = None) -> int:
    from jcompress import checkpoint, models, report

    fn = models.functional(model)
    checkpoint.save_model(directory, config, fn.params, fn.extra, meta=meta)
    return report.dir_size(directory)


def run(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcompress import models
    from jcompress import tree as jtree
    from jcompress.core.base import masked
    from jcompress.core.patterns import Units
    from jcompress.nnx import factorize, surgery
    from jcompress.pruning import masks as masks_lib

    width = 1024 if quick else 4096
    config = {"name": "mlp", "input_shape": [784], "num_classes": 10, "widths": [width, width], "seed": 0}
    dense = models.create(**config)
    x = jax.random.normal(jax.random.key(1), (256, 784), jnp.float32)
    dense_fwd, dense_fn = _forward(dense)

    hidden = r"^fc[12]/kernel$"
    _, mask_aux = masked(masks_lib.magnitude(sparsity=0.5, pattern=Units(norm="l2")), hidden)(dense_fn.params)
    masks = mask_aux.masks
    small, units = surgery.hard_prune(masks, input_shape=(784,))(dense)
    small_fwd, small_fn = _forward(small)
    forwards = {
        "dense": (dense_fwd, (dense_fn.params, dense_fn.extra, x)),
        "pruned": (small_fwd, (small_fn.params, small_fn.extra, x)),
    }

    ranks = {"fc1": round(min(784, width) / 8), "fc2": round(width / 8)}
    factored, svd_aux = masked(factorize.factorize(rank=ranks), hidden)(dense)
    svd_fwd, svd_fn = _forward(factored)
    forwards["svd"] = (svd_fwd, (svd_fn.params, svd_fn.extra, x))

    seconds = _latency(forwards, rounds=2 if quick else 3, repeats=5 if quick else 10)
    flops = {
        "dense": sum(surgery.forward_flops(dense, (784,)).values()),
        "pruned": sum(surgery.forward_flops(small, (784,)).values()),
    }
    params = {"dense": jtree.tree_size(dense_fn.params), "pruned": jtree.tree_size(small_fn.params)}
    ref = np.asarray(dense_fwd(masks_lib.apply_masks(dense_fn.params, masks), dense_fn.extra, x))
    diff = float(np.max(np.abs(np.asarray(small_fwd(small_fn.params, small_fn.extra, x)) - ref)))
    scale = float(np.max(np.abs(ref)))
    with tempfile.TemporaryDirectory() as tmp:
        size = {
            "dense": _saved_bytes(Path(tmp) / "dense", config, dense),
            "pruned": _saved_bytes(Path(tmp) / "pruned", config, small, {"shapes": surgery.leaf_shapes(small)}),
            "svd": _saved_bytes(Path(tmp) / "svd", config, factored, {"factorize": {"ranks": svd_aux.ranks}}),
        }
    arch = f"784-{width}-{width}-10, batch 256"
    ratio = seconds["dense"] / seconds["pruned"]
    rows = [
        {
            "name": f"B6 hard pruning 50% hidden neurons ({arch})",
            "ratio": ratio,
            "target": ">= 1.8",
            "met": bool(ratio >= 1.8 and diff <= 1e-5 * max(1.0, scale)),
            "seconds_dense": seconds["dense"],
            "seconds_pruned": seconds["pruned"],
            "flops_ratio": flops["dense"] / flops["pruned"],
            "params_ratio": params["dense"] / params["pruned"],
            "file_size_ratio": size["dense"] / size["pruned"],
            "file_bytes_dense": size["dense"],
            "file_bytes_pruned": size["pruned"],
            "widths_pruned": [len(units.kept["fc1"]), len(units.kept["fc2"])],
            "max_abs_logit_diff_vs_masked": diff,
            "max_abs_logit": scale,
        }
    ]
    out = np.asarray(svd_fwd(svd_fn.params, svd_fn.extra, x))
    dense_out = np.asarray(dense_fwd(dense_fn.params, dense_fn.extra, x))
    svd_ratio = seconds["dense"] / seconds["svd"]
    svd_flops = sum(surgery.forward_flops(factored, (784,)).values())
    rows.append(
        {
            "name": f"B6 SVD rank 1/8 on fc1, fc2 ({arch})",
            "ratio": svd_ratio,
            "target": ">= 3",
            "met": bool(svd_ratio >= 3),
            "seconds_dense": seconds["dense"],
            "seconds_svd": seconds["svd"],
            "flops_ratio": flops["dense"] / svd_flops,
            "params_ratio": params["dense"] / jtree.tree_size(svd_fn.params),
            "file_size_ratio": size["dense"] / size["svd"],
            "relative_logit_error": float(np.linalg.norm(out - dense_out) / np.linalg.norm(dense_out)),
        }
    )
    return rows
