"""`Covariates`: the population's covariate dict, with look-ups that name the choices.

A plain ``dict`` to every reader (and to JAX: it flattens exactly like a dict, keys sorted, so
compiled programs and tree structures are unchanged), with two additions:

- an unknown name raises a ``KeyError`` that lists the covariates there are (``pop.covariates['WGT']``
  when the column is ``WT``);
- while `reading` is active, every name looked up is recorded, so that model discovery can name a
  time-varying covariate used where one value per subject was expected.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

from .._collect import collecting

__all__ = ["Covariates", "reading"]

_READ: contextvars.ContextVar[list | None] = contextvars.ContextVar("nlmegen_covariates_read", default=None)


class Covariates(dict):
    """Covariate name -> ``[subj]`` (constant) or ``[subj, obs]`` (time-varying) array."""

    def __getitem__(self, name):
        try:
            value = super().__getitem__(name)
        except KeyError:
            close = [k for k in self if str(k).lower() == str(name).lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"no covariate {name!r}{hint}; this population has covariates {sorted(self)}") from None
        log = _READ.get()
        if log is not None:
            log.append(name)
        return value


def _flatten_with_keys(cov: Covariates):
    keys = sorted(cov)
    return [(jax.tree_util.DictKey(k), dict.__getitem__(cov, k)) for k in keys], tuple(keys)


def _unflatten(keys, children) -> Covariates:
    return Covariates(zip(keys, children, strict=True))


jax.tree_util.register_pytree_with_keys(
    Covariates, _flatten_with_keys, _unflatten,
    flatten_func=lambda cov: ([dict.__getitem__(cov, k) for k in sorted(cov)], tuple(sorted(cov))))


@contextlib.contextmanager
def reading() -> Iterator[list]:
    """Record the covariate names looked up (by ``pop.covariates[name]``) inside the block."""
    with collecting(_READ) as log:
        yield log


def time_varying_hint(err: Exception, names: list, covariates: dict) -> str | None:
    """A message for a shape error raised while a model ran, when the model read time-varying covariates.

    A time-varying covariate is ``[subj, obs]``; used where a per-subject value is expected (a
    parameter such as ``CL * (WT / 70)`` of shape ``[subj]``) it fails with a bare broadcasting
    error. Returns None when ``err`` is not a shape error or no time-varying covariate was read.
    """
    text = str(err).lower()
    if not any(word in text for word in ("shape", "broadcast")):
        return None
    # dict.get: a look-up through Covariates would be recorded in ``names`` while it is read
    varying = sorted({n for n in list(names) if getattr(dict.get(covariates, n), "ndim", 1) == 2})
    if not varying:
        return None
    first = varying[0]
    return (f"covariate(s) {varying} vary with time within subjects (shape [subj, obs]) and were used where one "
            f"value per subject is expected ({err}); take one value per subject, e.g. "
            f"pop.covariate_at({first!r}, 0.0) (its value at time 0) or pop.covariates[{first!r}][:, 0] (at the "
            "first observation), or use the [subj, obs] values with [subj, obs] predictions")
