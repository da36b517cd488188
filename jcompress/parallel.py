"""Device meshes and shardings for data-parallel steps (one CPU, many GPUs, TPU pods).

The batch is sharded over a 1-D mesh axis ``'data'``; params and optimizer state are
replicated. In a multi-process run (``jax.distributed.initialize``), each process holds
its own rows of the global batch and :func:`shard_batch` assembles the global array
from them without any cross-host copy.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["data_mesh", "default_mesh", "replicate", "shard_batch", "batch_sharding", "initialize_distributed"]


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over the first ``num_devices`` global devices (all by default)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible")
    return Mesh(np.array(devices[:n]), ("data",))


def default_mesh(global_batch_size: int) -> Mesh:
    """The mesh training uses when none is given.

    Every device when each process's share of the batch splits evenly over its local
    devices, else one device. A single process on the CPU backend uses one device: forced
    host devices (``--xla_force_host_platform_device_count``) share the same cores and
    exist to test sharded code, not to speed it up, so they are used only when asked for
    with an explicit mesh.
    """
    if jax.process_count() == 1 and jax.default_backend() == "cpu":
        return data_mesh(1)
    per_process = global_batch_size // jax.process_count()
    return data_mesh(None if per_process % jax.local_device_count() == 0 else 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf fully replicated over ``mesh`` (params, optimizer state, keys)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays sharded over ``'data'`` from this process's local rows of a batch.

    Each leaf's leading axis must be divisible by the number of local devices of the mesh.
    """
    sharding = batch_sharding(mesh)
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n_local:
            raise ValueError(
                f"local batch of {x.shape[0]} rows cannot be split over {n_local} local devices; "
                "choose a batch size divisible by the number of devices"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 30,
    initialization_timeout: int = 120,
) -> None:
    """``jax.distributed.initialize`` with bounded failure detection.

    On CPU it selects gloo collectives (so a multi-process run works over localhost).
    When a process dies, the coordination service notices its missing heartbeats
    after ``heartbeat_timeout_seconds`` and terminates every other process with an
    error naming the dead task, instead of leaving them blocked in a collective.
    On TPU pods and Slurm clusters all three addresses may be left as ``None``.
    """
    # Only CPU collectives read this option; setting it is harmless on GPU and TPU, and
    # querying the backend here would initialise it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
        initialization_timeout=int(initialization_timeout),
    )
