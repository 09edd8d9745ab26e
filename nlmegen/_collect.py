"""One context manager for the package's recorders: a context variable holding a list while a block runs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator


@contextlib.contextmanager
def collecting(var: contextvars.ContextVar) -> Iterator[list]:
    """Set ``var`` to a fresh list for the block and yield it; the previous value comes back after."""
    log: list = []
    token = var.set(log)
    try:
        yield log
    finally:
        var.reset(token)
