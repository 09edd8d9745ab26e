"""`simulate`: the generative use of a model — new random effects, new observations.

Bayesian fits (a `FitResult` with posterior ``draws``, from NUTS, SVI, ...) are simulated with
their parameter uncertainty: replicate ``r`` takes the population parameters (and, with
``individual=True``, the random effects) of one posterior draw. `posterior_predictive` returns the
same simulations as an ArviZ ``posterior_predictive`` group, one simulated data set per draw.
"""

from __future__ import annotations

import functools
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

__all__ = ["draw_indices", "posterior_predictive", "simulate", "simulate_arrays"]


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


def model_values(fit) -> dict:
    """A fit's population parameters as the model takes them: network weights (``<name>$params``,
    kept flat in ``fit.params`` for tables) back in the pytree the model's `nlmegen.nn` declared."""
    params = dict(fit.params)
    flat = [k for k, v in params.items() if k.endswith("$params") and isinstance(v, np.ndarray)]
    if not flat or fit.model is None or fit.pop is None:
        return params
    from .model._density import _unflatten_leaves

    sites = {s.name: s for s in discover(fit.model, fit.pop).population}
    for k in flat:
        site = sites[k]
        if site.tree is not None and site.leaf_shapes is not None:
            params[k] = _unflatten_leaves(jnp.asarray(params[k]), site.tree, site.leaf_shapes)
    return params


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
    return model, model_values(fit), pop


@functools.lru_cache(maxsize=64)
def _runner(model, names: tuple[str, ...], noise: bool, batched: bool):
    """Jitted ``(values, keys, pop) -> {site: [n, subj, obs]}``, cached per model: the data and the
    parameter values are arguments, so new values or a second call with the same shapes do not
    recompile (a VPC and the NPDE simulations of one fit share one compilation)."""

    def one(values, k, pop):
        conditioned = handlers.substitute(handlers.seed(resample_observed(model), k), data=values)
        tr = handlers.trace(conditioned).get_trace(pop)
        return {name: tr[name]["value"] if noise else jnp.broadcast_to(tr[name]["fn"].mean, tr[name]["value"].shape)
                for name in names}

    return jax.jit(jax.vmap(one, in_axes=(0 if batched else None, 0, None)))


def _assemble(draws: dict, sites, pop) -> np.ndarray:
    mask, dvid = np.asarray(pop.mask), np.asarray(pop.dvid)
    n = next(iter(draws.values())).shape[0]
    value = np.full((n, *mask.shape), np.nan)
    for site in sites.observed:
        covered = mask if site.output is None else mask & (dvid == site.output)
        value = np.where(covered[None], np.asarray(draws[site.name]), value)
    return value


def simulate_arrays(model, params: Mapping[str, Any], pop: Population, *, key: jax.Array, n: int = 1,
                    noise: bool = True) -> np.ndarray:
    """``[n, subj, obs]`` simulated observations (NaN at padding); see :func:`simulate`."""
    sites = discover(model, pop)
    values = _check_params(params, sites)
    run = _runner(model, tuple(s.name for s in sites.observed), bool(noise), False)
    return _assemble(run(values, jax.random.split(key, n), pop), sites, pop)


def simulate_batched(model, values: Mapping[str, Any], pop: Population, *, key: jax.Array, noise: bool = True,
                     chunk: int = 1000) -> np.ndarray:
    """``[n, subj, obs]`` simulations, replicate ``r`` at ``values[site][r]`` (every leaf has a leading ``n``).

    Replicates are run ``chunk`` at a time (one compilation: the last chunk is padded).
    """
    sites = discover(model, pop)
    values = _check_params(values, sites)
    n = int(jax.tree_util.tree_leaves(values)[0].shape[0])
    run = _runner(model, tuple(s.name for s in sites.observed), bool(noise), True)
    keys = jax.random.split(key, n)
    size = min(chunk, n)
    parts = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        take = np.minimum(np.arange(start, start + size), stop - 1)  # pad the last chunk by repetition
        out = run(jax.tree_util.tree_map(lambda v, idx=take: v[idx], values), keys[take], pop)
        parts.append({k: np.asarray(v)[: stop - start] for k, v in out.items()})
    draws = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return _assemble(draws, sites, pop)


def draw_indices(total: int, n: int) -> np.ndarray:
    """Flat indices of the posterior draws used by ``n`` replicates out of ``total`` draws.

    Draws are flattened chain by chain (``[chain, draw] -> chain * n_draws + draw``). ``n <= total``:
    ``n`` evenly spaced draws (all of them when ``n == total``); ``n > total``: the draws in order,
    cycled.
    """
    if n <= total:
        return np.round(np.linspace(0, total - 1, n)).astype(np.int64)
    return np.arange(n, dtype=np.int64) % total


def _posterior_sites(fit, sites) -> dict[str, np.ndarray]:
    """``{site: [chain, draw, ...]}``: the draws of the model's population and random-effect sites."""
    names = {s.name for s in sites.population} | {s.name for s in sites.random_effects}
    return {k: np.asarray(v) for k, v in (fit.draws or {}).items() if k in names}


def _subject_positions(fit, pop) -> np.ndarray:
    positions = {sid: i for i, sid in enumerate(fit.ids)}
    missing = [sid for sid in pop.ids if sid not in positions]
    if missing:
        raise ModelError(f"individual=True: subject(s) {missing[:10]} are not in this fit")
    return np.asarray([positions[sid] for sid in pop.ids])


def _values_at_draws(fit, pop, sites, posterior: dict, lead: tuple, index: np.ndarray, individual: bool) -> dict:
    """Site values of the flat draws ``index`` (leading axis ``len(index)``); fixed sites broadcast.

    Population sites come from ``posterior`` (missing ones, e.g. fixed sites, from ``fit.params``);
    with ``individual`` the random effects too (missing ones: the fit's EBEs), reordered to
    ``pop``'s subjects by ID.
    """
    n = len(index)
    total = int(np.prod(lead))

    def pick(v):
        v = np.asarray(v)
        return v.reshape((total, *v.shape[len(lead):]))[index]

    def repeat(v):
        if isinstance(v, Mapping):
            return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), v)
        return np.broadcast_to(np.asarray(v, dtype=float), (n, *np.shape(v)))

    held = model_values(fit)  # network weights back in their pytree
    values = {s.name: pick(posterior[s.name]) if s.name in posterior else repeat(held[s.name])
              for s in sites.population}
    if individual:
        order = _subject_positions(fit, pop)
        ebes = None
        for s in sites.random_effects:
            if s.name in posterior:
                values[s.name] = pick(posterior[s.name])[:, order]
            else:
                ebes = ebe_values(fit, pop, sites.random_effects) if ebes is None else ebes
                values[s.name] = repeat(ebes[s.name])
    return values


def simulate(
    model,
    params_or_fit: Mapping[str, Any] | Any,
    pop: Population | None = None,
    *,
    key: jax.Array,
    n: int = 1,
    individual: bool = False,
    noise: bool = True,
    posterior: bool = True,
    as_arviz: bool = False,
    as_population: bool = False,
) -> pd.DataFrame | Any:
    """Simulate ``n`` replicates of the population's observations from ``model``.

    New random effects are drawn from their distribution given the population parameters
    (``params_or_fit``: a dict site name -> value on the model's scale, or a `FitResult`, whose
    model and population are used when ``model``/``pop`` are None). Give a random-effect site in
    the dict, or ``individual=True`` with a fit, to hold the random effects at given values (the
    EBEs). Observation sites declared with :func:`nlmegen.observe` are sampled (``noise=True``) or
    replaced by their mean, the prediction (``noise=False``).

    Bayesian fits (``fit.draws`` not None: NUTS, SVI, ...): with ``posterior=True`` (default)
    replicate ``r`` uses the population parameters of one posterior draw, and with
    ``individual=True`` that draw's random effects too (subjects matched by ID; EBEs for a
    random-effect site without draws). The draws are flattened chain by chain and ``n`` of them
    taken evenly spaced (:func:`draw_indices`; all draws in order when ``n`` is their number,
    cycled when ``n`` is larger). ``posterior=False`` simulates at the point estimates
    (``fit.params``, ``fit.ebes``) instead.

    ``as_population=True`` returns ``pop`` with the simulated values as its DV (a design from
    :func:`nlmegen.design` becomes a data set :func:`nlmegen.fit` takes; values below an LLOQ
    become censored records): one `Population` for ``n=1``, a list of ``n`` otherwise.

    ``as_arviz=True`` returns :func:`posterior_predictive` instead of the frame: an
    ``xarray.Dataset`` with ``DV`` of dims ``(chain, draw, obs)`` (for Bayesian fits one
    simulation per posterior draw, all draws, ``n`` unused; otherwise one chain of ``n``
    simulations at the estimates).

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
    >>> design = nlmegen.design(12, doses=nlmegen.regimen(320), times=[0.5, 1, 2, 4, 8, 12, 24])
    >>> study = nlmegen.simulate(nlmegen.examples.theo_model, theta, design, key=jax.random.key(1),
    ...                          as_population=True)
    >>> study.dv_missing is None, study.n_observations
    (True, 84)
    """
    if as_arviz and as_population:
        raise ValueError("simulate: ask for as_arviz or as_population, not both")
    if as_arviz:
        if isinstance(params_or_fit, Mapping):
            raise ValueError("as_arviz=True needs a FitResult (its posterior draws or estimates)")
        return posterior_predictive(params_or_fit, key=key, pop=pop, model=model, individual=individual,
                                    noise=noise, n=n, use_draws=posterior)
    value, pop = _simulate_values(model, params_or_fit, pop, key=key, n=n, individual=individual, noise=noise,
                                  posterior=posterior)
    if as_population:
        studies = [pop.with_dv(value[r]) for r in range(n)]
        return studies[0] if n == 1 else studies
    mask, dvid = np.asarray(pop.mask), np.asarray(pop.dvid)
    subj, obs = np.nonzero(mask)
    frames = [pd.DataFrame({"replicate": r, "ID": np.asarray(pop.ids, dtype=object)[subj],
                            "TIME": np.asarray(pop.times)[subj, obs],
                            "output": np.asarray(pop.outputs, dtype=object)[dvid[subj, obs]],
                            "value": value[r, subj, obs]}) for r in range(n)]
    return pd.concat(frames, ignore_index=True)


def _simulate_values(model, params_or_fit, pop, *, key, n, individual, noise, posterior=True):
    """``([n, subj, obs], pop)``: the arrays behind :func:`simulate` (posterior draws when the fit has them)."""
    model, params, pop = _resolve(model, params_or_fit, pop)
    fit = None if isinstance(params_or_fit, Mapping) else params_or_fit
    sites = discover(model, pop)
    draws = _posterior_sites(fit, sites) if (fit is not None and posterior) else {}
    if draws:
        lead = next(iter(draws.values())).shape[:2]
        index = draw_indices(int(np.prod(lead)), n)
        values = _values_at_draws(fit, pop, sites, draws, lead, index, individual)
        return simulate_batched(model, values, pop, key=key, noise=noise), pop
    if individual:
        params.update(ebe_values(params_or_fit, pop, sites.random_effects))
    return simulate_arrays(model, params, pop, key=key, n=n, noise=noise), pop


def posterior_predictive(
    fit,
    *,
    key: jax.Array,
    pop: Population | None = None,
    model: Any = None,
    individual: bool = True,
    noise: bool = True,
    draws: Mapping[str, Any] | None = None,
    n: int = 500,
    use_draws: bool = True,
) -> Any:
    """The ArviZ ``posterior_predictive`` group of a fit: one simulated data set per posterior draw.

    Parameters
    ----------
    fit
        A `FitResult` holding its model and population (or pass ``model`` / ``pop``).
    key
        PRNG key (one sub-key per draw).
    pop
        Population to simulate (default the fit's; ``individual=True`` needs its IDs in the fit).
    individual
        True (default, the usual posterior predictive check of the data): each draw's own random
        effects for the fitted subjects, ``y_rep ~ p(y | theta_s, eta_s)``; False: new random effects
        from ``p(eta | theta_s)`` (new subjects with the same design).
    noise
        Add residual error (False: the predictions ``f(theta_s, eta_s)``).
    draws
        ``{site: [chain, draw, ...]}`` to simulate from instead of ``fit.draws``: e.g. the
        ``posterior`` group of ``fit.to_arviz()`` for a maximum-likelihood fit (its
        asymptotic-normal draws), so that the two groups share ``(chain, draw)``. Population sites
        missing from it are taken at ``fit.params`` (fixed sites); random-effect sites, at the EBEs.
    n
        Maximum-likelihood fit without ``draws``: ``n`` simulations at the estimates (one chain).
    use_draws
        False: ignore ``fit.draws`` (simulate at the estimates as for a maximum-likelihood fit).

    Returns
    -------
    xarray.Dataset
        ``DV`` with dims ``(chain, draw, obs)``; ``obs`` enumerates the real observations subject
        by subject (padding dropped), with coordinates ``ID``, ``TIME`` and ``output``: the ``obs``
        dim of ``fit.to_arviz()``'s ``observed_data``. Attach it with
        ``dt["posterior_predictive"] = posterior_predictive(fit, key=key)``.
    """
    import xarray as xr

    model = fit.model if model is None else model
    pop = fit.pop if pop is None else pop
    if model is None or pop is None:
        raise ValueError("posterior_predictive needs the fit's model and population (pass model= and pop=)")
    sites = discover(model, pop)
    if draws is not None:
        source = {k: np.asarray(v) for k, v in draws.items()
                  if k in {s.name for s in sites.population} | {s.name for s in sites.random_effects}}
    else:
        source = _posterior_sites(fit, sites) if use_draws else {}
    if source:
        lead = tuple(next(iter(source.values())).shape[:2])
        total = int(np.prod(lead))
        values = _values_at_draws(fit, pop, sites, source, lead, np.arange(total), individual)
        sims = simulate_batched(model, values, pop, key=key, noise=noise)
    else:
        lead = (1, int(n))
        params = model_values(fit)
        if individual:
            params.update(ebe_values(fit, pop, sites.random_effects))
        sims = simulate_arrays(model, params, pop, key=key, n=int(n), noise=noise)
    mask = np.asarray(pop.mask)
    subj, obs = np.nonzero(mask)
    dv = sims[:, subj, obs].reshape((*lead, subj.size))
    coords = {"chain": np.arange(lead[0]), "draw": np.arange(lead[1]), "obs": np.arange(subj.size),
              "ID": ("obs", np.asarray(list(pop.ids))[subj]), "TIME": ("obs", np.asarray(pop.times)[subj, obs]),
              "output": ("obs", np.asarray(list(pop.outputs))[np.asarray(pop.dvid)[subj, obs]])}
    kind = "posterior draws" if source else "the point estimates"
    effects = "each draw's own random effects" if individual else "new random effects"
    error = "with residual error" if noise else "predictions (no residual error)"
    return xr.Dataset({"DV": (("chain", "draw", "obs"), dv)}, coords=coords,
                      attrs={"description": f"simulated observations at {kind}; {effects}; {error}"})


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
