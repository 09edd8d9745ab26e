"""Sensitivity-augmented ODE solves: the random-effect derivatives of the states in the primal solve.

The conditional estimation methods need, for every subject, the predictions ``f`` and their
derivatives ``g = df/d eta`` (and the gradient of the OFV with respect to every population
parameter, network weights included). Forward-mode differentiation through the solver gives ``g``
cheaply, but then the outer gradient must be forward mode too and its cost grows with the number of
population parameters; diffrax's reverse-mode adjoint cannot be differentiated forward (diffrax
issue 314).

Here `nlmegen.ode.solve` gets a `jax.custom_jvp` while :func:`sensitivities` is active. Its rule
integrates the forward sensitivity equations (Hairer, Norsett & Wanner, *Solving ODEs I*, I.14)

    dx/dt = F(t, x, u),      dS/dt = dF/dx S + dF/du,      S = dx/du,

for the per-subject inputs ``u`` of the solve whose tangents are not zero (the parameters, initial
states, lag, F, modelled rates and durations that depend on the random effects), as extra states of
ONE diffrax solve; ``dF/dx S + dF/du`` comes from `jax.linearize` of the right-hand side. The rule
returns ``x`` and ``S du``: a contraction, linear in ``du``. So:

- a `jax.jvp` over the random effects (the backends take one per eta direction under `jax.vmap`)
  runs the augmented solve once, whatever the number of directions;
- that solve uses diffrax's checkpointed adjoint (or `diffrax.ForwardMode`, see
  :func:`sensitivities`), so ONE reverse-mode pass through it gives the derivative of anything
  computed from ``x`` and ``S`` with respect to all population parameters: its cost does not grow
  with their number.

Dose events act on ``S`` as on ``x``: a jump in ``x`` (bolus amount ``F * AMT``, reset to ``y0``)
jumps ``S`` by the jump's own derivative, and an event whose time ``tau`` depends on ``u`` (lag,
infusion duration) adds ``(F(x-) - F(x+)) dtau/du`` (the vector field before minus after the event),
which is what each segment's ``S(t0) -= F(t0) dt0`` and ``S(t1) += F(t1) dt1`` add up to. The
sensitivity states are part of diffrax's error norm, so the step sizes control their error too (the
EBE search needs derivatives that are smooth in eta; STACK.md's "Newton stalls at |grad| 1e-4").

Not covered (the solve raises :class:`SensitivityUnsupported` while tracing, and the caller falls
back to forward mode): steady-state doses (SS=1/2), whose fixed point would need its own
sensitivity equations.
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array

from .._collect import ODE_SOLVES

__all__ = ["SensitivityUnsupported", "active", "no_dynamics", "sensitivities", "solve_with_sensitivities"]


class SensitivityUnsupported(NotImplementedError):
    """The model's dosing needs a feature the sensitivity-augmented solve does not have."""


class _Mode(NamedTuple):
    anchor: Array  # an array of the jvp's inputs: gives the solve a tangent even if its inputs have none
    adjoint: Any


_MODE: contextvars.ContextVar = contextvars.ContextVar("nlmegen_ode_sensitivities", default=None)
_NO_DYNAMICS: contextvars.ContextVar = contextvars.ContextVar("nlmegen_ode_no_dynamics", default=False)


def record(cfg) -> None:
    """Append a solve's configuration to the list being collected (`nlmegen._collect.ODE_SOLVES`), if any."""
    calls = ODE_SOLVES.get()
    if calls is not None:
        calls.append(cfg)


@contextlib.contextmanager
def sensitivities(anchor: Array, adjoint: Any = None):
    """Within this block `nlmegen.ode.solve` differentiates forward by sensitivity equations.

    Use it inside the function given to `jax.jvp`, with ``anchor`` that function's input (the
    random effects): every solve then carries a tangent, so the rule (not JAX's default) always
    differentiates it. ``adjoint`` is the adjoint of the augmented solve: diffrax's checkpointed
    one (default) when the results will be differentiated in reverse mode, `diffrax.ForwardMode`
    when they will be differentiated forward once more (second derivatives in eta).
    """
    token = _MODE.set(_Mode(anchor, adjoint or diffrax.RecursiveCheckpointAdjoint(checkpoints=64)))
    try:
        yield
    finally:
        _MODE.reset(token)


@contextlib.contextmanager
def no_dynamics():
    """Within this block `nlmegen.ode.solve` returns zeros without solving anything.

    For quantities that do not depend on the dynamics (the random-effect prior and its curvature):
    their derivatives then never touch the solver.
    """
    token = _NO_DYNAMICS.set(True)
    try:
        yield
    finally:
        _NO_DYNAMICS.reset(token)


def active() -> _Mode | None:
    """The sensitivity mode in force (None outside :func:`sensitivities`)."""
    return _MODE.get()


def dynamics_off() -> bool:
    return _NO_DYNAMICS.get()


# --------------------------------------------------------------------------------------------
def solve_with_sensitivities(cfg, pop, params, y0s, specs) -> tuple[Array, Array]:
    """States ``[subj, obs, n]`` and status ``[subj]`` through the custom-JVP solve."""
    from . import ode

    if cfg.n_ss:  # (with traced data: whenever the population's features include steady state)
        raise SensitivityUnsupported("steady-state doses (SS=1/2) are not covered by the sensitivity-augmented "
                                     "solve")
    mode = active()
    one = jax.tree.map(lambda x: x[0], params)
    rhs_c, consts = jax.closure_convert(lambda t, y, p: cfg.rhs(t, y, p), jnp.zeros(()), y0s[0], one)
    anchor = 0.0 * jnp.sum(mode.anchor)
    data = (ode._dose_arrays(pop), (pop.times, pop.mask, pop.obs_index),
            (pop.reset_times, pop.reset_mask, pop.reset_index))
    static = _Static(cfg._replace(rhs=rhs_c, adjoint=mode.adjoint))
    states, status = _solve(static, params, y0s, specs, tuple(consts), anchor, data)
    return states, status.astype(jnp.int32)


class _Static:
    """Hashable-by-identity holder of the solver configuration (a `custom_jvp` nondiff argument)."""

    def __init__(self, cfg):
        self.cfg = cfg


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _solve(static, params, y0s, specs, consts, anchor, data):
    from . import ode

    cfg = _bind(static.cfg, consts)
    n_states = y0s.shape[-1]
    doses = jax.vmap(partial(ode._dose_table, n_states=n_states))(data[0], specs)
    states, status = jax.vmap(partial(ode._subject, cfg))(params, y0s, data[1], doses, data[2], None)
    states = jnp.where((status != 0)[:, None, None], jnp.nan, states)
    return states, status.astype(y0s.dtype)


def _bind(cfg, consts):
    rhs_c = cfg.rhs
    return cfg._replace(rhs=lambda t, y, p: rhs_c(t, y, p, *consts))


@partial(_solve.defjvp, symbolic_zeros=True)
def _solve_jvp(static, primals, tangents):
    params, y0s, specs, consts, anchor, data = primals
    dparams, dy0s, dspecs, dconsts, _, _ = tangents
    if any(not isinstance(t, SymbolicZero) for t in jax.tree.leaves(dconsts, is_leaf=_is_zero)):
        raise NotImplementedError(
            "internal: the sensitivity-augmented ODE solve was differentiated with respect to values its "
            "right-hand side captures by closure (network weights?) in forward mode; only its inputs may "
            "carry tangents here (differentiate those values in reverse mode, outside the jvp)")
    inputs = (params, y0s, specs)
    leaves, tree = jax.tree.flatten(inputs)
    d_leaves = jax.tree.leaves((dparams, dy0s, dspecs), is_leaf=_is_zero)
    if len(d_leaves) != len(leaves):
        raise AssertionError("tangent structure does not match the inputs")
    chosen = [k for k, d in enumerate(d_leaves) if not isinstance(d, SymbolicZero)
              and jnp.issubdtype(leaves[k].dtype, jnp.inexact)]
    n_subj = y0s.shape[0]
    sizes = [int(np.prod(leaves[k].shape[1:])) for k in chosen]
    cfg = _bind(static.cfg, consts)
    if not chosen:
        states, status = _solve(static, params, y0s, specs, consts, anchor, data)
        return (states, status), (jnp.zeros_like(states), jnp.zeros_like(status))
    u = jnp.concatenate([leaves[k].reshape(n_subj, -1) for k in chosen], axis=1)  # [subj, P]
    du = jnp.concatenate([d_leaves[k].reshape(n_subj, -1) for k in chosen], axis=1)

    def rebuild(u_i, rest_i):
        out, start = list(rest_i), 0
        for k, m in zip(chosen, sizes, strict=True):
            out[k] = u_i[start:start + m].reshape(leaves[k].shape[1:])
            start += m
        return jax.tree.unflatten(tree, out)

    states, sens, status = jax.vmap(partial(_subject_sens, cfg, rebuild))(u, list(leaves), *data)
    failed = (status != 0)[:, None, None]
    states = jnp.where(failed, jnp.nan, states)
    sens = jnp.where(failed[..., None], jnp.nan, sens)
    tangent = jnp.einsum("sonp,sp->son", sens, du)
    return (states, status.astype(y0s.dtype)), (tangent, jnp.zeros_like(status, dtype=y0s.dtype))


def _is_zero(x) -> bool:
    return isinstance(x, SymbolicZero)


def _subject_sens(cfg, rebuild, u, rest, dose_arrays, obs, resets):
    """One subject: states at the observation times, their sensitivities ``[obs, n, P]``, status."""
    from . import _covariate_hook, ode

    def inputs(u_):
        params, y0, specs = rebuild(u_, rest)
        doses = ode._dose_table(dose_arrays, specs, n_states=y0.shape[0])
        return params, y0, doses

    def grid_parts(u_):  # the grid's differentiable parts, and (as aux) its discrete parts and values
        params, y0, doses = inputs(u_)
        extra = _covariate_hook.extra_times(cfg, params)
        time, rate, is_reset, ss1, ss2, _, bolus, pos_obs, t_init = ode._grid(cfg, y0, obs, doses, resets, None, extra)
        values = (time, rate, bolus, t_init, y0)
        return values, ((is_reset, ss1, ss2, pos_obs), values)

    # one trace of the grid: its Jacobian, with the values and discrete parts as jacfwd's aux
    jac, ((is_reset, ss1, ss2, pos_obs), (time, rate, bolus, t_init, y0)) = jax.jacfwd(grid_parts, has_aux=True)(u)
    dtime, drate, dbolus, dt_init, dy0 = jac  # [G, P], [G, n, P], [G, n, P], [P], [n, P]
    p_of = lambda u_: rebuild(u_, rest)[0]  # noqa: E731

    def field(t, y, u_, rate_i):
        return cfg.rhs(t, y, p_of(u_)) + rate_i

    def step(carry, x):
        y, sens, t0, dt0, status = carry
        t1, dt1, rate_i, drate_i, reset_i, ss1_i, ss2_i, bolus_i, dbolus_i = x
        go = status == 0
        t1, dt1 = jnp.where(go, t1, t0), jnp.where(go, dt1, dt0)
        s0, s1 = _covariate_hook.span(cfg, t0, t1)  # (the segment's own covariate values at its ends)
        sens = sens - field(s0, y, u, rate_i)[:, None] * dt0[None, :]
        (y, sens), res = _augmented_flow(cfg, field, u, t0, t1, y, sens, rate_i, drate_i)
        sens = sens + field(s1, y, u, rate_i)[:, None] * dt1[None, :]
        status = jnp.where(go, res, status)
        zero = jnp.zeros_like(y)
        y = ode._apply_events(y, y0, reset_i, ss1_i, ss2_i, zero, bolus_i)
        sens = ode._apply_events(sens, dy0, reset_i, ss1_i, ss2_i, jnp.zeros_like(sens), dbolus_i)
        return (y, sens, t1, dt1, status), (y, sens)

    init = (y0, dy0, t_init, dt_init, jnp.zeros((), jnp.int32))
    xs = (time, dtime, rate, drate, is_reset, ss1, ss2, bolus, dbolus)
    (_, _, _, _, status), (ys, ss) = jax.lax.scan(step, init, xs)
    states, sens = ys[pos_obs], ss[pos_obs]
    status = jnp.where((status == 0) & ~jnp.all(jnp.isfinite(states)), ode.NON_FINITE, status)
    return states, sens, status


def _augmented_flow(cfg, field, u, t0, t1, y, sens, rate, drate):
    """Integrate ``(x, S)`` from ``t0`` to ``t1`` (no steps when equal); state and result code."""
    from ._covariate_hook import span

    eye = jnp.eye(u.shape[0], dtype=u.dtype)
    t0, t1 = span(cfg, t0, t1)

    def vector_field(t, z, args):
        x, s = z
        u_, rate_, drate_ = args
        fx, lin = jax.linearize(lambda x_, v_: field(t, x_, v_, rate_), x, u_)
        ds = jax.vmap(lin, in_axes=(1, 0), out_axes=1)(s, eye) + drate_
        return fx, ds

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), cfg.solver, t0, t1, cfg.dt0, (y, sens), (u, rate, drate),
        stepsize_controller=cfg.controller, adjoint=cfg.adjoint, max_steps=cfg.max_steps, throw=False)
    x, s = jax.tree.map(lambda a: a[-1], sol.ys)
    return (x, s), sol.result._value.astype(jnp.int32)
