"""One context manager for the package's recorders: a context variable holding a list while a block runs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

#: While set (a list), every `nlmegen.ode.solve` call appends its configuration to it: site discovery
#: (`nlmegen.model.discover`, ``Sites.ode_solves``) finds out whether a model has ODE dynamics and
#: steady-state doses. Here, not beside the solver, so that discovery records without importing diffrax.
ODE_SOLVES: contextvars.ContextVar = contextvars.ContextVar("nlmegen_ode_record", default=None)


@contextlib.contextmanager
def collecting(var: contextvars.ContextVar) -> Iterator[list]:
    """Set ``var`` to a fresh list for the block and yield it; the previous value comes back after."""
    log: list = []
    token = var.set(log)
    try:
        yield log
    finally:
        var.reset(token)
