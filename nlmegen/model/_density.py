"""The shared density: log p(y_i, eta_i | theta) per subject, in unconstrained coordinates.

Every backend goes through this module. Population parameters are one flat unconstrained vector
``theta`` (each site mapped by ``biject_to(site.support)``, NumPyro's convention); random effects
are an unconstrained matrix ``eta`` of shape ``[subj, n_eta]``. Because observations and random
effects live inside the subject plate, the joint log density splits into one term per subject:

    log p(y, eta | theta) = sum_i [ log p(y_i | eta_i, theta) + log p(eta_i | theta) + log|J_i| ],

where ``log|J_i|`` is the Jacobian of subject i's random-effect transform (zero for real-valued
random effects). The Hessian in ``eta`` is therefore block diagonal by subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from numpyro import handlers
from numpyro.distributions.transforms import biject_to

from .._errors import ModelError
from ._plate import SUBJECT_PLATE
from ._sites import Site, Sites

__all__ = ["Density", "ParameterSpace"]


@dataclass(frozen=True)
class _Block:
    """One site's slice of the flat unconstrained vector."""

    site: Site
    start: int
    stop: int
    inv_shape: tuple
    leaf_shapes: tuple | None  # pytree-valued param sites (e.g. NN weights): shapes of the leaves


@dataclass(frozen=True)
class ParameterSpace:
    """A flat unconstrained vector <-> a dict of constrained site values.

    With ``batch=True`` (random effects) the vector has a leading subject axis and each value
    ``[subj, *shape]``; otherwise (population parameters) it is one vector.
    """

    sites: tuple[Site, ...]
    batch: bool = False
    blocks: tuple[_Block, ...] = field(init=False)

    def __post_init__(self):
        blocks, start = [], 0
        for site in self.sites:
            if site.kind == "param" and site.tree is not None and site.tree.num_nodes > 1:
                leaves = site.leaf_shapes
                size = int(sum(int(np.prod(s)) for s in leaves))
                blocks.append(_Block(site, start, start + size, (size,), tuple(leaves)))
            else:
                inv = tuple(biject_to(site.support).inverse_shape(tuple(site.shape)))
                size = int(np.prod(inv))
                blocks.append(_Block(site, start, start + size, inv, None))
            start += size
        object.__setattr__(self, "blocks", tuple(blocks))

    @property
    def size(self) -> int:
        """Number of unconstrained scalars (per subject when ``batch``)."""
        return self.blocks[-1].stop if self.blocks else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def _lead(self, u: Array) -> tuple:
        """The subject axis of ``u`` when batched (random effects), else nothing."""
        return tuple(u.shape[:1]) if self.batch else ()

    def constrain(self, u: Array) -> dict[str, Any]:
        """Constrained values of every site from the unconstrained vector ``u``."""
        out = {}
        for b in self.blocks:
            piece = u[..., b.start:b.stop]
            if b.leaf_shapes is not None:
                out[b.site.name] = _unflatten_leaves(piece, b.site.tree, b.leaf_shapes)
            else:
                piece = piece.reshape(self._lead(u) + b.inv_shape)
                out[b.site.name] = biject_to(b.site.support)(piece)
        return out

    def unconstrain(self, values: dict[str, Any]) -> Array:
        """The unconstrained vector of constrained ``values`` (every site must be given)."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ModelError(f"no value given for site(s) {missing}")
        pieces = []
        for b in self.blocks:
            v = values[b.site.name]
            if b.leaf_shapes is not None:
                pieces.append(jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(v)]))
                continue
            v = jnp.asarray(v, dtype=float)
            target = self._lead(v) + tuple(b.site.shape)
            v = jnp.broadcast_to(v, target)
            u = biject_to(b.site.support).inv(v)
            pieces.append(u.reshape(target[: len(target) - len(b.site.shape)] + (-1,)))
        if not pieces:
            return jnp.zeros((0,))
        return jnp.concatenate(pieces, axis=-1)

    def log_abs_det_jacobian(self, u: Array) -> Array:
        """log|d constrained / d unconstrained|, summed per subject (``[subj]``) or in total."""
        total = jnp.zeros(self._lead(u))
        for b in self.blocks:
            if b.leaf_shapes is not None or b.site.kind == "param":
                continue
            piece = u[..., b.start:b.stop].reshape(self._lead(u) + b.inv_shape)
            transform = biject_to(b.site.support)
            ladj = transform.log_abs_det_jacobian(piece, transform(piece))
            total = total + jnp.sum(jnp.reshape(ladj, self._lead(u) + (-1,)), axis=-1)
        return total


def _unflatten_leaves(piece: Array, tree, shapes) -> Any:
    leaves, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        leaves.append(piece[start:start + n].reshape(shape))
        start += n
    return jax.tree_util.tree_unflatten(tree, leaves)


@dataclass(frozen=True)
class Density:
    """Per-subject joint log density of a model, for every backend.

    Parameters
    ----------
    model
        The NumPyro model, called as ``model(pop, *args, **kwargs)``.
    sites
        Its sites, from :func:`nlmegen.model.discover`.

    All methods take the population explicitly (so one compiled function serves any population of
    the same shape) and are pure: `jit`, `grad`, `vmap` and `hessian` apply.
    """

    model: Any
    sites: Sites
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    #: mixture models (`nlmegen.mixture`): every subject's class (an int or ``[subj]`` ints) in the
    #: traces; None: each subject's most probable class a priori (typical-value quantities)
    classes: Any = None

    @property
    def theta_space(self) -> ParameterSpace:
        """Population parameters (flat unconstrained vector)."""
        return ParameterSpace(self.sites.population, batch=False)

    @property
    def eta_space(self) -> ParameterSpace:
        """Random effects (``[subj, n_eta]`` unconstrained)."""
        return ParameterSpace(self.sites.random_effects, batch=True)

    def trace(self, theta: Array, eta: Array, pop) -> dict:
        """The model's trace with ``theta`` and ``eta`` (unconstrained) substituted."""
        values = {**self.theta_space.constrain(theta), **self.eta_space.constrain(eta)}
        return self.trace_values(values, pop)

    def trace_values(self, values: dict, pop) -> dict:
        """The model's trace with constrained site ``values`` substituted."""
        model = handlers.substitute(handlers.seed(self.model, 0), data=values)
        if self.sites.mixtures:
            from ._mixture import class_values, typical_class

            model = typical_class(model) if self.classes is None else class_values(model, classes=self.classes)
        return handlers.trace(model).get_trace(pop, *self.args, **self.kwargs)

    def subject_terms(self, theta: Array, eta: Array, pop) -> tuple[Array, Array]:
        """``(log p(y_i | eta_i, theta), log p(eta_i | theta) + log|J_i|)``, each ``[subj]``."""
        return self.terms_of_trace(self.trace(theta, eta, pop), eta, pop)

    def terms_of_trace(self, tr: dict, eta: Array, pop) -> tuple[Array, Array]:
        """`subject_terms` from a trace already computed (backends that also read the sites)."""
        loglik = jnp.zeros(pop.n_subjects)
        prior = self.eta_space.log_abs_det_jacobian(eta)
        for site in tr.values():
            if site["type"] != "sample" or SUBJECT_PLATE not in _plates(site):
                continue
            lp = _site_log_prob(site, pop.n_subjects)
            if site["is_observed"]:
                loglik = loglik + lp
            else:
                prior = prior + lp
        return loglik, prior

    def subject_log_joint(self, theta: Array, eta: Array, pop) -> Array:
        """log p(y_i, eta_i | theta) (+ Jacobian of eta's transform), ``[subj]``."""
        loglik, prior = self.subject_terms(theta, eta, pop)
        return loglik + prior

    def log_prior(self, theta: Array, pop, *, jacobian: bool = True) -> Array:
        """log p(theta) of the population sample sites (``numpyro.param`` sites have no prior).

        The model runs with its ODE solves replaced by zeros (`no_dynamics`): the prior does not
        depend on them, and a solve would cost a full model run (and cannot be differentiated in
        forward mode with diffrax's default adjoint).
        """
        from ..dynamics._sensitivity import no_dynamics

        with no_dynamics():
            tr = self.trace(theta, jnp.zeros((pop.n_subjects, self.eta_space.size)), pop)
        total = jnp.zeros(())
        for site in tr.values():
            if site["type"] == "sample" and not site["is_observed"] and SUBJECT_PLATE not in _plates(site):
                total = total + jnp.sum(_scaled(site, site["fn"].log_prob(site["value"])))
        if jacobian:
            total = total + self.theta_space.log_abs_det_jacobian(theta)
        return total

    def log_joint(self, theta: Array, eta: Array, pop) -> Array:
        """log p(y, eta, theta) in unconstrained coordinates (what full Bayes samples)."""
        return self.log_prior(theta, pop) + jnp.sum(self.subject_log_joint(theta, eta, pop))


def _plates(site: dict) -> list[str]:
    return [f.name for f in site.get("cond_indep_stack", [])]


def _scaled(site: dict, lp: Array) -> Array:
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    if site.get("scale") is not None:
        lp = site["scale"] * lp
    return lp


def _site_log_prob(site: dict, n_subjects: int) -> Array:
    """One number per subject: the site's log-probability over its subject-plate batch axis."""
    lp = _scaled(site, site["fn"].log_prob(site["value"]))
    lp = jnp.asarray(lp)
    if lp.ndim == 0:
        return jnp.broadcast_to(lp, (n_subjects,))
    if lp.ndim > 1:  # extra batch dims left of the subject axis are not supported by the contract
        raise ModelError(f"site {site['name']!r}: log-probability has batch shape {lp.shape}; inside the subject "
                         "plate a site must have one log-probability per subject")
    return jnp.broadcast_to(lp, (n_subjects,))
