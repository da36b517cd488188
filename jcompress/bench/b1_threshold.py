"""B1: the exact global magnitude threshold (k-th largest |w|) vs ``np.partition``, over
several weight distributions.

Problem: float32 weights in five leaves of different sizes, 16M and 64M weights in all
(quick mode: 4M, the smallest size that takes the sampled path), the threshold for
global magnitude pruning at 90% sparsity, i.e. the k-th largest ``|w|`` with ``k`` the
number of weights kept. Distributions (:data:`DISTRIBUTIONS`): i.i.d. normal; normal
rows with per-row log-normal scales (as trained layers have); Student-t with 2 degrees
of freedom (heavy tails); half the weights exactly zero (an already pruned model); heavy
ties (int8-valued floats).

Figures, four per distribution and size, each measured side by side in the same run
(the median of at least 5 interleaved calls after a warm-up call, so compilation is
excluded, with the min-max; quick mode: 1 call). Each jcompress function is timed on two
paths: ``eager`` calls it on the concrete leaves (on a CPU device: numpy selection on the
host, reading the leaves in place) and ``jit`` calls it inside ``jax.jit`` (traced: the
compiled histogram search that sharded and accelerator inputs take).

* ``B1 threshold ...``: seconds of :func:`jcompress.core.topk.kth_largest` over the
  leaves with ``magnitude=True`` (it takes ``|w|`` itself) divided by seconds of
  ``np.partition`` on the already concatenated ``|w|`` (numpy's ``abs`` and
  ``concatenate`` are *not* timed; their time is reported separately); target
  ``<= 1.0``. ``met`` also requires the two thresholds to be equal.
* ``B1 threshold + mask ...``: :func:`jcompress.core.topk.keep_largest_global` (masks
  with exactly ``k`` weights kept, ties resolved) divided by ``np.partition`` followed by
  the mask ``|w| >= t`` (which keeps every tie, so more than ``k`` weights on tied data);
  target ``<= 1.0``. ``met`` also requires exactly ``k`` kept weights.
* ``B1 user call magnitude(sparsity=s, scope='global')(params), eager``: the whole user
  call on the concrete leaves (params as ``{layer_i: {kernel: w}}``; its finite-weights
  check, ``|w|`` scores, numpy selection on the host, masks applied and per-leaf errors)
  divided by numpy doing the pruning from the same raw weights: ``abs`` and
  ``concatenate``, ``np.partition``, then ``np.where(|w| >= t, w, 0)`` per leaf (both
  sides timed in full), at 50% and 90% sparsity, 16M weights (normal and int8 ties;
  quick mode: 4M, ties); target ``<= 1.0``. ``met`` also requires exactly ``k`` weights
  kept and the pruned weights to equal numpy's wherever ``|w|`` differs from ``t``.
* ``B1 sharded threshold (8 host devices)``: in a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, leaves sharded over an
  8-device mesh (rows of some, columns of others); ratio = the number of all-gather
  ops in the compiled HLO, target ``== 0``; ``met`` also requires the threshold to
  equal numpy's and the HLO to reduce the bucket counts with an all-reduce. Timings of
  that run are reported (8 simulated devices share this machine's cores).

Run: ``python -m jcompress.bench --only b1_threshold``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from jcompress import timing

__all__ = ["DISTRIBUTIONS", "USER_DISTRIBUTIONS", "USER_SPARSITIES", "make_leaves", "run"]

_SHAPES = {
    64: [(4096, 4096), (6144, 4096), (2048, 4096), (3072, 4096), (1024, 4096)],
    16: [(2048, 2048), (3072, 2048), (1024, 2048), (1536, 2048), (512, 2048)],
    4: [(1024, 1024), (1536, 1024), (512, 1024), (768, 1024), (256, 1024)],
}
DISTRIBUTIONS = ("normal", "row_lognormal", "student_t2", "half_zero", "int8_ties")
SPARSITY = 0.9
USER_DISTRIBUTIONS = ("normal", "int8_ties")  # the user-call rows (16M weights; quick: 4M, ties only)
USER_SPARSITIES = (0.5, 0.9)
_QUICK_USER = ("int8_ties",)


def make_leaves(shapes, seed: int = 0, distribution: str = "normal") -> list[np.ndarray]:
    """float32 weights with the given shapes, drawn from one of :data:`DISTRIBUTIONS`."""
    rng = np.random.default_rng(seed)
    leaves = []
    for shape in shapes:
        if distribution == "normal":
            w = rng.standard_normal(shape, dtype=np.float32)
        elif distribution == "row_lognormal":
            scale = np.exp(rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
            w = rng.standard_normal(shape, dtype=np.float32) * scale
        elif distribution == "student_t2":
            w = rng.standard_t(2, shape).astype(np.float32)
        elif distribution == "half_zero":
            w = rng.standard_normal(shape, dtype=np.float32) * (rng.random(shape) < 0.5)
        elif distribution == "int8_ties":
            w = rng.integers(-127, 128, shape).astype(np.float32)
        else:
            raise ValueError(f"distribution={distribution!r} must be one of {DISTRIBUTIONS}")
        leaves.append(w)
    return leaves


@functools.cache
def _jitted(k: int):
    """The two timed functions for ``k``, compiled once for all distributions of a size."""
    import jax

    from jcompress.core import topk

    threshold = jax.jit(lambda ls: topk.kth_largest(ls, k, magnitude=True))
    masks = jax.jit(lambda ls: topk.keep_largest_global(ls, k, magnitude=True))
    return threshold, masks


def _rows(leaves, distribution: str, repeats: int) -> list[dict]:
    import jax.numpy as jnp

    from jcompress.core import topk

    n = sum(x.size for x in leaves)
    prep = timing.timeit(lambda: np.abs(np.concatenate([x.ravel() for x in leaves])), repeats=1)
    t_prep, flat = prep.median, prep.output
    device_leaves = [jnp.asarray(x) for x in leaves]
    k = n - topk.pruned_count(SPARSITY, n)
    threshold, masks = _jitted(k)

    def np_threshold():
        return np.partition(flat, n - k)[n - k]

    def np_mask():
        return flat >= np.partition(flat, n - k)[n - k]

    ts = timing.compare(
        {
            "threshold_eager": lambda: topk.kth_largest(device_leaves, k, magnitude=True),
            "threshold_jit": lambda: threshold(device_leaves),
            "np_threshold": np_threshold,
            "mask_eager": lambda: topk.keep_largest_global(device_leaves, k, magnitude=True),
            "mask_jit": lambda: masks(device_leaves),
            "np_mask": np_mask,
        },
        repeats=repeats,
    )
    want = float(ts["np_threshold"].output)
    got = {p: float(ts[f"threshold_{p}"].output) for p in ("eager", "jit")}
    kept = {p: int(sum(int(jnp.sum(m)) for m in ts[f"mask_{p}"].output)) for p in ("eager", "jit")}
    common = {
        "distribution": distribution,
        "elements": n,
        "k": k,
        "sparsity": SPARSITY,
        "seconds_np_abs_concatenate": t_prep,
        "threshold_numpy": want,
        "kept_numpy_mask": int(np.count_nonzero(ts["np_mask"].output)),
        "repeats": repeats,
    }
    label = f"{n / 2**20:.0f}M weights, {distribution}"
    out = []
    for what, ours, ref in (("threshold", "threshold", "np_threshold"), ("threshold + mask", "mask", "np_mask")):
        for path in ("eager", "jit"):
            a, b = ts[f"{ours}_{path}"], ts[ref]
            ok = got[path] == want if ours == "threshold" else kept[path] == k
            out.append(
                {
                    "name": f"B1 {what}, {path}, {label}",
                    "ratio": a.median / b.median,
                    "target": "<= 1.0",
                    "met": bool(a.median <= b.median and ok),
                    "path": path,
                    **common,
                    "threshold_jcompress": got[path],
                    "equal": got[path] == want,
                    "kept_jcompress": kept[path],
                    "seconds_jcompress": a.median,
                    "seconds_jcompress_min_max": [a.low, a.high],
                    "seconds_numpy": b.median,
                    "seconds_numpy_min_max": [b.low, b.high],
                    "first_call_jcompress": a.first,
                }
            )
    return out


def _user_rows(leaves, distribution: str, repeats: int) -> list[dict]:
    """``jc.pruning.magnitude(sparsity=s, scope='global')(params)`` called eagerly, end to end,
    against numpy doing the same from the raw weights, at each of :data:`USER_SPARSITIES`."""
    import jax.numpy as jnp

    import jcompress as jc
    from jcompress.core import topk

    n = sum(x.size for x in leaves)
    params = {f"layer{i}": {"kernel": jnp.asarray(x)} for i, x in enumerate(leaves)}
    label = f"{n / 2**20:.0f}M weights, {distribution}"
    out = []
    for sparsity in USER_SPARSITIES:
        k = n - topk.pruned_count(sparsity, n)
        prune = jc.pruning.magnitude(sparsity=sparsity, scope="global")

        def numpy_prune(k=k):
            flat = np.abs(np.concatenate([x.ravel() for x in leaves]))
            t = np.partition(flat, n - k)[n - k]
            bounds = np.cumsum([0] + [x.size for x in leaves])
            return t, [np.where(flat[a:b].reshape(x.shape) >= t, x, 0) for a, b, x in zip(bounds, bounds[1:], leaves)]

        ts = timing.compare({"jcompress": lambda prune=prune: prune(params), "numpy": numpy_prune}, repeats=repeats)
        a, b = ts["jcompress"], ts["numpy"]
        (new, aux), (t, reference) = a.output, b.output
        kept = sum(int(jnp.sum(aux.masks[f"layer{i}"]["kernel"])) for i in range(len(leaves)))
        equal = kept == k
        for i, (x, r) in enumerate(zip(leaves, reference)):  # weight for weight, except at ties of t
            off = np.abs(x) != t
            equal = equal and np.array_equal(np.asarray(new[f"layer{i}"]["kernel"])[off], r[off])
        out.append(
            {
                "name": f"B1 user call magnitude(sparsity={sparsity}, scope='global')(params), eager, {label}",
                "ratio": a.median / b.median,
                "target": "<= 1.0",
                "met": bool(a.median <= b.median and equal),
                "path": "user call",
                "distribution": distribution,
                "elements": n,
                "k": k,
                "sparsity": sparsity,
                "threshold_numpy": float(t),
                "equal": equal,
                "kept_jcompress": kept,
                "kept_numpy_mask": int(sum(np.count_nonzero(np.abs(x) >= t) for x in leaves)),
                "seconds_jcompress": a.median,
                "seconds_jcompress_min_max": [a.low, a.high],
                "seconds_numpy": b.median,
                "seconds_numpy_min_max": [b.low, b.high],
                "first_call_jcompress": a.first,
                "repeats": repeats,
            }
        )
    return out


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
    rows, user = [], []
    repeats = 1 if quick else 5
    for size in (4,) if quick else (16, 64):
        for distribution in DISTRIBUTIONS:
            leaves = make_leaves(_SHAPES[size], distribution=distribution)
            rows += _rows(leaves, distribution, repeats=repeats)
            if size == (4 if quick else 16) and distribution in (_QUICK_USER if quick else USER_DISTRIBUTIONS):
                user += _user_rows(leaves, distribution, repeats=repeats)
            del leaves
    return rows + user + [_sharded_row(quick)]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
