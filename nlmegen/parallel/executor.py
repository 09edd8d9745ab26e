"""Where independent fits run: any `concurrent.futures.Executor`, a local default, or a Dask cluster.

Bootstrap replicates, SIR samples and multistart fits are independent tasks. They are handed to an
executor through ``submit(fn, *args) -> Future`` only (the `concurrent.futures.Executor` protocol),
so whatever runs them is the user's choice and nlmegen has no scheduler of its own:

- ``None`` (default): `LocalExecutor`, in this process, one task after another (one fit already
  uses every core through XLA, and the compiled programs are reused from task to task);
- a ``distributed.Client`` (Dask: a laptop's `LocalCluster`, SLURM/PBS through dask-jobqueue,
  Kubernetes): its ``get_executor()``, after a worker plugin gave every worker its own JAX
  compilation cache directory (`WorkerCompilationCache`; JAX's persistent cache is not safe for
  several processes writing one directory at once);
- any other `concurrent.futures.Executor` (``ProcessPoolExecutor``, ``ThreadPoolExecutor``, ...), used
  as given.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import re
import weakref
from typing import Any

import jax

__all__ = ["LocalExecutor", "as_executor", "dask_client", "set_compilation_cache", "worker_count"]


class LocalExecutor(cf.Executor):
    """Runs each submitted call at once, in this process, and returns its finished `Future`.

    The default executor of `bootstrap`, `sir` and `multistart`: a `concurrent.futures.Executor`
    (so it can stand in wherever one is expected) that keeps everything in one process, where the
    compiled model is reused by every task.
    """

    def __init__(self) -> None:
        self._shutdown = False

    def submit(self, fn, /, *args: Any, **kwargs: Any) -> cf.Future:
        if self._shutdown:
            raise RuntimeError("cannot submit to a LocalExecutor after shutdown")
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - delivered through the future, as executors do
            if isinstance(err, KeyboardInterrupt):
                raise
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True


def set_compilation_cache(path: str | os.PathLike | None) -> None:
    """Point this process's persistent JAX compilation cache at ``path`` (``None``: no cache).

    Takes effect for the next compilation even if the cache was already in use (JAX's
    ``compilation_cache.reset_cache``). Every program is kept, as `nlmegen`'s import does.
    """
    from jax.experimental.compilation_cache import compilation_cache

    if path is not None:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_dir", None if path is None else os.fspath(path))
    compilation_cache.reset_cache()


def _worker_cache_base(cache: str | os.PathLike | None) -> str | None:
    """The directory under which each worker gets its own cache (None: workers run without one)."""
    if cache is None or cache is False:
        return None
    if cache != "per-worker":
        return os.fspath(cache)
    here = jax.config.jax_compilation_cache_dir
    return None if not here else os.fspath(here).rstrip("/\\") + "-workers"


_PREPARED: weakref.WeakSet = weakref.WeakSet()  # Dask clients whose workers already have their cache plugin


def _prepare_workers(client, cache) -> None:
    """Register `WorkerCompilationCache` on ``client``'s workers (once per client: a later call with the
    default leaves the choice made by `dask_client` alone)."""
    from .dask import WorkerCompilationCache

    client.register_plugin(WorkerCompilationCache(_worker_cache_base(cache)), name=WorkerCompilationCache.name)
    _PREPARED.add(client)


def _dask_client_type():
    try:
        from distributed import Client
    except ImportError:
        return None
    return Client


def as_executor(executor: Any = None, *, cache: str | os.PathLike | None = "per-worker") -> cf.Executor:
    """The `concurrent.futures.Executor` for ``executor`` (see the module docstring).

    Parameters
    ----------
    executor
        ``None`` (a `LocalExecutor`), a ``distributed.Client``, or any object with
        ``submit(fn, *args, **kwargs)`` returning a `concurrent.futures.Future`.
    cache
        For a Dask client not yet prepared (by `dask_client` or an earlier call): the JAX
        compilation cache of its workers. ``"per-worker"`` (default):
        ``<this process's cache dir>-workers/<worker name>`` (no cache when this process has none,
        e.g. under ``NLMEGEN_CACHE_DIR=0``); a directory: ``<directory>/<worker name>``; ``None``:
        none.
    """
    if executor is None:
        return LocalExecutor()
    client_type = _dask_client_type()
    if client_type is not None and isinstance(executor, client_type):
        if executor not in _PREPARED:
            _prepare_workers(executor, cache)
        return executor.get_executor()
    if not callable(getattr(executor, "submit", None)):
        raise TypeError(f"executor must be None, a distributed.Client or an object with submit() (a "
                        f"concurrent.futures.Executor), not {type(executor).__name__}")
    return executor


def worker_count(executor: Any) -> int:
    """How many tasks ``executor`` runs at once (1 for `LocalExecutor`; a guess of 4 when it does not say)."""
    if executor is None or isinstance(executor, LocalExecutor):
        return 1
    client_type = _dask_client_type()
    if client_type is not None and isinstance(executor, client_type):
        return max(1, sum(executor.nthreads().values()))
    for name in ("n_workers", "_max_workers"):
        value = getattr(executor, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4


def split(n: int, n_chunks: int) -> list[range]:
    """``range(n)`` cut into at most ``n_chunks`` contiguous, nearly equal pieces."""
    n_chunks = max(1, min(n, n_chunks))
    size = math.ceil(n / n_chunks)
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def dask_client(n_workers: int = 2, *, threads_per_worker: int = 1, cache: str | os.PathLike | None = "per-worker",
                **cluster_kwargs: Any):
    """A ``distributed.Client`` on a new local cluster of worker *processes* (Dask's `LocalCluster`).

    Each worker gets its own JAX compilation cache (see `as_executor`'s ``cache``). Close it with
    ``client.close(); client.cluster.close()`` (or use it as a context manager). For a cluster
    (SLURM/PBS, Kubernetes) build the client with dask-jobqueue / dask-kubernetes and pass it as
    ``executor=`` directly.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise ImportError("the Dask engine needs the 'distributed' package: pip install 'nlmegen[dask]'") from err
    cluster_kwargs.setdefault("dashboard_address", None)
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                           **cluster_kwargs)
    client = Client(cluster)
    _prepare_workers(client, cache)
    return client


def safe_name(name: Any) -> str:
    """A worker name usable as a directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)) or "worker"
