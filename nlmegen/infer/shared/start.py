"""Starting values and labels of the population parameters (shared by the backends)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.initialization import init_to_median

from ..._errors import ModelError

__all__ = ["initial_values", "theta_labels"]


def _element(label: str) -> tuple[str, int] | None:
    """``"omega[2]"`` -> ``("omega", 2)``; None for a plain site name."""
    import re

    m = re.fullmatch(r"(.+)\[(\d+)\]", str(label))
    return (m.group(1), int(m.group(2))) if m else None


def split_elements(fixed: Mapping, sites) -> tuple[dict, dict]:
    """``fixed`` split into whole sites and single elements (``{"omega[2]": 0.1}``, NONMEM's FIX on
    one OMEGA), the latter checked: a known vector site, an index in range, and a site whose
    transform maps element by element (fixing one Cholesky entry of a correlation has no meaning)."""
    from numpyro.distributions.transforms import biject_to

    shapes = {s.name: s for s in sites.population}
    whole, elements = {}, {}
    for key, value in dict(fixed or {}).items():
        parsed = _element(key)
        if parsed is None or key in shapes:
            whole[key] = value
            continue
        name, index = parsed
        if name not in shapes:
            continue  # left for _check_names to report
        site = shapes[name]
        size = int(np.prod(site.shape)) if site.shape else 1
        if not site.shape or index >= size:
            raise ModelError(f"fixed: {key!r}: site {name!r} has shape {tuple(site.shape)}; elements are "
                             f"{name}[0] .. {name}[{size - 1}]" if site.shape else
                             f"fixed: {key!r}: site {name!r} is a scalar; fix it as {name!r}")
        if site.leaf_shapes is not None or tuple(biject_to(site.support).inverse_shape(site.shape)) != site.shape:
            raise ModelError(f"fixed: {key!r}: the elements of {name!r} are not separate parameters "
                             f"(support {site.support}); fix the whole site")
        if np.ndim(value) != 0:
            raise ModelError(f"fixed: {key!r} takes one number, not a value of shape {np.shape(value)}")
        elements[key] = (name, index, float(value))
    return whole, elements


def _check_names(kind: str, given: Mapping, population: list[str], random: list[str]) -> None:
    for name in given:
        parsed = _element(name)
        if parsed is not None and name not in population and parsed[0] in population:
            if kind == "fixed":
                continue
            raise ModelError(f"{kind}: {name!r}: give the whole site {parsed[0]!r} (single elements can be held "
                             "with fixed=)")
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
    overrides starts; ``fixed`` holds sites at given values (and wins over ``init``). A key
    ``"site[i]"`` of ``fixed`` holds one element of a vector site (see `split_elements`); the
    returned names then hold that label.
    """
    init = dict(init or {})
    population = [s.name for s in sites.population]
    random = [s.name for s in sites.random_effects]
    _check_names("init", init, population, random)
    _check_names("fixed", dict(fixed or {}), population, random)
    fixed, elements = split_elements(fixed, sites)
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
    for label, (name, index, value) in elements.items():
        if name in fixed:
            raise ModelError(f"fixed: {label!r} and {name!r} both given")
        flat = jnp.ravel(jnp.asarray(values[name], dtype=float)).at[index].set(value)
        values[name] = flat.reshape(jnp.shape(values[name]))
    return values, tuple(n for n in population if n in fixed) + tuple(elements)


def split_values(values: Mapping, fixed_names) -> tuple[dict, dict]:
    """``(init, fixed)`` that rebuild a problem at ``values`` with the same fixed sites and elements."""
    init = {k: v for k, v in values.items() if k not in fixed_names}
    fixed = {k: v for k, v in values.items() if k in fixed_names}
    for label in fixed_names:
        parsed = _element(label)
        if parsed is not None and label not in values and parsed[0] in values:
            fixed[label] = float(np.ravel(np.asarray(values[parsed[0]]))[parsed[1]])
    return init, fixed


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
    for label in fixed_names:
        parsed = _element(label)
        if parsed is not None and parsed[0] not in fixed_names and label not in density.theta_space.names:
            block = next(b for b in density.theta_space.blocks if b.site.name == parsed[0])
            free[block.start + parsed[1]] = False  # elementwise transform: element i is coordinate i
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
    singles = [k for k in fixed if _element(k) is not None and k not in population]
    if singles:
        raise ModelError(f"{name}: fixing single elements {singles} is supported by the maximum-likelihood "
                         "backends (FOCEI, SAEM, ...); here fix the whole site")
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
