"""One fit across several processes or hosts: JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same script. After `initialize`, ``jax.devices()`` lists the devices of
all processes, and every sharded backend (``devices=None``, the default) splits the subjects over
all of them: each process reads the same table, passes the whole population, and its devices
compute only their own blocks of subjects inside the program (`nlmegen.infer.shared.shard`); the
sums over subjects are ``psum``s across processes (Gloo on CPU, NCCL on GPU) and every process
receives the same totals and per-subject results, so their optimisers take the same steps.

Launch:

- several local processes: ``python -m nlmegen.parallel.launch -n 2 fit.py ...`` (sets
  ``NLMEGEN_COORDINATOR``, ``NLMEGEN_NUM_PROCESSES`` and ``NLMEGEN_PROCESS_ID`` for each);
- SLURM: ``srun --nodes=4 --ntasks-per-node=1 python fit.py ...``; `initialize` with no
  arguments lets JAX read the cluster from SLURM's environment (Open MPI's ``mpirun`` likewise).

Reference: JAX documentation, "Multi-process environments" (``jax.distributed.initialize``).
"""

from __future__ import annotations

import os

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "initialize", "is_main"]

ENV_COORDINATOR = "NLMEGEN_COORDINATOR"
ENV_NUM_PROCESSES = "NLMEGEN_NUM_PROCESSES"
ENV_PROCESS_ID = "NLMEGEN_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, initialization_timeout: int = 300) -> int:
    """Join this process to a multi-process JAX run; returns its process index.

    Call it first, before any JAX computation. Arguments left out are read from
    ``NLMEGEN_COORDINATOR`` (``host:port`` of process 0), ``NLMEGEN_NUM_PROCESSES`` and
    ``NLMEGEN_PROCESS_ID`` (what `nlmegen.parallel.launch` sets); with none of them set, JAX
    detects the cluster itself (SLURM, Open MPI, Cloud TPU). The persistent compilation cache,
    when on, moves to a directory of this process's own (``<cache>-process<k>``): JAX's cache is not
    safe for several processes writing one directory.
    """
    import jax

    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("initialize needs coordinator_address, num_processes and process_id together (or none, "
                         f"for SLURM / Open MPI detection); got coordinator_address={coordinator_address!r}, "
                         f"num_processes={num_processes!r}, process_id={process_id!r}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is not in 0..{num_processes - 1}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    index = jax.process_index()
    cache = jax.config.jax_compilation_cache_dir
    if cache and jax.process_count() > 1:
        from .executor import set_compilation_cache

        set_compilation_cache(os.fspath(cache).rstrip("/\\") + f"-process{index}")
    return index


def is_main() -> bool:
    """Whether this is process 0 (the one to print, plot and save results)."""
    import jax

    return jax.process_index() == 0
