"""`simulate`: the generative use of a model — new random effects, new observations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from numpyro import handlers

from ._errors import ModelError
from .data import Population
from .model import discover, resample_observed

__all__ = ["simulate"]


def _check_params(params: Mapping[str, Any], sites) -> dict:
    names = {s.name for s in sites.population}
    missing = sorted(names - set(params))
    unknown = sorted(set(params) - names - {s.name for s in sites.random_effects})
    if missing:
        raise ModelError(f"simulate: no value for population parameter(s) {missing}")
    if unknown:
        raise ModelError(f"simulate: {unknown} are not population parameters or random effects of the model "
                         f"(population parameters: {sorted(names)})")
    return {k: jax.tree_util.tree_map(jnp.asarray, v) if isinstance(v, Mapping) else jnp.asarray(v, dtype=float)
            for k, v in params.items()}


def simulate(
    model,
    params: Mapping[str, Any],
    pop: Population,
    *,
    key: jax.Array,
    n: int = 1,
    noise: bool = True,
) -> pd.DataFrame:
    """Simulate ``n`` replicates of the population's observations from ``model``.

    New random effects are drawn from their distribution given the population parameters
    ``params`` (site name -> value on the model's scale; give a random-effect site too to hold it
    fixed). Observation sites declared with :func:`nlmegen.observe` are sampled (``noise=True``) or
    replaced by their mean, the prediction (``noise=False``).

    Returns
    -------
    pandas.DataFrame
        Tidy: ``replicate, ID, TIME, output, value``, one row per real observation record.

    Examples
    --------
    >>> import jax, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> theta = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": [0.6, 0.3, 0.1], "add_sd": 0.7}
    >>> sims = nlmegen.simulate(nlmegen.examples.theo_model, theta, pop, key=jax.random.key(0), n=2)
    >>> sims.shape
    (264, 5)
    """
    sites = discover(model, pop)
    values = _check_params(params, sites)
    names = [s.name for s in sites.observed]

    def one(k):
        conditioned = handlers.substitute(handlers.seed(resample_observed(model), k), data=values)
        tr = handlers.trace(conditioned).get_trace(pop)
        out = {}
        for name in names:
            site = tr[name]
            out[name] = site["value"] if noise else jnp.broadcast_to(site["fn"].mean, site["value"].shape)
        return out

    keys = jax.random.split(key, n)
    draws = jax.jit(jax.vmap(one))(keys)
    outputs = {s.name: s.output for s in sites.observed}
    return _tidy(pop, {k: np.asarray(v) for k, v in draws.items()}, outputs, n)


def _tidy(pop: Population, draws: dict, outputs: dict, n: int) -> pd.DataFrame:
    mask = np.asarray(pop.mask)
    dvid = np.asarray(pop.dvid)
    value = np.full((n, *mask.shape), np.nan)
    for name, idx in outputs.items():
        covered = mask if idx is None else mask & (dvid == idx)
        value = np.where(covered[None], draws[name], value)
    subj, obs = np.nonzero(mask)
    times = np.asarray(pop.times)[subj, obs]
    labels = np.asarray(pop.outputs, dtype=object)[dvid[subj, obs]]
    ids = np.asarray(pop.ids, dtype=object)[subj]
    frames = [pd.DataFrame({"replicate": r, "ID": ids, "TIME": times, "output": labels,
                            "value": value[r, subj, obs]}) for r in range(n)]
    return pd.concat(frames, ignore_index=True)
