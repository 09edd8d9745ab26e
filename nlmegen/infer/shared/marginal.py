"""Per-subject marginal log-likelihood ``log p(y_i | theta)`` at many population draws.

What leave-one-subject-out cross-validation needs (``log_likelihood`` variable ``subject`` of
`FitResult.to_arviz`): the random effects of subject ``i`` are integrated out, so leaving the
subject out removes its data *and* its random effects. The integral is the Laplace approximation
of FOCEI (Gaussian residuals) or of the exact-Hessian Laplace method otherwise, at each draw's
own EBEs (one batched Newton search per draw):

    log p(y_i | theta) ~ -(OFV_i(theta) + n_i log(2 pi)) / 2,

``OFV_i`` the subject's FOCEI/Laplace objective and ``n_i`` its uncensored observations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["subject_log_likelihood", "theta_of_draws", "unconstrained_ebes"]

LOG_2PI = math.log(2.0 * math.pi)


_CACHE: dict = {}  # compiled batch functions by (model, data structure and shapes, chunk)


def _objective(model, pop):
    import jax
    import jax.numpy as jnp

    from ..._errors import ModelError
    from ...model import Density, discover
    from ..laplace.backend import FOCEI, Laplace

    density = Density(model, discover(model, pop))
    for backend in (FOCEI(progress=False), Laplace(progress=False)):
        obj = backend.objective_for(density)
        try:
            theta = jnp.zeros(density.theta_space.size)
            eta = jnp.zeros((pop.n_subjects, obj.n_eta))
            jax.eval_shape(obj.subject_ofv, theta, eta, pop)
            return obj
        except ModelError:  # FOCEI needs Gaussian residuals
            continue
    raise ModelError("no Laplace approximation of the marginal likelihood applies to this model")


def _batch(model, pop, chunk: int):
    """``f(theta [chunk, p], eta0, pop) -> [chunk, subj]`` subject OFVs, compiled once per model and shape."""
    import jax

    key = (model, jax.tree_util.tree_structure(pop), tuple(x.shape for x in jax.tree_util.tree_leaves(pop)), chunk)
    if key not in _CACHE:
        obj = _objective(model, pop)

        def one(t, eta0, pop):
            state = obj.ebe(t, eta0, pop)
            return obj.subject_ofv(t, state.eta, pop)

        _CACHE[key] = jax.jit(jax.vmap(one, in_axes=(0, None, None)))
    return _CACHE[key]


def subject_log_likelihood(model, pop, theta: np.ndarray, eta_start: np.ndarray, *, chunk: int = 50) -> np.ndarray:
    """``[n, subj]`` marginal log-likelihood of each subject at each row of ``theta``.

    Parameters
    ----------
    model, pop
        The model and the data it was fitted to.
    theta
        ``[n, p]`` unconstrained population parameters (all of them, fixed ones included).
    eta_start
        ``[subj, n_eta]`` unconstrained start of every EBE search (the fit's EBEs).
    chunk
        Draws per vectorised call (the last chunk is padded: one compiled shape for any ``n``).
    """
    import jax.numpy as jnp
    import numpyro

    batch = _batch(model, pop, chunk)
    n_i = np.asarray((pop.mask & (pop.cens == 0)).sum(axis=1), dtype=float)
    eta0 = jnp.asarray(eta_start, dtype=float)
    theta = np.asarray(theta, dtype=float)
    n = theta.shape[0]
    out = np.empty((n, pop.n_subjects))
    with numpyro.validation_enabled(False):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            piece = theta[start:stop]
            if stop - start < chunk:
                piece = np.concatenate([piece, np.repeat(piece[-1:], chunk - (stop - start), 0)])
            out[start:stop] = np.asarray(batch(jnp.asarray(piece), eta0, pop))[: stop - start]
    return -0.5 * (out + n_i * LOG_2PI)


def unconstrained_ebes(fit: Any, sites: Any) -> np.ndarray:
    """``[subj, n_eta]`` EBEs of ``fit`` in the unconstrained random-effect space of ``sites``."""
    from ...model import ParameterSpace

    if fit.ebes.shape[1] == 0:
        return np.zeros((fit.n_subjects, 0))
    space = ParameterSpace(sites.random_effects, batch=True)
    ebe, cols, start = fit.ebes.to_numpy(dtype=float), {}, 0
    for block in space.blocks:
        k = int(np.prod(block.site.shape)) if block.site.shape else 1
        cols[block.site.name] = ebe[:, start:start + k].reshape((fit.n_subjects, *block.site.shape))
        start += k
    return np.asarray(space.unconstrain(cols))


def theta_of_draws(fit: Any, sites: Any, posterior: dict, n: int) -> np.ndarray:
    """``[n, p]`` unconstrained population parameters of ``n`` flat draws (``posterior[k]``:
    ``[chain, draw, ...]``; sites without draws, e.g. fixed ones, at ``fit.params``)."""
    import jax
    import jax.numpy as jnp

    from ...model import ParameterSpace

    space = ParameterSpace(sites.population, batch=False)
    values = {}
    for name, value in fit.params.items():
        if name in posterior:
            x = np.asarray(posterior[name], dtype=float)
            values[name] = jnp.asarray(x.reshape((n, *x.shape[2:])))
        else:
            values[name] = jnp.broadcast_to(jnp.asarray(value, dtype=float), (n, *np.shape(value)))
    return np.asarray(jax.vmap(space.unconstrain)(values))
