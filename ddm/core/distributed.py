"""Multi-process (multi-host) start-up for one island job.

An island may be one JAX program spread over several processes/hosts. `initialize()` calls
`jax.distributed.initialize()` when the environment says this is such a job:
- explicitly: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (our launcher and tests);
- implicitly: SLURM (`SLURM_NTASKS` > 1) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1), which JAX detects itself.
On CPU the processes talk through gloo collectives; `DDM_NUM_CPU_DEVICES` fakes devices per process.
Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax


def is_multiprocess_env(env: os._Environ | dict = os.environ) -> bool:
    """Whether to join a distributed job: more than one process, or an explicit coordinator (a job of one
    process then still runs its collectives through gloo, exactly like the same job on several processes)."""
    if int(env.get("JAX_NUM_PROCESSES", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in env:
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize() -> None:
    """Configures CPU devices and joins the multi-process job if there is one (idempotent)."""
    cpu_devices = os.environ.get("DDM_NUM_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if not is_multiprocess_env() or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        # A count or id left unset is for JAX to detect (SLURM, Open MPI), as without a coordinator.
        num_processes, process_id = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(num_processes) if num_processes else None,
            process_id=int(process_id) if process_id else None,
        )
    else:
        jax.distributed.initialize()
