"""Multi-process distillation on one machine: a worker and a launcher, for tests and demos.

The same :func:`run_steps` runs in every process. Each process joins the job with
``jax.distributed.initialize('127.0.0.1:PORT', num_processes, process_id)``, loads only
its own rows of every global batch (``data.batches(..., process_index, process_count)``),
and ``parallel.shard_batch`` assembles the global batch from the local rows. The mesh
spans the devices of all processes; params stay replicated, so every process ends with
the same params, which equal those of a single process stepping on the whole batch.

On CPU each process gets ``devices_per_process`` host devices through
``XLA_FLAGS=--xla_force_host_platform_device_count``, and cross-process collectives use
gloo. :func:`launch` starts the workers as subprocesses on a free localhost port, under
a timeout, and kills them if they do not finish, so a broken collective never hangs::

    python -m jcompress.distill.multihost --processes 2 --devices 2 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["free_port", "launch", "run_steps", "worker_main"]


def run_steps(
    *,
    steps: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
) -> dict:
    """A few distillation steps of a small MLP student on ``digits``, from a fixed MLP teacher.

    The teacher is a randomly initialised 64-64 MLP with dropout (evaluated without it):
    its logits are a fixed function, which is all the step needs.

    Args:
      steps: number of steps (global batches of epoch 0).
      batch_size: the global batch size.
      seed: data order, initialisation and dropout.
      process_index, process_count: this process's share of each batch (default: JAX's).
      num_devices: mesh size (default: every device of every process).

    Returns:
      ``{'params': {name: float32 array}, 'loss': [per-step loss], 'devices': int, 'processes': int}``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from jcompress import data, models, parallel, tree
    from jcompress.distill.step import DistillConfig, init_state, make_step

    ds = data.load("digits")
    make = lambda widths, s, **kw: models.create(
        "mlp", input_shape=ds.input_shape, num_classes=10, widths=widths, seed=s, **kw
    )
    s_fn = models.functional(make((16,), seed, dropout=0.2))
    t_fn = models.functional(make((64, 64), seed + 1, dropout=0.5))
    tx = optax.adam(1e-2)
    mesh = parallel.data_mesh(num_devices)
    state = parallel.replicate(init_state(jax.tree.map(jnp.array, s_fn.params), s_fn.extra, tx, seed=seed), mesh)
    teacher = parallel.replicate((t_fn.params, t_fn.extra), mesh)
    step = make_step(
        student_apply=s_fn.apply,
        teacher_apply=t_fn.apply,
        tx=tx,
        config=DistillConfig(temperature=4.0, alpha=0.9),
        mesh=mesh,
    )
    batches = data.batches(
        ds.x_train, ds.y_train, batch_size=batch_size, seed=seed, epoch=0,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip
    losses = []
    for xb, yb in itertools.islice(batches, steps):
        state, metrics = step(state, parallel.shard_batch((xb, yb), mesh), *teacher)
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    params = {name: np.asarray(leaf.addressable_data(0)) for name, leaf in tree.named_leaves(state.params)}
    return {"params": params, "loss": losses, "devices": int(mesh.devices.size), "processes": jax.process_count()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    *, processes: int = 2, devices: int = 2, steps: int = 3, batch_size: int = 32, seed: int = 0, timeout: float = 120.0
) -> list[dict]:
    """Run :func:`run_steps` in ``processes`` local processes with ``devices`` CPU devices each.

    Args:
      processes, devices: the job's shape (``processes * devices`` devices in the mesh).
      steps, batch_size, seed: as in :func:`run_steps` (``batch_size`` is global).
      timeout: seconds for the whole job; the workers are killed past it.

    Returns:
      One result dict of :func:`run_steps` per process, in process order.

    Raises:
      RuntimeError: with each worker's exit code and the end of its stderr when a worker
        fails or the job exceeds ``timeout``.
    """
    if processes < 1 or devices < 1:
        raise ValueError(f"processes={processes} and devices={devices} must be at least 1")
    port = free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONUNBUFFERED": "1",
    }
    with tempfile.TemporaryDirectory(prefix="jcompress-multihost-") as tmp, contextlib.ExitStack() as files:
        procs, outs = [], []
        for i in range(processes):
            out = Path(tmp) / f"result{i}.npz"
            err = files.enter_context(open(Path(tmp) / f"stderr{i}.txt", "w"))
            cmd = [
                sys.executable, "-m", "jcompress.distill.multihost", "--worker",
                "--coordinator", f"127.0.0.1:{port}", "--processes", str(processes), "--process-id", str(i),
                "--steps", str(steps), "--batch-size", str(batch_size), "--seed", str(seed), "--out", str(out),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
            outs.append(out)
        failed = _wait_all(procs, timeout)
        files.close()
        if failed:
            tails = [f"process {i}: {why}\n{(Path(tmp) / f'stderr{i}.txt').read_text()[-2000:]}" for i, why in failed]
            raise RuntimeError("multi-process run failed:\n" + "\n".join(tails))
        return [_read_result(out) for out in outs]


def _wait_all(procs: list, timeout: float) -> list[tuple[int, str]]:
    """Wait for every worker; kill all of them at the deadline. Returns ``(index, reason)`` failures."""
    import time

    deadline = time.monotonic() + timeout
    failed = []
    for i, p in enumerate(procs):
        try:
            rc = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            if rc != 0:
                failed.append((i, f"exit code {rc}"))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
            failed.append((i, f"timed out after {timeout:.0f} s"))
            break
    return failed


def _write_result(path: Path, result: dict) -> None:
    meta = {k: v for k, v in result.items() if k != "params"}
    np.savez(path, __meta__=np.array(json.dumps(meta)), **{f"p:{k}": v for k, v in result["params"].items()})


def _read_result(path: Path) -> dict:
    with np.load(path) as z:
        meta = json.loads(str(z["__meta__"]))
        return {**meta, "params": {k[2:]: z[k] for k in z.files if k.startswith("p:")}}


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of one worker process (``--worker``), or a launcher run without it."""
    p = argparse.ArgumentParser(prog="python -m jcompress.distill.multihost", description=__doc__)
    p.add_argument("--worker", action="store_true", help="run as one process of the job (started by launch)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--devices", type=int, default=2, help="CPU devices per process (launcher only)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where a worker writes its result (.npz)")
    args = p.parse_args(argv)
    if not args.worker:
        results = launch(
            processes=args.processes, devices=args.devices, steps=args.steps, batch_size=args.batch_size, seed=args.seed
        )
        print(json.dumps([{k: v for k, v in r.items() if k != "params"} for r in results]))
        return 0
    import jax

    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.process_id)
    try:
        result = run_steps(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
        _write_result(Path(args.out), result)
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
