"""Summaries of posterior draws shared by the Bayesian backends (NUTS, SVI).

A Bayesian backend hands over its draws ``{site: [chain, draw, ...]}`` of population and
random-effect sites (user scale); `summarise_draws` turns them into the `FitResult` fields that do
not depend on how the draws were made: population estimates (medians of the unconstrained draws
mapped back, so valid for any support), posterior SDs, EBEs (medians) and their posterior
covariance, PRED/IPRED, the theta vector and labels.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from ...model import Density
from .start import theta_labels

__all__ = ["summarise_draws", "unconstrain_draws"]


def unconstrain_draws(space, values: dict, lead: tuple) -> np.ndarray:
    """Unconstrain draws with leading axes ``lead`` (e.g. ``(chain, draw)``): ``[*lead, size]``."""
    if not space.sites:
        return np.zeros(lead + (0,))
    n = int(np.prod(lead))
    flat = jax.tree_util.tree_map(lambda v: jnp.reshape(jnp.asarray(v), (n,) + np.shape(v)[len(lead):]), values)
    out = jax.vmap(space.unconstrain)(flat)
    return np.asarray(out).reshape(lead + out.shape[1:])


def summarise_draws(model, pop, sites, samples: dict, fixed: dict, lead: tuple) -> dict:
    """`FitResult` keyword arguments computed from posterior draws ``[*lead, ...]``.

    Parameters
    ----------
    model, pop, sites
        The model, the population and its discovered sites.
    samples
        Draws of every free population site and every random-effect site, user scale.
    fixed
        Population sites held fixed ``{name: value}`` (broadcast over the draws).
    lead
        The sample axes, ``(n_chains, n_draws)``.

    Returns
    -------
    dict
        ``params``, ``se``, ``ebes``, ``ebe_cov``, ``ebe_converged``, ``pred``, ``ipred``,
        ``theta``, ``theta_names``, ``free``, ``n_params``, ``n_obs``, ``n_subjects``, ``ids``,
        ``times``, ``dv``, ``mask``, ``dvid``, ``outputs``, ``transforms``, ``fixed``, ``model``,
        ``pop`` and ``ofv``/``loglik``/``aic``/``bic`` (NaN: not defined for a posterior).
    """
    from ..laplace.finish import _ebe_table, _flat_values, _transforms, site_means

    density = Density(model, sites)
    theta_space, eta_space = density.theta_space, density.eta_space
    random = [s.name for s in sites.random_effects]

    pop_values = {}
    for s in sites.population:
        pop_values[s.name] = samples[s.name] if s.name in samples else jax.tree_util.tree_map(
            lambda x: np.broadcast_to(np.asarray(x, float), lead + np.shape(x)), fixed[s.name])
    theta_draws = unconstrain_draws(theta_space, pop_values, lead)
    theta = np.median(theta_draws.reshape(-1, theta_draws.shape[-1]), axis=0)
    params = {k: (np.asarray(v) if not isinstance(v, dict) else _flat_values({k: v}))
              for k, v in theta_space.constrain(jnp.asarray(theta)).items()}
    se = {k: (np.full(np.shape(params[k]), np.nan) if k in fixed else
              np.std(samples[k].reshape((-1,) + np.shape(params[k])), axis=0, ddof=1))
          for k in params}
    free = np.ones(theta.size, bool)
    for block in theta_space.blocks:
        if block.site.name in fixed:
            free[block.start:block.stop] = False

    n_subj = pop.n_subjects
    if random:
        eta_draws = unconstrain_draws(eta_space, {k: samples[k] for k in random}, lead)  # [*lead, subj, n_eta]
        eta_flat = eta_draws.reshape((-1,) + eta_draws.shape[len(lead):])
        eta = np.median(eta_flat, axis=0)
        centred = eta_flat - eta_flat.mean(axis=0)
        ebe_cov = np.einsum("nsi,nsj->sij", centred, centred) / max(eta_flat.shape[0] - 1, 1)
    else:
        eta = np.zeros((n_subj, 0))
        ebe_cov = np.zeros((n_subj, 0, 0))
    holder = types.SimpleNamespace(density=density, pop=pop)
    with numpyro.validation_enabled(False):
        pred = np.asarray(site_means(density, jnp.asarray(theta), jnp.zeros_like(jnp.asarray(eta)), pop))
        ipred = np.asarray(site_means(density, jnp.asarray(theta), jnp.asarray(eta), pop))
    return dict(
        params=params, se=se, ofv=np.nan, loglik=np.nan, aic=np.nan, bic=np.nan,
        n_obs=int((pop.mask & (pop.cens == 0)).sum()), n_params=int(free.sum()), n_subjects=n_subj,
        ebes=_ebe_table(holder, eta), ebe_cov=ebe_cov, ebe_converged=np.ones(n_subj, bool), ids=tuple(pop.ids),
        times=np.asarray(pop.times), dv=np.asarray(pop.dv), mask=np.asarray(pop.mask), dvid=np.asarray(pop.dvid),
        outputs=tuple(pop.outputs), pred=pred, ipred=ipred, theta=theta,
        theta_names=tuple(theta_labels(theta_space)), free=free, fixed=tuple(fixed),
        transforms=_transforms(density), model=model, pop=pop,
    )
