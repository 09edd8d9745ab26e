"""Closed-form 1-, 2- and 3-compartment pharmacokinetics by superposition over doses.

Linear compartment models need no ODE solver: the central amount after a unit bolus into the
central compartment is a sum of exponentials ``sum_i A_i exp(-lambda_i t)`` (Gibaldi & Perrier,
*Pharmacokinetics*, 2nd ed., 1982, ch. 2-3), and by linearity every dose contributes independently.
For each subject, observation and dose we evaluate that dose's contribution in closed form and sum
them, which is exact, cheap, fully vectorised and differentiable, and matches NONMEM's ADVAN1-4 and
ADVAN11-12 (Abuhelwa, Foster & Upton 2015, "ADVAN-style analytical solutions for common
pharmacokinetic models", J Pharmacol Toxicol Methods 73:42-48).

One code path serves all three models. A model supplies its disposition eigenvalues ``lambda_i`` and
central macro-coefficients ``A_i``; a dose is a linear operator ``E`` on ``exp(-r t)`` (bolus,
zero-order infusion, steady state as a geometric series over the implied doses). A dose into the
central compartment contributes ``sum_i A_i E(lambda_i)``; a first-order depot dose contributes
``ka sum_i A_i (E(lambda_i) - E(ka)) / (ka - lambda_i)``, a divided difference that is replaced by
a quadrature of its integral form when ``ka`` comes close to an eigenvalue (so ``ka == k`` gives
finite, exact values and gradients; no perturbation of the parameters).

Compartment numbers follow NONMEM: with ``ka`` (ADVAN2/4/12) CMT 1 is the depot and CMT 2 the
central compartment; without ``ka`` (ADVAN1/3/11) CMT 1 is central. Doses into peripheral
compartments are not supported.

Dose semantics (NONMEM help: "SS data item", "SS dose event record", "RATE data item",
"bioavailability fraction parameter"):

- Records are ordered by time, then by their order in the table (``obs_index``, ``dose_index``,
  ``reset_index``): a dose record affects an observation record that comes after it; a lagged
  bolus whose effective time equals the observation time counts.
- Bolus: ``F * AMT`` enters at ``TIME + ALAG``. Infusion: RATE > 0 keeps the rate and F changes
  the duration (``F AMT / RATE``); RATE = -1 takes the modelled rate, RATE = -2 the modelled
  duration (rate ``F AMT / D``).
- SS = 1 / 2 with II > 0: the dose is the last of infinitely many implied doses every II (ALAG and
  F apply to all of them), summed as geometric series; SS = 1 also drops every earlier dose.
  SS > 0 with II = 0 and RATE != 0 (AMT = 0) is a constant infusion at steady state: the system
  is at the infusion's steady state at the record time and the infusion then stops there (NONMEM
  help, "SS dose event record": it "terminates at the event time of the SS dose record"), so the
  level falls afterwards; F and ALAG do not apply.
- ALAG, F and the modelled D and R may differ from one dose record to the next (NONMEM computes
  them anew at every record): besides one value for all doses, ``[n_subjects]`` or ``{cmt: value}``,
  they take one value per dose, ``[n_subjects, n_doses]`` aligned with ``pop.dose_times`` (ADDL
  doses included).
- EVID 3/4 resets (and SS = 1 doses) remove every earlier dose record from later observations,
  including lagged doses not yet given and infusions still running.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ..data._population import ALL_FEATURES

__all__ = ["one_cmt", "two_cmt", "three_cmt"]

Param = ArrayLike
"""A PK parameter: a scalar (all subjects) or an array of shape ``[n_subjects]``."""
PerCmt = ArrayLike | Mapping[int, ArrayLike]
"""A dose-level parameter: a `Param` for all doses, or ``{cmt: Param}`` per dose compartment."""

# Below this value of |ka - lambda| * (time scale of the dose) the depot divided difference uses
# Gauss quadrature of its integral form: its error (~x^4 / 4320) and the cancellation error of the
# plain quotient (~1e-16 / x) are then both below ~1e-13.
_NEAR = 3e-3
# The bolus-only path decides per subject (see `_bolus_divided_difference`): Taylor series to x^8
# below this value of |ka - lambda| * (the subject's longest time since a dose).
_NEAR_BOLUS = 0.1


class _Events(NamedTuple):
    """The population arrays this module reads, each with a leading subject axis."""

    times: Array
    obs_index: Array
    dose_times: Array
    dose_amts: Array
    dose_cmts: Array
    dose_rates: Array
    dose_ii: Array
    dose_ss: Array
    dose_mask: Array
    dose_index: Array
    reset_times: Array
    reset_mask: Array
    reset_index: Array


class _Doses(NamedTuple):
    """Per (subject, observation, dose) inputs of the dose operator, shape ``[S, O, D, 1]``."""

    tau: Array  # observation time minus the dose's effective (lagged) time
    amt: Array  # bolus amount F * AMT
    rate: Array  # infusion rate
    dur: Array  # infusion duration
    ii: Array  # interdose interval of a steady-state dose (1 elsewhere)
    steady: Array  # steady state of repeated doses (SS > 0, II > 0)
    bolus: Array  # instantaneous dose
    const: Array  # steady-state constant infusion (SS > 0, II = 0, RATE != 0)
    span: Array  # time scale of the dose, to judge when ka is "close" to an eigenvalue


# ----------------------------------------------------------------------------------- public API
def one_cmt(
    pop: Any,
    *,
    cl: Param,
    v: Param,
    ka: Param | None = None,
    lag: PerCmt = 0.0,
    f: PerCmt = 1.0,
    duration: PerCmt | None = None,
    rate: PerCmt | None = None,
) -> Array:
    """Central concentration of a one-compartment model (NONMEM ADVAN1, or ADVAN2 with ``ka``).

    Closed form instead of an ODE solve: exact, fast and smooth in all parameters, which is what
    gradient-based estimation (FOCE, HMC, SVI) needs.

    Parameters
    ----------
    pop : Population
        Subjects with observation times and doses (``nlmegen.read_nonmem``). A single subject
        (arrays without the subject axis, e.g. under ``jax.vmap`` over the population) also works
        and gives ``[n_obs]``.
    cl, v : scalar, ``[n_subjects]`` or ``[n_subjects, n_obs]``
        Clearance and volume. A ``[n_subjects, n_obs]`` value gives each observation its own
        parameters (inter-occasion variability: ``nlmegen.by_occasion``); the observation's
        prediction then superposes every dose with that observation's values, which is exact when
        earlier occasions' doses are washed out or reset (EVID 3/4) by the time of the observation;
        for parameters that switch while earlier doses are still present, use ``nlmegen.ode.solve``
        with ``pop.occasion_at(t)`` in the right-hand side.
    ka : scalar, ``[n_subjects]`` or ``[n_subjects, n_obs]``, optional
        First-order absorption rate constant; when given, CMT 1 is a depot and CMT 2 central.
    lag, f : scalar, ``[n_subjects]``, ``[n_subjects, n_doses]`` or ``{cmt: value}``
        Absorption lag time (ALAG) and bioavailability (F), for all doses or per dose compartment
        (other compartments: lag 0, F 1). A ``[n_subjects, n_doses]`` value gives each dose record
        its own (aligned with ``pop.dose_times``, ADDL doses included; padding is ignored), as
        NONMEM's ALAG and F computed from each record's covariates. For a single subject, a
        per-dose value is ``[n_doses]``.
    duration, rate : same forms, optional
        Modelled infusion duration (D, for doses with RATE = -2) and rate (R, for RATE = -1).

    Returns
    -------
    Array ``[n_subjects, n_obs]``
        Amount in the central compartment divided by ``v`` at every ``pop.times`` (finite at padded
        observations, which the caller masks).

    Raises
    ------
    ValueError
        For doses into a compartment other than depot / central, or RATE = -1 / -2 doses without
        ``rate`` / ``duration``. Checked on the host when the population's arrays are concrete;
        skipped when the population itself is a `jax.jit` / `jax.vmap` argument (check it once
        outside, e.g. by a call before jitting).

    Examples
    --------
    >>> import nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> conc = nlmegen.pk.one_cmt(pop, cl=2.7, v=31.5, ka=1.6)
    >>> conc.shape, round(float(conc[0, 3]), 2)
    ((12, 11), 7.96)
    """
    _check_doses(pop, "one_cmt", ka, duration, rate)
    doses = {"ka": ka, "lag": lag, "f": f, "duration": duration, "rate": rate}
    return _concentration(pop, "one", {"cl": cl, "v": v}, doses)


def two_cmt(
    pop: Any,
    *,
    cl: Param,
    v1: Param,
    q: Param,
    v2: Param,
    ka: Param | None = None,
    lag: PerCmt = 0.0,
    f: PerCmt = 1.0,
    duration: PerCmt | None = None,
    rate: PerCmt | None = None,
) -> Array:
    """Central concentration of a two-compartment model (NONMEM ADVAN3, or ADVAN4 with ``ka``).

    Same conventions as :func:`one_cmt`; ``q`` is the intercompartmental clearance and ``v1``,
    ``v2`` the central and peripheral volumes. With ``ka`` CMT 1 is the depot, CMT 2 central (the
    peripheral compartment, CMT 3, cannot be dosed); without it CMT 1 is central.
    """
    _check_doses(pop, "two_cmt", ka, duration, rate)
    doses = {"ka": ka, "lag": lag, "f": f, "duration": duration, "rate": rate}
    return _concentration(pop, "two", {"cl": cl, "v1": v1, "q": q, "v2": v2}, doses)


def three_cmt(
    pop: Any,
    *,
    cl: Param,
    v1: Param,
    q2: Param,
    v2: Param,
    q3: Param,
    v3: Param,
    ka: Param | None = None,
    lag: PerCmt = 0.0,
    f: PerCmt = 1.0,
    duration: PerCmt | None = None,
    rate: PerCmt | None = None,
) -> Array:
    """Central concentration of a three-compartment model (NONMEM ADVAN11, or ADVAN12 with ``ka``).

    Same conventions as :func:`one_cmt`; ``q2``, ``q3`` are the intercompartmental clearances to
    the peripheral volumes ``v2``, ``v3``. The eigenvalues are the roots of the characteristic cubic
    by the trigonometric method of ADVAN11 (Abuhelwa et al. 2015), polished by a Newton step.
    """
    _check_doses(pop, "three_cmt", ka, duration, rate)
    doses = {"ka": ka, "lag": lag, "f": f, "duration": duration, "rate": rate}
    disposition = {"cl": cl, "v1": v1, "q2": q2, "v2": v2, "q3": q3, "v3": v3}
    return _concentration(pop, "three", disposition, doses)


# ----------------------------------------------------------------------------------- disposition
def _param(x: ArrayLike, name: str) -> Array:
    """A parameter as a scalar, ``[S, 1, 1]`` (per subject) or ``[S, O, 1]`` (per observation: each
    observation's prediction uses its own value for every dose, e.g. its occasion's), broadcasting
    over observations and doses."""
    x = jnp.asarray(x, dtype=float)
    if x.ndim > 2:
        raise ValueError(f"{name} must be a scalar, [n_subjects] or [n_subjects, n_obs]; got shape {x.shape}")
    return x[:, None, None] if x.ndim == 1 else x[:, :, None] if x.ndim == 2 else x


def _one(cl: Array, v: Array) -> tuple[Array, Array, Array]:
    """ADVAN1: eigenvalue ``CL / V``, coefficient 1; central volume ``V``."""
    return (*_macro((cl / v,), ()), v)


def _two(cl: Array, v1: Array, q: Array, v2: Array) -> tuple[Array, Array, Array]:
    """ADVAN3: the two roots of ``x^2 - (k10 + k12 + k21) x + k10 k21`` (Gibaldi & Perrier)."""
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s = k10 + k12 + k21
    root = jnp.sqrt(jnp.maximum(s * s - 4.0 * k10 * k21, 1e-300))  # > 0 unless q == 0
    alpha = 0.5 * (s + root)
    beta = k10 * k21 / alpha  # product of the roots: no cancellation for a slow terminal phase
    return (*_macro((alpha, beta), (k21,)), v1)


def _three(
    cl: Array, v1: Array, q2: Array, v2: Array, q3: Array, v3: Array
) -> tuple[Array, Array, Array]:
    """ADVAN11: the roots of the characteristic cubic (Abuhelwa et al. 2015, eq. for ADVAN11)."""
    k10, k12, k21, k13, k31 = cl / v1, q2 / v1, q2 / v2, q3 / v1, q3 / v3
    lams = _cubic_roots(
        k10 + k12 + k13 + k21 + k31,
        k10 * k31 + k21 * k31 + k21 * k13 + k10 * k21 + k31 * k12,
        k10 * k21 * k31,
    )
    return (*_macro(lams, (k21, k31)), v1)


_MODELS = {"one": _one, "two": _two, "three": _three}


def _macro(lams: tuple[Array, ...], returns: tuple[Array, ...]) -> tuple[Array, Array]:
    """Eigenvalues ``[..., n]`` and central macro-coefficients of a mammillary model.

    For a unit bolus into the central compartment of a mammillary model whose peripheral
    compartments return at rates ``k_p1`` the central amount is ``sum_i A_i exp(-lambda_i t)`` with
    ``A_i = prod_p (k_p1 - lambda_i) / prod_{j != i} (lambda_j - lambda_i)`` (Gibaldi & Perrier
    1982, appendix B; the ADVAN3/11 coefficients).
    """
    coefs = []
    for i, lam in enumerate(lams):
        num = math.prod((e - lam for e in returns), start=jnp.ones_like(lam))
        den = math.prod((lj - lam for j, lj in enumerate(lams) if j != i), start=jnp.ones_like(lam))
        coefs.append(num / den)
    return jnp.stack(jnp.broadcast_arrays(*lams), -1), jnp.stack(jnp.broadcast_arrays(*coefs), -1)


def _cubic_roots(a2: Array, a1: Array, a0: Array) -> tuple[Array, Array, Array]:
    """Roots of ``x^3 - a2 x^2 + a1 x - a0`` (three real positive roots), as in NONMEM ADVAN11."""
    p = a1 - a2**2 / 3.0
    q = 2.0 * a2**3 / 27.0 - a1 * a2 / 3.0 + a0
    r1 = jnp.sqrt(jnp.maximum(-(p**3) / 27.0, 1e-300))
    phi = jnp.arccos(jnp.clip(-q / (2.0 * r1), -1.0 + 1e-15, 1.0 - 1e-15)) / 3.0
    r2 = 2.0 * jnp.cbrt(r1)
    roots = []
    for k in range(3):
        x = a2 / 3.0 - r2 * jnp.cos(phi + 2.0 * jnp.pi * k / 3.0)
        poly = ((x - a2) * x + a1) * x - a0
        dpoly = (3.0 * x - 2.0 * a2) * x + a1
        ok = jnp.abs(dpoly) > 1e-300  # a double root only when a peripheral flow is 0
        roots.append(x - jnp.where(ok, poly / jnp.where(ok, dpoly, 1.0), 0.0))  # Newton polish
    return tuple(roots)


# ----------------------------------------------------------------------------------- superposition
def _concentration(pop: Any, model: str, disposition: dict, doses: dict) -> Array:
    """Read the population's arrays (adding a subject axis for a single subject) and superpose."""
    ev = _Events(*(jnp.asarray(getattr(pop, name)) for name in _Events._fields))
    single = ev.times.ndim == 1
    if single:  # one subject, e.g. under jax.vmap over the population
        ev = _Events(*(x[None] for x in ev))
        doses = {k: _one_subject(v) if k != "ka" else _add_subject(v) for k, v in doses.items()}
        disposition = {k: _add_subject(v) for k, v in disposition.items()}
    for name, x in (*disposition.items(), ("ka", doses["ka"])):
        shape = jnp.shape(x) if x is not None else ()
        if len(shape) == 2 and tuple(shape) != tuple(ev.times.shape):
            raise ValueError(f"{name}: a per-observation value must be [n_subjects, n_obs] = "
                             f"{list(ev.times.shape)}; got shape {list(shape)}")
    features = getattr(pop, "features", ALL_FEATURES)  # population-like objects: assume any kind
    conc = _superpose(model, ev, disposition, doses, features)
    return conc[0] if single else conc


@functools.partial(jax.jit, static_argnums=(0, 4))
def _superpose(model: str, ev: _Events, disposition: dict, doses: dict, features: frozenset) -> Array:
    """Sum over doses of each dose's central amount at every observation, divided by ``V``.

    Jitted so that eager calls compile once per shape instead of dispatching many small ops.
    """
    params = {k: _param(x, k) for k, x in disposition.items()}
    lams, coefs, vc = _MODELS[model](**params)  # [S, 1, 1, n] (or [n]) and [S, 1, 1]
    if ev.dose_times.shape[-1] == 0:
        return jnp.zeros(ev.times.shape, dtype=float)
    inputs, on = _dose_inputs(ev, doses["lag"], doses["f"], doses["duration"], doses["rate"], features)

    def response(r: Array) -> Array:
        if not features & {"infusion", "steady_state"}:  # boluses only: a much smaller program
            return inputs.amt * jnp.exp(-r * jnp.maximum(inputs.tau, 0.0))
        return _response(r, inputs)

    # eigenvalues [S, 1, 1, n] against dose inputs [S, O, D, 1]
    if doses["ka"] is None:
        amount = jnp.sum(coefs * response(lams), -1)
    else:  # CMT 1 is a first-order depot, CMT 2 central
        ka = _param(doses["ka"], "ka")[..., None]
        if not features & {"infusion", "steady_state"}:
            central, dd = _bolus_divided_difference(inputs.amt, jnp.maximum(inputs.tau, 0.0), lams, ka)
        else:
            steady = inputs.steady | inputs.const
            central, dd = _with_divided_difference(response, lams, ka, inputs.span, steady)
        depot = ka[..., 0] * jnp.sum(coefs * dd, -1)
        amount = jnp.where(ev.dose_cmts[:, None, :] == 1, depot, jnp.sum(coefs * central, -1))
    return jnp.sum(jnp.where(on, amount, 0.0) / vc, -1)


def _add_subject(x: ArrayLike | None) -> Array | None:
    """One subject's per-observation parameter ``[O]`` as ``[1, O]`` (a scalar stays a scalar)."""
    if x is None:
        return None
    x = jnp.asarray(x, dtype=float)
    return x[None] if x.ndim == 1 else x


def _one_subject(value: PerCmt | None) -> PerCmt | None:
    """A dose-level value of a single subject with the subject axis added to per-dose ``[D]``."""

    def add(x: ArrayLike) -> Array:
        x = jnp.asarray(x, dtype=float)
        return x[None] if x.ndim == 1 else x

    if value is None:
        return None
    if isinstance(value, Mapping):
        return {cmt: add(v) for cmt, v in value.items()}
    return add(value)


def _per_dose(value: PerCmt | None, cmts: Array, default: float, name: str = "a dose parameter") -> Array:
    """A dose-level parameter at every dose ``[S, D]``, from a value or a ``{cmt: value}`` map.

    A value is a scalar, ``[S]`` (per subject) or ``[S, D]`` (per dose record: NONMEM computes
    ALAG, F, R and D anew at every dose record).
    """

    def column(x: ArrayLike) -> Array:
        x = jnp.asarray(x, dtype=float)
        if x.ndim > 2 or (x.ndim == 2 and x.shape[1] != cmts.shape[1]):
            raise ValueError(
                f"{name}: shape {x.shape} is neither a scalar, [n_subjects] nor per dose, "
                f"[n_subjects, n_doses] with n_doses = {cmts.shape[1]} (pop.dose_times.shape[1])")
        return x[:, None] if x.ndim == 1 else x

    if value is None:
        value = default
    if isinstance(value, Mapping):
        out = jnp.full(cmts.shape, default, dtype=float)
        for cmt, val in value.items():
            out = jnp.where(cmts == int(cmt), column(val), out)
        return out
    return jnp.broadcast_to(column(value), cmts.shape)


def _dose_inputs(
    ev: _Events, lag: PerCmt, f: PerCmt, duration: PerCmt | None, rate: PerCmt | None,
    features: frozenset = frozenset({"infusion", "steady_state", "reset"}),
) -> tuple[_Doses, Array]:
    """Resolve NONMEM dose coding (RATE, SS, II, F, ALAG, D, R) into operator inputs and a mask.

    NONMEM keeps a given RATE and lets F change the duration (RATE > 0: ``T = F AMT / RATE``;
    RATE = -1: ``T = F AMT / R``; RATE = -2: ``RATE = F AMT / D``). F and ALAG do not apply to a
    steady-state constant infusion (NONMEM help, "bioavailability fraction parameter", "SS dose
    event record"): it acts at the record time.
    """
    cmts = ev.dose_cmts
    amt = _per_dose(f, cmts, 1.0, "f") * ev.dose_amts
    d1, r1 = _per_dose(duration, cmts, 1.0, "duration"), _per_dose(rate, cmts, 1.0, "rate")
    raw = ev.dose_rates.astype(float)
    given, modelled = (raw > 0) | (raw == -1), raw == -2
    rate_d = jnp.where(raw > 0, raw, jnp.where(raw == -1, r1, amt / jnp.where(modelled, d1, 1.0)))
    dur = jnp.where(modelled, d1, amt / jnp.where(given, rate_d, 1.0))  # double where: no 0/0
    bolus = ~(given | modelled)
    ss = ev.dose_ss > 0
    steady, const = ss & (ev.dose_ii > 0), ss & (ev.dose_ii <= 0) & given
    lag_d = jnp.where(const, 0.0, _per_dose(lag, cmts, 0.0, "lag"))
    ii = jnp.where(steady, ev.dose_ii, 1.0)
    t_obs, i_obs = ev.times[:, :, None], ev.obs_index[:, :, None]
    t_dose, i_dose = ev.dose_times[:, None, :], ev.dose_index[:, None, :]
    tau = t_obs - (t_dose + lag_d[:, None, :])
    span = jnp.maximum(tau, 0.0) + jnp.where(bolus | const, 0.0, dur)[:, None, :]
    span = span + jnp.where(steady, ii, 0.0)[:, None, :]
    before = ev.dose_mask[:, None, :] & _precedes(t_dose, i_dose, t_obs, i_obs)
    if features & {"reset", "steady_state"}:
        before = before & ~_reset_between(ev)
    on = before & ((steady | const)[:, None, :] | (tau >= 0.0))

    def full(x: Array) -> Array:
        return jnp.broadcast_to(x[:, None, :] if x.ndim == 2 else x, tau.shape)[..., None]

    doses = _Doses(
        *(full(x) for x in (tau, amt, rate_d, dur, ii, steady, bolus, const, span))
    )
    return doses, on


def _precedes(t_a: Array, i_a: Array, t_b: Array, i_b: Array) -> Array:
    """Record a comes before record b: earlier time, or same time and earlier in the table."""
    return (t_a < t_b) | ((t_a == t_b) & (i_a < i_b))


def _reset_between(ev: _Events) -> Array:
    """``[S, O, D]``: a reset (EVID 3/4, or an SS=1 dose) lies between the dose and the observation.

    Finds, for each observation, the last resetting record before it (by time, then record order)
    and drops every dose record that precedes that reset. An EVID 4 record's reset shares the dose's
    time and comes first, so it never removes its own dose.
    """
    kt = jnp.concatenate([ev.reset_times, ev.dose_times], -1)[:, None, :]
    ki = jnp.concatenate([ev.reset_index, ev.dose_index], -1)[:, None, :]
    km = jnp.concatenate([ev.reset_mask, ev.dose_mask & (ev.dose_ss == 1)], -1)[:, None, :]
    t_obs, i_obs = ev.times[:, :, None], ev.obs_index[:, :, None]
    hit = km & _precedes(kt, ki, t_obs, i_obs)  # [S, O, K]
    t_last = jnp.max(jnp.where(hit, kt, -jnp.inf), -1, keepdims=True)
    i_last = jnp.max(jnp.where(hit & (kt == t_last), ki, -1), -1, keepdims=True)
    return _precedes(ev.dose_times[:, None, :], ev.dose_index[:, None, :], t_last, i_last)


def _response(r: Array, d: _Doses) -> Array:
    """Central input of one dose (and its implied steady-state doses) applied to ``exp(-r t)``.

    Bolus: ``A exp(-r s)``. Infusion at rate ``R`` for ``T``: ``R (1 - exp(-r s)) / r`` while it
    runs, ``R (1 - exp(-r T)) / r * exp(-r (s - T))`` after. Steady state (SS, interval II): the
    sum over implied doses at ``s_n = tau + n II``, ``n >= n0`` (``n0`` skips doses still in their
    lag time), whose running part is a finite geometric sum (doses ``n0 .. n1-1``, several when
    ``T > II``) and whose finished part an infinite one (Gibaldi & Perrier 1982, ch. 3; ADVAN SS
    routines). Constant infusion at steady state, stopped at the record time (NONMEM): ``R / r``
    at the record, decaying as ``R / r exp(-r s)`` after it.
    """
    tau, ii, dur = d.tau, d.ii, d.dur
    n0 = jnp.where(d.steady & (tau < 0.0), jnp.ceil(-tau / ii), 0.0)
    s0 = jnp.maximum(tau + n0 * ii, 0.0)  # time since the last implied dose already given
    tail = jnp.where(d.steady, 1.0 / -jnp.expm1(-r * ii), 1.0)  # sum_n exp(-r n II), or 1 dose
    bolus = d.amt * jnp.exp(-r * s0) * tail
    n1 = jnp.where(
        d.steady, jnp.maximum(n0, jnp.ceil((dur - tau) / ii)), jnp.where(s0 < dur, 1.0, 0.0)
    )
    m = n1 - n0  # number of infusions still running
    s1 = jnp.where(d.steady, tau + n1 * ii, s0)  # time since the start of the last finished one
    running = jnp.where(
        d.steady, m + jnp.exp(-r * s0) * jnp.expm1(-r * m * ii) * tail, -m * jnp.expm1(-r * s0)
    )
    done = jnp.exp(-r * jnp.maximum(s1 - dur, 0.0)) * jnp.where(d.steady, tail, 1.0 - m)
    infusion = d.rate / r * (running - jnp.expm1(-r * dur) * done)
    const = d.rate / r * jnp.exp(-r * jnp.maximum(tau, 0.0))
    return jnp.where(d.const, const, jnp.where(d.bolus, bolus, infusion))


def _bolus_divided_difference(amt: Array, s: Array, lam: Array, ka: Array) -> tuple[Array, Array]:
    """Bolus doses only: ``A exp(-lam s)`` and ``A (exp(-lam s) - exp(-ka s)) / (ka - lam)``.

    The special case of `_with_divided_difference` for ``fn(r) = A exp(-r s)``, in two exponentials
    instead of four points with derivatives (the common oral-bolus case, e.g. theophylline: about
    half the work in every derivative of the objective). The quotient is
    ``A s exp(-lam s) h(x)`` with ``h(x) = (1 - exp(-x)) / x`` at ``x = (ka - lam) s``. For a
    subject whose ``|ka - lam| * max(s) < _NEAR_BOLUS`` (max over its observations and doses) ``h``
    is its Taylor series to ``x^8`` (truncation ``< x^9 / 9! < 3e-15``); otherwise the plain
    quotient, whose cancellation error is ``~1e-16 / |x| <= 1e-15 max(s) / s`` relative. The choice
    is made per subject and eigenvalue, not per observation: a branch per grid point (a comparison
    of a parameter-dependent value on the ``[subj, obs, dose]`` grid) kept XLA on CPU from
    vectorising the exponentials and tripled the cost of a NUTS step on theo_sd (35 -> 20 us per
    vectorised leapfrog step measured with it per subject; ``benchmarks/nuts_overhead.py``). Both
    branches are evaluated at safe arguments (double where), so values and gradients stay finite.
    """
    delta = ka - lam
    s_max = jnp.max(s, axis=tuple(range(1, s.ndim - 1)), keepdims=True)  # per subject: [S, 1, 1, 1]
    near = jnp.abs(delta) * s_max < _NEAR_BOLUS  # [S, 1, 1, n]: small arrays only
    at_lam = amt * jnp.exp(-lam * s)
    far = (at_lam - amt * jnp.exp(-jnp.where(near, lam + 1.0, ka) * s)) / jnp.where(near, 1.0, delta)
    xs = jnp.where(near, delta, 0.0) * s
    h = 0.0
    for k in range(9, 0, -1):  # sum_{k=0}^{8} (-x)^k / (k + 1)!, by Horner
        h = 1.0 / math.factorial(k) - xs * h
    w = near.astype(s.dtype)  # the two branches blended by arithmetic: no select on the grid
    return at_lam, w * (at_lam * s * h) + (1.0 - w) * far


def _with_divided_difference(
    fn: Callable[[Array], Array], lam: Array, ka: Array, span: Array, steady: Array
) -> tuple[Array, Array]:
    """``fn(lam)`` and ``(fn(lam) - fn(ka)) / (ka - lam)``, with exact gradients at ``ka == lam``.

    The divided difference equals ``-integral_0^1 fn'(lam + s (ka - lam)) ds``. Close to the
    diagonal (``|ka - lam| * scale < _NEAR``) we take that integral by 2-point Gauss-Legendre
    quadrature (error ``(ka - lam)^4 fn^(5) / 4320``), elsewhere the quotient, evaluated at a safe
    ``ka`` where unused (double-where: no NaN in the gradient). At ``ka == lam`` this is the
    limiting form, e.g. ``t exp(-k t)`` for a one-compartment bolus. All points go through one
    `jax.jvp` of ``fn`` (values and ``fn'``), which keeps the compiled program small.
    """
    delta = ka - lam
    scale = span + jnp.where(steady, 2.0 / (lam + ka), 0.0)
    near = jnp.abs(delta) * scale < _NEAR
    ka_far = jnp.where(near, 2.0 * lam + ka + 1.0, ka)
    g = 0.5 / math.sqrt(3.0)  # Gauss-Legendre nodes on [0, 1]: 1/2 -+ g
    points = [lam, ka_far, lam + (0.5 - g) * delta, lam + (0.5 + g) * delta]
    points = jnp.concatenate(jnp.broadcast_arrays(*points), -1)
    values, slopes = jax.jvp(fn, (points,), (jnp.ones_like(points),))
    n = lam.shape[-1]
    at_lam, at_ka = values[..., :n], values[..., n : 2 * n]
    far = (at_lam - at_ka) / (ka_far - lam)
    quad = -0.5 * (slopes[..., 2 * n : 3 * n] + slopes[..., 3 * n :])
    return at_lam, jnp.where(near, quad, far)


# ----------------------------------------------------------------------------------- host checks
def _check_doses(
    pop: Any, name: str, ka: Param | None, duration: PerCmt | None, rate: PerCmt | None
) -> None:
    """Reject doses the model cannot take, with a message naming the compartment and function.

    Runs on the host when the population arrays are concrete; skipped when they are tracers (the
    population passed as a `jax.jit` / `jax.vmap` argument), where such doses would silently be
    treated as central doses: check the population once outside the transformation.
    """
    arrays = (pop.dose_cmts, pop.dose_mask, pop.dose_rates)
    if any(isinstance(x, jax.core.Tracer) for x in arrays):
        return
    allowed = (1, 2) if ka is not None else (1,)
    where = (
        "CMT 1 (depot) or CMT 2 (central)"
        if ka is not None
        else "CMT 1 (central) only; pass ka= for a depot in CMT 1 and central in CMT 2"
    )
    for cmt in pop.dose_compartments:
        if cmt not in allowed:
            raise ValueError(
                f"{name}: a dose goes into compartment {cmt}, which this model cannot dose "
                f"(doses may go into {where})"
            )
    mask = np.asarray(pop.dose_mask, dtype=bool)
    cmts, rates = np.asarray(pop.dose_cmts)[mask], np.asarray(pop.dose_rates)[mask]
    for code, value, label in ((-2, duration, "duration"), (-1, rate, "rate")):
        needed = {int(c) for c in cmts[rates == code]}
        if isinstance(value, Mapping):
            missing = needed - {int(c) for c in value}
        else:
            missing = needed if value is None else set()
        if missing:
            raise ValueError(
                f"{name}: doses with RATE={code} into compartment(s) {sorted(missing)} need a "
                f"modelled infusion {label}: pass {label}= (a value or {{cmt: value}})"
            )
