"""Multi-host: JAX's own multi-controller runtime. Every host runs the same program; `initialize` joins
them (coordinator address, process count, process id from arguments or the environment), and from then
on `jax.devices()` spans every host while `jax.local_devices()` are this host's.

Environment: JINFER_COORDINATOR (host:port of process 0), JINFER_NUM_PROCESSES, JINFER_PROCESS_ID.
On CPU hosts the cross-process collectives are gloo's (XLA's CPU collectives).
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the job when a coordinator is given (here or in the environment); False for a lone process."""
    coordinator = coordinator or os.environ.get("JINFER_COORDINATOR")
    if num_processes is None and "JINFER_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JINFER_NUM_PROCESSES"])
    if process_id is None and "JINFER_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JINFER_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return True
    if coordinator is None:
        if num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address (host:port)")
        return False
    if num_processes is None or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} must be a positive integer with a coordinator")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id!r} must be in [0, {num_processes})")
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """Waits until every process has reached the barrier of this name (a no-op for one process).

    The wait is the coordination service's barrier, not a device collective: hosts of a batch job finish their
    shares minutes apart, and a collective (gloo's on CPUs) times out long before the slowest host arrives,
    leaving the others hung in a collective that no one completes."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
