"""NONMEM's objective function (FO, FOCE, FOCEI, Laplace) with EBEs by batched Newton.

For subject i with random effects eta (unconstrained) and the joint log density
``l_i(eta) = log p(y_i | eta, theta) + log p(eta | theta)`` (the shared density), the Laplace
approximation of the marginal likelihood gives, at the conditional mode ``eta_i*``,

    -2 log p(y_i | theta) ~= -2 l_i(eta_i*) - d log(2 pi) + log|A_i|,

and NONMEM's OFV drops the ``n_i log(2 pi)`` of the observations. The methods differ in ``A_i``
(Beal & Sheiner, NONMEM Users Guide Part VII; Wang Y, J Pharmacokinet Pharmacodyn 2007;34:575-593):

- ``laplace``: the exact ``-d^2 l_i / d eta^2`` (any likelihood: censored M3 data, counts, ...).
- ``focei``: Gaussian residuals ``y_ij ~ N(f_ij, V_ij)``; the expected information
  ``A_i = -d^2 log p(eta)/d eta^2 + sum_j [g_j g_j' / V_ij + 1/2 (dV_ij)(dV_ij)' / V_ij^2]`` with
  ``g = df/d eta`` (the second term is the eta-epsilon interaction, required to match NONMEM).
- ``foce``: no interaction: ``V`` is evaluated at ``eta = 0`` everywhere (in the EBE search too).
- ``fo``: linearisation at ``eta = 0``: ``y_i ~ N(f_i(0), G Omega G' + V_i(0))``, no EBEs.

For a Gaussian ``p(eta) = N(0, Omega)`` these are exactly NONMEM's formulas
``sum_j [log V + (y - f)^2 / V] + eta' Omega^-1 eta + log|Omega| + log|A_i|``.

The EBE search is Fisher scoring / Newton over all subjects at once (the Hessian in eta is block
diagonal by subject, built from ``d`` forward-mode directional derivatives), with a per-subject
backtracking line search. Gradients of the OFV with respect to theta go through the EBEs by the
implicit function theorem (`jax.lax.custom_root`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import Array

from ..._errors import ModelError
from ...dynamics._sensitivity import no_dynamics, sensitivities
from ...dynamics.ode import forward_mode
from ...model import Density
from ...model._observe import Censored

__all__ = ["METHODS", "EBEState", "Local", "Objective"]

METHODS = ("fo", "foce", "focei", "laplace")
LOG_2PI = math.log(2 * math.pi)  # not jnp: no JAX backend at import (jax.distributed comes first)


class EBEState(NamedTuple):
    """Result of the batched EBE search: modes, per-subject convergence, iterations used."""

    eta: Array  # [subj, n_eta]
    converged: Array  # [subj] bool
    grad_norm: Array  # [subj] max |d l_i / d eta| at the returned eta
    iterations: Array  # scalar int


@dataclass(frozen=True)
class Objective:
    """Per-subject OFV contributions of one model and method; pure functions of (theta, eta, pop).

    Parameters
    ----------
    density
        The shared density of the model.
    method
        One of :data:`METHODS`.
    max_iter, gtol, max_halvings
        EBE Newton settings: iteration cap, convergence tolerance on ``max |d l_i / d eta|`` and
        line-search halvings per iteration.
    """

    density: Density
    method: str = "focei"
    max_iter: int = 100
    gtol: float = 1e-8
    max_halvings: int = 30

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")

    @property
    def n_eta(self) -> int:
        return self.density.sites.n_eta

    # ----------------------------------------------------------------- model pieces
    def _trace_parts(self, theta: Array, eta: Array, pop, context=None) -> dict:
        """One model run: log-likelihood and prior per subject, and the Gaussian observation parts.

        ``context`` (a context manager) is entered while the model runs; by default `forward_mode`:
        every derivative of the forward engine is forward mode (ODE models included).
        """
        with forward_mode() if context is None else context:
            tr = self.density.trace(theta, eta, pop)
        loglik, prior = self.density.terms_of_trace(tr, eta, pop)
        out = {"loglik": loglik, "prior": prior}
        if self.method != "laplace":
            out.update(_gaussian_parts(tr, self.density.sites, self.method))
        return out

    def joint(self, theta: Array, eta: Array, pop, var0: Array | None = None) -> Array:
        """The function whose mode is the EBE, ``[subj]`` (FOCE: the variances frozen at ``var0``)."""
        parts = self._trace_parts(theta, eta, pop)
        if self.method == "foce":
            return _gaussian_loglik(parts["y"], parts["f"], var0, parts["mask"]) + parts["prior"]
        return parts["loglik"] + parts["prior"]

    def frozen_variance(self, theta: Array, pop) -> Array | None:
        """FOCE's residual variances at eta = 0 (``None`` for the other methods)."""
        if self.method != "foce":
            return None
        zero = jnp.zeros((pop.n_subjects, self.n_eta))
        return self._trace_parts(theta, zero, pop)["var"]

    # ----------------------------------------------------------------- EBEs
    def ebe(self, theta: Array, eta0: Array, pop) -> EBEState:
        """Conditional modes of every subject's random effects (no gradient; see `ebe_implicit`)."""
        var0 = self.frozen_variance(theta, pop)

        def objective(e):
            return self.joint(theta, e, pop, var0)

        def matrix(e):
            return self.newton_matrix(theta, e, pop, var0)

        return _newton(objective, matrix, eta0, self.max_iter, self.gtol, self.max_halvings)

    def ebe_implicit(self, theta: Array, eta0: Array, pop) -> tuple[Array, EBEState]:
        """The EBEs as a differentiable function of theta (implicit function theorem).

        The Newton search runs without gradients; `jax.lax.custom_root` then attaches
        ``d eta*/d theta = -(d^2 l / d eta^2)^-1 d^2 l / d eta d theta`` to its result.
        """
        state = self.ebe(jax.lax.stop_gradient(theta), eta0, pop)
        var0 = self.frozen_variance(theta, pop)

        def optimality(eta):
            return _columns(lambda e: self.joint(theta, e, pop, var0), eta)

        def tangent_solve(linear, rhs):
            hess = _block_columns(linear, rhs.shape)  # [subj, d, d] = d optimality / d eta
            return jnp.linalg.solve(hess, rhs[..., None])[..., 0]

        eta = jax.lax.custom_root(optimality, state.eta, lambda _, guess: guess, tangent_solve)
        return eta, state

    def newton_matrix(self, theta: Array, eta: Array, pop, var0: Array | None = None) -> Array:
        """A positive-definite ``[subj, d, d]`` curvature for the EBE search."""
        if self.method == "laplace":
            return _positive_definite(self.curvature(theta, eta, pop))
        return self.curvature(theta, eta, pop, var0)

    def curvature(self, theta: Array, eta: Array, pop, var0: Array | None = None) -> Array:
        """``A_i`` of the method (see module docstring), ``[subj, d, d]``."""
        if self.method == "laplace":
            grad = lambda e: _columns(lambda x: self.joint(theta, x, pop), e)  # noqa: E731
            return -_columns(grad, eta)
        a = self._prior_curvature(theta, eta, pop)

        def obs(e):
            parts = self._trace_parts(theta, e, pop)
            return parts["f"], parts["var"]

        (_, var), (g, dvar) = _value_and_columns(obs, eta)
        mask = self._trace_parts(theta, eta, pop)["mask"]
        if self.method == "foce":
            var, dvar = var0, jnp.zeros_like(dvar)
        w = jnp.where(mask, 1.0 / var, 0.0)
        a = a + jnp.einsum("so,sok,sol->skl", w, g, g)
        a = a + 0.5 * jnp.einsum("so,sok,sol->skl", w**2, dvar, dvar)
        return a

    # ----------------------------------------------------------------- OFV
    def subject_ofv(self, theta: Array, eta: Array, pop) -> Array:
        """OFV contribution of each subject at the given (converged) EBEs, ``[subj]``."""
        if self.method == "fo":
            return self._fo_ofv(theta, pop)
        var0 = self.frozen_variance(theta, pop)
        parts = self._trace_parts(theta, eta, pop)
        n_obs = _n_observations(parts, pop)
        if self.method == "foce":
            loglik = _gaussian_loglik(parts["y"], parts["f"], var0, parts["mask"])
        else:
            loglik = parts["loglik"]
        a = self.curvature(theta, eta, pop, var0)
        _, logdet = jnp.linalg.slogdet(a)
        return -2.0 * (loglik + parts["prior"]) - (n_obs + self.n_eta) * LOG_2PI + logdet

    def _prior_curvature(self, theta: Array, eta: Array, pop) -> Array:
        """``-d^2 log p(eta | theta) / d eta^2`` per subject, ``[subj, d, d]``."""
        grad_prior = lambda e: _columns(lambda x: self._trace_parts(theta, x, pop)["prior"], e)  # noqa: E731
        return -_columns(grad_prior, eta)

    def prior_precision(self, theta: Array, pop) -> Array:
        """The prior curvature at eta = 0, ``[subj, d, d]`` (Omega^-1 for Gaussian random effects)."""
        return self._prior_curvature(theta, jnp.zeros((pop.n_subjects, self.n_eta)), pop)

    def _fo_ofv(self, theta: Array, pop) -> Array:
        """First-order: marginal Gaussian of the model linearised at eta = 0 (Woodbury form)."""
        zero = jnp.zeros((pop.n_subjects, self.n_eta))
        precision = self.prior_precision(theta, pop)  # Omega^-1

        def obs(e):
            return self._trace_parts(theta, e, pop)["f"]

        f, g = _value_and_columns(obs, zero)
        parts = self._trace_parts(theta, zero, pop)
        return _fo_from(precision, f, g, parts["var"], parts["y"], parts["mask"])

    # ----------------------------------------------------------------- sensitivity engine
    # The reverse engine (see `_reverse`): the model runs once per evaluation under a jvp over eta
    # whose ODE solves carry forward sensitivities (`nlmegen.dynamics._sensitivity`); everything the
    # OFV needs (f, g = df/deta, V, dV/deta, log densities and their eta-gradients) comes out of that
    # run, and it can be differentiated in reverse mode with respect to theta.
    def local(self, theta: Array, eta: Array, pop, var0: Array | None = None, adjoint=None) -> Local:
        """Joint log density, its eta-gradient and the method's curvature ``A_i`` from one model run.

        FOCE freezes the residual variances at ``var0`` (without it, at ``eta``: how ``var0`` is found).
        """
        if self.method == "laplace":
            raise ModelError("the sensitivity engine covers FO, FOCE and FOCEI; Laplace uses the forward engine")

        def fn(e):
            parts = self._trace_parts(theta, e, pop, context=sensitivities(e, adjoint))
            return ({"loglik": parts["loglik"], "prior": parts["prior"], "f": parts["f"], "var": parts["var"]},
                    {"y": parts["y"], "mask": parts["mask"]})

        (vals, cols), aux = _value_and_columns_aux(fn, eta)
        mask, y = aux["mask"], aux["y"]
        g, dvar = cols["f"], cols["var"]
        frozen = self.method == "foce" and var0 is not None
        var, dvar = (var0, jnp.zeros_like(dvar)) if frozen else (vals["var"], dvar)
        w = jnp.where(mask, 1.0 / jnp.where(mask, var, 1.0), 0.0)
        if frozen:  # FOCE: log-likelihood and its gradient with the variances at var0
            loglik = _gaussian_loglik(y, vals["f"], var0, mask)
            grad = jnp.einsum("so,so,sok->sk", w, jnp.where(mask, y - vals["f"], 0.0), g) + cols["prior"]
        else:
            loglik = vals["loglik"]
            grad = cols["loglik"] + cols["prior"]
        a = self.prior_curvature_static(theta, eta, pop)
        a = a + jnp.einsum("so,sok,sol->skl", w, g, g) + 0.5 * jnp.einsum("so,sok,sol->skl", w**2, dvar, dvar)
        return Local(loglik + vals["prior"], grad, a, loglik, vals["prior"], vals["f"], var, y, mask, g)

    def prior_curvature_static(self, theta: Array, eta: Array, pop) -> Array:
        """``-d^2 log p(eta | theta) / d eta^2`` from a model run whose ODE solves are skipped."""

        def prior(e):
            return self._trace_parts(theta, e, pop, context=no_dynamics())["prior"]

        return -_columns(lambda e: _columns(prior, e), eta)

    def local_ofv(self, loc: Local, pop) -> Array:
        """Per-subject OFV from `local`'s pieces (module docstring's formula), ``[subj]``."""
        n_obs = jnp.sum(loc.mask, axis=1)
        _, logdet = jnp.linalg.slogdet(loc.curvature)
        return -2.0 * loc.value - (n_obs + self.n_eta) * LOG_2PI + logdet

    def local_fo_ofv(self, theta: Array, pop, adjoint=None) -> Array:
        """FO's OFV from one sensitivity run at eta = 0 (see `_fo_ofv`)."""
        zero = jnp.zeros((pop.n_subjects, self.n_eta))
        loc = self.local(theta, zero, pop, None, adjoint)
        precision = self.prior_curvature_static(theta, zero, pop)
        return _fo_from(precision, loc.f, loc.g, loc.var, loc.y, loc.mask)

    def ebe_local(self, theta: Array, eta0: Array, pop, var0: Array | None = None,
                  final_exact: bool = False) -> tuple[EBEState, Array, Array]:
        """The EBE search of `ebe`, with gradient and curvature from one sensitivity run per iteration.

        Returns ``(state, matrix, d OFV_i / d eta)``; with ``final_exact``, the matrix is the exact
        ``H_i = -d^2 l_i / d eta^2`` at the returned EBEs and the last entry the derivative of each
        subject's OFV (`exact_pieces`), from one more pass after the search (what the reverse engine's
        multipliers need).
        """
        fwd = diffrax.ForwardMode()

        def objective(e):  # line-search values: plain solves, no derivatives
            parts = self._trace_parts(theta, e, pop, context=contextlib.nullcontext())
            if self.method == "foce":
                return _gaussian_loglik(parts["y"], parts["f"], var0, parts["mask"]) + parts["prior"]
            return parts["loglik"] + parts["prior"]

        def scoring(e):  # Fisher scoring: the method's curvature A_i
            loc = self.local(theta, e, pop, var0, fwd)
            return loc.grad, loc.curvature, jnp.zeros_like(loc.grad)

        def exact(e):  # Newton: the exact Hessian, second derivatives in eta
            return self.exact_pieces(theta, e, pop, var0)

        return _newton_local(objective, scoring, exact, eta0, self.max_iter, self.gtol, self.max_halvings,
                             final_exact)

    def exact_pieces(self, theta: Array, eta: Array, pop, var0: Array | None = None) -> tuple[Array, Array, Array]:
        """``d l_i / d eta``, ``H_i = -d^2 l_i / d eta^2`` of the EBE objective and ``d OFV_i / d eta``
        (the OFV of `local_ofv`, whose ``log|A_i|`` depends on eta through ``g = df/d eta``), from one
        forward-over-forward pass (the augmented solves in `diffrax.ForwardMode`)."""
        fwd = diffrax.ForwardMode()

        def pieces(e):
            loc = self.local(theta, e, pop, var0, fwd)
            return loc.grad, self.local_ofv(loc, pop)

        (grad, _), (dgrad, dofv) = _value_and_columns(pieces, eta)
        return grad, -0.5 * (dgrad + jnp.swapaxes(dgrad, -1, -2)), dofv

    def n_observations(self, pop) -> int:
        """Observation records that count for the OFV's dropped ``N log(2 pi)`` constant."""
        return int((pop.mask & (pop.cens == 0)).sum())


# --------------------------------------------------------------------- helpers
def _unwrap(fn: dist.Distribution) -> tuple[dist.Distribution, Array | None]:
    """Peel Independent / Masked / Censored wrappers; return the base and the mask."""
    mask = None
    while True:
        if isinstance(fn, dist.Independent):
            fn = fn.base_dist
        elif isinstance(fn, dist.MaskedDistribution):
            mask = fn._mask if mask is None else mask & fn._mask
            fn = fn.base_dist
        elif isinstance(fn, Censored):
            fn = fn.base
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, mask


def _gaussian_parts(tr: dict, sites, method: str) -> dict:
    """y, f, V and mask of every observed site, concatenated along the observation axis."""
    ys, fs, vs, ms = [], [], [], []
    for site in sites.observed:
        msg = tr[site.name]
        base, mask = _unwrap(msg["fn"])
        if not isinstance(base, dist.Normal):
            raise ModelError(f"method {method!r} needs Gaussian residuals, but observed site {site.name!r} has a "
                             f"{type(base).__name__} distribution; use method='laplace'")
        shape = msg["value"].shape
        fs.append(jnp.broadcast_to(base.loc, shape))
        vs.append(jnp.broadcast_to(base.scale, shape) ** 2)
        ys.append(msg["value"])
        ms.append(jnp.ones(shape, bool) if mask is None else jnp.broadcast_to(mask, shape))
    return {"y": jnp.concatenate(ys, 1), "f": jnp.concatenate(fs, 1), "var": jnp.concatenate(vs, 1),
            "mask": jnp.concatenate(ms, 1)}


class Local(NamedTuple):
    """One sensitivity run of the model at ``eta`` (see `Objective.local`), per subject."""

    value: Array  # [subj] the function whose mode is the EBE (FOCE: variances frozen)
    grad: Array  # [subj, d] its eta-gradient
    curvature: Array  # [subj, d, d] A_i of the method
    loglik: Array  # [subj]
    prior: Array  # [subj]
    f: Array  # [subj, obs] predictions of the Gaussian observed sites, concatenated
    var: Array  # [subj, obs] residual variances (FOCE: frozen)
    y: Array
    mask: Array
    g: Array  # [subj, obs, d] df / d eta


def _fo_from(precision: Array, f: Array, g: Array, var: Array, y: Array, mask: Array) -> Array:
    """FO's OFV per subject: the marginal Gaussian of the linearised model, Woodbury form."""
    w = jnp.where(mask, 1.0 / jnp.where(mask, var, 1.0), 0.0)
    r = jnp.where(mask, y - f, 0.0)
    m = precision + jnp.einsum("so,sok,sol->skl", w, g, g)
    b = jnp.einsum("so,sok,so->sk", w, g, r)
    logdet_v = jnp.sum(jnp.where(mask, jnp.log(jnp.where(mask, var, 1.0)), 0.0), axis=1)
    logdet_c = logdet_v - jnp.linalg.slogdet(precision)[1] + jnp.linalg.slogdet(m)[1]
    quad = jnp.sum(w * r**2, axis=1) - jnp.einsum("sk,sk->s", b, jnp.linalg.solve(m, b[..., None])[..., 0])
    return logdet_c + quad


def _gaussian_loglik(y: Array, f: Array, var: Array, mask: Array) -> Array:
    safe_var = jnp.where(mask, var, 1.0)
    terms = -0.5 * (jnp.log(2 * jnp.pi * safe_var) + (y - f) ** 2 / safe_var)
    return jnp.sum(jnp.where(mask, terms, 0.0), axis=1)


def _n_observations(parts: dict, pop) -> Array:
    if "mask" in parts:
        return jnp.sum(parts["mask"], axis=1)
    return jnp.sum(pop.mask & (pop.cens == 0), axis=1)


def _basis(shape: tuple, d: int) -> Array:
    return jnp.broadcast_to(jnp.eye(d)[:, None, :], (d, *shape))


def _value_and_columns(fn, eta: Array) -> tuple[Any, Any]:
    """``fn(eta)`` and its derivative columns along each eta component, stacked on a new last axis.

    One forward-mode pass per component, with the tangent set for every subject at once: because
    subjects are independent this gives each subject's own Jacobian (gradient for ``[subj]``
    outputs, Hessian blocks for ``[subj, d]`` ones). The primal does not depend on the tangent, so
    vmap computes it once.
    """
    value, cols = jax.vmap(lambda t: jax.jvp(fn, (eta,), (t,)), out_axes=(None, 0))(
        _basis(eta.shape, eta.shape[-1]))
    return value, jax.tree_util.tree_map(lambda c: jnp.moveaxis(c, 0, -1), cols)


def _value_and_columns_aux(fn, eta: Array) -> tuple[Any, Any]:
    """`_value_and_columns` for ``fn(eta) -> (out, aux)``: ``((value, columns), aux)``."""
    value, cols, aux = jax.vmap(lambda t: jax.jvp(fn, (eta,), (t,), has_aux=True), out_axes=(None, 0, None))(
        _basis(eta.shape, eta.shape[-1]))
    return (value, jax.tree_util.tree_map(lambda c: jnp.moveaxis(c, 0, -1), cols)), aux


def _columns(fn, eta: Array) -> Any:
    """Per-subject Jacobian columns of ``fn`` (see `_value_and_columns`): ``[subj, d]`` or ``[subj, d, d]``."""
    return _value_and_columns(fn, eta)[1]


def _block_columns(linear, shape: tuple) -> Array:
    """Materialise a block-diagonal linear map given as a function, ``[subj, d, d]``."""
    d = shape[-1]
    cols = jax.vmap(linear)(_basis(shape, d))
    return jnp.moveaxis(cols, 0, -1)


def _positive_definite(a: Array, floor: float = 1e-8) -> Array:
    vals, vecs = jnp.linalg.eigh(0.5 * (a + jnp.swapaxes(a, -1, -2)))
    scale = jnp.maximum(jnp.max(jnp.abs(vals), axis=-1, keepdims=True), 1.0)
    vals = jnp.maximum(vals, floor * scale)
    return jnp.einsum("...ik,...k,...jk->...ij", vecs, vals, vecs)


#: A subject's Newton search stops after the step whose predicted gain, the Newton decrement
#: ``g' M^-1 g``, is below this: the log density cannot rise by more than ~1e-12 (OFV
#: precision far below 1e-6). Needed because FOCE(I)'s Fisher-scoring matrix converges only
#: linearly when residuals are large, and a max-|gradient| test alone then runs to ``max_iter``.
DECREMENT_TOL = 1e-12
#: Below this decrement a subject is also done once an iteration fails to halve it: the objective
#: is then at its noise floor (an ODE solved to rtol 1e-6 is not smoother than that).
NOISE_DECREMENT = 1e-8


def _gnorm(g: Array) -> Array:
    """Each subject's largest absolute gradient entry (0 without random effects)."""
    return jnp.max(jnp.abs(g), axis=-1) if g.shape[-1] else jnp.zeros(g.shape[:1])


def _finished(done: Array, active: Array, decrement: Array, last: Array, noise: float) -> Array:
    """Subjects whose search ends after this iteration's step.

    Done after a step whose Newton decrement ``g' M^-1 g`` is below `DECREMENT_TOL` (Boyd &
    Vandenberghe, Convex Optimization, 9.5.1: the step squares the error where Newton converges
    quadratically), or below ``noise`` without halving since the last step (the objective's noise
    floor). Only subjects that took a step this iteration (``active``) can finish: an inactive
    subject's zeroed step has decrement 0, and a stalled subject must not be reported converged.
    """
    floor = (decrement <= noise) & (decrement > 0.5 * last)
    return done | (active & ((decrement <= DECREMENT_TOL) | floor))


def _ebe_state(eta: Array, value: Array, g: Array, it: Array, done: Array, gtol: float) -> EBEState:
    """The search's result: converged where the gradient is small or the decrement test ended it."""
    finite = jnp.isfinite(value)
    converged = ((_gnorm(g) <= gtol) | done) & finite
    # a subject stuck where no step improves is at its mode up to rounding: accept a small gradient
    converged = converged | ((_gnorm(g) <= jnp.sqrt(gtol)) & finite)
    return EBEState(eta, converged, _gnorm(g), it)


def _newton(objective, matrix, eta0: Array, max_iter: int, gtol: float, max_halvings: int) -> EBEState:
    """Maximise ``objective: [subj, d] -> [subj]`` for all subjects at once (damped Newton).

    A subject is done when ``max |gradient| <= gtol``, when its Newton decrement is below
    `DECREMENT_TOL` (Boyd & Vandenberghe, Convex Optimization, 9.5.1), or below
    `NOISE_DECREMENT` without halving in an iteration; stalled when no step along the Newton
    direction improves the objective.
    """
    grad_fn = lambda e: _columns(objective, e)  # noqa: E731

    def cond(carry):
        eta, value, g, it, stalled, done, _ = carry
        return (it < max_iter) & jnp.any((_gnorm(g) > gtol) & ~stalled & ~done)

    def body(carry):
        eta, value, g, it, stalled, done, last = carry
        step = jnp.linalg.solve(matrix(eta), g[..., None])[..., 0]
        active = (_gnorm(g) > gtol) & ~stalled & ~done
        step = jnp.where(active[:, None], step, 0.0)
        new_eta, new_value, accepted = _line_search(objective, eta, value, step, max_halvings)
        new_g = grad_fn(new_eta)
        stalled = stalled | (active & ~accepted)
        # done after taking this last step (it squares the error where Newton converges quadratically);
        # also when a small decrement stops shrinking: the objective's noise floor (ODE tolerances)
        decrement = jnp.sum(g * step, axis=-1)
        done = _finished(done, active, decrement, last, NOISE_DECREMENT)
        return new_eta, new_value, new_g, it + 1, stalled, done, jnp.where(active, decrement, last)

    value0 = objective(eta0)
    n = eta0.shape[0]
    init = (eta0, value0, grad_fn(eta0), jnp.zeros((), int), ~jnp.isfinite(value0), jnp.zeros(n, bool),
            jnp.full(n, jnp.inf))
    eta, value, g, it, _, done, _ = jax.lax.while_loop(cond, body, init)
    return _ebe_state(eta, value, g, it, done, gtol)


#: The sensitivity engine's noise floor: a subject whose Newton decrement (the largest further gain
#: of its log density, about the OFV it can still lose) is below this and stopped halving is at its
#: mode as far as the ODE's tolerances resolve it. Measured on the IDR model with an MLP at rtol 1e-6:
#: the line search then fights solver noise (decrement ~3e-7 for 90 iterations, gradient ~5e-3).
ODE_NOISE_DECREMENT = 1e-6
#: Largest change of one (unconstrained) random effect in one EBE iteration of the sensitivity
#: engine: a factor e^2 on a log-normal parameter.
MAX_EBE_STEP = 2.0
#: Fisher-scoring iterations of the sensitivity engine's EBE search before it may switch to Newton's
#: method with the exact Hessian (for subjects still searching): it does when scoring converges
#: slowly (some subject's decrement fell by less than `SLOW_RATE` in the last iteration), and after
#: `NEWTON_AFTER` iterations in any case. The exact Hessian (forward over forward) costs 7-10 scoring
#: iterations on the IDR model, so Newton only pays where scoring's linear rate is poor: from EBEs
#: of a nearby theta (a fit's trial points) scoring alone took 0.3-0.4 s where switching at
#: iteration 6 took 1.0-1.3 s, for the same 7 iterations.
SCORING_ITERATIONS = 6
SLOW_RATE = 0.5
NEWTON_AFTER = 24
#: A subject whose Newton decrement ``g' M^-1 g`` (twice the predicted gain of its log density) is
#: below this is at its mode: no step is taken. Measured on the IDR model at converged EBEs:
#: decrements 1e-28 to 4e-9 while ``max |g|`` is up to 9e-4, so a gradient test alone kept every
#: subject stepping, and steps at the solver's noise floor failed their line search after all of
#: its halvings (0.6 s of a 0.9 s evaluation). Not looser: the theta-gradient's accuracy follows
#: ``|g|`` (at 1e-9 it fell to relative 1e-5 against finite differences).
AT_MODE_DECREMENT = DECREMENT_TOL
#: Line-search halvings for a subject whose decrement is below `ODE_NOISE_DECREMENT`: a step of
#: 1/16 of the Newton step gains < 1e-7 in log density, nothing the solver's tolerances resolve.
NOISE_HALVINGS = 4


class _Search(NamedTuple):
    """The carry of `_newton_local`'s loop."""

    eta: Array
    value: Array
    g: Array  # gradient at eta (computed at the start of the last iteration)
    m: Array  # the matrix computed with it
    extra: Array
    it: Array
    stalled: Array
    done: Array
    last: Array  # each subject's last decrement
    slow: Array  # some subject's decrement fell by less than SLOW_RATE in the last iteration
    final: Array  # the next iteration only evaluates (the exact pieces at the EBEs)
    finished: Array


def _newton_local(objective, scoring, exact, eta0: Array, max_iter: int, gtol: float, max_halvings: int,
                  final_exact: bool = False) -> tuple[EBEState, Array, Array]:
    """`_newton` with the gradient and the Newton matrix from one call per iteration.

    ``scoring(eta) -> (g, A, extra)``: the gradient, Fisher scoring's matrix (FOCE(I)'s ``A_i``) and
    zeros shaped as ``exact``'s extra (``[subj, d]``); ``exact(eta) -> (g, H, extra)``: the gradient, the exact
    ``-d^2 l / d eta^2`` (symmetric; made positive definite for the step) and what else the caller wants
    from that pass. The same iteration and stopping rules as `_newton`; the sensitivity engine computes
    everything from one model run. Fisher scoring is cheap and robust far from the mode but converges
    only linearly where the model fits badly (large residuals: a network at its initial weights);
    after `SCORING_ITERATIONS` the search goes on with ``exact`` (quadratic convergence) if some subject
    above the solver's noise floor still converges slowly.

    Each iteration evaluates at its start, so each function appears once in the compiled program
    (`exact` is the largest: forward over forward through the ODE solves). With ``final_exact`` one
    more iteration evaluates ``exact`` at the returned EBEs, without a step. Returns
    ``(state, matrix, extra)`` of the last evaluation, at the returned EBEs.
    """

    def pieces(e, it, slow, final):
        rule = (it >= NEWTON_AFTER) | ((it >= SCORING_ITERATIONS) & slow)
        use_exact = jnp.where(final, final_exact, rule)
        return jax.lax.cond(use_exact, lambda x: (*exact(x), True), lambda x: (*scoring(x), False), e)

    def body(c: _Search) -> _Search:
        g, m, extra, is_exact = pieces(c.eta, c.it, c.slow, c.final)
        stalled = c.stalled | ~jnp.all(jnp.isfinite(g), axis=-1)
        searching = (_gnorm(g) > gtol) & ~stalled & ~c.done & ~c.final & (c.it < max_iter)
        matrix = jax.lax.cond(is_exact, _positive_definite, lambda a: a, m)
        step = jnp.linalg.solve(matrix, g[..., None])[..., 0]
        decrement = jnp.sum(g * step, axis=-1)
        at_mode = decrement <= AT_MODE_DECREMENT  # nothing left to gain: done without a step
        done = c.done | (searching & at_mode)
        # a trust region: no random effect moves by more than MAX_EBE_STEP in one iteration, so one
        # subject's wild trial point (an extreme rate constant: a stiff, slow solve) cannot stall the batch
        size = jnp.max(jnp.abs(step), axis=-1, keepdims=True)
        step = step * jnp.minimum(1.0, MAX_EBE_STEP / jnp.where(size > 0, size, 1.0))
        active = searching & ~at_mode & jnp.all(jnp.isfinite(step), axis=-1)
        step = jnp.where(active[:, None], step, 0.0)
        noise = decrement <= ODE_NOISE_DECREMENT
        halvings = jnp.where(noise, min(NOISE_HALVINGS, max_halvings), max_halvings)
        new_eta, new_value, accepted = _line_search(objective, c.eta, c.value, step, halvings)
        failed = active & ~accepted
        # slow: a subject above the solver's noise floor whose decrement fell by less than SLOW_RATE (at
        # the floor decrements stop falling whatever the matrix: that is no reason for the exact Hessian)
        slow = jnp.any(active & accepted & ~noise & (decrement > SLOW_RATE * c.last))
        # a failed line search at the noise floor is the mode as far as the solver resolves it
        done = _finished(done | (failed & noise), active & accepted, decrement, c.last, ODE_NOISE_DECREMENT)
        stalled = stalled | (failed & ~noise)
        stepped = jnp.any(active & accepted)
        it = c.it + stepped.astype(c.it.dtype)
        # over: no subject moved (all at their modes or stalled), or the iteration cap. One more
        # evaluation where the EBEs moved (their gradient) or the exact pieces are wanted and not at hand
        over = ~stepped | (it >= max_iter)
        need_final = over & (stepped | (final_exact & ~is_exact))
        return _Search(new_eta, new_value, g, m, extra, it, stalled, done, jnp.where(active, decrement, c.last),
                       slow, ~c.final & need_final, c.final | (over & ~need_final))

    value0 = objective(eta0)
    # g [subj, d], the matrix [subj, d, d], extra [subj, d] (their shapes by contract: tracing
    # ``scoring`` for them would trace the model's sensitivity solve once more)
    n, d = eta0.shape
    g0, m0, extra0 = jnp.zeros_like(eta0), jnp.zeros((n, d, d), eta0.dtype), jnp.zeros_like(eta0)
    false = jnp.zeros((), bool)
    init = _Search(eta0, value0, g0, m0, extra0, jnp.zeros((), int), ~jnp.isfinite(value0), jnp.zeros(n, bool),
                   jnp.full(n, jnp.inf), false, false, false)
    c = jax.lax.while_loop(lambda c: ~c.finished, body, init)
    return _ebe_state(c.eta, c.value, c.g, c.it, c.done, gtol), c.m, c.extra


def _line_search(objective, eta, value, step, max_halvings):
    """Per-subject backtracking: the first of 1, 1/2, 1/4, ... that does not decrease the objective.

    ``max_halvings``: trial points per subject (an int, or ``[subj]``).
    """
    limit = jnp.broadcast_to(max_halvings, eta.shape[:1])

    def cond(carry):
        alpha, _, _, done, k = carry
        return jnp.any(~done & (k < limit))

    def body(carry):
        alpha, best_eta, best_value, done, k = carry
        trial = eta + alpha[:, None] * step
        trial_value = objective(trial)
        ok = jnp.isfinite(trial_value) & (trial_value >= value - 1e-12 * jnp.abs(value)) & (k < limit)
        take = ok & ~done
        best_eta = jnp.where(take[:, None], trial, best_eta)
        best_value = jnp.where(take, trial_value, best_value)
        done = done | ok
        alpha = jnp.where(done, alpha, 0.5 * alpha)
        return alpha, best_eta, best_value, done, k + 1

    n = eta.shape[0]
    no_step = jnp.all(step == 0.0, axis=-1)
    init = (jnp.ones(n), eta, value, no_step, jnp.zeros((), int))
    _, new_eta, new_value, done, _ = jax.lax.while_loop(cond, body, init)
    return new_eta, new_value, done & ~no_step
