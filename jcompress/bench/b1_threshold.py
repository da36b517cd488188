"""B1: the exact global magnitude threshold (k-th largest |w|) vs ``np.partition``.

Problem: 64M float32 weights (256 MB) in five leaves of different sizes (quick mode:
8M), normal-distributed; the threshold for global magnitude pruning at 50% and 90%
sparsity, i.e. the k-th largest ``|w|`` with ``k`` the number of weights kept.

Figures (each measured side by side in the same run, best of 3 after a warm-up):

* ``B1 global threshold ... sparsity s``: seconds of the jitted
  :func:`jcompress.core.topk.kth_largest` over the leaves (it takes ``|w|`` itself)
  divided by seconds of ``np.partition`` on the already concatenated ``|w|`` (numpy's
  ``abs`` and ``concatenate`` are *not* timed; their time is reported separately);
  target ``<= 1.0``. ``met`` also requires the two thresholds to be equal.
* ``B1 sharded threshold (8 host devices)``: in a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, leaves sharded over an
  8-device mesh (rows of some, columns of others); ratio = the number of all-gather
  ops in the compiled HLO, target ``== 0``; ``met`` also requires the threshold to
  equal numpy's and the HLO to reduce the bucket counts with an all-reduce. Timings of
  that run are reported (8 simulated devices share this machine's cores).

Run: ``python -m jcompress.bench --only b1_threshold``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from jcompress import timing

__all__ = ["make_leaves", "run"]

_SHAPES_FULL = [(4096, 4096), (6144, 4096), (2048, 4096), (3072, 4096), (1024, 4096)]  # 64M
_SHAPES_QUICK = [(1024, 2048), (1536, 2048), (512, 2048), (768, 2048), (256, 2048)]  # 8M


def make_leaves(shapes, seed: int = 0) -> list[np.ndarray]:
    """Normal float32 weights with the given shapes."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def _threshold_rows(leaves, quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jcompress.core import topk

    n = sum(x.size for x in leaves)
    prep = timing.timeit(lambda: np.abs(np.concatenate([x.ravel() for x in leaves])), repeats=1)
    t_prep, flat = prep.median, prep.output
    device_leaves = [jnp.asarray(x) for x in leaves]
    rows = []
    for sparsity in (0.5, 0.9):
        k = n - topk.pruned_count(sparsity, n)
        fn = jax.jit(lambda ls, k=k: topk.kth_largest([jnp.abs(x) for x in ls], k))
        ts = timing.compare(
            {"jax": lambda fn=fn: fn(device_leaves), "numpy": lambda k=k: np.partition(flat, n - k)[n - k]}, repeats=3
        )
        t_jax, t_np = ts["jax"].median, ts["numpy"].median
        got, want = float(ts["jax"].output), ts["numpy"].output
        rows.append(
            {
                "name": f"B1 global threshold {n / 2**20:.0f}M weights, {len(leaves)} leaves, sparsity {sparsity}",
                "ratio": t_jax / t_np,
                "target": "<= 1.0",
                "met": bool(t_jax <= t_np and got == float(want)),
                "seconds_jcompress": t_jax,
                "seconds_np_partition": t_np,
                "seconds_np_abs_concatenate": t_prep,
                "threshold_jcompress": got,
                "threshold_numpy": float(want),
                "equal": got == float(want),
                "elements": n,
                "k": k,
            }
        )
    return rows


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jcompress import timing
    from jcompress.core import topk

    rows = int(sys.argv[1])
    mesh = jax.make_mesh((8,), ("d",))
    rng = np.random.default_rng(0)
    shapes = [(rows, 1024), (rows // 2, 2048), (rows // 4, 1024)]
    specs = [P("d", None), P(None, "d"), P("d", None)]
    leaves = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    n = sum(x.size for x in leaves)
    k = n // 10
    fn = jax.jit(lambda ls: topk.kth_largest([jnp.abs(x) for x in ls], k, chunk=None))
    hlo = fn.lower(sharded).compile().as_text()
    got = float(fn(sharded))
    best = timing.timeit(fn, sharded, repeats=3, warmup=0).median  # compiled above
    flat = np.abs(np.concatenate([x.ravel() for x in leaves]))
    partition = timing.timeit(lambda: float(np.partition(flat, n - k)[n - k]), repeats=1, warmup=0)
    t_np, want = partition.median, partition.output
    print(json.dumps({
        "devices": len(jax.devices()), "elements": n, "k": k, "all_gathers": len(re.findall(r"all-gather", hlo)),
        "all_reduces": len(re.findall(r"all-reduce", hlo)), "threshold_jcompress": got, "threshold_numpy": want,
        "seconds_jcompress": best, "seconds_np_partition": t_np,
    }))
    """
)


def _sharded_row(quick: bool) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    rows = 512 if quick else 4096
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(rows)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sharded B1 subprocess failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    equal = res["threshold_jcompress"] == res["threshold_numpy"]
    return {
        "name": f"B1 sharded threshold ({res['devices']} host devices, {res['elements'] / 2**20:.0f}M weights): all-gathers in HLO",
        "ratio": float(res["all_gathers"]),
        "target": "== 0",
        "met": bool(res["all_gathers"] == 0 and res["all_reduces"] > 0 and equal),
        "equal": equal,
        **{k: v for k, v in res.items() if k != "devices"},
    }


def run(quick: bool) -> list[dict]:
    leaves = make_leaves(_SHAPES_QUICK if quick else _SHAPES_FULL)
    return _threshold_rows(leaves, quick) + [_sharded_row(quick)]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
