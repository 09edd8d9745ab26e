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

__all__ = ["simulate", "simulate_arrays"]


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


def _resolve(model, params_or_fit, pop):
    """(model, population parameters, population) from a parameter dict or a `FitResult`."""
    if isinstance(params_or_fit, Mapping):
        if model is None or pop is None:
            raise ValueError("simulate with a parameter dict needs the model and the population")
        return model, dict(params_or_fit), pop
    fit = params_or_fit
    model = fit.model if model is None else model
    pop = fit.pop if pop is None else pop
    if model is None or pop is None:
        raise ValueError("this fit holds no model/population (a loaded fit?): pass model= and pop=")
    params = dict(fit.params)
    if fit.draws is None and any(isinstance(v, np.ndarray) and v.ndim and k.endswith("$params")
                                 for k, v in params.items()):
        raise ModelError("simulate from a fit with network weights: pass the weights as a pytree dict")
    return model, params, pop


def simulate_arrays(model, params: Mapping[str, Any], pop: Population, *, key: jax.Array, n: int = 1,
                    noise: bool = True) -> np.ndarray:
    """``[n, subj, obs]`` simulated observations (NaN at padding); see :func:`simulate`."""
    sites = discover(model, pop)
    values = _check_params(params, sites)
    names = [s.name for s in sites.observed]

    def one(k):
        conditioned = handlers.substitute(handlers.seed(resample_observed(model), k), data=values)
        tr = handlers.trace(conditioned).get_trace(pop)
        return {name: tr[name]["value"] if noise else jnp.broadcast_to(tr[name]["fn"].mean, tr[name]["value"].shape)
                for name in names}

    draws = jax.jit(jax.vmap(one))(jax.random.split(key, n))
    mask, dvid = np.asarray(pop.mask), np.asarray(pop.dvid)
    value = np.full((n, *mask.shape), np.nan)
    for site in sites.observed:
        covered = mask if site.output is None else mask & (dvid == site.output)
        value = np.where(covered[None], np.asarray(draws[site.name]), value)
    return value


def simulate(
    model,
    params_or_fit: Mapping[str, Any] | Any,
    pop: Population | None = None,
    *,
    key: jax.Array,
    n: int = 1,
    individual: bool = False,
    noise: bool = True,
) -> pd.DataFrame:
    """Simulate ``n`` replicates of the population's observations from ``model``.

    New random effects are drawn from their distribution given the population parameters
    (``params_or_fit``: a dict site name -> value on the model's scale, or a `FitResult`, whose
    model and population are used when ``model``/``pop`` are None). Give a random-effect site in
    the dict, or ``individual=True`` with a fit, to hold the random effects at given values (the
    EBEs). Observation sites declared with :func:`nlmegen.observe` are sampled (``noise=True``) or
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
    model, params, pop = _resolve(model, params_or_fit, pop)
    if individual:
        params.update(ebe_values(params_or_fit, pop, discover(model, pop).random_effects))
    value = simulate_arrays(model, params, pop, key=key, n=n, noise=noise)
    mask, dvid = np.asarray(pop.mask), np.asarray(pop.dvid)
    subj, obs = np.nonzero(mask)
    frames = [pd.DataFrame({"replicate": r, "ID": np.asarray(pop.ids, dtype=object)[subj],
                            "TIME": np.asarray(pop.times)[subj, obs],
                            "output": np.asarray(pop.outputs, dtype=object)[dvid[subj, obs]],
                            "value": value[r, subj, obs]}) for r in range(n)]
    return pd.concat(frames, ignore_index=True)


def ebe_values(fit, pop, random_effects) -> dict:
    """The fit's EBEs as values of the ``random_effects`` sites for ``pop``'s subjects (matched by ID)."""
    if isinstance(fit, Mapping):
        raise ValueError("individual=True needs a FitResult (its EBEs), not a parameter dict")
    missing = [sid for sid in pop.ids if sid not in fit.ebes.index]
    if missing:
        raise ModelError(f"individual=True: no EBEs for subject(s) {missing[:10]} in this fit")
    table = fit.ebes.loc[list(pop.ids)]
    out = {}
    for site in random_effects:
        columns = [c for c in table.columns if c == site.name or c.startswith(f"{site.name}[")]
        out[site.name] = table[columns].to_numpy(float).reshape((pop.n_subjects, *site.shape))
    return out
