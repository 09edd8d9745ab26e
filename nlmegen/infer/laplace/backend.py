"""Laplace / FOCEI / FOCE / FO: NONMEM's estimation methods on any nlmegen model.

The outer problem is a quasi-Newton (BFGS) minimisation of the OFV over the free population
parameters in the unconstrained space of each site's support, with exact gradients (the EBEs are
differentiated by the implicit function theorem). The inner problem, the EBEs, is the batched
Newton search of `objective`, warm-started from the previous evaluation's modes. One compiled
function serves every evaluation: new parameter values, new initial values and new fixed values
never recompile.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..._errors import DataError, ModelError
from ...dynamics._sensitivity import SensitivityUnsupported
from ...model import Density, discover
from ..shared import checkpoint
from ..shared.checks import check_fit, ode_step_limit
from ..shared.covariance import covariance_step, unidentified
from ..shared.joint import AUTO_MANY_PARAMS, distribution_parameters, has_network_weights, joint_mode, joint_steps
from ..shared.progress import compiling, ticker
from ..shared.start import starting_point
from .bfgs import BFGSState, bfgs, bhhh_inverse
from .objective import LOG_2PI, Objective
from .reverse import reverse_value_and_grad
from .shard import shard_count, shard_subjects

__all__ = ["ENGINES", "FO", "FOCE", "FOCEI", "Laplace"]

ENGINES = ("auto", "forward", "reverse")
#: ``engine="auto"`` takes the reverse engine above this many free parameters, and for ODE models,
#: network weights, or no random effects. Closed-form models with fewer parameters keep the forward
#: engine (the optimiser paths of the published theo_sd and Wang2007 checks). On ODE models the
#: reverse engine is faster even with few parameters: the 60-subject IDR model (14 parameters) 0.47 s
#: per evaluation at warm EBEs against ~1.0 s, its FOCEI fit from the priors' medians 26 s against 89.5 s.
AUTO_REVERSE_PARAMS = AUTO_MANY_PARAMS


@dataclass(frozen=True)
class Laplace:
    """Laplace approximation of the marginal likelihood (exact Hessian; any likelihood).

    Parameters
    ----------
    maxiter
        Outer (BFGS) iterations.
    gtol, ftol
        Outer convergence (BFGS, see `bfgs`): largest ``|d OFV / d theta|`` (unconstrained scale)
        at most ``gtol``, or the predicted further decrease of the OFV at most ``ftol``.
    ebe_max_iter, ebe_gtol
        Inner Newton iterations and tolerance on ``max |d l_i / d eta|``.
    covariance
        ``"sandwich"`` (R^-1 S R^-1, NONMEM's default), ``"R"``, ``"S"`` or ``"none"``.
    map
        Add the log prior of the population parameters (maximum a posteriori) instead of maximum
        likelihood (priors ignored, only their supports used).
    progress, print_every
        Print the iteration log (OFV, gradient norm) every ``print_every`` iterations.
    engine
        How the OFV's gradient is computed. ``"forward"``: forward mode throughout (one tangent per
        free parameter; fastest for closed-form models with few parameters). ``"reverse"``: ODE
        solves carry their random-effect sensitivities and the gradient over all population
        parameters is one reverse-mode pass (`reverse`; FO/FOCE/FOCEI; its cost does not grow with
        the number of parameters, e.g. network weights). ``"auto"`` (default): reverse for models
        with ODE dynamics, network weights, more than 32 free parameters or no random effects;
        forward otherwise (and for Laplace, and for steady-state ODE dosing, which the sensitivity
        solve does not cover).
    adam_steps, learning_rate
        First-order steps (`optax.adam` at this rate) on the OFV before BFGS takes over and judges
        convergence: for network weights far from their optimum, where the quasi-Newton method's
        line searches make slow progress. 0 (default): BFGS alone. Weights with a prior
        (``nlmegen.nn(..., prior=...)``) and ``map=True`` give DeepPumas' ``MAP(FOCE())``: the
        marginal likelihood plus the weights' prior (an L2 penalty for a Normal prior).
    joint_steps
        L-BFGS steps on the joint mode of the population parameters and all random effects, with the
        random effects' distribution held at its start (Pumas' ``JointMAP``; see `shared.joint`), before the
        marginal fit: no EBE searches, one model run per step, so far cheaper far from the optimum.
        The fit then starts there, its EBE searches from the joint mode's random effects.
        ``"auto"`` (default): up to 500 steps for models with network weights or more than 32 free
        parameters (Bayesian network weights, given a prior), up to 100 for other models with ODE
        dynamics (an OFV evaluation costs an EBE search of ODE solves, a step one solve), none otherwise.
    devices
        Devices the subjects are split over in every evaluation (`shard`: ``shard_map`` with a
        ``psum`` of the OFV and its gradient; subjects in a cost-balanced layout). ``None``
        (default): all of them, those of every process after
        `nlmegen.parallel.distributed.initialize` included (one CPU device unless
        ``XLA_FLAGS=--xla_force_host_platform_device_count=N``; every GPU). With ``map=True``
        evaluations run on one device.

    References
    ----------
    Beal SL, Sheiner LB. NONMEM Users Guides, Part VII (conditional estimation methods).
    Wang Y. Derivation of various NONMEM estimation methods. J Pharmacokinet Pharmacodyn
    2007;34:575-593.
    """

    method: ClassVar[str] = "laplace"
    maxiter: int = 1000
    gtol: float = 1e-5
    ftol: float = 1e-6
    ebe_max_iter: int = 100
    ebe_gtol: float = 1e-8
    covariance: str = "sandwich"
    map: bool = False
    progress: bool = True
    print_every: int = 10
    engine: str = "auto"
    adam_steps: int = 0
    learning_rate: float = 0.01
    joint_steps: int | str = "auto"
    devices: int | None = None

    def objective_for(self, density: Density) -> Objective:
        return Objective(density, self.method, self.ebe_max_iter, self.ebe_gtol)

    def fit(self, model, pop, *, init: Mapping | None = None, fixed: Mapping | None = None, key=None):
        """Estimate the population parameters of ``model`` on ``pop``; returns a `FitResult`."""
        del key  # deterministic method; accepted for a uniform backend signature
        problem = _Problem.build(self, model, pop, init, fixed)
        return problem.run()


@dataclass(frozen=True)
class FOCEI(Laplace):
    """First-order conditional estimation with eta-epsilon interaction (Gaussian residuals)."""

    method: ClassVar[str] = "focei"


@dataclass(frozen=True)
class FOCE(Laplace):
    """First-order conditional estimation without interaction (variances at eta = 0)."""

    method: ClassVar[str] = "foce"


@dataclass(frozen=True)
class FO(Laplace):
    """First-order method: the model linearised at eta = 0 (no EBEs in the objective)."""

    method: ClassVar[str] = "fo"


# --------------------------------------------------------------------------------------------
def check_population(pop) -> None:
    """Fitting needs at least one observation per subject: name the subjects that have none."""
    pop.check_observed()
    counts = np.asarray(pop.mask).sum(axis=1)
    empty = [pop.ids[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"subject(s) {empty[:10]} have no observation records; fitting needs at least one per "
                        "subject (drop them with pop.subset(...))")


class _Problem:
    """One fit: the model's pieces, the free parameter vector and the compiled functions."""

    #: whether ``joint_steps="auto"`` gives ODE models a warm start (see `joint_steps`)
    ode_warm_start: bool = True

    def __init__(self, backend, model, pop, density, theta0, free, labels, fixed_names):
        self.backend, self.model, self.pop, self.density = backend, model, pop, density
        self.theta0, self.free, self.labels, self.fixed_names = theta0, free, labels, fixed_names
        self.objective = backend.objective_for(density)
        self.eta = jnp.zeros((pop.n_subjects, density.sites.n_eta))
        self.history: list[dict] = []
        self.warnings: list[str] = []
        self.free_labels = [lab for lab, f in zip(labels, free, strict=True) if f]
        self.nonfinite: tuple[list, list] | None = None
        self.joint: dict | None = None  # the joint-mode warm start's record (steps, seconds, value)
        self.interrupted = False
        self.last_x: np.ndarray | None = None

    @classmethod
    def build(cls, backend, model, pop, init, fixed):
        check_population(pop)
        sites = discover(model, pop)
        if sites.mixtures and cls is _Problem:  # NONMEM's $MIX: one Laplace approximation per class
            from .mixture import MixtureProblem

            return MixtureProblem.build(backend, model, pop, init, fixed)
        check_fit(sites, pop)
        flows = [s.name for s in sites.random_effects if not s.gaussian]
        if backend.method == "fo" and flows:
            raise ModelError(f"FO linearises the model at eta = 0 under a Gaussian N(0, Omega), but random effect(s) "
                             f"{flows} come from nlmegen.flow: use FOCEI, FOCE or Laplace (exact curvature of the "
                             "flow's log density), SAEM, NUTS or SVI")
        density, _, fixed_names, theta0, labels, free = starting_point(model, pop, sites, init, fixed)
        return cls(backend, model, pop, density, theta0, free, labels, fixed_names)

    # ------------------------------------------------------------------ compiled pieces
    def full(self, theta_free: np.ndarray) -> np.ndarray:
        theta = self.theta0.copy()
        theta[self.free] = theta_free
        return theta

    def resolve_engine(self) -> str:
        """The gradient engine for this fit (see `Laplace`'s ``engine``)."""
        engine, method = self.backend.engine, self.backend.method
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        if method == "laplace" and self.density.sites.n_eta:
            if engine == "reverse":
                raise ModelError("engine='reverse' covers FO, FOCE and FOCEI; Laplace's exact Hessian needs "
                                 "second-order sensitivities: use engine='forward' (or 'auto')")
            return "forward"
        if engine != "auto":
            return engine
        network = has_network_weights(self.density)
        many = int(self.free.sum()) > AUTO_REVERSE_PARAMS
        ode = bool(self.density.sites.ode_solves)
        if not (network or many or ode or not self.density.sites.n_eta):
            return "forward"
        # steady-state ODE dosing: forward (the sensitivity solve lacks it)
        return "forward" if any(self.density.sites.ode_solves) else "reverse"

    def compile(self) -> float:
        """Compile the evaluation function once (cached across fits); return the seconds spent."""
        with compiling(f"the {self.backend.method.upper()} objective and gradient", self.backend.progress):
            return self._compile()

    def _compile(self) -> float:
        start = time.perf_counter()
        self.engine = self.resolve_engine()

        # the MAP penalty is shared out by the subject count, which a device's block does not know
        n_devices = 1 if self.backend.map else shard_count(self.backend.devices, self.pop.n_subjects)

        def compiled(engine):
            key = (self.model, self.backend.method, self.backend.ebe_max_iter, self.backend.ebe_gtol,
                   self.backend.map, engine, tuple(self.free.tolist()), jax.tree_util.tree_structure(self.pop),
                   tuple(x.shape for x in jax.tree_util.tree_leaves(self.pop)), n_devices)
            return _compiled(key, engine, self.objective, self.backend.map, self.free, self.pop, self.eta,
                             jnp.asarray(self.theta0), n_devices)

        try:
            self.fns = compiled(self.engine)
        except SensitivityUnsupported as err:
            if self.backend.engine == "reverse":
                raise ModelError(f"engine='reverse' cannot fit this model: {err}; use engine='forward'") from err
            self.warnings.append(f"gradient by forward mode: {err}")
            self.engine = "forward"
            self.fns = compiled("forward")
        return time.perf_counter() - start

    def evaluate(self, theta_free: np.ndarray):
        args = (jnp.asarray(theta_free), jnp.asarray(self.theta0))
        ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac = self.fns["value_and_grad"](*args, self.eta, self.pop)
        failed = ~np.asarray(ebe.converged)
        if failed.any():  # fallback: the subjects that failed from the warm start restart from eta = 0
            restart = jnp.where(jnp.asarray(failed)[:, None], 0.0, self.eta)
            retry = self.fns["value_and_grad"](*args, restart, self.pop)
            if np.sum(~np.asarray(retry[3].converged)) < failed.sum() or not np.isfinite(float(ofv)):
                ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac = retry
        ofv, grad = float(ofv), np.asarray(grad)
        self.subject_gradients, self.eta_jacobian = grad_i, eta_jac
        self.last_x = np.array(theta_free, dtype=float)
        if np.isfinite(ofv) and np.all(np.isfinite(np.asarray(eta))):
            self.eta = eta  # warm start of the next EBE search
        else:  # remember who made the objective non-finite, for the status message
            self.nonfinite = ([self.pop.ids[i] for i in np.flatnonzero(~np.isfinite(np.asarray(ofv_i)))],
                              [lab for lab, g in zip(self.free_labels, grad, strict=True) if not np.isfinite(g)])
        return ofv, grad, ebe

    # ------------------------------------------------------------------ the fit
    def run(self):
        compile_s = self.compile()
        start = time.perf_counter()
        x0 = self.theta0[self.free]
        count = {"n": 0}
        accepted = {}  # eta, d eta/d theta and theta of the last accepted point

        def fun(x):
            # every trial starts its EBE search from the modes of the last accepted point, moved to
            # first order (d eta*/d theta, from the implicit function theorem): a rejected trial far
            # away may leave subjects at poor local modes that nearby points would inherit
            if accepted:
                self.eta = accepted["eta"] + jnp.einsum("sdp,p->sd", accepted["jac"], x - accepted["x"])
            ofv, grad, ebe = self.evaluate(x)
            count["n"] += 1
            return ofv, grad, (ebe, self.eta)

        def remember(x):  # the accepted point is the one evaluated last
            accepted.update(eta=self.eta, jac=self.eta_jacobian, x=np.array(x, dtype=float))

        def callback(it, xk, ofv, grad):
            remember(xk)
            record = {"iteration": it, "ofv": ofv, "grad_norm": float(np.max(np.abs(grad)))}
            record.update(dict(zip(self.free_labels, xk, strict=True)))
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(OFV=f"{record['ofv']:.4f}", grad=f"{record['grad_norm']:.2g}")
            if self.backend.progress and (it == 1 or it % self.backend.print_every == 0):
                bar.write(f"{self.backend.method} iter {it:4d}  OFV {record['ofv']:.6f}  "
                          f"max|grad| {record['grad_norm']:.3g}")

        def on_state(state):  # checkpoint (see `nlmegen.resume`); the last state is what Ctrl-C returns
            last["state"] = state
            checkpoint.save(self.backend.method, 1, 1, lambda: {
                "bfgs": vars(state), "accepted": dict(accepted), "history": self.history, "n_eval": count["n"],
                "warnings": self.warnings, "nonfinite": self.nonfinite})

        bar = tqdm(desc=f"{self.backend.method} fit", unit="it", disable=not self.backend.progress, leave=False)
        saved, last, first = checkpoint.restored(self.backend.method), {}, None
        if saved is not None:  # resume: the BFGS loop's state and the EBE warm start of the checkpoint
            accepted.update(saved["accepted"])
            self.history, count["n"] = list(saved["history"]), int(saved["n_eval"])
            self.warnings, self.nonfinite = list(saved["warnings"]), saved["nonfinite"]
            last["state"] = BFGSState(**saved["bfgs"])
        try:
            steps = joint_steps(self.backend.joint_steps, self.density, self.free,
                                ode=self.ode_warm_start and bool(self.density.sites.ode_solves))
            if saved is None and x0.size and steps:
                x0 = self.joint_start(x0, steps, bar)
            if saved is None and x0.size and self.backend.adam_steps:
                x0 = self.adam(fun, x0, callback)
            if saved is None:
                first = fun(x0)
                remember(x0)
            if x0.size:
                # BHHH needs more subjects than parameters (network weights): otherwise a scaled identity
                bhhh = x0.size < self.pop.n_subjects
                h0 = (None if first is None else bhhh_inverse(np.asarray(self.subject_gradients)) if bhhh
                      else identity_start(first[1]))
                res = bfgs(fun, x0, first, h0, gtol=self.backend.gtol, ftol=self.backend.ftol,
                           maxiter=self.backend.maxiter, callback=callback, rescale_first=not bhhh,
                           line_search="armijo" if bhhh else "wolfe", on_state=on_state, resume=last.get("state"))
                restart = self.boundary_restart(fun, res, self.theta0[self.free]) if res.success else None
                if restart is not None:  # a variance left at its spurious stationary point near 0: go on
                    # from the BHHH start as at first (60-subject IDR: 98 evaluations after the restart
                    # with a scaled identity and Wolfe steps)
                    x1, first1, note, grads1 = restart
                    h1 = bhhh_inverse(grads1) if bhhh else identity_start(first1[1])
                    res = bfgs(fun, x1, first1, h1, gtol=self.backend.gtol,
                               ftol=self.backend.ftol, maxiter=self.backend.maxiter, callback=callback,
                               rescale_first=not bhhh, line_search="armijo" if bhhh else "wolfe",
                               on_state=on_state)
                    res.message = f"{res.message} ({note})"
                x_hat, message, success = res.x, res.message, res.success
                ofv, grad, (ebe, self.eta) = res.fun, res.jac, res.aux  # the EBEs at x_hat (warm start, result)
            else:
                x_hat, message, success = x0, "no free parameters: objective evaluated", True
                ofv, grad, (ebe, _) = first
        except KeyboardInterrupt:  # Ctrl-C: the last accepted iterate (or the start) with its EBEs
            if "state" not in last and first is None:
                raise
            state = last.get("state") or BFGSState(np.asarray(x0, float), first[0], first[1], first[2], None, 0, False)
            x_hat, ofv, grad, (ebe, self.eta) = state.x, state.f, state.g, state.aux
            message, success = f"after {state.it} BFGS iteration(s)", False
            self.interrupted = True
        bar.close()
        run_s = time.perf_counter() - start
        return self.finish(x_hat, ofv, grad, ebe, message, success, compile_s, run_s, count["n"])

    def boundary_restart(self, fun, res, x_start: np.ndarray):
        """Leave a spurious stationary point where a random-effect SD went to ~0: ``(x, evaluation,
        note, per-subject gradients)`` of the point to go on from, or None.

        On the log scale of a standard deviation ``omega``, ``d OFV / d log omega = omega d OFV /
        d omega`` vanishes as ``omega -> 0``: an optimiser that drives one there stops with a
        small gradient although a positive value may fit better (seen on the 60-subject IDR fit:
        omega_n 1e-4 at OFV -807.28, 0.1 at -814.92). For each positive parameter of the random
        effects' distribution that ended more than 100 times below its start and below 1e-2, the
        OFV is evaluated with it at its start value and at 1/3, 1/10, 1/30 and 1/100 of it (the
        start may be far above the optimum); the best such point that lowers the OFV is returned
        (with its evaluation and a note) for BFGS to continue from, else None.
        """
        positive = np.zeros(self.theta0.size, bool)  # unconstrained by log: u = log(value)
        for b in self.density.theta_space.blocks:
            positive[b.start:b.stop] = b.leaf_shapes is None and _log_scale(b.site.support)
        low = np.flatnonzero(positive[self.free] & (res.x < x_start - np.log(100.0)) & (res.x < np.log(1e-2)))
        if low.size:  # of those, the random effects' distribution's (one derivative: only when needed)
            low = low[distribution_parameters(self.density, self.pop, self.theta0, self.free, res.x, self.eta)[low]]
        best = None
        for j in low:
            for factor in (1.0, 3.0, 10.0, 30.0, 100.0):
                trial = res.x.copy()
                trial[j] = x_start[j] - np.log(factor)
                value = fun(trial)
                if np.isfinite(value[0]) and value[0] < res.fun - 1e-3 and (best is None or value[0] < best[1][0]):
                    best = (trial, value, f"{self.free_labels[j]} restarted from {np.exp(res.x[j]):.2g} at "
                                          f"{np.exp(trial[j]):.2g}: OFV {res.fun:.4f} -> {value[0]:.4f}",
                            np.asarray(self.subject_gradients))
        return best

    def joint_start(self, x0: np.ndarray, steps: int, bar) -> np.ndarray:
        """Move the start to the joint mode of (theta, eta) (`shared.joint`); its eta warm-start the EBEs."""

        def report(it, value):
            bar.set_postfix(joint=f"{value:.4f}")
            if self.backend.progress and (it == 1 or it % self.backend.print_every == 0):
                bar.write(f"{self.backend.method} joint-mode warm start, step {it:4d}  -2 log joint {value:.6f}")

        res = joint_mode(self.density, self.pop, self.theta0, self.free, x0, self.eta, self.free_labels,
                         steps=steps, use_map=self.backend.map, callback=report)
        self.joint = {"steps": res.steps, "seconds": res.seconds, "value": res.value}
        if not np.isfinite(res.value):
            self.warnings.append("joint-mode warm start: objective not finite; the fit starts from the given values")
            return x0
        self.eta = res.eta
        return res.x

    def adam(self, fun, x0: np.ndarray, callback) -> np.ndarray:
        """``adam_steps`` first-order steps (`optax.adam`) before the quasi-Newton method: far from the
        optimum of a network's weights they make cheaper progress than line searches. Returns the
        best point seen (a step that makes the OFV non-finite is undone and the rate halved)."""
        import optax

        rate = self.backend.learning_rate
        opt = optax.adam(rate)
        state = opt.init(x0)
        x, best = np.array(x0, dtype=float), (np.inf, np.array(x0, dtype=float))
        for step in range(1, self.backend.adam_steps + 1):
            ofv, grad, _ = fun(x)
            if not (np.isfinite(ofv) and np.all(np.isfinite(grad))):
                rate *= 0.5
                opt, x = optax.adam(rate), best[1].copy()
                state = opt.init(x)
                continue
            if ofv < best[0]:
                best = (ofv, x.copy())
            callback(step, x, ofv, grad)
            updates, state = opt.update(grad, state, x)
            x = x + np.asarray(updates)
        return best[1]

    def status(self, ofv, grad, ebe, message, success) -> tuple[str, str]:
        grad_max = float(np.max(np.abs(grad))) if grad.size else 0.0
        failed_ebe = [self.pop.ids[i] for i in np.flatnonzero(~np.asarray(ebe.converged))]
        notes = [message, f"max |dOFV/dtheta| = {grad_max:.2g}"]
        if not np.isfinite(ofv):
            subjects, params = self.nonfinite or ([], [])
            from ..shared.diagnose import explain_nonfinite

            last = self.last_x if self.last_x is not None else self.theta0[self.free]
            cause = explain_nonfinite(self.density, self.full(last), self.eta, self.pop)
            stiff = ode_step_limit(self.density, self.full(last), self.eta, self.pop)
            if stiff:
                self.warnings.append(stiff)
            return "failed", ((f"{cause}; " if cause else "") + f"objective is not finite at the final estimate: "
                              f"subject(s) {subjects[:10]}, non-finite gradient for {params}"
                              f"{'; ' + stiff if stiff else ''}; {message}")
        if self.nonfinite is not None:
            subjects, params = self.nonfinite
            self.warnings.append(f"the objective was not finite at some trial parameters (subject(s) "
                                 f"{subjects[:10]}); the optimiser stepped back")
        status = "converged" if success else "not_converged"
        if failed_ebe:
            notes.append(f"EBE search did not converge for subject(s) {failed_ebe[:10]}")
            status = "not_converged"
        return status, "; ".join(notes)

    def build_result(self, x_hat, ofv, ebe, status, message, cov, timings):
        """The `FitResult` (`finish.build_result`; mixture models report their most probable classes)."""
        from .finish import build_result

        return build_result(self, x_hat, ofv, ebe, status, message, cov, timings)

    def finish(self, x_hat, ofv, grad, ebe, message, success, compile_s, run_s, n_eval):
        status, message = self.status(ofv, grad, ebe, message, success)
        if self.interrupted:  # no identifiability check or covariance step: the user asked to stop
            status, message = "interrupted", checkpoint.interrupted_note(message)
        elif status != "failed" and x_hat.size:
            message = self.identifiability(x_hat, message)
        start = time.perf_counter()
        kind = self.backend.covariance if status not in ("failed", "interrupted") else "none"
        with ticker(f"covariance step ({kind}) and result tables", "covariance step and tables done",
                    self.backend.progress):
            cov = covariance_step(lambda x: self.evaluate(x)[1], self.subject_grads, x_hat, self.free_labels, kind)
            self.warnings.extend(cov.warnings)
            covariance_s = time.perf_counter() - start
            if not np.array_equal(self.last_x, x_hat):  # the covariance step moved the EBEs: back to the estimate
                ofv, grad, ebe = self.evaluate(x_hat)
            return self.build_result(x_hat, ofv, ebe, status, message, cov,
                                     {"compile_s": compile_s, "run_s": run_s, "covariance_s": covariance_s,
                                      "n_evaluations": float(n_eval),
                                      **({"joint_s": self.joint["seconds"], "joint_steps": float(self.joint["steps"])}
                                         if self.joint else {})})

    def identifiability(self, x_hat: np.ndarray, message: str) -> str:
        """Name parameters the data cannot tell apart (whatever the covariance setting) in the message
        and the warnings; the estimates are kept."""
        names = unidentified(self.subject_grads(x_hat), self.free_labels)
        if not names:
            return message
        note = (f"parameters {names} are not identifiable: no subject's objective changes along a combination of "
                "them (they enter the model only together, or not at all); fix some of them or reparameterise")
        self.warnings.append(note)
        return f"{message}; {note}"

    def subject_grads(self, x: np.ndarray) -> np.ndarray:
        """Each subject's OFV gradient at ``x``, at the EBEs there (the covariance step moves them)."""
        self.evaluate(x)
        return np.asarray(self.subject_gradients)


def _log_scale(support) -> bool:
    """Whether a site's unconstrained coordinate is the log of its value (positive support)."""
    from numpyro.distributions.transforms import ExpTransform, IndependentTransform, biject_to

    transform = biject_to(support)
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ExpTransform)


_CACHE: dict = {}  # compiled functions by (model, settings, free set, data structure)
_CACHE_SIZE = 16


def _compiled(key, engine: str, objective: Objective, use_map: bool, free: np.ndarray, pop, eta, theta0,
              n_devices: int = 1) -> dict:
    """The jitted evaluation functions for this problem, compiled once per key.

    Only what compiled is stored: a failed or interrupted compile leaves no entry behind.
    """
    if key in _CACHE:
        return _CACHE[key]
    store = {}
    free_idx = np.flatnonzero(free)

    def full(theta_free, theta_all):
        return theta_all.at[free_idx].set(theta_free)

    def subject_ofv(theta_free, theta_all, eta0, pop):
        theta = full(theta_free, theta_all)
        if objective.method == "fo":  # the EBEs are reported only: no derivative through them
            ebe = objective.ebe(jax.lax.stop_gradient(theta), eta0, pop)
            eta = jax.lax.stop_gradient(ebe.eta)
            return objective.subject_ofv(theta, eta, pop), ebe, eta
        eta, ebe = objective.ebe_implicit(theta, eta0, pop)
        ofv_i = objective.subject_ofv(theta, eta, pop)
        if use_map:
            ofv_i = ofv_i - 2.0 * objective.density.log_prior(theta, pop, jacobian=False) / pop.n_subjects
        return ofv_i, ebe, eta

    def value_and_grad(theta_free, theta_all, eta0, pop):
        # forward mode: one tangent per free parameter; the primal (and the EBE search, which does
        # not depend on the tangents) is computed once under vmap. The tangents of the per-subject
        # OFVs are each subject's gradient, kept for BFGS's starting Hessian (BHHH)
        def fn(t):
            ofv_i, ebe, eta = subject_ofv(t, theta_all, eta0, pop)
            return (ofv_i, eta), ebe

        basis = jnp.eye(theta_free.size, dtype=theta_free.dtype)
        (ofv_i, _), (grad_i, eta_jac), ebe = jax.vmap(
            lambda v: jax.jvp(fn, (theta_free,), (v,), has_aux=True), out_axes=(None, (1, 2), None))(basis)
        # eta_jac [subj, n_eta, p] = d eta* / d theta: the first-order prediction of the EBEs at the
        # next trial point (a warm start a few Newton iterations closer)
        return jnp.sum(ofv_i), jnp.sum(grad_i, axis=0), ebe.eta, ebe, ofv_i, grad_i, eta_jac

    if engine == "reverse":
        value_and_grad = reverse_value_and_grad(objective, use_map, free_idx)  # noqa: F811
    args = (jnp.asarray(theta0)[free_idx], jnp.asarray(theta0), eta, pop)
    if n_devices > 1:  # the subjects split over the devices, one psum of the OFV and its gradient
        value_and_grad, sharding = shard_subjects(value_and_grad, n_devices)  # noqa: F811
        store["value_and_grad"] = jax.jit(value_and_grad, in_shardings=sharding,
                                          out_shardings=sharding).lower(*args).compile()
    else:
        store["value_and_grad"] = jax.jit(value_and_grad).lower(*args).compile()
    # compiled on first use: predictions are not always needed
    store["predict"] = jax.jit(functools.partial(_predict, objective))
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = store
    return store


def _predict(objective: Objective, theta, eta, pop):
    """PRED (eta = 0), IPRED (at the EBEs), residual variance and curvature at the EBEs, and the
    precision of the random-effect distribution at eta = 0 (Omega^-1 for Gaussian random effects)."""
    from .finish import site_means

    zero = jnp.zeros_like(eta)
    pred = site_means(objective.density, theta, zero, pop)
    ipred = site_means(objective.density, theta, eta, pop)
    var = objective._trace_parts(theta, eta, pop).get("var") if objective.method != "laplace" else None
    if var is not None:  # one [subj, obs] block per observed site, concatenated: place each by output
        blocks = jnp.split(var, len(objective.density.sites.observed), axis=1)
        merged = jnp.ones(pop.dv.shape)
        for site, block in zip(objective.density.sites.observed, blocks, strict=True):
            covered = pop.mask if site.output is None else pop.mask & (pop.dvid == site.output)
            merged = jnp.where(covered, block, merged)
        var = merged
    curvature = objective.curvature(theta, eta, pop, objective.frozen_variance(theta, pop))
    return pred, ipred, var, curvature, objective.prior_precision(theta, pop)


def identity_start(grad: np.ndarray) -> np.ndarray:
    """A first inverse Hessian that makes the first step 0.1 long in the largest gradient coordinate."""
    top = float(np.max(np.abs(grad))) if grad.size and np.all(np.isfinite(grad)) else 0.0
    return np.eye(grad.size) * (0.1 / top if top > 0 else 1.0)


def loglik_from_ofv(ofv: float, n_obs: int) -> float:
    """Log-likelihood with the constant NONMEM's OFV drops."""
    return -0.5 * (ofv + n_obs * LOG_2PI)


def information_criteria(ofv: float, n_obs: int, n_params: int) -> tuple[float, float, float]:
    """(loglik, AIC, BIC) with the constant included, as nlmixr2 and Monolix report them."""
    ll = loglik_from_ofv(ofv, n_obs)
    return ll, -2 * ll + 2 * n_params, -2 * ll + math.log(n_obs) * n_params
