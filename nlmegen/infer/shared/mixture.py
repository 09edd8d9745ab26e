"""Mixture models in NUTS, SVI and SAEM: fit the model with the class summed out.

These backends sample (NUTS, SAEM's E-step) or approximate (SVI) the continuous latent variables;
`nlmegen.model.marginalised` gives them the model with the subject's class summed out
(``p(y_i | eta_i) = sum_k p_ik p(y_i | eta_i, z = k)``). The result then gets back the user's model
(so `simulate` and `vpc` draw new classes) and ``classes``, each subject's posterior class
probabilities:

- ``p(z_i = k | y_i, eta_i0, .., eta_iK-1)`` averaged over posterior draws (Rao-Blackwellised: exact
  given the draws); for a result without draws, at the EBEs of each class's random effects.

The predictions (PRED, IPRED) are those of each subject's most probable class.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ...model import Density, discover, marginalised
from ...model._mixture import class_site
from ..laplace.finish import site_means
from ..laplace.mixture import class_table

__all__ = ["fit_mixture", "has_mixture"]

#: posterior draws used for the class probabilities of NUTS and SVI fits
CLASS_DRAWS = 200


def has_mixture(model, pop) -> bool:
    return bool(discover(model, pop).mixtures)


def fit_mixture(fit_fn, model, pop, em_curvature: bool = False, **kwargs):
    """``fit_fn(marginalised model, pop, **kwargs)``, then the result for the user's model
    (``em_curvature``: see `nlmegen.model.marginalised`)."""
    sites = discover(model, pop)
    site = sites.mixtures[0]
    result = fit_fn(marginalised(model, site.size, site.name, em_curvature=em_curvature), pop, **kwargs)
    density = Density(model, sites)
    theta_names = [s.name for s in sites.population]
    n_classes = site.size
    if result.draws is not None:
        probs = _draw_probabilities(density, pop, result.draws, result.params, theta_names)
    else:
        theta = density.theta_space.unconstrain({k: result.params[k] for k in theta_names})
        etas = [_class_eta(density, result, k) for k in range(n_classes)]
        probs = np.asarray(jax.jit(lambda t, e: _posterior(density, pop, t, e))(theta, etas))
    best = np.argmax(probs, axis=1)
    view = dataclasses.replace(density, classes=jnp.asarray(best))
    theta = view.theta_space.unconstrain({k: result.params[k] for k in theta_names})
    etas = np.stack([np.asarray(_class_eta(density, result, k)) for k in range(n_classes)], axis=1)
    eta = jnp.asarray(etas[np.arange(pop.n_subjects), best])  # each subject's most probable class
    means = jax.jit(lambda t, e: site_means(view, t, e, pop))
    pred, ipred = np.asarray(means(theta, jnp.zeros_like(eta))), np.asarray(means(theta, eta))
    return dataclasses.replace(result, model=model, pred=pred, ipred=ipred,
                               classes=class_table(density, pop, probs))


def _class_eta(density: Density, result, k: int):
    """Class ``k``'s random effects (unconstrained ``[subj, n_eta]``) from the result's EBE table."""
    values = {}
    for s in density.sites.random_effects:
        name = class_site(s.name, k)
        cols = [c for c in result.ebes.columns if c == name or c.startswith(name + "[")]
        arr = result.ebes[cols].to_numpy()
        values[s.name] = arr.reshape((arr.shape[0],) + tuple(s.shape))
    return density.eta_space.unconstrain(values)


def _posterior(density: Density, pop, theta, etas) -> jax.Array:
    """``p(z_i = k | y_i, eta_i0, .., eta_iK-1) ∝ p_ik p(y_i | eta_ik, z = k)``, ``[subj, K]``."""
    name = density.sites.mixtures[0].name
    terms = []
    for k, eta in enumerate(etas):
        part = dataclasses.replace(density, classes=k)
        tr = part.trace(theta, eta, pop)
        loglik, _ = part.terms_of_trace(tr, eta, pop)
        terms.append(loglik + tr[name]["fn"].log_prob(tr[name]["value"]))
    return jax.nn.softmax(jnp.stack(terms, axis=1), axis=1)


def _draw_probabilities(density: Density, pop, draws: dict, params: dict, theta_names: list[str]) -> np.ndarray:
    """Class probabilities averaged over (at most `CLASS_DRAWS`) posterior draws, ``[subj, K]``."""
    flat = {k: np.reshape(np.asarray(v), (-1,) + np.shape(v)[2:]) for k, v in draws.items()}
    n = next(iter(flat.values())).shape[0]
    index = np.linspace(0, n - 1, min(n, CLASS_DRAWS)).astype(int)
    n_classes = density.sites.mixtures[0].size
    random = [s.name for s in density.sites.random_effects]

    @jax.jit
    def one(theta_values, eta_values):
        theta = density.theta_space.unconstrain(theta_values)
        etas = [density.eta_space.unconstrain({r: eta_values[class_site(r, k)] for r in random})
                for k in range(n_classes)]
        return _posterior(density, pop, theta, etas)

    total = 0.0
    for i in index:
        theta_values = {k: jnp.asarray(flat[k][i] if k in flat else params[k]) for k in theta_names}  # fixed: held
        eta_values = {class_site(r, k): jnp.asarray(flat[class_site(r, k)][i]) for r in random
                      for k in range(n_classes)}
        total = total + np.asarray(one(theta_values, eta_values))
    return total / len(index)
