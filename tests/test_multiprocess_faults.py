"""When one process of a jax.distributed run dies, the others stop with a clear error in
bounded time instead of hanging in a collective (localhost, gloo CPU collectives)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

WORKER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jcompress import parallel

    port, pid, victim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    parallel.initialize_distributed(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_seconds=5)
    mesh = parallel.data_mesh()
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    for step in range(100000):
        x = parallel.shard_batch(np.ones((2,), np.float32), mesh)
        assert float(total(x)) == 4.0
        if pid == victim and step == 5:
            print("dying", flush=True)
            os.kill(os.getpid(), 9)
        time.sleep(0.02)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_survivor_stops_with_clear_error(victim, tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(port), str(i), str(victim)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        assert procs[victim].wait(timeout=120) == -signal.SIGKILL
        t_dead = time.monotonic()
        survivor = procs[1 - victim]
        survivor.wait(timeout=90)  # bounded: a hang fails the test here
        waited = time.monotonic() - t_dead
        out = survivor.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert survivor.returncode != 0
    assert waited < 60, f"survivor took {waited:.0f} s to notice"
    # the survivor's own error says what happened
    assert any(s in out for s in ("unhealthy", "stopped sending heartbeats", "another task died", "UNAVAILABLE")), out[-3000:]
