"""B6: real speed-ups from model surgery (hard pruning and SVD factorisation).

Problem: a 784-4096-4096-10 ReLU MLP (quick mode: 784-1024-1024-10) in eval mode on a
batch of 256 float32 inputs, jitted forward pass on CPU.

Figures (measured side by side in the same run; each latency is the best over 3
interleaved rounds of ``report.measure_latency``, a median of 10 calls after warm-up;
quick mode: 2 rounds of 5 calls):

* ``B6 hard pruning 50% hidden neurons``: dense latency / latency of the model from
  :func:`jcompress.pruning.surgery.hard_prune` after removing the half of ``fc1`` and
  ``fc2`` neurons with the smallest L2 norm (about 3.4x fewer FLOPs); target ``>= 1.8``.
  Detail: FLOP ratio (``report.layer_flops``), parameter ratio, ratio of the saved
  ``checkpoint.save_model`` directories' sizes, and the largest difference between the
  small model's logits and the masked dense model's (must be float32 rounding).
* ``B6 SVD rank 1/8``: dense latency / latency of ``jcompress.lowrank.factorize_dense``
  with ``rank_fraction=1/8`` on the hidden layers ``fc1`` and ``fc2`` (the 10-way output
  layer is left dense); target ``>= 3``. Detail as above, plus the relative logit error
  (SVD truncation is lossy, so it is reported, not required to be small).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["run"]


def _latency(forwards: dict, rounds: int = 3, repeats: int = 10) -> dict[str, float]:
    """Best over ``rounds`` interleaved rounds of the median time of each forward."""
    from jcompress import report

    best = {k: float("inf") for k in forwards}
    for _ in range(rounds):
        for k, (fn, args) in forwards.items():
            best[k] = min(best[k], report.measure_latency(fn, *args, warmup=2, repeats=repeats))
    return best


def _forward(model):
    import jax

    from jcompress import models

    fn = models.functional(model)
    return jax.jit(lambda p, e, x: fn.apply(p, e, x)[0]), fn


def _saved_bytes(directory: Path, config: dict, model) -> int:
    from jcompress import checkpoint, models, report

    fn = models.functional(model)
    checkpoint.save_model(directory, config, fn.params, fn.extra)
    return report.dir_size(directory)


def run(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcompress import models, report
    from jcompress import tree as jtree
    from jcompress.pruning import masks as masks_lib
    from jcompress.pruning import scores, surgery

    width = 1024 if quick else 4096
    config = {"name": "mlp", "input_shape": [784], "num_classes": 10, "widths": [width, width], "seed": 0}
    dense = models.create(**config)
    x = jax.random.normal(jax.random.key(1), (256, 784), jnp.float32)
    dense_fwd, dense_fn = _forward(dense)

    hidden = r"^fc[12]/kernel$"
    masks = masks_lib.make_masks(
        scores.magnitude(dense_fn.params), sparsity=0.5, selection=hidden, pattern="structured", norm="l2"
    )
    small = surgery.hard_prune(dense, masks, config=config)
    small_fwd, small_fn = _forward(small.model)
    forwards = {
        "dense": (dense_fwd, (dense_fn.params, dense_fn.extra, x)),
        "pruned": (small_fwd, (small_fn.params, small_fn.extra, x)),
    }

    lowrank = None
    try:
        from jcompress import lowrank
    except ImportError:
        pass
    if lowrank is not None and hasattr(lowrank, "factorize_dense"):
        factored, svd_aux = lowrank.factorize_dense(dense, rank_fraction=1 / 8, include=[r"^fc[12]$"])
        svd_fwd, svd_fn = _forward(factored)
        forwards["svd"] = (svd_fwd, (svd_fn.params, svd_fn.extra, x))

    seconds = _latency(forwards, rounds=2 if quick else 3, repeats=5 if quick else 10)
    flops = {
        "dense": sum(report.layer_flops(dense, (784,)).values()),
        "pruned": sum(report.layer_flops(small.model, (784,)).values()),
    }
    params = {"dense": jtree.tree_size(dense_fn.params), "pruned": jtree.tree_size(small_fn.params)}
    ref = np.asarray(dense_fwd(masks_lib.apply_masks(dense_fn.params, masks), dense_fn.extra, x))
    diff = float(np.max(np.abs(np.asarray(small_fwd(small_fn.params, small_fn.extra, x)) - ref)))
    scale = float(np.max(np.abs(ref)))
    with tempfile.TemporaryDirectory() as tmp:
        size = {
            "dense": _saved_bytes(Path(tmp) / "dense", config, dense),
            "pruned": _saved_bytes(Path(tmp) / "pruned", small.config, small.model),
        }
        if "svd" in forwards:
            lowrank.save(
                Path(tmp) / "svd",
                factored,
                config=config,
                ranks={k.removesuffix("/kernel"): int(r) for k, r in svd_aux.ranks.items()},
            )
            size["svd"] = report.dir_size(Path(tmp) / "svd")
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
            "widths_pruned": small.config["widths"],
            "max_abs_logit_diff_vs_masked": diff,
            "max_abs_logit": scale,
        }
    ]
    if "svd" in forwards:
        out = np.asarray(svd_fwd(svd_fn.params, svd_fn.extra, x))
        dense_out = np.asarray(dense_fwd(dense_fn.params, dense_fn.extra, x))
        svd_ratio = seconds["dense"] / seconds["svd"]
        svd_flops = sum(report.layer_flops(factored, (784,)).values())
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
    else:
        rows.append(
            {
                "name": f"B6 SVD rank 1/8 ({arch})",
                "ratio": float("nan"),
                "target": ">= 3",
                "met": False,
                "note": "jcompress.lowrank.factorize_dense is not available",
            }
        )
    return rows
