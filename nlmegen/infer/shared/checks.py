"""Checks every fitting backend makes once the model's sites are known, before anything compiles.

They turn faults that would otherwise surface as a bare NumPy/JAX error or a non-finite objective
deep inside an estimation into a message naming the site and the records.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from ..._errors import DataError, ModelError

__all__ = ["check_fit"]


def check_fit(sites, pop) -> None:
    """Raise `ModelError` for a model with nothing to fit, `DataError` for DVs its error model excludes.

    A DV outside the support of its observed site's distribution (DV <= 0 under a log-normal error,
    a negative count under a Poisson one) has zero density: the objective is -inf for that subject
    whatever the parameters, and an estimation fails after many evaluations with "not finite".
    Censored records (BLQ, M3) do not use their DV and are not checked.
    """
    if not sites.observed:
        raise ModelError("the model has no observed site: declare the observations with nlmegen.observe(name, "
                         "distribution, pop) inside `with nlmegen.subjects(pop):`")
    for site in sites.observed:
        _check_support(site, pop)


def _check_support(site, pop) -> None:
    support = site.value_support
    if support is None or support is constraints.real:
        return
    covered = np.asarray(pop.mask) & (np.asarray(pop.cens) == 0)
    if site.output is not None:
        covered = covered & (np.asarray(pop.dvid) == site.output)
    if pop.dv_missing is not None:
        covered = covered & ~np.asarray(pop.dv_missing)
    dv = np.asarray(pop.dv)
    try:
        inside = np.asarray(support.check(jnp.asarray(dv)), dtype=bool)
    except Exception:  # a support that cannot judge single values: nothing to say here
        return
    bad = np.argwhere(covered & ~inside)
    if not bad.size:
        return
    times = np.asarray(pop.times)
    shown = ", ".join(f"ID {pop.ids[s]} TIME {times[s, o]:g} DV {dv[s, o]:g}" for s, o in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise DataError(f"observed site {site.name!r}: {len(bad)} observation record(s) have a DV outside the support "
                    f"of its distribution ({_describe(support)}), where the density is zero and the objective "
                    f"infinite: {shown}{more}. Drop these records, mark them censored (BLQ with LLOQ), or use an "
                    "error model that allows them (e.g. additive instead of log-normal for DV <= 0)")


def _describe(support) -> str:
    names = ((constraints.positive, "DV > 0"), (constraints.nonnegative, "DV >= 0"),
             (constraints.nonnegative_integer, "integer DV >= 0"), (constraints.positive_integer, "integer DV >= 1"),
             (constraints.unit_interval, "0 <= DV <= 1"), (constraints.boolean, "DV 0 or 1"))
    for constraint, text in names:
        if support is constraint:
            return text
    return str(support)


def ode_step_limit(density, theta, eta, pop) -> str | None:
    """Why an objective is not finite when an ODE solve ran out of steps; None when none did.

    A stiff system under an explicit solver (the default Tsit5) takes steps limited by stability,
    not accuracy, until ``max_steps``; the subject's states are then NaN and the fit fails with a
    non-finite objective. One extra run of the model at ``theta``, ``eta`` (unconstrained) reads the
    status of every solve (`nlmegen.ode.reporting`).
    """
    import diffrax
    import jax
    import numpyro

    from ...dynamics.ode import reporting

    code = int(diffrax.RESULTS.max_steps_reached._value)
    settings: list = []

    def run(theta, eta, pop):
        with reporting() as reports:
            density.trace(theta, eta, pop)
        settings[:] = [(steps, solver) for _, steps, solver in reports]
        return [status for status, _, _ in reports]

    with numpyro.validation_enabled(False):
        statuses = jax.jit(run)(jnp.asarray(theta), jnp.asarray(eta), pop)
    hit, limits = set(), set()
    for status, setting in zip(statuses, settings, strict=True):
        reached = np.flatnonzero(np.asarray(status) == code)
        if reached.size:
            hit.update(int(i) for i in reached)
            limits.add(setting)
    if not hit:
        return None
    ids = [pop.ids[i] for i in sorted(hit)]
    (steps, solver), *_ = sorted(limits)
    return (f"the ODE solver ({solver}) reached max_steps={steps} for subject(s) {ids[:10]}, whose states are then "
            "NaN: the system is probably stiff; solve it with a stiff (implicit) solver, e.g. "
            "nlmegen.ode.solve(..., solver=diffrax.Kvaerno5()), or raise max_steps")
