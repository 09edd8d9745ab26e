"""SAEM: stochastic approximation EM with an MCMC E-step, on any nlmegen model.

One SAEM iteration k (Delyon, Lavielle & Moulines 1999; Kuhn & Lavielle 2004, 2005):

1. **Simulation (E-step).** A few MCMC transitions of every subject's random effects given the
   current ``theta_k`` (`.kernels`: random walk, HMC or NUTS, each subject with its own
   adapted step size and proposal shape; the chains are carried over between iterations).
2. **Stochastic approximation and maximisation.** The model is a general NumPyro program, so the
   complete-data log-likelihood ``L(theta; eta) = sum_i log p(y_i, eta_i | theta)`` is not assumed
   to be an exponential family. ``theta`` moves by a stochastic-approximation Newton step
   (Gu & Kong 1998; the non-exponential case of Kuhn & Lavielle 2005):

       H_k = H_{k-1} + gamma_k (-d^2 L(theta_k; phi_k) - H_{k-1}),
       theta_{k+1} = theta_k + gamma_k H_k^-1 dL(theta_k; phi_k),

   whose fixed point is the maximum-likelihood estimate (the expected complete-data score is the
   observed score, Fisher's identity). ``gamma_k = 1`` during the ``n_explore`` exploration
   iterations and ``1 / (k - n_explore + 1)^step_exponent`` during the ``n_smooth`` smoothing
   iterations.
3. **Mu-referencing, found automatically.** Where a population parameter enters the model only
   as ``theta_j + eta_ik`` (e.g. ``ka = exp(tka + eta[0])``), SAEM works with the centred random
   effect ``phi_ik = theta_j + eta_ik`` as missing data, as Monolix does. The centring is detected
   numerically (``d log p(y_i | eta, theta) / d theta_j == d log p(y_i | eta, theta) / d eta_ik``
   for every subject at random points, and ``theta_j`` absent from ``p(eta)``). In the centred
   coordinates the Newton step for ``theta_j`` of a Normal random effect *is* the closed form
   ``theta_j = mean_i(phi_ik)``; for the log standard deviation of a Normal random effect and of
   an additive residual error it is the Newton iteration of ``omega^2 = mean(eta^2)`` and
   ``sigma^2 = mean(residual^2)``, and network weights or covariate coefficients get (damped)
   Newton steps on the same stochastic approximation.
4. **Simulated annealing** (Lavielle's Monolix scheme): during exploration the positive-valued
   free parameters that are not mu-referenced (variances of random effects and residual errors)
   may shrink by at most a factor ``anneal`` per iteration on the variance scale.

After the iterations a conditional-distribution run at the final estimate (``n_conditional``
iterations without adaptation) gives each subject's conditional mean (the EBEs here) and
covariance, which define the importance-sampling proposal of the log-likelihood (multivariate
Student t, ``is_df`` degrees of freedom, ``is_draws`` draws per subject) with its Monte-Carlo
standard error. The FOCEI objective at the SAEM estimate and the FOCEI covariance step (R, S,
sandwich; NONMEM's $COV) give the comparison OFV and the standard errors.

References
----------
Delyon B, Lavielle M, Moulines E. Convergence of a stochastic approximation version of the EM
algorithm. Ann Stat 1999;27:94-128.
Kuhn E, Lavielle M. Coupling a stochastic approximation version of EM with an MCMC procedure.
ESAIM P&S 2004;8:115-131.
Kuhn E, Lavielle M. Maximum likelihood estimation in nonlinear mixed effects models. Comput Stat
Data Anal 2005;49:1020-1038.
Gu MG, Kong FH. A stochastic approximation algorithm with Markov chain Monte-Carlo method for
incomplete data estimation problems. PNAS 1998;95:7270-7274.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from tqdm.auto import tqdm

from ..._errors import ModelError
from ...dynamics.ode import forward_mode
from ...model import discover
from ...model._mixture import unclassed
from ..laplace.backend import check_population
from ..shared import checkpoint
from ..shared.checks import check_fit
from ..shared.joint import joint_mode, joint_steps
from ..shared.progress import compiling
from ..shared.result import _positive_valued
from ..shared.shard import per_subject, replicated, shard_count, subject_mesh
from ..shared.start import starting_point, theta_labels
from .kernels import KERNELS, TARGET_ACCEPT, EState, adapt, hmc_step, nuts_step, rwm_step

__all__ = ["SAEM"]

COVARIANCES = ("sandwich", "R", "S", "none")
HESSIANS = ("exact", "fisher")
BACKTRACK = 8  # halvings of an exploration M-step tried at once (`_SAEMProblem.backtrack`)
_CACHE: dict = {}  # compiled chunks by (model, settings, data structure)
_CACHE_SIZE = 8


@dataclass(frozen=True)
class SAEM:
    """Stochastic approximation EM (Monolix's algorithm) with per-subject MCMC E-steps.

    Parameters
    ----------
    n_explore, n_smooth
        Iterations of the exploration phase (step size 1, simulated annealing; Monolix's K1) and of
        the smoothing phase (decreasing steps; K2).
    step_exponent
        ``a`` in the smoothing step sizes ``1 / k^a`` (``0.5 < a <= 1``).
    kernel
        E-step kernel: ``"rwm"`` (random-walk Metropolis, the default), ``"hmc"`` or ``"nuts"``.
    n_kernel_steps
        Kernel transitions per SAEM iteration.
    num_chains
        Chains per subject (``None``: enough for 50 chains in all, Monolix's rule).
    num_leapfrog, max_tree_depth
        Leapfrog steps of ``"hmc"``; tree depth of ``"nuts"``.
    anneal
        Simulated annealing: variances shrink by at most this factor per exploration iteration.
    max_step
        Largest change of one unconstrained parameter in one M-step (a trust region).
    hessian
        ``"exact"``: the complete-data Hessian by forward-mode derivatives; ``"fisher"``: the sum
        of the subjects' score outer products (cheaper for ODE models with many parameters).
        Either covers the parameters other than network weights.
    network_lr
        Network weights (``nlmegen.nn`` sites) are not Newton-stepped (no Hessian over thousands of
        weights): their complete-data gradient, by one reverse-mode pass, drives Adam
        (`optax.adam`) with this learning rate, scaled by the stochastic-approximation step
        ``gamma_k`` (Robbins-Monro).
    joint_steps
        L-BFGS steps on the joint mode of the population parameters and all random effects (the
        random effects' distribution held at its start; Pumas' ``JointMAP``, see `shared.joint`)
        before the iterations: the network weights and structural parameters start near their
        optimum and the chains at the joint mode's random effects. ``"auto"`` (default): up to 500
        steps for models with network weights or more than 32 free parameters, none otherwise.
    n_conditional
        Iterations of the conditional-distribution run at the estimate (EBEs, IS proposal).
    is_draws, is_df
        Importance-sampling draws per subject and degrees of freedom of the t proposal.
    covariance
        Standard errors by the FOCEI covariance step at the SAEM estimate: ``"sandwich"``, ``"R"``,
        ``"S"``, or ``"none"``.
    focei
        Also compute the FOCEI OFV at the SAEM estimate (needed for ``covariance``).
    conv_window, conv_tol
        Convergence check: over the last ``conv_window`` fraction of the smoothing phase, the drift
        of every free unconstrained parameter (mean of the window's second half minus its first
        half) must be below ``conv_tol * max(1, |theta|)``.
    chunk
        Iterations per compiled call (the progress bar advances per chunk).
    progress
        Show a progress bar.
    devices
        Devices the subjects are split over in the E-step and the M-step's derivatives (every
        per-subject log density runs on its subject's device; `shared.shard`): ``None`` (default)
        all of them (one CPU device unless ``XLA_FLAGS=--xla_force_host_platform_device_count=N``),
        or a number. The random numbers are drawn as on one device: the same key gives the same
        iterates.

    Notes
    -----
    ``fit(..., key=...)`` needs a PRNG key; the same key gives the same result bit for bit (on
    the same machine and versions).

    - ``FitResult.ofv`` is the importance-sampling -2 log-likelihood without the ``n_obs log(2 pi)``
      constant (the package's NONMEM convention, as FOCEI's); ``loglik``, ``aic`` and ``bic``
      include the constant. ``settings`` also holds ``minus2ll_is`` and ``minus2ll_is_se`` (the
      IS -2LL with the constant and its Monte-Carlo standard error), ``minus2ll_focei`` (the
      FOCEI -2LL at the SAEM estimate, with the constant), ``focei_ofv`` (the same without it),
      ``focei_decrement`` (the OFV decrease a Newton step on that objective predicts: above 2 a warning says
      SAEM may have stopped short; non-centred parameters converge slowly),
      ``mu_referenced`` (which random effects were centred on which parameter), ``annealed``,
      the E-step acceptance rates and ``max_drift`` (the convergence statistic).
    - ``se`` come from the FOCEI covariance step at the SAEM estimate (``covariance_kind`` says
      which matrix; Laplace's for non-Gaussian residuals); the stochastic approximation of the
      Fisher information (Louis) is not implemented.
    - ``ebes`` are conditional means and ``ebe_cov`` conditional covariances of the random
      effects (unconstrained scale) from the conditional-distribution run.
    - ``history`` has one row per iteration: every parameter on the user's scale, the step size
      ``gamma``, the ``phase`` (1 exploration, 2 smoothing) and the mean E-step acceptance rate.
      ``fit.history.plot(x="iteration", y=["tka", "tcl"], subplots=True)`` shows the convergence.
    - ``timings``: ``setup_s`` (site discovery and the mu-referencing check), ``compile_s`` (the
      iteration loop, 0 when reused from an earlier fit of the same model and data shapes),
      ``run_s`` (the iterations and the conditional run), ``is_s``, ``focei_s`` (FOCEI OFV and
      covariance step, compilation included) and ``covariance_s``.
    - ``status`` is ``"converged"`` only when the trajectories are stable at the end of the
      smoothing phase (see ``conv_window``); otherwise ``"not_converged"`` with the parameter that
      drifts named in ``message``.

    Examples
    --------
    >>> import jax, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> fit = nlmegen.fit(nlmegen.examples.theo_model, pop, method="saem", key=jax.random.key(1),
    ...                   progress=False)  # doctest: +SKIP
    >>> fit.params["tcl"]  # doctest: +SKIP
    array(1.01...)

    References
    ----------
    Kuhn E, Lavielle M. Maximum likelihood estimation in nonlinear mixed effects models. Comput
    Stat Data Anal 2005;49:1020-1038.
    Delyon B, Lavielle M, Moulines E. Convergence of a stochastic approximation version of the EM
    algorithm. Ann Stat 1999;27:94-128.
    """

    method: ClassVar[str] = "saem"
    n_explore: int = 300
    n_smooth: int = 200
    step_exponent: float = 1.0
    kernel: str = "rwm"
    n_kernel_steps: int = 4
    num_chains: int | None = None
    num_leapfrog: int = 5
    max_tree_depth: int = 5
    anneal: float = 0.95
    max_step: float = 1.0
    hessian: str = "exact"
    network_lr: float = 0.01
    joint_steps: int | str = "auto"
    n_conditional: int = 200
    is_draws: int = 5000
    is_df: float = 5.0
    covariance: str = "sandwich"
    focei: bool = True
    conv_window: float = 0.25
    conv_tol: float = 0.01
    chunk: int = 50
    progress: bool = True
    devices: int | None = None

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"SAEM: {what}")

        for name in ("n_explore", "n_smooth", "n_kernel_steps", "num_leapfrog", "max_tree_depth", "chunk",
                     "n_conditional", "is_draws"):
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be a non-negative integer, not {value!r}")
        need(self.n_smooth >= 10, f"n_smooth must be at least 10 (convergence is judged on it), not {self.n_smooth}")
        need(self.n_kernel_steps >= 1 and self.chunk >= 1 and self.num_leapfrog >= 1 and self.max_tree_depth >= 1,
             "n_kernel_steps, chunk, num_leapfrog and max_tree_depth must be at least 1")
        need(self.kernel in KERNELS, f"kernel must be one of {KERNELS}, not {self.kernel!r}")
        need(self.hessian in HESSIANS, f"hessian must be one of {HESSIANS}, not {self.hessian!r}")
        need(self.covariance in COVARIANCES, f"covariance must be one of {COVARIANCES}, not {self.covariance!r}")
        need(0.5 < self.step_exponent <= 1.0, f"step_exponent must be in (0.5, 1], not {self.step_exponent}")
        need(0.0 < self.anneal <= 1.0, f"anneal must be in (0, 1], not {self.anneal}")
        need(self.max_step > 0, f"max_step must be positive, not {self.max_step}")
        need(self.network_lr > 0, f"network_lr must be positive, not {self.network_lr}")
        need(self.is_df > 0, f"is_df must be positive, not {self.is_df}")
        need(0.0 < self.conv_window <= 1.0, f"conv_window must be in (0, 1], not {self.conv_window}")
        need(self.conv_tol > 0, f"conv_tol must be positive, not {self.conv_tol}")
        need(self.num_chains is None or (isinstance(self.num_chains, int) and self.num_chains >= 1),
             f"num_chains must be None or a positive integer, not {self.num_chains!r}")
        need(self.covariance == "none" or self.focei,
             "covariance needs focei=True (standard errors come from the FOCEI covariance step)")
        need(self.is_draws == 0 or self.is_draws >= 100, "is_draws must be 0 (no log-likelihood) or at least 100")

    def fit(self, model, pop, *, init: Mapping | None = None, fixed: Mapping | None = None, key=None):
        """Estimate the population parameters of ``model`` on ``pop``; returns a `FitResult`."""
        if key is None:
            raise ValueError("SAEM needs key=jax.random.key(...)")
        from ..shared.mixture import fit_mixture, has_mixture
        from .finish import finish

        if has_mixture(model, pop):
            # the class summed out, one copy of the random effects per class; the M-step's Newton matrix
            # is EM's with the class responsibilities held (Lavielle & Mbogning, Stat Comput 2014;24:693)
            return fit_mixture(self.fit, model, pop, em_curvature=True, init=init, fixed=fixed, key=key)

        with numpyro.validation_enabled(False):
            start = time.perf_counter()
            problem = _SAEMProblem.build(self, model, pop, init, fixed)
            setup_s = time.perf_counter() - start
            run = problem.run(key)
            run["setup_s"] = setup_s
            return finish(problem, run)


# --------------------------------------------------------------------------------------------
class _SAEMProblem:
    """One SAEM fit: the model's pieces, the free vector, the centring, the compiled loop."""

    def __init__(self, backend, model, pop, density, theta0, free, fixed_names, values):
        self.backend, self.model, self.pop, self.density = backend, model, pop, density
        self.theta0, self.free, self.fixed_names, self.values0 = theta0, free, fixed_names, values
        self.labels = theta_labels(density.theta_space)
        self.free_idx = np.flatnonzero(free)
        self.n_eta = density.sites.n_eta
        n = pop.n_subjects
        self.n_chains = backend.num_chains or max(1, math.ceil(50 / n))
        self.warnings: list[str] = []
        self.n_devices = shard_count(backend.devices, n)
        if self.n_devices > 1:
            self._sharded_log_joint = per_subject(density.subject_log_joint, self.n_devices, 1)

    def subject_log_joint(self, theta, eta, pop):
        """``density.subject_log_joint``, with the subjects split over the devices when there are several."""
        if self.n_devices == 1:
            return self.density.subject_log_joint(theta, eta, pop)
        return self._sharded_log_joint(theta, eta, pop)

    @classmethod
    def build(cls, backend, model, pop, init, fixed):
        check_population(pop)
        sites = discover(model, pop)
        check_fit(sites, pop)
        if sites.n_eta == 0:
            raise ModelError("SAEM needs random effects (sample sites inside the subject plate); this model has "
                             "none: use method='focei'")
        density, values, fixed_names, theta0, labels, free = starting_point(model, pop, sites, init, fixed)
        problem = cls(backend, model, pop, density, theta0, free, fixed_names, values)
        problem.eta0 = jnp.zeros((pop.n_subjects, sites.n_eta))
        steps = joint_steps(backend.joint_steps, density, free)
        problem.joint = None
        if steps and free.any():  # the warm start: parameters and chains from the joint mode
            res = joint_mode(density, pop, theta0, free, theta0[free], problem.eta0,
                             [lab for lab, f in zip(labels, free, strict=True) if f], steps=steps, use_map=False)
            if np.isfinite(res.value):
                problem.theta0 = theta0.copy()
                problem.theta0[free] = res.x
                problem.eta0 = res.eta
            problem.joint = {"steps": res.steps, "seconds": res.seconds, "value": res.value}
        network = np.zeros(theta0.size, bool)  # network weights: Adam on the SA gradient, not Newton
        for block in density.theta_space.blocks:
            network[block.start:block.stop] = block.leaf_shapes is not None
        problem.network = network
        problem.newton_idx = problem.free_idx[~network[problem.free_idx]]
        problem.network_idx = problem.free_idx[network[problem.free_idx]]
        problem.centring = problem.find_mu_reference()
        problem.variance_like = problem.find_variances()
        return problem

    # ------------------------------------------------------------------ structure
    def find_mu_reference(self) -> np.ndarray:
        """The centring matrix ``A`` (``[d, p]``, 0/1): eta component k is centred on ``sum_j A[k, j] theta_j``.

        Each component is centred on at most one parameter of its own; in a mixture model a parameter
        shared by the classes is the centre of all its class copies, and a class's shift (``tcl + dcl``
        in class 1) the centre of that class's copy."""
        density, pop, d = self.density, self.pop, self.n_eta
        centring = np.zeros((d, self.theta0.size))
        if self.free_idx.size == 0:
            return centring

        def parts(theta, eta):
            with forward_mode():
                loglik, prior = density.subject_terms(theta, eta, pop)
            return loglik, prior

        plain = np.flatnonzero(~self.network)  # network weights are never centred on

        @jax.jit
        def derivs(theta, eta):
            jt = jax.jacfwd(lambda t: parts(theta.at[plain].set(t), eta))(theta[plain])  # ([n, p'], [n, p'])
            from ..laplace.objective import _columns

            je = _columns(lambda e: parts(theta, e)[0], eta)  # [n, d]
            full = [jnp.zeros((pop.n_subjects, theta.size)).at[:, plain].set(j) for j in jt]
            return full[0], full[1], je

        # a mixture model's class copies of one component (eta[0], eta$class1[0], ..) share their centre:
        # the parameter then enters as theta_j + eta_k in every class, d/d theta_j = sum over the copies
        copies = [list(g) for g in _copy_groups([self.eta_label(k) for k in range(d)]) if len(g) > 1]
        groups = [[k] for k in range(d)] + copies  # singletons first, then the class copies
        member = np.zeros((d, len(groups)))
        for g, ks in enumerate(groups):
            member[ks, g] = 1.0
        rng = np.random.default_rng(0)
        confirmed = np.zeros((self.theta0.size, len(groups)), bool)
        refuted = np.zeros((self.theta0.size, len(groups)), bool)
        for _ in range(3):  # subjects whose derivatives are not finite neither confirm nor refute
            theta = self.theta0 + 0.1 * rng.standard_normal(self.theta0.size)
            eta = 0.3 * rng.standard_normal((pop.n_subjects, d))
            jl, jp, je = (np.asarray(x) for x in derivs(jnp.asarray(theta), jnp.asarray(eta)))
            jg = np.where(np.isfinite(je), je, 0.0) @ member  # [n, groups]
            finite = ~(~np.isfinite(je) @ member).astype(bool)
            for j in range(self.theta0.size):
                for g in range(len(groups)):
                    rows = np.isfinite(jl[:, j]) & np.isfinite(jp[:, j]) & finite[:, g]
                    if not rows.any():
                        continue
                    a, b = jl[rows, j], jg[rows, g]
                    same = bool(np.all(np.abs(a - b) <= 1e-7 * np.abs(a) + 1e-10) and np.any(np.abs(a) > 0)
                                and np.all(jp[rows, j] == 0))
                    confirmed[j, g] |= same
                    refuted[j, g] |= not same
        ok = confirmed & ~refuted
        used = set()
        for g, ks in enumerate(groups):
            for j in self.free_idx:
                if ok[j, g] and j not in used and (len(ks) > 1 or not centring[ks[0]].any()):
                    centring[ks, j] = 1.0
                    used.add(j)
                    break
        return centring

    def find_variances(self) -> np.ndarray:
        """Free, positive-valued elements that are not centred on: annealed during exploration."""
        out = np.zeros(self.theta0.size, bool)
        from numpyro.distributions.transforms import biject_to

        for block in self.density.theta_space.blocks:
            if block.leaf_shapes is None and _positive_valued(biject_to(block.site.support)):
                out[block.start:block.stop] = True
        out &= self.free
        out[self.centring.any(axis=0)] = False
        return out

    def eta_label(self, k: int) -> str:
        """Label of unconstrained random-effect element ``k`` (``eta[0]``, or a scalar site's name)."""
        return theta_labels(self.density.eta_space)[k]

    # ------------------------------------------------------------------ the compiled loop
    def shift(self, theta):
        """The centring ``A theta`` (``[d]``; 0 for the components that are not centred)."""
        return jnp.asarray(self.centring) @ theta

    def centres(self) -> dict[str, str]:
        """Which parameters each centred random-effect component is centred on (``{"eta[0]": "tcl"}``)."""
        return {self.eta_label(k): " + ".join(self.labels[j] for j in np.flatnonzero(row))
                for k, row in enumerate(self.centring) if row.any()}

    def initial_state(self, key):
        """The loop's carry at the start: chains at eta = 0 with proposal shapes from the curvature."""
        from ..laplace.objective import _columns

        n, d, c = self.pop.n_subjects, self.n_eta, self.n_chains
        theta = jnp.asarray(self.theta0)
        eta = jnp.asarray(self.eta0)

        def curvature():
            grad = lambda e: _columns(lambda x: self.density.subject_log_joint(theta, x, self.pop), e)  # noqa: E731
            with forward_mode():
                return -_columns(grad, eta)

        h = np.asarray(jax.jit(curvature)())
        cov = np.stack([_safe_inverse(hi) for hi in h])
        chol = np.linalg.cholesky(cov + 1e-10 * np.eye(d))
        log_step0 = {"rwm": math.log(2.38 / math.sqrt(d)), "hmc": math.log(0.5), "nuts": math.log(0.5)}
        phi = jnp.broadcast_to(self.shift(theta), (c, n, d))
        estate = EState(eta=jnp.broadcast_to(eta, (c, n, d)), logp=jnp.zeros((c, n)),
                        log_step=jnp.full((c, n), log_step0[self.backend.kernel]),
                        chol=jnp.broadcast_to(jnp.asarray(chol), (c, n, d, d)))
        p = self.newton_idx.size
        opt = _adam(self.backend.network_lr).init(theta[self.network_idx])
        return {"key": key, "theta": theta, "phi": phi, "estate": estate, "H": jnp.zeros((p, p)), "opt": opt,
                "m": jnp.zeros((n, d)), "S": jnp.asarray(cov), "sum1": jnp.zeros((n, d)),
                "sum2": jnp.zeros((n, d, d)), "count": jnp.zeros(()), "bad_msteps": jnp.zeros((), jnp.int64),
                "left_out": jnp.zeros((), jnp.int64)}

    def _kernel(self, theta):
        """One E-kernel transition of one chain ``(key, EState) -> (EState, EInfo)``."""
        backend, density, pop = self.backend, self.density, self.pop

        def logdensity(eta):
            return self.subject_log_joint(theta, eta, pop)

        if backend.kernel == "rwm":
            return lambda k, s: rwm_step(k, s, logdensity)
        if backend.kernel == "hmc":
            return lambda k, s: hmc_step(k, s, logdensity, backend.num_leapfrog)
        ids = pop.ids[:1]

        def logdensity_one(eta_i, pop_i):
            import dataclasses

            one = dataclasses.replace(jax.tree_util.tree_map(lambda x: x[None], pop_i), ids=ids)
            return density.subject_log_joint(theta, eta_i[None], one)[0]

        vmap = jax.vmap if self.n_devices == 1 else lambda f: per_subject(jax.vmap(f), self.n_devices, 0)
        return lambda k, s: nuts_step(k, s, logdensity_one, pop, backend.max_tree_depth, vmap=vmap)

    def complete_ll(self, theta_part, theta, phi, idx=None, forward: bool = True):
        """Centred complete-data log-likelihood per chain and subject ``[chain, subj]``, as a function
        of the elements ``idx`` of theta (default: the free ones); ``forward`` for forward-mode
        derivatives (ODE solves in `diffrax.ForwardMode`), else reverse mode."""
        full = theta.at[self.free_idx if idx is None else idx].set(theta_part)
        eta = phi - self.shift(full)
        with forward_mode() if forward else contextlib.nullcontext():
            return jax.vmap(lambda e: self.subject_log_joint(full, e, self.pop))(eta)

    def mstep_derivatives(self, theta, phi):
        """Gradient and negative Hessian of the complete-data log-likelihood in the free theta.

        Per (chain, subject) by forward mode, so that contributions with a non-finite derivative
        (e.g. ``0 ** n`` in a Hill term at time 0) are left out rather than poisoning the step;
        returns ``(grad, hess, n_left_out)``.
        """
        tf = theta[self.newton_idx]
        n_chains = phi.shape[0]

        def ll(t):
            return self.complete_ll(t, theta, phi, self.newton_idx)  # [chain, subj]

        jac = jax.jacfwd(ll)(tf)  # [chain, subj, p]
        if self.backend.hessian == "exact":
            parts = -jax.jacfwd(jax.jacfwd(ll))(tf)  # [chain, subj, p, p]
        else:  # the subjects' score outer products (Fisher information of the complete data)
            parts = jnp.einsum("csi,csj->csij", jac, jac)
        ok = jnp.all(jnp.isfinite(jac), -1) & jnp.all(jnp.isfinite(parts), (-1, -2))
        grad = jnp.sum(jnp.where(ok[..., None], jac, 0.0), axis=(0, 1)) / n_chains
        hess = jnp.sum(jnp.where(ok[..., None, None], parts, 0.0), axis=(0, 1)) / n_chains
        return grad, hess, jnp.sum(~ok)

    def iteration(self, carry, sched):
        """One SAEM iteration (or, with ``mstep`` off, one conditional-distribution iteration)."""
        backend = self.backend
        gamma, explore, active, mstep, collect = sched
        theta = carry["theta"]
        key, k_e = jax.random.split(carry["key"])
        kernel = self._kernel(theta)
        eta = carry["phi"] - self.shift(theta)
        logp = jax.vmap(lambda e: self.subject_log_joint(theta, e, self.pop))(eta)
        estate = carry["estate"]._replace(eta=eta, logp=jnp.where(jnp.isnan(logp), -jnp.inf, logp))
        target = TARGET_ACCEPT[backend.kernel]
        rate = jnp.where(mstep, jnp.where(explore, 0.1, 0.1 * gamma), 0.0)

        def transition(state, k):
            keys = jax.random.split(k, state.eta.shape[0])
            state, info = jax.vmap(kernel)(keys, state)
            return adapt(state, info.accept_prob, target, rate), info.accept_prob

        estate, accept = jax.lax.scan(transition, estate, jax.random.split(k_e, backend.n_kernel_steps))
        eta = estate.eta
        # proposal shapes follow a running estimate of each subject's conditional covariance
        mean_now = jnp.mean(eta, axis=0)
        dev = eta - carry["m"]
        cov_now = jnp.einsum("csi,csj->sij", dev, dev) / eta.shape[0]
        rho = jnp.where(explore & mstep, 0.05, 0.0)
        m = carry["m"] + rho * (mean_now - carry["m"])
        S = carry["S"] + rho * (cov_now - carry["S"])
        d = eta.shape[-1]
        chol = jnp.linalg.cholesky(S + 1e-8 * jnp.eye(d))
        chol_ok = jnp.all(jnp.isfinite(chol), axis=(-1, -2), keepdims=True)
        chol = jnp.where(chol_ok & explore & mstep, chol, estate.chol[0])
        estate = estate._replace(chol=jnp.broadcast_to(chol, estate.chol.shape))
        phi = eta + self.shift(theta)

        # the conditional-distribution run (mstep off) skips the derivatives altogether
        new_theta, H, opt_state, bad, left_out = jax.lax.cond(
            mstep, lambda: self.mstep(theta, phi, carry["H"], carry["opt"], gamma, explore),
            lambda: (theta, carry["H"], carry["opt"], jnp.zeros((), bool), jnp.zeros((), jnp.int64)))
        w = jnp.where(collect, 1.0, 0.0)
        out = {"key": key, "theta": new_theta, "phi": phi, "estate": estate, "H": H, "opt": opt_state, "m": m,
               "S": S,
               "sum1": carry["sum1"] + w * jnp.sum(eta, 0),
               "sum2": carry["sum2"] + w * jnp.einsum("csi,csj->sij", eta, eta),
               "count": carry["count"] + w * eta.shape[0],
               "bad_msteps": carry["bad_msteps"] + jnp.where(mstep & bad, 1, 0),
               "left_out": carry["left_out"] + jnp.where(mstep, left_out, 0)}
        new_key = out.pop("key")  # typed keys do not go through jnp.where; padded iterations just advance it
        out = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), out, {k: carry[k] for k in out})
        out["key"] = new_key
        record = {"theta": theta, "accept": jnp.mean(accept, axis=(0, 1)), "gamma": gamma}
        return out, record

    def mstep(self, theta, phi, H_old, opt_old, gamma, explore):
        """The SA update of the free theta: Newton for the parameters, Adam for network weights.

        Returns (theta, H, optimiser state, non-finite step?, left out)."""
        backend = self.backend
        bad, left_out, H, opt_state = jnp.zeros((), bool), jnp.zeros((), jnp.int64), H_old, opt_old
        new = theta
        if self.newton_idx.size:
            grad, hess, left_out = self.mstep_derivatives(theta, phi)
            H = H_old + gamma * (hess - H_old)
            step = gamma * jnp.linalg.solve(_positive_definite(H), grad)
            step = jnp.clip(step, -backend.max_step, backend.max_step)
            floor = 0.5 * math.log(backend.anneal)  # log sd may fall by at most sqrt(anneal)
            annealed = jnp.asarray(self.variance_like[self.newton_idx])
            step = jnp.where(explore & annealed, jnp.maximum(step, floor), step)
            bad = ~jnp.all(jnp.isfinite(step)) | ~jnp.all(jnp.isfinite(H))
            step = jax.lax.cond(explore & ~bad, lambda: self.backtrack(theta, phi, step), lambda: step)
            new = new.at[self.newton_idx].add(jnp.where(bad, 0.0, step))
            H = jnp.where(bad, H_old, H)
        if self.network_idx.size:  # one reverse pass: its cost does not grow with the number of weights
            weights = theta[self.network_idx]
            grad = jax.grad(lambda w: jnp.sum(self.complete_ll(w, theta, phi, self.network_idx, forward=False))
                            / phi.shape[0])(weights)
            updates, state = _adam(backend.network_lr).update(-grad, opt_old, weights)
            ok = jnp.all(jnp.isfinite(updates))
            new = new.at[self.network_idx].add(jnp.where(ok, gamma * updates, 0.0))
            opt_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), state, opt_old)
            bad = bad | ~ok
        return new, H, opt_state, bad, left_out

    def backtrack(self, theta, phi, step):
        """The exploration's Newton step, halved until it does not lower the complete-data log-likelihood
        of the current draws (a generalised EM M-step, Dempster, Laird & Rubin 1977, section 3).

        With step size 1 the Newton matrix is one draw's Hessian; far from the estimate (e.g. a residual
        error started 7 times too large) it is ill-conditioned or indefinite, and full steps jumped
        between the trust region's bounds. All ``BACKTRACK`` halvings are evaluated at once (one
        batched log-likelihood); the largest that does not lower it is taken, the smallest if none.
        """
        tf = theta[self.newton_idx]

        def total(t):
            ll = self.complete_ll(t, theta, phi, self.newton_idx, forward=False)
            return jnp.sum(jnp.where(jnp.isnan(ll), -jnp.inf, ll))

        scales = 0.5 ** jnp.arange(BACKTRACK)
        base = total(tf)
        trial = jax.vmap(lambda c: total(tf + c * step))(scales)
        good = trial >= base - 1e-8 * jnp.abs(base)
        scale = jnp.where(jnp.any(good) & jnp.isfinite(base), scales[jnp.argmax(good)], scales[-1])
        return jnp.where(jnp.isfinite(base), scale, 1.0) * step

    def schedule(self) -> np.ndarray:
        """Per-iteration (gamma, explore, active, mstep, collect), padded to whole chunks."""
        b = self.backend
        k1, k2, kc = b.n_explore, b.n_smooth, b.n_conditional
        rows = [(1.0, 1.0, 1.0, 1.0, 0.0)] * k1
        rows += [((k + 1.0) ** -b.step_exponent, 0.0, 1.0, 1.0, 0.0) for k in range(k2)]
        rows += [(0.0, 0.0, 1.0, 0.0, 1.0)] * kc
        total = len(rows)
        pad = (-total) % b.chunk
        rows += [(0.0, 0.0, 0.0, 0.0, 0.0)] * pad
        return np.asarray(rows, dtype=float).reshape(-1, b.chunk, 5)

    def compiled_chunk(self, carry, sched_chunk):
        """The jitted chunk of iterations, compiled once per model, settings and data shapes."""
        b = self.backend
        leaves = jax.tree_util.tree_leaves(self.pop)
        key = (self.model, b.kernel, b.n_kernel_steps, b.num_leapfrog, b.max_tree_depth, b.anneal, b.max_step,
               b.hessian, b.network_lr, b.chunk, self.n_chains, self.n_devices, tuple(self.free_idx.tolist()),
               self.centring.tobytes(),
               tuple(self.variance_like.tolist()), jax.tree_util.tree_structure(self.pop),
               tuple((x.shape, x.dtype) for x in leaves))
        if key in _CACHE:
            return _CACHE[key], 0.0
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))

        def chunk_fn(carry, sched_chunk, pop):
            problem = copy.copy(self)  # the same problem with the data as an argument (no recompile)
            problem.pop = pop

            def body(c, s):
                return problem.iteration(c, (s[0], s[1] > 0, s[2] > 0, s[3] > 0, s[4] > 0))

            return jax.lax.scan(body, carry, sched_chunk)

        start = time.perf_counter()
        with compiling(f"the SAEM iteration ({self.backend.chunk} per call)", self.backend.progress):
            # several devices (of one or several processes): inputs and outputs replicated, every
            # process passing the same values (see `shared.shard`)
            shardings = {} if self.n_devices == 1 else dict(in_shardings=replicated(subject_mesh(self.n_devices)),
                                                           out_shardings=replicated(subject_mesh(self.n_devices)))
            compiled = jax.jit(chunk_fn, **shardings).lower(carry, sched_chunk, self.pop).compile()
        _CACHE[key] = compiled
        return compiled, time.perf_counter() - start

    def run(self, key) -> dict:
        """Compile, iterate chunk by chunk (progress bar), return the records and the final carry."""
        b = self.backend
        carry = self.initial_state(key)
        sched = self.schedule()
        compiled, compile_s = self.compiled_chunk(carry, jnp.asarray(sched[0]))
        start = time.perf_counter()
        records, first, stopped = [], 0, None
        saved = checkpoint.restored("saem")
        if saved is not None:  # resume: the carry (chains, statistics, key) and records of the checkpoint
            carry = jax.tree_util.tree_map(lambda like, x: jnp.asarray(x, like.dtype) if isinstance(
                x, np.ndarray) else x, carry, saved["carry"])
            records, first = list(saved["records"]), int(saved["next"])
        n_iter = b.n_explore + b.n_smooth
        with tqdm(total=sched.shape[0] * b.chunk, initial=first * b.chunk, desc="saem", unit="it",
                  disable=not b.progress, leave=False) as bar:
            try:
                for i in range(first, sched.shape[0]):
                    carry, rec = compiled(carry, jnp.asarray(sched[i]), self.pop)
                    records.append(jax.tree_util.tree_map(np.asarray, rec))
                    checkpoint.save("saem", b.chunk, b.chunk,
                                    lambda: {"carry": carry, "records": records, "next": i + 1})  # noqa: B023
                    bar.update(b.chunk)
                    th = np.asarray(carry["theta"])
                    bar.set_postfix({lab: f"{th[i]:.3g}" for lab, i in
                                     list(zip(self.labels, range(th.size), strict=True))[:4]})
            except KeyboardInterrupt:  # the carry of the last completed chunk (see `finish`)
                done = len(records) * b.chunk
                stopped = f"after {min(done, n_iter)} of {n_iter} SAEM iterations" + (
                    f" and {done - n_iter} of {b.n_conditional} conditional ones" if done > n_iter else "")
        carry = jax.block_until_ready(carry)
        run_s = time.perf_counter() - start
        if not records:
            raise KeyboardInterrupt  # nothing done yet: nothing to return
        recs = {k: np.concatenate([r[k] for r in records])[:n_iter] for k in records[0]}
        cond_accept = np.concatenate([r["accept"] for r in records])[n_iter:n_iter + b.n_conditional]
        return {"carry": carry, "records": recs, "cond_accept": cond_accept, "compile_s": compile_s,
                "run_s": run_s, "interrupted": stopped}


def _adam(lr: float):
    return optax.adam(lr)


def _copy_groups(labels: list[str]) -> list[tuple[int, ...]]:
    """Random-effect components grouped by their label without the class suffix (`marginalised`'s
    ``<site>$class<k>`` copies, `unclassed`): singletons unless the model is a mixture."""
    groups: dict[str, list[int]] = {}
    for k, label in enumerate(labels):
        groups.setdefault(unclassed(label), []).append(k)
    return [tuple(ks) for ks in groups.values()]


def _safe_inverse(h: np.ndarray) -> np.ndarray:
    """A covariance from a curvature: eigenvalues floored (flat or concave directions get variance 1)."""
    h = 0.5 * (h + h.T)
    if not np.all(np.isfinite(h)):
        return np.eye(h.shape[0])
    vals, vecs = np.linalg.eigh(h)
    vals = np.where(vals > 1e-6, vals, 1.0)
    return (vecs / vals) @ vecs.T


def _positive_definite(a, floor: float = 1e-8):
    """Absolute eigenvalues, floored relative to the largest (saddle-free Newton)."""
    vals, vecs = jnp.linalg.eigh(0.5 * (a + a.T))
    vals = jnp.abs(vals)
    vals = jnp.maximum(vals, floor * jnp.maximum(jnp.max(vals), 1.0))
    return (vecs * vals) @ vecs.T
