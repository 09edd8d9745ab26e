"""Dosed ODE models: any right-hand side, solved per subject with NONMEM dose semantics.

:func:`solve` integrates ``dy/dt = rhs(t, y, params)`` for every subject of a
:class:`~nlmegen.Population` with `diffrax`, applying the subject's dose records (bolus, zero-order
infusion, modelled rate or duration, lag time, bioavailability, steady state) and resets, and returns
the states at every observation time.

Dose semantics follow NONMEM: a bolus (RATE 0) adds ``F * AMT`` at ``TIME + ALAG``; an infusion
adds ``RATE`` to the compartment's derivative over ``F * AMT / RATE`` (F changes the duration);
RATE = -2 infuses ``F * AMT`` over the modelled ``duration``, RATE = -1 at the modelled ``rate``.
Records at the same time act in record order: an observation sees a same-time bolus only if the dose
record came first. A reset (EVID 3/4) sets the state to ``y0`` and cancels every earlier dose record
still under way: running infusions stop, and lagged doses not yet due are never given (as for SS = 1,
NONMEM help, "SS data item": "infusions in progress or pending additional doses are cancelled"). The system starts from
``y0`` at the subject's first record. ALAG, F and the modelled duration and rate may differ from one
dose record to the next, as NONMEM computes them at every record: pass ``[n_subjects, n_doses]``.

Steady state (NONMEM help, "SS dose event record"): an SS dose is the last of an infinite train of
implied doses every ``II``, ALAG and F applying to all of them. SS = 1 resets (as above) and sets
the state at the record time to that of the train (with its lag, so the record time is a point of the
dosing cycle); the implied doses then go on as transient doses (infusions still running at the record
time continue to their end, and with ``ALAG >= II`` implied doses still due after the record time are
given), and the record's own dose is given as usual. Up to 4 implied doses are continued, which covers
``ALAG + duration <= 5 * II`` (up to 5 overlapping infusions); a longer train fails the subject with
:data:`SS_UNSUPPORTED` rather than give a wrong solution. SS = 1 with ``II = 0`` and an infusion
(``AMT = 0``) sets the steady state of a constant infusion, which then stops at the record time
(NONMEM: it "terminates at the event time of the SS dose record"), so the level falls afterwards.
SS = 2 adds the steady-state deviation (fixed point minus ``y0``) to the current state without a
reset: superposition, exact only for linear systems. A steady state must exist (no state growing
without bound, such as a cumulative AUC state); otherwise the subject fails with :data:`SS_FAILED`.

How it works: each subject's events (effective dose times ``TIME + ALAG``, infusion ends, steady-state
resets, the implied doses of steady-state trains after their record, EVID 3/4 resets, observation
times) are merged into one grid, sorted by time and then by record order (`jax.numpy.lexsort`, so
that lag times and durations may be parameters); each dose record's events count up to the first
reset whose record follows it; a `jax.lax.scan` over the grid runs one ``diffeqsolve`` per segment,
with the infusion rates constant within it, applies bolus jumps and resets at grid points and records
the observed states. Subjects
are mapped with `jax.vmap`. Event records are data: new parameter values never recompile (wrap the
caller in `jax.jit`; ``solve`` itself is a traceable function).

Steady state (SS=1, SS=2) is the fixed point of the one-interval flow map ``Phi``, found by Newton's
method with the Jacobian of ``Phi`` from the variational equations (integrated alongside the states,
so no differentiation through the solver is needed; linear systems converge in one step). The
iterations carry no gradients; gradients come from one more Newton step taken from the root with the
chosen adjoint, ``y* - (dPhi/dy - I)^-1 (Phi(y*, params) - y*)``, whose derivative is the implicit
function theorem's: exact first derivatives, in reverse or forward mode. (`optimistix.root_find`
with its implicit adjoint would need a flow map that is both forward- and reverse-differentiable,
which diffrax offers only with ``DirectAdjoint``: measured 5x the compile time of this scheme.)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._collect import collecting
from ..data._population import ALL_FEATURES
from . import _covariate_hook, _sensitivity

if TYPE_CHECKING:
    from ..data import Population

__all__ = ["NON_FINITE", "SS_FAILED", "SS_UNSUPPORTED", "forward_mode", "solve"]

#: Status code: the steady-state fixed point did not converge (or was not finite).
SS_FAILED = 100
#: Status code: every solve reported success but some state came out NaN or infinite.
NON_FINITE = 101
#: Status code: a steady-state dose whose train reaches too far past its record (ALAG + duration
#: over 5 dosing intervals): more implied doses than the event grid continues (see `solve`).
SS_UNSUPPORTED = 102

# segments are short: 64 checkpoints (not diffrax's default sqrt(max_steps)) made IDR gradients
# 1.6x faster, with 7x less memory
_DEFAULT_ADJOINT = diffrax.RecursiveCheckpointAdjoint(checkpoints=64)
# Backends whose derivatives are all forward mode (FOCE/FOCEI/Laplace) trace models inside
# `forward_mode()`, which switches the default adjoint of every `solve` to `diffrax.ForwardMode`.
_ADJOINT_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("nlmegen_ode_adjoint", default=None)
# while `reporting` is active, every solve appends (status [subj], max_steps, solver name) to this list
_REPORTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("nlmegen_ode_reports", default=None)


@contextlib.contextmanager
def reporting():
    """Collect the per-subject status of every `solve` run inside the block (traced values under `jit`):
    how a failed fit finds out that the solver ran out of steps (a stiff system under an explicit solver)."""
    with collecting(_REPORTS) as reports:
        yield reports


def _report(cfg, status):
    reports = _REPORTS.get()
    if reports is not None:
        reports.append((status, cfg.max_steps, type(cfg.solver).__name__))


@contextlib.contextmanager
def forward_mode():
    """Within this block, `solve` calls without an explicit ``adjoint`` use `diffrax.ForwardMode`.

    Forward-mode sensitivities are the cheaper route for models with few parameters per subject
    (FOCE's ``df/d eta``, the outer gradient of the objective) and reverse-mode adjoints cannot be
    differentiated forward. Estimation backends enter this block while their functions are traced.
    """
    token = _ADJOINT_OVERRIDE.set(diffrax.ForwardMode())
    try:
        yield
    finally:
        _ADJOINT_OVERRIDE.reset(token)

# tie-breaks between events of the same record: reset, steady-state reset, dose start, infusion end
_RESET, _SS, _START, _END = 0, 1, 2, 3


class _Config(NamedTuple):
    """Solver settings and the static structure of the event grid (host-side, hashable parts)."""

    rhs: Callable
    solver: Any
    controller: Any
    adjoint: Any
    max_steps: int
    dt0: float | None
    rtol: float
    atol: float
    has_inf: bool  # some dose is an infusion: infusion-end events
    n_ss: int  # steady-state doses per subject (0: none)
    has_residual: bool  # steady-state infusions may overlap the record time
    has_periodic: bool  # SS with II > 0
    has_const: bool  # SS with II == 0 (constant infusion)
    has_reset: bool  # EVID 3/4 resets
    covariates: tuple = ()  # covariates bound to rhs (`_covariate_hook`): record times on the grid


class _Doses(NamedTuple):
    """Effective dose quantities of one subject, ``[dose]`` each."""

    t: Array  # record time
    lag: Array
    amt: Array  # F * AMT
    cmt: Array  # 0-based state index
    rate: Array  # infusion rate (0 for a bolus)
    dur: Array  # infusion duration (0 for a bolus and for a steady-state constant infusion)
    ii: Array
    ss: Array
    valid: Array
    index: Array


def solve(
    rhs: Callable[[Array, Array, PyTree], Array],
    pop: Population,
    params: PyTree,
    *,
    y0: Array | Callable[[PyTree], Array],
    lag: Any = None,
    f: Any = None,
    duration: Any = None,
    rate: Any = None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    max_steps: int = 100_000,
    dt0: float | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    return_status: bool = False,
    covariates: Sequence[str] = (),
) -> Array | tuple[Array, Array]:
    """Solve ``dy/dt = rhs(t, y, params)`` for every subject, with its doses; states at the obs times.

    Parameters
    ----------
    rhs : callable
        ``rhs(t, y, p) -> dy``: ``y`` is the 1-D state vector (``n_states``), ``p`` one subject's
        parameters (``params`` with the subject axis removed). Things shared by all subjects that are
        not scalars (neural-network weights, matrices) are captured by closure in ``rhs``, not passed
        in ``params``; closures over traced values (inside `jax.grad`, `jax.jit`) work.
    pop : Population
        Observation, dose and reset records (NONMEM semantics; compartment ``k`` is ``y[k - 1]``).
    params : pytree
        Leaves of shape ``[n_subjects, ...]`` are per subject; scalar leaves are shared by all.
    y0 : array or callable
        Initial state (at the subject's first record and after resets): ``[n_states]``,
        ``[n_subjects, n_states]`` or ``y0(p) -> [n_states]`` evaluated per subject (a baseline that
        depends on the parameters, e.g. ``R0 = kin / kout``).
    lag, f : optional
        Absorption lag (ALAG, default 0) and bioavailability (F, default 1): a scalar or
        ``[n_subjects]`` value for every dose, ``[n_subjects, n_doses]`` for one value per dose
        record (aligned with ``pop.dose_times``, ADDL doses included; NONMEM's ALAG and F from each
        record's covariates), or a dict ``{cmt: value}`` of these per dosing compartment.
    duration, rate : optional
        Modelled duration (for RATE = -2 doses) and modelled rate (RATE = -1), same forms.
    solver : diffrax solver, optional
        Default `diffrax.Tsit5`; for stiff systems use e.g. `diffrax.Kvaerno5`.
    rtol, atol : float
        Tolerances of the `diffrax.PIDController` (and, times 10, of the steady-state Newton solve).
    max_steps : int
        Step limit of every segment's solve; a subject that reaches it fails (see ``return_status``).
    dt0 : float, optional
        Initial step (default: chosen by the controller).
    adjoint : diffrax adjoint, optional
        Default ``diffrax.RecursiveCheckpointAdjoint(checkpoints=64)`` (reverse mode);
        `diffrax.ForwardMode` gives cheap forward-mode Jacobians (`jax.jacfwd`) instead.
    return_status : bool
        Also return the status of each subject.
    covariates : sequence of str
        Covariates the right-hand side reads at time ``t``: it is then called
        ``rhs(t, y, p, cov)`` with ``cov[name]`` the subject's value at ``t`` by the population's
        NOCB/LOCF rule (`Population.covariate_at`). Every record time becomes a point of the event
        grid, so the solver never steps across a change (see `nlmegen.dynamics._covariate_hook`).

    Returns
    -------
    states : ``[n_subjects, n_obs, n_states]``
        States at ``pop.times`` (padded observations included); NaN for failed subjects.
    status : ``[n_subjects]`` int, only with ``return_status``
        0 on success; otherwise the `diffrax.RESULTS` code of the failed solve, :data:`SS_FAILED`,
        :data:`SS_UNSUPPORTED` or :data:`NON_FINITE`. Failures never raise, so extreme parameters
        cannot crash an estimation.

    See the module docstring for the dose, reset and steady-state semantics.

    Examples
    --------
    >>> import jax.numpy as jnp, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> def rhs(t, y, p):  # depot, central
    ...     return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["cl"] / p["v"] * y[1]])
    >>> states = nlmegen.ode.solve(rhs, pop, {"ka": 1.6, "cl": 2.7, "v": 31.5}, y0=jnp.zeros(2))
    >>> states.shape, round(float(states[0, 3, 1] / 31.5), 2)
    ((12, 11, 2), 7.96)
    """
    n_subj = int(pop.times.shape[0])
    if covariates:
        rhs, y0, params = _covariate_hook.bind(rhs, y0, pop, params, covariates)
    cfg = _config(rhs, pop, solver, rtol, atol, max_steps, dt0, adjoint)._replace(covariates=tuple(covariates))
    _check_rates(pop, duration, rate)
    params = _per_subject(params, n_subj, "params")
    specs = {name: _spec(v, n_subj, name) for name, v in
             (("lag", lag), ("f", f), ("duration", duration), ("rate", rate))}
    y0s = _initial_states(y0, params, n_subj)
    n_states = y0s.shape[-1]
    _check_compartments(pop, n_states)
    _sensitivity.record(cfg)
    if _sensitivity.dynamics_off():  # quantities that do not depend on the dynamics (see no_dynamics)
        states, status = jnp.zeros((n_subj, pop.times.shape[1], n_states)), jnp.zeros((n_subj,), jnp.int32)
        return (states, status) if return_status else states
    if _sensitivity.active() is not None:  # forward sensitivities in the primal solve (custom JVP)
        states, status = _sensitivity.solve_with_sensitivities(cfg, pop, params, y0s, specs)
        _report(cfg, status)
        return (states, status) if return_status else states
    doses = jax.vmap(partial(_dose_table, n_states=n_states))(_dose_arrays(pop), specs)
    yss, ss_status = _steady_states(cfg, pop, params, y0s, doses)
    obs = (pop.times, pop.mask, pop.obs_index)
    resets = (pop.reset_times, pop.reset_mask, pop.reset_index)
    states, status = jax.vmap(partial(_subject, cfg))(params, y0s, obs, doses, resets, yss)
    status = jnp.where(ss_status != 0, ss_status, status)
    states = jnp.where((status != 0)[:, None, None], jnp.nan, states)
    _report(cfg, status)
    return (states, status) if return_status else states


# ---------------------------------------------------------------------------- host-side set-up
def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or None when it is a tracer (inside `jax.jit`)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _config(rhs, pop, solver, rtol, atol, max_steps, dt0, adjoint) -> _Config:
    """Solver settings, and which event kinds the grid needs (all of them when ``pop`` is traced)."""
    arrays = [_concrete(getattr(pop, k)) for k in
              ("dose_mask", "dose_rates", "dose_ss", "dose_ii", "reset_mask")]
    n_doses = int(pop.dose_times.shape[1])
    settings = dict(
        rhs=rhs, solver=diffrax.Tsit5() if solver is None else solver,
        controller=diffrax.PIDController(rtol=rtol, atol=atol),
        adjoint=(_ADJOINT_OVERRIDE.get() or _DEFAULT_ADJOINT) if adjoint is None else adjoint,
        max_steps=int(max_steps), dt0=dt0, rtol=float(rtol), atol=float(atol))
    if any(a is None for a in arrays):  # traced data: the population's static features still tell
        feats = getattr(pop, "features", ALL_FEATURES)
        ss, inf = "steady_state" in feats, "infusion" in feats
        return _Config(**settings, has_inf=inf, n_ss=n_doses if ss else 0, has_residual=ss and inf,
                       has_periodic=ss, has_const=ss and inf,
                       has_reset=("reset" in feats) and pop.reset_times.shape[1] > 0)
    mask, rates, ss, ii, reset_mask = arrays
    inf = mask & (rates != 0)
    is_ss = mask & (ss != 0)
    return _Config(
        **settings, has_inf=bool(inf.any()), n_ss=int(is_ss.sum(axis=1).max(initial=0)),
        has_residual=bool((is_ss & inf & (ii > 0)).any()),
        has_periodic=bool((is_ss & (ii > 0)).any()), has_const=bool((is_ss & (ii <= 0)).any()),
        has_reset=bool(reset_mask.any()))


def _check_rates(pop: Any, duration: Any, rate: Any) -> None:
    """Raise if RATE = -2 (-1) doses exist without a modelled duration (rate); concrete data only."""
    mask, rates, cmts = (_concrete(getattr(pop, k)) for k in ("dose_mask", "dose_rates", "dose_cmts"))
    if mask is None or rates is None or cmts is None:
        return
    for code, value, name in ((-2, duration, "duration"), (-1, rate, "rate")):
        needed = {int(c) for c in cmts[mask & (rates == code)]}
        if not needed:
            continue
        if value is None:
            raise ValueError(f"the data have RATE={code} doses (compartments {sorted(needed)}) "
                             f"but no modelled `{name}` was given to ode.solve")
        if isinstance(value, Mapping) and not needed <= {int(k) for k in value}:
            missing = sorted(needed - {int(k) for k in value})
            raise ValueError(f"RATE={code} doses into compartments {missing} have no modelled "
                             f"`{name}`: give {name}={{cmt: value}} for them")


def _check_compartments(pop: Any, n_states: int) -> None:
    """Raise if a real dose goes into a compartment the model does not have (concrete data only)."""
    mask, cmts = _concrete(pop.dose_mask), _concrete(pop.dose_cmts)
    if mask is None or cmts is None:
        return
    bad = sorted({int(c) for c in cmts[mask] if not 1 <= c <= n_states})
    if bad:
        raise ValueError(f"doses into compartments {bad}, but the model has {n_states} states "
                         f"(compartments 1..{n_states})")


def _per_subject(tree: PyTree, n_subj: int, name: str) -> PyTree:
    """Broadcast scalar leaves to ``[n_subjects]``; check that the others lead with ``n_subjects``."""

    def leaf(x):
        x = jnp.asarray(x)
        if x.ndim == 0:
            return jnp.broadcast_to(x, (n_subj,))
        if x.shape[0] != n_subj:
            raise ValueError(
                f"{name}: a leaf of shape {x.shape} neither is a scalar nor leads with the "
                f"{n_subj} subjects; capture arrays shared by all subjects by closure in `rhs`")
        return x

    return jax.tree.map(leaf, tree)


def _spec(value: Any, n_subj: int, name: str) -> tuple:
    """``lag``/``f``/``duration``/``rate`` as ``(value for all doses or None, {cmt: value})``."""
    if value is None:
        return None, {}
    if isinstance(value, Mapping):
        return None, {int(k): _per_subject(v, n_subj, name) for k, v in value.items()}
    return _per_subject(value, n_subj, name), {}


def _initial_states(y0: Any, params: PyTree, n_subj: int) -> Array:
    """``[n_subjects, n_states]`` initial states from an array or a per-subject callable."""
    if callable(y0):
        return jax.vmap(lambda p: jnp.asarray(y0(p), dtype=float))(params)
    y0 = jnp.asarray(y0, dtype=float)
    if y0.ndim == 1:
        return jnp.broadcast_to(y0, (n_subj, y0.shape[0]))
    if y0.ndim != 2 or y0.shape[0] != n_subj:
        raise ValueError(f"y0 must be [n_states] or [{n_subj}, n_states], got shape {y0.shape}")
    return y0


def _dose_arrays(pop: Any) -> tuple:
    return (pop.dose_times, pop.dose_amts, pop.dose_cmts, pop.dose_rates, pop.dose_ii,
            pop.dose_ss, pop.dose_mask, pop.dose_index)


# ---------------------------------------------------------------------------- one subject
def _resolve(spec: tuple, cmt: Array, default: float, name: str = "a dose parameter") -> Array:
    """Per-dose value of a ``lag``/``f``/... spec (``cmt`` 1-based ``[dose]``, one subject).

    Each value is one for all doses (a scalar here) or one per dose record (``[dose]`` here, from
    ``[n_subjects, n_doses]``): NONMEM computes ALAG, F, R and D anew at every dose record.
    """
    base, per_cmt = spec
    for v in (base, *per_cmt.values()):
        if v is not None and jnp.ndim(v) and jnp.shape(v) != cmt.shape:
            raise ValueError(
                f"{name}: a value of shape [n_subjects, {', '.join(map(str, jnp.shape(v)))}] is neither "
                f"[n_subjects] nor per dose, [n_subjects, n_doses] with n_doses = {cmt.shape[0]} "
                "(pop.dose_times.shape[1], ADDL doses included)")
    out = jnp.full(cmt.shape, default) if base is None else jnp.broadcast_to(base, cmt.shape)
    for k, v in per_cmt.items():
        out = jnp.where(cmt == k, v, out)
    return out


def _safe(x: Array) -> Array:
    return jnp.where(x != 0, x, 1.0)


def _dose_table(arrays: tuple, specs: dict, n_states: int) -> _Doses:
    """Effective amount, rate, duration and lag of each dose (NONMEM RATE coding)."""
    t, amt, cmt, code, ii, ss, mask, index = arrays
    amt = _resolve(specs["f"], cmt, 1.0, "f") * amt
    model_dur = _resolve(specs["duration"], cmt, 1.0, "duration")
    model_rate = _resolve(specs["rate"], cmt, 1.0, "rate")
    is_inf = mask & (code != 0)
    rate = jnp.where(code > 0, code, jnp.where(code == -1, model_rate, amt / _safe(model_dur)))
    rate = jnp.where(is_inf, rate, 0.0)
    dur = jnp.where(code == -2, model_dur, amt / _safe(rate))
    dur = jnp.where(is_inf, dur, 0.0)
    # steady-state constant infusion: the state is set to its steady state and the infusion then
    # stops (NONMEM help, "SS dose event record": it "terminates at the event time of the SS dose
    # record"); `rate` is kept for the steady state
    dur = jnp.where(is_inf & (ss != 0) & (ii <= 0), 0.0, dur)
    return _Doses(t=t, lag=_resolve(specs["lag"], cmt, 0.0, "lag"), amt=jnp.where(mask, amt, 0.0),
                  cmt=jnp.clip(cmt - 1, 0, n_states - 1), rate=rate, dur=dur, ii=ii, ss=ss,
                  valid=mask, index=index)


def _flow(cfg: _Config, adjoint: Any, p: PyTree, t0: Array, t1: Array, y: Array, rate: Array):
    """Integrate ``rhs + rate`` from ``t0`` to ``t1`` (no steps when equal); state and result code."""
    t0, t1 = _covariate_hook.span(cfg, t0, t1)
    term = diffrax.ODETerm(lambda t, y, args: cfg.rhs(t, y, args[0]) + args[1])
    sol = diffrax.diffeqsolve(
        term, cfg.solver, t0, t1, cfg.dt0, y, (p, rate), stepsize_controller=cfg.controller,
        adjoint=adjoint, max_steps=cfg.max_steps, throw=False)
    return sol.ys[-1], sol.result._value.astype(jnp.int32)


def _subject(cfg: _Config, p, y0, obs, doses: _Doses, resets, yss):
    """States of one subject at its observation times, and its status code."""
    grid = _grid(cfg, y0, obs, doses, resets, yss, _covariate_hook.extra_times(cfg, p))
    t_grid, rate, is_reset, ss1, ss2, y_ss, bolus, pos_obs, t_init = grid

    def step(carry, x):
        y, t0, status = carry
        t1, rate_i, reset_i, ss1_i, ss2_i, yss_i, bolus_i = x
        y, res = _flow(cfg, cfg.adjoint, p, t0, jnp.where(status == 0, t1, t0), y, rate_i)
        status = jnp.where(status == 0, res, status)
        y = _apply_events(y, y0, reset_i, ss1_i, ss2_i, yss_i, bolus_i)
        return (y, t1, status), y

    init = (y0, t_init, jnp.zeros((), jnp.int32))
    (_, _, status), ys = jax.lax.scan(step, init, (t_grid, rate, is_reset, ss1, ss2, y_ss, bolus))
    states = ys[pos_obs]
    status = jnp.where((status == 0) & ~jnp.all(jnp.isfinite(states)), NON_FINITE, status)
    return states, status


def _apply_events(y: Array, y0: Array, reset: Array, ss1: Array, ss2: Array, yss: Array, bolus: Array) -> Array:
    """The state after the events of one grid point: reset to ``y0``, steady state (SS=1 replaces,
    SS=2 adds the deviation from ``y0``), then the bolus. Linear in ``(y, y0, yss, bolus)``, so the
    same map moves the sensitivity states (`nlmegen.dynamics._sensitivity`)."""
    y = jnp.where(reset, y0, y)
    return jnp.where(ss1, yss, jnp.where(ss2, y + yss - y0, y)) + bolus


class _Group(NamedTuple):
    """Candidate grid events of one kind, ``[event]`` each (``[event, n]`` for the state vectors)."""

    time: Array
    valid: Array
    order: Array  # record index * 4 + kind (_RESET, _SS, _START, _END): the tie-break at equal times
    reset: Array
    ss1: Array
    ss2: Array
    y_ss: Array
    bolus: Array
    owner: Array  # the dose whose event this is (its pending doses may be cancelled), -1 for none


def _group(time, valid, order, n: int, owner=None, reset=None, ss1=None, ss2=None, y_ss=None,
           bolus=None) -> _Group:
    """A `_Group`, with the flags false, the state vectors zero and no owner where not given."""
    no, zeros = jnp.zeros(time.shape, bool), jnp.zeros((*time.shape, n))
    return _Group(time, valid, order, no if reset is None else reset, no if ss1 is None else ss1,
                  no if ss2 is None else ss2, zeros if y_ss is None else y_ss,
                  zeros if bolus is None else bolus,
                  jnp.full(time.shape, -1, jnp.int32) if owner is None else owner.astype(jnp.int32))


def _events(cfg: _Config, y0, obs, d: _Doses, resets, yss, extra=None) -> dict[str, _Group]:
    """Candidate events of one subject by kind: observations, dose starts, infusion ends, steady
    states, the doses of steady-state trains continued past their record (`_train`) and resets."""
    n_d, n = d.t.shape[0], y0.shape[0]
    onehot = jax.nn.one_hot(d.cmt, n, dtype=y0.dtype)
    doses = jnp.arange(n_d)
    t_obs, _, obs_index = obs
    groups = {"obs": _group(t_obs, jnp.ones(t_obs.shape, bool), obs_index * 4 + _START, n)}
    bolus = jnp.where((d.valid & (d.rate == 0))[:, None], d.amt[:, None] * onehot, 0.0)
    groups["start"] = _group(d.t + d.lag, d.valid, d.index * 4 + _START, n, doses, bolus=bolus)
    if cfg.has_inf:
        end = d.t + d.lag + d.dur
        ok = d.valid & (d.rate > 0) & jnp.isfinite(end)
        groups["end"] = _group(jnp.where(ok, end, 0.0), ok, d.index * 4 + _END, n, doses)
    if cfg.n_ss:
        is_ss = d.valid & (d.ss != 0)
        groups["ss"] = _group(d.t, is_ss, d.index * 4 + _SS, n, doses, ss1=is_ss & (d.ss == 1),
                              ss2=is_ss & (d.ss == 2), y_ss=yss)
    if cfg.n_ss and cfg.has_periodic:
        tr = _train(cfg, d)
        start = jnp.where(tr.bolus_ok | tr.inf_ok, jnp.maximum(tr.start, tr.record), 0.0)
        groups["train_start"] = _group(start, tr.bolus_ok | tr.inf_ok, tr.index * 4 + _START, n, tr.owner,
                                       bolus=jnp.where(tr.bolus_ok[:, None], tr.amt[:, None] * onehot[tr.owner], 0.0))
        if cfg.has_residual:
            groups["train_end"] = _group(jnp.where(tr.inf_ok, tr.end, 0.0), tr.inf_ok, tr.index * 4 + _END, n,
                                         tr.owner)
    if cfg.has_reset:
        t_r, mask_r, index_r = resets
        groups["reset"] = _group(t_r, mask_r, index_r * 4 + _RESET, n, reset=mask_r)
    if extra is not None:  # record times of bound covariates: grid points without an event
        t_x, mask_x = extra
        groups["covariates"] = _group(t_x, mask_x, jnp.zeros(t_x.shape, jnp.int32), n)
    return groups


#: Doses of a steady-state train (besides the record's own dose) continued past the record time:
#: enough for ALAG + duration <= (_TRAIN + 1) * II, i.e. up to 5 overlapping infusions. A longer
#: train fails the subject with `SS_UNSUPPORTED` (`_train_too_long`).
_TRAIN = 4


class _Train(NamedTuple):
    """The implied doses ``k = 1 .. _TRAIN`` of each steady-state train, ``[slot * k]`` each."""

    owner: Array  # the SS dose record
    index: Array  # its record index
    record: Array  # its record time
    start: Array  # dose time TIME + ALAG - k II
    end: Array  # infusion end
    amt: Array
    bolus_ok: Array  # a bolus given at or after the record time
    inf_ok: Array  # an infusion still running at the record time or starting after it


def _train(cfg: _Config, d: _Doses) -> _Train:
    """The doses of each steady-state train (SS > 0, II > 0) that the state at the record time
    does not contain yet: infusions still running then, and doses due at or after it (ALAG >= II).

    NONMEM help, "SS dose event record": the SS dose is the last of a series of implied doses
    every II; ALAG, F, R and D apply to all of them. The steady state at the record time is that of
    the train (`_period_map`); after it the implied doses go on as transient doses, running
    infusions until their end, and lagged doses of the train still due are given.
    """
    n_slots = min(cfg.n_ss, d.t.shape[0])
    periodic = d.valid & (d.ss != 0) & (d.ii > 0)
    (slot,) = jnp.nonzero(periodic, size=n_slots, fill_value=0)
    used = (jnp.arange(n_slots) < periodic.sum())[:, None]
    k = jnp.arange(1, _TRAIN + 1, dtype=d.t.dtype)

    def each(x):  # [slot] -> [slot * k]
        return jnp.broadcast_to(x, (n_slots, _TRAIN)).reshape(-1)

    at = lambda x: x[slot][:, None]  # noqa: E731
    start = at(d.t) + at(d.lag) - k * at(d.ii)
    end = start + at(d.dur)
    infusion = at(d.rate) > 0
    bolus_ok = used & ~infusion & (start >= at(d.t))
    inf_ok = used & infusion & (end > at(d.t))
    return _Train(owner=each(slot[:, None]), index=each(at(d.index)), record=each(at(d.t)),
                  start=start.reshape(-1), end=end.reshape(-1), amt=each(at(d.amt)),
                  bolus_ok=bolus_ok.reshape(-1), inf_ok=inf_ok.reshape(-1))


def _train_too_long(d: _Doses) -> Array:
    """Some steady-state train has implied doses beyond the `_TRAIN` that `_train` continues."""
    start = d.t + d.lag - (_TRAIN + 1) * d.ii
    beyond = (start >= d.t) | ((d.rate > 0) & (start + d.dur > d.t))
    return jnp.any(d.valid & (d.ss != 0) & (d.ii > 0) & beyond)


def _grid(cfg: _Config, y0, obs, d: _Doses, resets, yss, extra=None):
    """The sorted event grid of one subject, with the infusion rate of each segment (``extra``:
    ``(times, mask)`` of further grid points without an event)."""
    groups = _events(cfg, y0, obs, d, resets, yss, extra)
    time, valid, order, is_reset, ss1, ss2, y_ss, bolus, owner = (
        jnp.concatenate(parts) for parts in zip(*groups.values(), strict=True))
    t_obs, mask_obs, _ = obs
    firsts = [jnp.where(mask_obs, t_obs, jnp.inf).min(initial=jnp.inf),
              jnp.where(d.valid, d.t, jnp.inf).min(initial=jnp.inf)]
    if cfg.has_reset:
        firsts.append(jnp.where(resets[1], resets[0], jnp.inf).min(initial=jnp.inf))
    t_init = jnp.min(jnp.stack(firsts))
    t_init = jnp.where(jnp.isfinite(t_init), t_init, 0.0)  # the first record
    t_end = jnp.maximum(t_obs.max(initial=-jnp.inf), t_init)  # nothing after the last observation
    beyond = ~valid | (time > t_end)
    time = jnp.where(beyond, t_end, jnp.clip(time, t_init, t_end))
    # (a barrier: with constant data XLA would otherwise constant-fold the sort, slowly)
    keys = jax.lax.optimization_barrier((order, beyond.astype(jnp.int32), time))
    perm = jnp.lexsort(keys)
    pos = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0]))
    at = _offsets(groups, pos)
    cut = _cuts(cfg, d, resets, at, pos.shape[0])
    if cut is not None:  # doses cancelled before they are due give nothing
        bolus = jnp.where((pos < cut[jnp.maximum(owner, 0)])[:, None] | (owner < 0)[:, None], bolus, 0.0)
    rate = _rates(cfg, d, at, cut, pos.shape[0], y0)
    return (time[perm], rate, is_reset[perm], ss1[perm], ss2[perm], y_ss[perm], bolus[perm],
            pos[: t_obs.shape[0]], t_init)


def _offsets(groups: dict[str, _Group], pos: Array) -> dict[str, Array]:
    """Grid positions of the events of each group (``pos`` of the concatenation, split by group)."""
    out, first = {}, 0
    for name, g in groups.items():
        out[name] = pos[first: first + g.time.shape[0]]
        first += g.time.shape[0]
    return out


def _cuts(cfg: _Config, d: _Doses, resets, at: dict, n_grid: int) -> Array | None:
    """``[dose]``: grid position of the first reset after each dose record (n_grid if none).

    NONMEM help, "SS data item": an SS = 1 dose cancels "infusions in progress or pending
    additional doses", and so does an EVID 3/4 reset; so a dose record's events (its lagged start,
    its infusion, its steady-state train) count only up to the first reset whose record comes after
    the dose record, even when the dose is not yet due at that reset. None: no resets possible.
    """
    if not (cfg.has_reset or cfg.n_ss):
        return None
    keys = []  # (record time, record index, grid position, is a reset)
    if cfg.has_reset:
        keys.append((resets[0], resets[2], at["reset"], resets[1]))
    if cfg.n_ss:
        keys.append((d.t, d.index, at["ss"], d.valid & (d.ss == 1)))
    # (a reset beyond the last observation sorts after every event that matters: no need to drop it)
    t_k, i_k, pos_k, ok_k = (jnp.concatenate(parts) for parts in zip(*keys, strict=True))
    later = (d.t[:, None] < t_k) | ((d.t[:, None] == t_k) & (d.index[:, None] < i_k))
    return jnp.min(jnp.where(later & ok_k, pos_k, n_grid), axis=1, initial=n_grid)


def _rates(cfg: _Config, d: _Doses, at: dict, cut: Array | None, n_grid: int, y0: Array) -> Array:
    """Total infusion rate vector over the segment that ends at each grid point, ``[grid, n]``.

    An infusion runs from its start event up to its end event or the first reset after its record
    (`_cuts`), whichever comes first on the grid.
    """
    n = y0.shape[0]
    if not cfg.has_inf:
        return jnp.zeros((n_grid, n), y0.dtype)
    per_dose = (d.rate * d.valid)[:, None] * jax.nn.one_hot(d.cmt, n, dtype=y0.dtype)
    cut = jnp.full(d.t.shape, n_grid) if cut is None else cut
    items = [(at["start"], at["end"], cut, per_dose)]
    if "train_end" in at:
        tr = _train(cfg, d)
        items.append((at["train_start"], at["train_end"], cut[tr.owner],
                       jnp.where(tr.inf_ok[:, None], per_dose[tr.owner], 0.0)))
    start, end, stop, rates = (jnp.concatenate(parts) for parts in zip(*items, strict=True))
    i = jnp.arange(n_grid)[:, None]
    active = (start <= i) & (i < jnp.minimum(end, stop))
    after = active.astype(y0.dtype) @ rates
    return jnp.concatenate([jnp.zeros_like(after[:1]), after[:-1]])


# ---------------------------------------------------------------------------- steady state
def _steady_states(cfg: _Config, pop: Any, params, y0s: Array, doses: _Doses):
    """Steady states ``[subj, dose, n]`` of the SS doses (None if there are none) and a status."""
    n_subj, n_states = y0s.shape
    if not cfg.n_ss:
        return None, jnp.zeros((n_subj,), jnp.int32)
    ss_fn = jax.vmap(partial(_ss_states, cfg))
    if _concrete(pop.dose_ss) is not None:  # known to have steady-state doses
        return ss_fn(params, y0s, doses)
    # traced data: skip the fixed points at run time when there are none
    zeros = (jnp.zeros((n_subj, pop.dose_times.shape[1], n_states), y0s.dtype),
             jnp.zeros((n_subj,), jnp.int32))
    any_ss = jnp.any(pop.dose_mask & (pop.dose_ss != 0))
    return jax.lax.cond(any_ss, ss_fn, lambda *_: zeros, params, y0s, doses)


def _ss_states(cfg: _Config, p, y0, d: _Doses):
    """Steady-state states ``[dose, n]`` (at each SS dose's record time) and a status code."""
    is_ss = d.valid & (d.ss != 0)
    n_ss = min(cfg.n_ss, d.t.shape[0])
    (idx,) = jnp.nonzero(is_ss, size=n_ss, fill_value=0)
    active = jnp.arange(n_ss) < is_ss.sum()
    sel = jax.tree.map(lambda a: a[idx], d)
    y_ss, ok = jax.vmap(partial(_ss_one, cfg, p, y0))(sel, active)
    slot = jnp.clip(jnp.cumsum(is_ss) - 1, 0, n_ss - 1)
    status = jnp.where(jnp.all(ok | ~active), 0, SS_FAILED)
    status = jnp.where(_train_too_long(d), SS_UNSUPPORTED, status).astype(jnp.int32)
    return y_ss[slot], status


def _ss_residual(cfg: _Config, y, args, adjoint, jac: bool = False):
    """Residual whose root is the steady state: ``Phi(y) - y`` (II > 0) or ``rhs + rate`` (II = 0).

    With ``jac``, also its Jacobian (the flow's from the variational equations; no autodiff
    through the solver).
    """
    p, y0, t, lag, dur, ii, bolus, rvec, periodic, const = args
    eye = jnp.eye(y.shape[0], dtype=y.dtype)
    r, dr = y - y0, eye  # unused slots: trivial root
    if cfg.has_periodic:
        phi = (_period_map_jac if jac else _period_map)(cfg, adjoint, p, y, t, lag, dur, ii, bolus,
                                                        rvec, periodic)
        r = jnp.where(periodic, (phi[0] if jac else phi) - y, r)
        dr = jnp.where(periodic, phi[1] - eye, dr) if jac else dr
    if cfg.has_const:
        r = jnp.where(const, cfg.rhs(t, y, p) + rvec, r)
        dr = jnp.where(const, jax.jacfwd(cfg.rhs, argnums=1)(t, y, p), dr) if jac else dr
    return (r, dr) if jac else r


def _ss_one(cfg: _Config, p, y0, d: _Doses, active: Array):
    """The steady state of one dose: Newton root (no gradients) plus one implicit-function step."""
    onehot = jax.nn.one_hot(d.cmt, y0.shape[0], dtype=y0.dtype)
    periodic = active & (d.ii > 0)
    const = active & (d.ii <= 0)
    dur = jnp.where(jnp.isfinite(d.dur), d.dur, 0.0)
    args = (p, y0, d.t, d.lag, dur, jnp.where(periodic, d.ii, 1.0),
            jnp.where(d.rate == 0, d.amt, 0.0) * onehot, d.rate * onehot, periodic, const)
    resid = partial(_ss_residual, cfg, adjoint=cfg.adjoint, jac=True)
    closed = eqx.filter_closure_convert(resid, y0, args)  # closed-over tracers become leaves ...
    closed, args_ng, y_init = jax.tree.map(_no_grad, (closed, args, y0))  # ... and lose gradients
    y_root, jac, ok = _newton(closed, y_init, args_ng, 10 * cfg.rtol, 10 * cfg.atol)
    # y_root does not depend on the parameters; this Newton step from it does, to first order exactly
    y = y_root - jnp.linalg.solve(jac, _ss_residual(cfg, y_root, args, cfg.adjoint))
    return y, ok & jnp.all(jnp.isfinite(y))


def _newton(resid: Callable, y: Array, args: Any, rtol: float, atol: float, max_iter: int = 64):
    """Newton's method on ``resid(y, args) -> (r, dr/dy)``: root, last Jacobian, converged flag."""

    def small(y, dy):  # max norm: the ODE error of small states need not be resolved
        return jnp.max(jnp.abs(dy)) <= atol + rtol * jnp.max(jnp.abs(y))

    def cond(c):
        it, y, dy, _ = c
        return (it < max_iter) & ~small(y, dy) & jnp.all(jnp.isfinite(y))

    def body(c):
        it, y, _, _ = c
        r, jac = resid(y, args)
        dy = jnp.linalg.solve(jac, r)
        return it + 1, y - dy, dy, jac

    init = (jnp.zeros((), jnp.int32), y, jnp.full_like(y, jnp.inf), jnp.eye(y.shape[0], dtype=y.dtype))
    it, y, dy, jac = jax.lax.while_loop(cond, body, init)
    ok = small(y, dy) & jnp.all(jnp.isfinite(y))
    return y, jac, ok


def _no_grad(x: Any) -> Any:
    return jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x


def _variational_flow(cfg: _Config, adjoint, p, t0, t1, z, rate):
    """Flow of ``(y, dy/dy_start)``: the state and its sensitivity to the starting state."""

    def field(t, z, args):
        y, sens = z
        dy, tangent = jax.linearize(lambda x: cfg.rhs(t, x, args[0]), y)
        return dy + args[1], jax.vmap(tangent, in_axes=1, out_axes=1)(sens)

    t0, t1 = _covariate_hook.span(cfg, t0, t1)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), cfg.solver, t0, t1, cfg.dt0, z, (p, rate),
        stepsize_controller=cfg.controller, adjoint=adjoint, max_steps=cfg.max_steps, throw=False)
    ok = sol.result == diffrax.RESULTS.successful
    return jax.tree.map(lambda x: jnp.where(ok, x[-1], jnp.nan), sol.ys)


def _period_map(cfg: _Config, adjoint, p, y, t, lag, dur, ii, bolus, rvec, on, jac=False):
    """Flow over the dosing interval ending at ``t`` of the train of doses given at ``lag`` mod II.

    Three segments split at the dose phase and the infusion-end phase; the infusion rate in each is
    ``rate`` times the number of the train's infusions running then (they may overlap). With
    ``jac``: ``(Phi(y), dPhi/dy)``.
    """
    a = jnp.mod(lag, ii)
    e = jnp.where(dur > 0, jnp.mod(a + dur, ii), a)
    bounds = jnp.stack([jnp.zeros_like(a), jnp.minimum(a, e), jnp.maximum(a, e), ii])
    bounds = jnp.where(on, bounds, 0.0)  # off: zero-length segments, no steps
    mid = (bounds[:-1] + bounds[1:]) / 2
    running = jnp.floor((mid - a) / ii) - jnp.floor((mid - a - dur) / ii)
    first = a <= e
    zero = jnp.zeros_like(bolus)
    jumps = jnp.stack([jnp.where(first, bolus, zero), jnp.where(first, zero, bolus), zero])
    times = t - jnp.where(on, ii, 0.0) + bounds

    def segment(z, x):
        t0, t1, n_running, jump = x
        if jac:
            y, sens = _variational_flow(cfg, adjoint, p, t0, t1, z, n_running * rvec)
            return (y + jump, sens), None
        z, res = _flow(cfg, adjoint, p, t0, t1, z, n_running * rvec)
        return jnp.where(res == 0, z, jnp.nan) + jump, None  # a failed solve poisons the root

    z0 = (y, jnp.eye(y.shape[0], dtype=y.dtype)) if jac else y
    z, _ = jax.lax.scan(segment, z0, (times[:-1], times[1:], running, jumps))
    return z


def _period_map_jac(cfg: _Config, adjoint, p, y, *rest):
    """``(Phi(y), dPhi/dy)``. Explicit solvers integrate the variational equations; implicit ones
    would need second derivatives of ``rhs`` for those, so they push tangents through the solver."""
    if not isinstance(cfg.solver, diffrax.AbstractImplicitSolver):
        return _period_map(cfg, adjoint, p, y, *rest, jac=True)
    phi, tangent = jax.linearize(lambda x: _period_map(cfg, diffrax.ForwardMode(), p, x, *rest), y)
    return phi, jax.vmap(tangent, out_axes=1)(jnp.eye(y.shape[0], dtype=y.dtype))
