"""What every many-fits method takes from a finished fit: its model, data, backend and start values."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ..infer._fit import BACKENDS, _backend
from ..infer.shared.start import split_values

__all__ = ["backend_of", "chunk_results", "key_data", "quiet", "start_of"]


def backend_of(fit, method: Any = None):
    """The backend object that produced ``fit`` (rebuilt from ``fit.settings``), or ``method`` if given."""
    if method is not None:
        return _backend(method, {})
    settings = dict(fit.settings)
    name = str(settings.pop("method", fit.method))
    if name not in BACKENDS:
        raise ValueError(f"the fit's method {name!r} is not one nlmegen.fit knows; pass method=")
    try:
        return BACKENDS[name](**settings)
    except TypeError as err:
        raise ValueError(f"could not rebuild the {name!r} backend from the fit's settings ({err}); pass "
                         "method=nlmegen.<Backend>(...)") from err


def quiet(backend, **changes: Any):
    """``backend`` without progress output (and with the given setting changes, where it has them)."""
    names = {f.name for f in dataclasses.fields(backend)}
    changes = {"progress": False, **changes}
    return dataclasses.replace(backend, **{k: v for k, v in changes.items() if k in names})


def start_of(fit) -> tuple[dict, dict]:
    """``(init, fixed)`` that restart ``fit``'s problem at its estimates, its fixed sites held."""
    return split_values(fit.params, fit.fixed)


def key_data(key) -> np.ndarray:
    """The raw data of a PRNG key (new-style or legacy), to send to a worker."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def need_model(fit, what: str):
    """``(model, pop)`` of ``fit`` or a clear error."""
    return fit.require_model(what)


def chunk_results(futures: list, sizes: list[int]) -> list[dict]:
    """The records of every chunk, in order; a chunk whose task died counts all its jobs as errors."""
    out = []
    for future, size in zip(futures, sizes, strict=True):
        try:
            out.extend(future.result())
        except Exception as err:  # noqa: BLE001 - a lost worker fails its replicates, not the whole run
            out.extend({"status": "error", "message": f"task failed: {type(err).__name__}: {err}",
                        "ofv": float("nan"), "theta": None, "estimates": {}, "seconds": float("nan")}
                       for _ in range(size))
    return out
