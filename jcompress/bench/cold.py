"""First calls in fresh processes that share a persistent XLA compilation cache.

A one-shot tool pays compilation once per layer shape and process. JAX's persistent
compilation cache (``jax_compilation_cache_dir``) keeps the compiled programs on disk, so
a later process that compresses the same shapes loads them instead of compiling. The
cold rows that use :func:`first_calls` report the first call in a fresh process whose
cache directory starts empty, and in a second fresh process that finds it filled by the
first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import jax

__all__ = ["first_calls", "row"]

_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    exec(sys.argv[2])
    t0 = time.perf_counter()
    jax.block_until_ready(eval(sys.argv[3]))
    print(json.dumps({"first_call": time.perf_counter() - t0}))
    """
)


def first_calls(setup: str, call: str, *, runs: int = 2, timeout: float = 900) -> list[float]:
    """Seconds of the first evaluation of ``call`` in each of ``runs`` fresh processes.

    Args:
      setup: Python statements run first, untimed (imports, the problem).
      call: a Python expression, timed until its arrays are ready.
      runs: processes, one after the other, sharing one cache directory that starts empty.
      timeout: seconds per process.

    Returns:
      the first-call seconds of each process, in order (the first compiled, the later
      ones loaded from the cache).
    """
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", jax.default_backend())}
    seconds = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(runs):
            proc = subprocess.run(
                [sys.executable, "-c", _SCRIPT, cache, setup, call],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"cold-start subprocess failed:\n{proc.stderr[-3000:]}")
            seconds.append(json.loads(proc.stdout.strip().splitlines()[-1])["first_call"])
    return seconds


def row(name: str, firsts: list[float], reference_first: float, **fields) -> dict:
    """A benchmark row: the filled-cache first call over the reference's first call, target ``<= 1.0``."""
    return {
        "name": f"{name}, cold in a fresh process, persistent cache filled",
        "ratio": firsts[1] / reference_first,
        "target": "<= 1.0",
        "met": bool(firsts[1] <= reference_first),
        "first_call_empty_cache": firsts[0],
        "first_call_filled_cache": firsts[1],
        "first_call_reference": reference_first,
        **fields,
    }
