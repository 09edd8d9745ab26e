"""The joint-mode warm start of the conditional methods (Pumas' ``JointMAP``) for network weights.

Far from the optimum, a FOCEI iteration is expensive: every OFV evaluation runs an EBE search per
subject, and BFGS on network weights needs hundreds of them. The joint mode of the population
parameters and all subjects' random effects,

    max over (theta, eta_1..eta_N) of  sum_i [log p(y_i | eta_i, theta) + log p(eta_i | theta)],

needs no inner search: each L-BFGS step is one model run and one reverse-mode pass over all
subjects. With the random effects' distribution held at its start (its scale would collapse to 0
at the joint mode: the density of ``eta = 0`` grows without bound as ``omega -> 0``), this is a
penalised least-squares fit whose solution puts the network weights and the structural parameters
near the marginal optimum, and whose random effects are the EBEs at that point. FOCEI then starts
there. DeepPumas' documented workflow is the same two stages (``fit(..., JointMAP())`` then
``fit(..., FOCE())``, Pumas 2.x documentation, "Neural-embedded NLME"); the joint objective is the
h-likelihood of Lee & Nelder (J R Stat Soc B 1996;58:619-678).

The population parameters held fixed are the ones the observations do not depend on given ``eta``
(those of the random effects' distribution); they are found from the structure of the gradient at
the start (exactly zero), not from names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AUTO_JOINT_STEPS", "AUTO_MANY_PARAMS", "JointResult", "distribution_parameters", "has_network_weights",
           "joint_mode", "joint_steps"]

#: ``joint_steps="auto"``: L-BFGS steps of the joint-mode warm start for models with network weights
#: or more than `AUTO_MANY_PARAMS` free parameters (none otherwise).
AUTO_JOINT_STEPS = 500
AUTO_MANY_PARAMS = 32
#: ``joint_steps="auto"`` of the conditional methods for other models with ODE dynamics: there an OFV
#: evaluation costs an EBE search of ~10 sensitivity solves per subject, a joint step one plain solve
#: and its reverse pass. Measured on the 60-subject IDR fit from the priors' medians (FOCEI, 2 cores):
#: without it 79 evaluations and 69 s (BFGS wandered to ka = e^7.5 and drove omega_n to 1e-4, left by
#: a boundary restart); with 50 / 100 / 300 steps 28 / 30 / 31 evaluations and 28 / 31 / 41 s, the same
#: OFV (-814.9184).
AUTO_ODE_JOINT_STEPS = 100


def has_network_weights(density) -> bool:
    """Whether the model declares network weights (pytree-valued population sites, `nlmegen.nn`)."""
    return any(b.leaf_shapes is not None for b in density.theta_space.blocks)


def joint_steps(setting, density, free: np.ndarray, ode: bool = False) -> int:
    """The warm start's step budget for a backend's ``joint_steps`` setting (``"auto"`` or an int).

    ``ode``: the model has ODE dynamics and the backend is a conditional method (`AUTO_ODE_JOINT_STEPS`).
    """
    if setting == "auto":
        if not density.sites.n_eta:
            return 0
        if has_network_weights(density) or int(np.sum(free)) > AUTO_MANY_PARAMS:
            return AUTO_JOINT_STEPS
        return AUTO_ODE_JOINT_STEPS if ode else 0
    if not isinstance(setting, (int, np.integer)) or isinstance(setting, bool) or setting < 0:
        raise ValueError(f"joint_steps must be 'auto' or a non-negative integer, not {setting!r}")
    return int(setting) if density.sites.n_eta else 0


@dataclass
class JointResult:
    """The joint mode's free parameters (the fit's free vector), random effects and the run's record."""

    x: np.ndarray
    eta: jax.Array
    value: float  # -2 x the joint log density at the end
    steps: int
    seconds: float
    moved: list[str]  # the free parameters it moved (the others are the random effects' distribution)


def distribution_parameters(density, pop, theta0: np.ndarray, free: np.ndarray, x: np.ndarray,
                            eta: jax.Array) -> np.ndarray:
    """Which free parameters only the random effects' distribution uses (omega, correlations).

    The observations' log-likelihood given ``eta`` has a structurally zero gradient with respect to
    them (an exact 0.0 from reverse mode; any use, however weak, gives a non-zero float). The gradient
    comes from the joint-mode warm start's program (compiled once per model and shape).
    """
    compiled = _value_and_grad(density, pop, np.flatnonzero(free), use_map=False)
    return _held(compiled(jnp.asarray(x), jnp.asarray(eta), jnp.asarray(theta0), pop)[1])


def _held(grad_loglik) -> np.ndarray:
    """Free parameters with a structurally zero log-likelihood gradient (see `distribution_parameters`)."""
    return np.asarray(grad_loglik) == 0.0


def joint_mode(density, pop, theta0: np.ndarray, free: np.ndarray, x0: np.ndarray, eta0: jax.Array,
               labels: list[str], *, steps: int, use_map: bool, callback=None) -> JointResult:
    """L-BFGS (SciPy's L-BFGS-B, no bounds) on the joint mode, from ``x0`` and ``eta0``.

    ``density`` is the fit's `Density`; ``theta0`` the full parameter vector (fixed values in place),
    ``free`` its free mask and ``x0`` the free values. At most ``steps`` iterations. With
    ``use_map`` the population parameters' log prior is added (the fit's ``map=True``). One jitted
    value-and-gradient function (one trace of the model's reverse mode) serves every evaluation;
    a non-finite value is returned to the line search as a very large one (it then shortens the
    step), and the best point seen is kept.
    """
    from scipy.optimize import minimize

    start = time.perf_counter()
    theta_all = jnp.asarray(theta0)
    x0 = jnp.asarray(x0)
    eta0 = jnp.asarray(eta0)
    compiled = _value_and_grad(density, pop, np.flatnonzero(free), use_map)
    first = compiled(x0, eta0, theta_all, pop)
    # the parameters held: those the observations do not depend on given eta (`distribution_parameters`)
    moving = np.flatnonzero(~_held(first[1]))
    move_idx, k, shape = jnp.asarray(moving), moving.size, eta0.shape

    def value_and_grad(z):
        value, grad_ll, grad_rest, grad_eta = compiled(x0.at[move_idx].set(z[:k]), z[k:].reshape(shape),
                                                       theta_all, pop)
        return value, jnp.concatenate([(grad_ll + grad_rest)[move_idx], grad_eta.ravel()])

    best = {"value": np.inf, "z": None}
    count = {"n": 0}

    def fun(z):
        value, grad = value_and_grad(jnp.asarray(z))
        value, grad = float(value), np.asarray(grad, dtype=float)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            return 1e300, np.zeros_like(z)
        if value < best["value"]:
            best.update(value=value, z=np.array(z))
        return value, grad

    def report(z):
        count["n"] += 1
        if callback is not None:
            callback(count["n"], best["value"])

    z0 = np.concatenate([np.asarray(x0)[moving], np.asarray(eta0).ravel()])
    minimize(fun, z0, jac=True, method="L-BFGS-B", callback=report,
             options={"maxiter": steps, "maxcor": 20, "ftol": 1e-10, "gtol": 1e-6})
    if best["z"] is None:  # not finite anywhere: nothing moved
        return JointResult(np.asarray(x0), eta0, np.inf, count["n"], time.perf_counter() - start,
                           [labels[i] for i in moving])
    z = best["z"]
    x = np.array(x0.at[move_idx].set(z[:k]))
    return JointResult(x, jnp.asarray(z[k:].reshape(shape)), best["value"], count["n"],
                       time.perf_counter() - start, [labels[i] for i in moving])


#: The joint objective's compiled value-and-gradient functions, by model and problem shape (as the
#: conditional methods' `backend._CACHE`): a second fit of the same model in the process (bootstrap,
#: SCM, a refit) does not trace and compile it again (7 s of the 60-subject IDR fit).
_CACHE: dict = {}
_CACHE_SIZE = 8


def _value_and_grad(density, pop, free_idx: np.ndarray, use_map: bool):
    """``f(x, eta, theta_all, pop) -> (value, d/dx of the log-likelihood part, d/dx of the rest, d/d eta)``
    of -2 x the joint log density (``x`` the free parameters), jitted once per key. The first gradient
    alone tells which parameters the observations do not depend on (see `distribution_parameters`):
    the random effects' prior comes from a second model run without ODE solves (`no_dynamics`), so
    the two reverse passes cost one."""
    key = (density.model, density.classes is None, tuple(free_idx.tolist()), use_map,
           jax.tree_util.tree_structure(pop), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(pop)))
    if key in _CACHE:
        return _CACHE[key]
    from ...dynamics._sensitivity import no_dynamics

    free_j = jnp.asarray(free_idx)

    def theta_of(x, theta_all):
        return theta_all.at[free_j].set(x)

    @jax.jit
    def value_and_grad(x, eta, theta_all, pop):
        def loglik(x, eta):
            return -2.0 * jnp.sum(density.subject_terms(theta_of(x, theta_all), eta, pop)[0])

        def rest(x, eta):
            with no_dynamics():
                total = -2.0 * jnp.sum(density.subject_terms(theta_of(x, theta_all), eta, pop)[1])
            if use_map:
                total = total - 2.0 * density.log_prior(theta_of(x, theta_all), pop, jacobian=False)
            return total

        ll, (gx_ll, geta_ll) = jax.value_and_grad(loglik, argnums=(0, 1))(x, eta)
        other, (gx_rest, geta_rest) = jax.value_and_grad(rest, argnums=(0, 1))(x, eta)
        return ll + other, gx_ll, gx_rest, geta_ll + geta_rest

    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = value_and_grad
    return value_and_grad
