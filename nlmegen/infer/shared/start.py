"""Starting values and labels of the population parameters (shared by the backends)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.initialization import init_to_median

from ..._errors import ModelError

__all__ = ["initial_values", "theta_labels"]


def _check_names(kind: str, given: Mapping, population: list[str], random: list[str]) -> None:
    for name in given:
        if name in random:
            raise ModelError(f"{kind}: {name!r} is a random-effect site; {kind} takes population parameters "
                             f"{population}")
        if name not in population:
            raise ModelError(f"{kind}: {name!r} is not a population parameter of the model; population "
                             f"parameters: {population}")


def _as_value(name: str, value, shape: tuple):
    if isinstance(value, Mapping):  # pytree-valued param site (network weights)
        return jax.tree_util.tree_map(jnp.asarray, value)
    arr = jnp.asarray(value, dtype=float)
    try:
        return jnp.broadcast_to(arr, shape)
    except ValueError:
        raise ModelError(f"value of {name!r} has shape {arr.shape}; the site has shape {shape}") from None


def initial_values(model, pop, sites, init: Mapping | None, fixed: Mapping | None) -> tuple[dict, tuple]:
    """Starting values of every population parameter on the user's scale, and the fixed names.

    The default start of a sample site is the median of its prior (NumPyro's ``init_to_median``,
    101 draws with seed 0); a ``numpyro.param`` site starts at its own initial value. ``init``
    overrides starts; ``fixed`` holds sites at given values (and wins over ``init``).
    """
    init, fixed = dict(init or {}), dict(fixed or {})
    population = [s.name for s in sites.population]
    random = [s.name for s in sites.random_effects]
    _check_names("init", init, population, random)
    _check_names("fixed", fixed, population, random)
    seeded = handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_median(num_samples=101))
    with numpyro.validation_enabled(False):  # a NaN prediction is reported by the fit, not here
        tr = handlers.trace(seeded).get_trace(pop)
    values = {}
    improper = [s.name for s in sites.population if s.kind == "sample" and s.name not in fixed and
                s.name not in init and _is_improper(tr[s.name]["fn"])]
    if improper:
        raise ModelError(f"population parameter(s) {improper} have an improper prior (no median to start from, and "
                         "maximum likelihood ignores the prior anyway): give starting values with init={...}, e.g. "
                         f"init={{{improper[0]!r}: ...}}")
    for site in sites.population:
        given = fixed.get(site.name, init.get(site.name))
        values[site.name] = tr[site.name]["value"] if given is None else _as_value(site.name, given, site.shape)
    return values, tuple(n for n in population if n in fixed)


def _is_improper(fn) -> bool:
    """Whether a prior is `ImproperUniform` (possibly expanded or made independent): it has no median."""
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.ImproperUniform)


def theta_labels(space) -> list[str]:
    """One label per unconstrained element: ``name`` for scalar sites, ``name[i]`` otherwise."""
    labels = []
    for block in space.blocks:
        size = block.stop - block.start
        if size == 1 and block.leaf_shapes is None and tuple(block.site.shape) == ():
            labels.append(block.site.name)
        else:
            labels.extend(f"{block.site.name}[{i}]" for i in range(size))
    return labels


def starting_point(model, pop, sites, init: Mapping | None, fixed: Mapping | None):
    """The density, start values and free mask shared by the maximum-likelihood backends.

    Returns ``(density, values, fixed_names, theta0, labels, free)``: ``theta0`` the flat
    unconstrained start, ``free`` False on the elements of fixed sites. Raises `ModelError` naming
    any start value outside its site's support.
    """
    import numpy as np

    from ...model import Density

    density = Density(model, sites)
    values, fixed_names = initial_values(model, pop, sites, init, fixed)
    theta0 = np.asarray(density.theta_space.unconstrain(values), dtype=float)
    labels = theta_labels(density.theta_space)
    bad = [labels[i] for i in np.flatnonzero(~np.isfinite(theta0))]
    if bad:
        raise ModelError(f"initial value of {bad} is outside its site's support")
    free = np.ones(theta0.size, bool)
    for block in density.theta_space.blocks:
        if block.site.name in fixed_names:
            free[block.start:block.stop] = False
    return density, values, fixed_names, theta0, labels, free


def bayesian_inputs(name: str, uses_priors: str, sites, init: Mapping | None, fixed: Mapping | None):
    """Checked ``(init, fixed)`` for a Bayesian backend (NUTS, SVI), values on the sites' shapes.

    ``name`` and ``uses_priors`` (e.g. ``"samples sites with priors"``) word the errors: unknown
    or random-effect sites in ``init``/``fixed``, and ``numpyro.param`` sites (which have no
    prior) that are not held fixed.
    """
    population = [s.name for s in sites.population]
    random = [s.name for s in sites.random_effects]
    init, fixed = dict(init or {}), dict(fixed or {})
    _check_names("init", init, population, random)
    _check_names("fixed", fixed, population, random)
    params_sites = [s.name for s in sites.population if s.kind == "param" and s.name not in fixed]
    if params_sites:
        raise ModelError(f"{name} {uses_priors}; {params_sites} are numpyro.param sites (no prior): give them a "
                         "prior with numpyro.sample, or hold them with fixed={...}")
    shapes = {s.name: s.shape for s in sites.population}
    fixed = {k: _as_value(k, v, shapes[k]) for k, v in fixed.items()}
    init = {k: _as_value(k, v, shapes[k]) for k, v in init.items() if k not in fixed}
    return init, fixed
