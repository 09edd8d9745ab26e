"""Time-varying covariates inside an ODE right-hand side: ``ode.solve(..., covariates=[...])``.

With ``covariates=("CRCL", ...)`` the right-hand side is called ``rhs(t, y, p, cov)``, where
``cov[name]`` is the subject's covariate at time ``t`` by the population's interpolation rule
(`Population.covariate_at`): NOCB (NONMEM's default: the value on a record holds for the
integration interval that ends at it) or LOCF (it holds from the record on).

The covariate is a step function of time, so the solve must never step across one of its changes:

- every record time of the subject becomes a point of the solve's event grid (`extra_times`), so
  each segment lies inside one interval between records and the covariate is constant on it;
- within a segment ``[t0, t1]`` the solver evaluates ``rhs`` at both ends, where the step function
  takes the value of the neighbouring interval (NOCB at ``t0``, LOCF at ``t1``); `span` moves the
  ends one floating-point step inwards, so every evaluation sees the segment's own value (the
  segment loses two ulps of time: a relative change of ~1e-16). Without this the first Runge-Kutta
  stage of each NOCB segment used the previous interval's value: 5e-5 relative error at rtol 1e-6.

Steady-state doses (SS = 1/2) integrate their implied dosing history with the covariates of the
interval before the record (NONMEM uses the SS record's values throughout; the two agree when the
covariate does not change within that interval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ..data._population import _step

__all__ = ["bind", "extra_times", "span"]


def bind(rhs: Callable, y0: Any, pop: Any, params: Any, names: Sequence[str]) -> tuple[Callable, Any, Any]:
    """The right-hand side, ``y0`` and parameters with the covariates' records riding in the parameters.

    Returns ``(rhs3, y0, (params, records))`` where ``rhs3(t, y, (p, records))`` calls
    ``rhs(t, y, p, {name: value at t})`` and ``records = (times [subj, rec], mask, {name: [subj, rec]})``.
    """
    names = tuple(names)
    known = set(getattr(pop, "cov_values", {}))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"ode.solve(covariates=...): no covariate {unknown} in the population; it has "
                       f"{sorted(known)}")
    n_subj, n_rec = pop.cov_times.shape
    values = {}
    for name in names:
        v = jnp.asarray(pop.cov_values[name], dtype=float)
        values[name] = jnp.broadcast_to(v[:, None], (n_subj, n_rec)) if v.ndim == 1 else v
    rules = {name: (pop.interpolation_of(name) if name in dict(pop.interpolation) else "nocb") for name in names}

    def rhs3(t, y, pp):
        p, (times, mask, vals) = pp
        cov = {name: _step(times, mask, vals[name], t, rules[name]) for name in names}
        return rhs(t, y, p, cov)

    y0_bound = (lambda pp: y0(pp[0])) if callable(y0) else y0
    return rhs3, y0_bound, (params, (jnp.asarray(pop.cov_times, dtype=float), pop.cov_mask, values))


def extra_times(cfg: Any, p: Any) -> tuple[Array, Array] | None:
    """One subject's record times and mask (grid points of the solve) when covariates are bound."""
    if not cfg.covariates:
        return None
    times, mask, _ = p[1]
    return times, mask


def span(cfg: Any, t0: Array, t1: Array) -> tuple[Array, Array]:
    """The segment ``[t0, t1]`` moved one ulp inwards at both ends when covariates are bound (see above)."""
    if not cfg.covariates:
        return t0, t1
    inward = lambda a, b: a + jax.lax.stop_gradient(jnp.nextafter(a, b) - a)  # noqa: E731
    a = jnp.where(t1 > t0, inward(t0, t1), t0)
    b = jnp.where(t1 > a, inward(t1, a), t1)
    return a, b
