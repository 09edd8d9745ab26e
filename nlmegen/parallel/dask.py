"""The Dask worker plugin that gives every worker process its own JAX compilation cache directory.

JAX's persistent compilation cache is not safe for several processes writing one directory at the
same time, and every Dask worker would otherwise use the directory `nlmegen`'s import chose (the
environment of the process that started it). The plugin runs on each worker before its first task
(`distributed.WorkerPlugin.setup`), also on workers that join later.
"""

from __future__ import annotations

import os

try:
    from distributed import WorkerPlugin
except ImportError:  # without Dask this module only has to import (doctest collection); nothing registers it
    WorkerPlugin = object

from .executor import safe_name, set_compilation_cache

__all__ = ["WorkerCompilationCache"]


class WorkerCompilationCache(WorkerPlugin):
    """Set each worker's JAX compilation cache to ``base/<worker name>``, or turn it off (``base=None``)."""

    name = "nlmegen-compilation-cache"

    def __init__(self, base: str | None) -> None:
        self.base = base

    def setup(self, worker) -> None:
        path = None if self.base is None else os.path.join(self.base, safe_name(worker.name))
        set_compilation_cache(path)
