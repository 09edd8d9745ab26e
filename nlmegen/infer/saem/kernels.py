"""SAEM E-step kernels: per-subject MCMC on the random effects, all subjects (and chains) at once.

Each kernel is a pure ``step(key, state, logdensity) -> (state, info)`` in BlackJAX's style; the
SAEM loop owns the `lax.scan`. ``logdensity(eta) -> [subj]`` is the model's per-subject
``log p(y_i, eta_i | theta)``: subjects are conditionally independent, so one batched model
evaluation serves every subject's chain and the gradient of its sum gives every subject's own
gradient. Every subject has its own step size, adapted towards a target acceptance rate, and its
own proposal shape (a Cholesky factor of a running estimate of its conditional covariance), so a
subject whose posterior is narrow does not slow down one whose posterior is wide.

- ``rwm``: random-walk Metropolis, ``eta' = eta + s_i C_i z`` (Roberts & Rosenthal 2001).
- ``hmc``: Hamiltonian Monte Carlo with ``num_leapfrog`` steps in the whitened coordinates
  ``eta = C_i z`` (Neal 2011), step size ``s_i``.
- ``nuts``: the No-U-Turn sampler (NumPyro's ``hmc(..., algo="NUTS")`` kernels) run on each
  subject separately under `jax.vmap` (one subject's data at a time).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["KERNELS", "EState", "EInfo", "hmc_step", "rwm_step", "adapt", "TARGET_ACCEPT"]

KERNELS = ("rwm", "hmc", "nuts")
TARGET_ACCEPT = {"rwm": 0.3, "hmc": 0.8, "nuts": 0.8}


class EState(NamedTuple):
    """The chains of one SAEM E-step (one per subject, or ``[chain, subj, ...]`` under vmap).

    ``eta`` current random effects (unconstrained) ``[subj, d]``; ``logp`` their log density
    ``[subj]``; ``log_step`` per-subject log step size ``[subj]``; ``chol`` per-subject proposal
    shape ``[subj, d, d]``.
    """

    eta: Array
    logp: Array
    log_step: Array
    chol: Array


class EInfo(NamedTuple):
    """What one kernel step reports: per-subject acceptance probability ``[subj]``."""

    accept_prob: Array


def _safe(logp: Array) -> Array:
    return jnp.where(jnp.isnan(logp), -jnp.inf, logp)


def rwm_step(key: Array, state: EState, logdensity) -> tuple[EState, EInfo]:
    """One random-walk Metropolis step for every subject."""
    k1, k2 = jax.random.split(key)
    z = jax.random.normal(k1, state.eta.shape)
    prop = state.eta + jnp.exp(state.log_step)[:, None] * jnp.einsum("sij,sj->si", state.chol, z)
    logp_prop = _safe(logdensity(prop))
    log_ratio = logp_prop - state.logp
    accept_prob = jnp.where(jnp.isfinite(log_ratio), jnp.exp(jnp.minimum(log_ratio, 0.0)), 0.0)
    accept = jax.random.uniform(k2, accept_prob.shape) < accept_prob
    eta = jnp.where(accept[:, None], prop, state.eta)
    logp = jnp.where(accept, logp_prop, state.logp)
    return state._replace(eta=eta, logp=logp), EInfo(accept_prob)


def hmc_step(key: Array, state: EState, logdensity, num_leapfrog: int) -> tuple[EState, EInfo]:
    """One HMC transition (``num_leapfrog`` leapfrog steps) for every subject.

    Positions are whitened per subject, ``eta = C_i z``, so the identity mass matrix in ``z`` is
    the mass ``(C_i C_i')^-1`` in ``eta``; each subject integrates with its own step size.
    """
    k1, k2 = jax.random.split(key)
    chol = state.chol
    eps = jnp.exp(state.log_step)[:, None]

    def grad_z(eta):
        value, g = jax.value_and_grad(lambda e: jnp.sum(_safe(logdensity(e))))(eta)
        return jnp.einsum("sji,sj->si", chol, g)  # C' grad_eta

    def to_eta(eta, dz):
        return eta + jnp.einsum("sij,sj->si", chol, dz)

    p0 = jax.random.normal(k1, state.eta.shape)
    g0 = grad_z(state.eta)

    def leapfrog(carry, _):
        eta, p, g = carry
        p = p + 0.5 * eps * g
        eta = to_eta(eta, eps * p)
        g = grad_z(eta)
        p = p + 0.5 * eps * g
        return (eta, p, g), None

    (eta1, p1, _), _ = jax.lax.scan(leapfrog, (state.eta, p0, g0), None, length=num_leapfrog)
    logp1 = _safe(logdensity(eta1))
    log_ratio = (logp1 - 0.5 * jnp.sum(p1**2, -1)) - (state.logp - 0.5 * jnp.sum(p0**2, -1))
    accept_prob = jnp.where(jnp.isfinite(log_ratio), jnp.exp(jnp.minimum(log_ratio, 0.0)), 0.0)
    accept = jax.random.uniform(k2, accept_prob.shape) < accept_prob
    eta = jnp.where(accept[:, None], eta1, state.eta)
    logp = jnp.where(accept, logp1, state.logp)
    return state._replace(eta=eta, logp=logp), EInfo(accept_prob)


def nuts_step(key: Array, state: EState, logdensity_one, subject_data: Any, max_tree_depth: int,
              vmap=jax.vmap) -> tuple[EState, EInfo]:
    """One NUTS transition per subject: NumPyro's functional NUTS kernel vmapped over subjects.

    ``logdensity_one(eta_i, data_i) -> scalar`` is one subject's log density given its slice of
    the data; the per-subject step size is ``exp(log_step)`` and the inverse mass matrix
    ``C_i C_i'``. ``vmap`` maps a per-subject function over the subjects (a sharded map on
    several devices).
    """
    from numpyro.infer.hmc import hmc

    n = state.eta.shape[0]
    keys = jax.random.split(key, n)

    def one(k, eta, logp, log_step, chol, data):
        def potential(x):
            return -logdensity_one(x, data)

        init_kernel, sample_kernel = hmc(potential_fn=potential, algo="NUTS")
        inv_mass = chol @ chol.T
        hmc_state = init_kernel(eta, num_warmup=0, step_size=jnp.exp(log_step), inverse_mass_matrix=inv_mass,
                                adapt_step_size=False, adapt_mass_matrix=False, dense_mass=True,
                                max_tree_depth=max_tree_depth, rng_key=k)
        new = sample_kernel(hmc_state)
        return new.z, -new.potential_energy, new.mean_accept_prob

    eta, logp, accept_prob = vmap(one)(keys, state.eta, state.logp, state.log_step, state.chol, subject_data)
    logp = _safe(logp)
    return state._replace(eta=eta, logp=logp), EInfo(accept_prob)


def adapt(state: EState, accept_prob: Array, target: float, rate: Array) -> EState:
    """Robbins-Monro adaptation of each subject's log step size towards the target acceptance."""
    log_step = state.log_step + rate * (accept_prob - target)
    return state._replace(log_step=jnp.clip(log_step, -12.0, 3.0))
