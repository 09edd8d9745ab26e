"""Pointwise log-likelihood: ``log p(y_ij | eta_i, theta)`` for every observation and every draw.

This is what ArviZ's ``loo`` and ``waic`` need (the ``log_likelihood`` group of a DataTree): one
number per observation, not per subject. Censored records (M3) contribute their log CDF or log
survival, as in the fit.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ...model import Density

__all__ = ["pointwise_log_likelihood"]


def _elementwise(fn: dist.Distribution) -> dist.Distribution:
    """Drop ``to_event`` wrappers so ``log_prob`` gives one value per observation."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn


def _one_draw(density: Density, values: dict, pop) -> jax.Array:
    """``[subj, obs]`` log-likelihood of one draw (0 in padding)."""
    from ..laplace.objective import _unwrap

    tr = density.trace_values(values, pop)
    out = jnp.zeros(pop.dv.shape)
    for site in density.sites.observed:
        msg = tr[site.name]
        lp = jnp.broadcast_to(_elementwise(msg["fn"]).log_prob(msg["value"]), pop.dv.shape)
        _, mask = _unwrap(msg["fn"])
        covered = pop.mask if site.output is None else pop.mask & (pop.dvid == site.output)
        if mask is not None:
            covered = covered & jnp.broadcast_to(mask, pop.dv.shape)
        out = jnp.where(covered, lp, out)
    return out


def pointwise_log_likelihood(model, pop, draws: Mapping[str, np.ndarray], fixed: Mapping[str, np.ndarray],
                             lead: tuple[int, ...], *, chunk: int = 256) -> np.ndarray:
    """``[*lead, subj, obs]`` log-likelihood of each observation at each draw.

    Parameters
    ----------
    model, pop
        The model and the data it was fitted to.
    draws
        Constrained draws of the model's latent sites, each with leading axes ``lead`` (e.g.
        ``(chain, draw)``); random effects ``[*lead, subj, ...]``.
    fixed
        Values of population sites that have no draws (held fixed), without the leading axes.
    lead
        The leading (sample) axes shared by every entry of ``draws``.
    chunk
        Draws evaluated per vectorised call (bounds memory: ``chunk * subj * obs`` floats).
    """
    from ...model import discover

    density = Density(model, discover(model, pop))
    n = int(np.prod(lead))
    flat = {k: np.reshape(np.asarray(v), (n, *np.shape(v)[len(lead):])) for k, v in draws.items()}
    held = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in fixed.items() if k not in draws}

    @jax.jit
    def batch(values):
        return jax.vmap(lambda v: _one_draw(density, {**held, **v}, pop))(values)

    out = np.empty((n, *pop.dv.shape))
    with numpyro.validation_enabled(False):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            piece = {k: v[start:stop] for k, v in flat.items()}
            if stop - start < chunk and n > chunk:  # pad the last chunk: one compiled shape
                piece = {k: np.concatenate([v, np.repeat(v[-1:], chunk - (stop - start), 0)]) for k, v in piece.items()}
            out[start:stop] = np.asarray(batch(piece))[: stop - start]
    return out.reshape(*lead, *pop.dv.shape)
