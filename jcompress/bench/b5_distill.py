"""B5: cost of a distillation step, against a plain student step and against FLOPs, and on 1-8 devices.

Hinton et al.'s MNIST setting: a 1200-1200 MLP teacher and an 800-800 MLP student on
28x28 inputs, one global batch. Three figures, each measured side by side in this run:

* distill step (teacher forward in the step) / student train step, next to the ratio
  the FLOPs predict: ``(student fwd + bwd + teacher fwd) / (student fwd + bwd)``. The
  backward pass costs the forward's FLOPs for the weight gradients plus, for every layer
  but the first, the same again for the input gradients; ``predicted_ratio_3x`` is the
  cruder ``1 + teacher_fwd / (3 student_fwd)``.
* distill step with cached teacher logits / student step: the FLOPs predict 1.
* the distill step on 1, 2, 4 and 8 forced host devices (a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``), same global batch: on a CPU
  the devices share the same cores, so this shows the partitioning overhead, not a
  speedup. The correctness part is that the params after the step equal the
  one-device params.

Each round times the steps back to back (median of repeated calls, after a warm-up that
compiles); a ratio is the median over rounds of the paired ratios, and the times shown
are the best round's.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np

__all__ = ["run"]

TEACHER_WIDTHS = (1200, 1200)
STUDENT_WIDTHS = (800, 800)
INPUT_SHAPE = (28, 28, 1)


def _models():
    from jcompress import models

    make = lambda widths, seed: models.create("mlp", input_shape=INPUT_SHAPE, num_classes=10, widths=widths, seed=seed)
    return make(TEACHER_WIDTHS, 0), make(STUDENT_WIDTHS, 1)


def _batch(batch_size: int):
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, *INPUT_SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    return x, y


def _best_time(fn, args, *, rounds: int, repeats: int) -> float:
    from jcompress import timing

    return min(timing.timeit(fn, *args, warmup=1, repeats=repeats).median for _ in range(rounds))


def _predicted(teacher, student) -> tuple[float, float]:
    from jcompress.report import layer_flops

    t_fwd = sum(layer_flops(teacher, INPUT_SHAPE).values())
    s_layers = layer_flops(student, INPUT_SHAPE)
    s_fwd = sum(s_layers.values())
    first = s_layers["fc1/kernel"]
    s_fwd_bwd = s_fwd + s_fwd + (s_fwd - first)  # forward, weight gradients, input gradients past fc1
    return (s_fwd_bwd + t_fwd) / s_fwd_bwd, 1.0 + t_fwd / (3.0 * s_fwd)


def _step_vs_student(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    from jcompress import models, train
    from jcompress.distill.step import DistillConfig, init_state, make_step, teacher_logits

    teacher, student = _models()
    t_fn, s_fn = models.functional(teacher), models.functional(student)
    batch_size = 64 if quick else 128
    rounds, repeats = (3, 5) if quick else (7, 15)
    x, y = _batch(batch_size)
    tx = optax.adam(1e-3)
    config = DistillConfig(temperature=20.0, alpha=0.9)
    d_state = init_state(jax.tree.map(jnp.array, s_fn.params), s_fn.extra, tx)
    s_state = train.init_state(jax.tree.map(jnp.array, s_fn.params), s_fn.extra, tx)
    student_step = jax.jit(functools.partial(train.train_step, apply_fn=s_fn.apply, tx=tx))
    live = make_step(student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=tx, config=config, donate=False)
    cached = make_step(student_apply=s_fn.apply, teacher_apply=None, tx=tx, config=config, donate=False)
    t_logits = teacher_logits(t_fn.apply, t_fn.params, t_fn.extra, x)
    times = {"student": [], "live": [], "cached": []}
    for _ in range(rounds):  # back to back in each round, so that the three see the same machine load
        times["student"].append(_best_time(student_step, (s_state, (x, y)), rounds=1, repeats=repeats))
        times["live"].append(_best_time(live, (d_state, (x, y), t_fn.params, t_fn.extra), rounds=1, repeats=repeats))
        times["cached"].append(_best_time(cached, (d_state, (x, y, t_logits), None, None), rounds=1, repeats=repeats))
    t_student, t_live, t_cached = (min(times[k]) for k in ("student", "live", "cached"))
    # the ratio of each round's paired times, median over rounds: robust to load that drifts between rounds
    live_ratio = float(np.median(np.array(times["live"]) / np.array(times["student"])))
    cached_ratio = float(np.median(np.array(times["cached"]) / np.array(times["student"])))
    predicted, predicted_3x = _predicted(teacher, student)
    common = {
        "teacher": "mlp " + "-".join(map(str, TEACHER_WIDTHS)),
        "student": "mlp " + "-".join(map(str, STUDENT_WIDTHS)),
        "batch_size": batch_size,
        "student_step_s": t_student,
    }
    return [
        {
            "name": f"B5 distill step / student step (teacher in the step, batch {batch_size})",
            "ratio": live_ratio,
            "target": f"<= 1.15 x FLOP prediction ({1.15 * predicted:.2f})",
            "met": bool(live_ratio <= 1.15 * predicted),
            "predicted_ratio": predicted,
            "predicted_ratio_3x": predicted_3x,
            "distill_step_s": t_live,
            **common,
        },
        {
            "name": f"B5 distill step / student step (cached teacher logits, batch {batch_size})",
            "ratio": cached_ratio,
            "target": "<= 1.15 (FLOP prediction 1.0)",
            "met": bool(cached_ratio <= 1.15),
            "predicted_ratio": 1.0,
            "distill_step_s": t_cached,
            **common,
        },
    ]


def _scaling_worker(quick: bool) -> dict:
    """In a process with 8 host devices: step time and final params on 1/2/4/8 devices."""
    import jax
    import jax.numpy as jnp
    import optax

    from jcompress import models, parallel
    from jcompress.distill.step import DistillConfig, init_state, make_step

    teacher, student = _models()
    t_fn, s_fn = models.functional(teacher), models.functional(student)
    batch_size = 64 if quick else 128
    rounds, repeats = (1, 5) if quick else (3, 10)
    x, y = _batch(batch_size)
    # SGD: Adam's first step divides each gradient by its own magnitude, which turns
    # rounding-level differences of near-zero gradients into visible parameter changes
    tx = optax.sgd(0.1)
    config = DistillConfig(temperature=20.0, alpha=0.9)
    out = {}
    for n in (1, 2, 4, 8):
        if n > len(jax.devices()):
            break
        mesh = parallel.data_mesh(n)
        state = parallel.replicate(init_state(jax.tree.map(jnp.array, s_fn.params), s_fn.extra, tx), mesh)
        t_arrays = parallel.replicate((t_fn.params, t_fn.extra), mesh)
        batch = parallel.shard_batch((x, y), mesh)
        step = make_step(
            student_apply=s_fn.apply, teacher_apply=t_fn.apply, tx=tx, config=config, mesh=mesh, donate=False
        )
        seconds = _best_time(step, (state, batch, *t_arrays), rounds=rounds, repeats=repeats)
        new_state, _ = step(state, batch, *t_arrays)
        params = [np.asarray(p) for p in jax.tree.leaves(jax.device_get(new_state.params))]
        out[n] = {"seconds": seconds, "params": params}
    ref = out[1]["params"]
    return {
        str(n): {
            "seconds": r["seconds"],
            "max_rel_diff": max(
                float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) for a, b in zip(ref, r["params"])
            ),
        }
        for n, r in out.items()
    }


def _device_scaling(quick: bool) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    code = f"import json; from jcompress.bench.b5_distill import _scaling_worker; print(json.dumps(_scaling_worker({quick})))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"device-scaling subprocess failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    t1 = result["1"]["seconds"]
    rows = []
    for n, r in result.items():
        rows.append(
            {
                "name": f"B5 distill step on {n} host devices / 1 device (same global batch)",
                "ratio": r["seconds"] / t1,
                "target": "params equal 1-device within 1e-5 (time: CPU overhead, not speedup)",
                "met": bool(r["max_rel_diff"] <= 1e-5),
                "devices": int(n),
                "step_s": r["seconds"],
                "max_rel_param_diff": r["max_rel_diff"],
            }
        )
    return rows


def run(quick: bool) -> list[dict]:
    """All B5 figures (see the module docstring)."""
    return _step_vs_student(quick) + _device_scaling(quick)
