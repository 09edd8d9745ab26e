"""NUTS and SVI with the subject axis over several devices: the model's log joint density as a ``psum``.

Full Bayes samples (NUTS) or fits a guide over (SVI) the population sites and every subject's
random effects. The model's log joint density splits into one term per subject (the sites inside
the subject plate: observations and random effects) plus the population sites' terms, so

    log p(y, eta, theta) = log p(theta) + sum_i log p(y_i, eta_i | theta)

is computed with `jax.shard_map`: every device runs the model on its own block of subjects (their
random effects and data), masks the layout's padding, and one ``psum`` adds the blocks; the
population terms are taken from the first device only (every device computes the same ones), so
the sum and its reverse-mode gradient (the transpose of the ``psum``) count them once.

- NUTS: `ShardedNUTS` is NumPyro's NUTS with this potential energy (``-log density`` in
  unconstrained coordinates, with every site's log |Jacobian|) in place of NumPyro's; its
  initialisation, transforms and post-processing are NumPyro's own.
- SVI: `ShardedTraceELBO` is NumPyro's ``Trace_ELBO`` with the model's log density computed this
  way (the guide's log density is unchanged; the same random numbers, so the same ELBO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import random
from jax.sharding import PartitionSpec as P
from numpyro import handlers
from numpyro.infer import NUTS as _NumPyroNUTS
from numpyro.infer import Trace_ELBO
from numpyro.infer.elbo import compute_log_probs
from numpyro.infer.hmc import hmc

from ...model._density import _plates, _scaled, _site_log_prob
from ...model._plate import SUBJECT_PLATE
from ..shared.shard import AXIS, Layout, subject_cost, subject_mesh

__all__ = ["ShardedNUTS", "ShardedTraceELBO", "log_joint_terms", "sharded_log_joint"]


def log_joint_terms(model, pop, values: dict):
    """``(per_subject [subj], population scalar)``: the model's sample sites' log densities at the
    constrained ``values``, those inside the subject plate per subject, the others summed."""
    tr = handlers.trace(handlers.substitute(handlers.seed(model, 0), data=values)).get_trace(pop)
    n = pop.n_subjects
    per, other = jnp.zeros(n), jnp.zeros(())
    for site in tr.values():
        if site["type"] != "sample":
            continue
        if SUBJECT_PLATE in _plates(site):
            per = per + _site_log_prob(site, n)
        else:
            other = other + jnp.sum(_scaled(site, site["fn"].log_prob(site["value"])))
    return per, other


def sharded_log_joint(model, n_devices: int, subject_sites, transforms=None):
    """``f(values, pop) -> log p`` (all sample sites), the subjects split over ``n_devices`` devices.

    ``values`` holds the latent sites (``subject_sites``: those in the subject plate, leading
    subject axis; the others replicated). With ``transforms`` (site -> NumPyro transform from
    unconstrained to constrained) the values are unconstrained and each site's log |Jacobian| is
    added (NumPyro's potential energy is minus this).
    """
    mesh = subject_mesh(n_devices)
    subject_sites = frozenset(subject_sites)

    def local(shared, own, pop, real):
        values, ladj_own, ladj_shared = {}, jnp.zeros(pop.n_subjects), jnp.zeros(())
        for name, u in {**shared, **own}.items():
            if transforms is None or name not in transforms:
                values[name] = u
                continue
            values[name] = transforms[name](u)
            ladj = transforms[name].log_abs_det_jacobian(u, values[name])
            if name in own:
                ladj_own = ladj_own + jnp.sum(jnp.reshape(ladj, (pop.n_subjects, -1)), axis=1)
            else:
                ladj_shared = ladj_shared + jnp.sum(ladj)
        per, other = log_joint_terms(model, pop, values)
        first = jax.lax.axis_index(AXIS) == 0  # population terms once, not once per device
        mine = jnp.sum(jnp.where(real, per + ladj_own, 0.0)) + jnp.where(first, other + ladj_shared, 0.0)
        return jax.lax.psum(mine, AXIS)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P(),
                            check_vma=False)  # the model code is not written for varying-manual-axes types

    def log_joint(values, pop):
        layout = Layout.build(pop.n_subjects, n_devices, subject_cost(pop))
        own = {k: v for k, v in values.items() if k in subject_sites}
        shared = {k: v for k, v in values.items() if k not in subject_sites}
        return sharded(shared, layout.take(own), layout.take_pop(pop), layout.real)

    return log_joint


def subject_site_names(model, pop) -> frozenset:
    """Latent sample sites inside the subject plate (their values lead with the subject axis)."""
    names = []

    def run():
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(pop)
        names.extend(name for name, site in tr.items() if site["type"] == "sample" and not site["is_observed"]
                     and SUBJECT_PLATE in _plates(site))
        return ()

    jax.eval_shape(run)
    return frozenset(names)


class ShardedNUTS(_NumPyroNUTS):
    """NumPyro's NUTS whose potential energy splits the subjects over ``n_devices`` devices."""

    def __init__(self, model, n_devices: int, pop, **kwargs):
        super().__init__(model, **kwargs)
        self._n_devices = n_devices
        self._subject_sites = subject_site_names(model, pop)
        self._sharded = False

    def _init_state(self, rng_key, model_args, model_kwargs, init_params):
        init_params = super()._init_state(rng_key, model_args, model_kwargs, init_params)
        if not self._sharded:  # NumPyro's initialisation and transforms, then our potential in its place
            log_joint = sharded_log_joint(self._model, self._n_devices, self._subject_sites, self._inv_transforms)
            self._sharded_gen = lambda pop: (lambda z: -log_joint(z, pop))
            self._init_fn, self._sample_fn = hmc(potential_fn_gen=self._sharded_gen, kinetic_fn=self._kinetic_fn,
                                                 algo=self._algo)
            self._sharded = True
        self._potential_fn_gen = self._sharded_gen
        return init_params


class ShardedTraceELBO(Trace_ELBO):
    """``Trace_ELBO`` with the model's log density from `sharded_log_joint` (model sites fixed or
    latent; the model's own ``numpyro.param`` sites, e.g. the learned centring of `LocScaleReparam`,
    take their values from the parameters being fitted; no mutable sites)."""

    def __init__(self, model, n_devices: int, pop, num_particles: int = 1):
        super().__init__(num_particles=num_particles)
        self._log_joint = sharded_log_joint(model, n_devices, subject_site_names(model, pop))
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(pop)
        self._model_params = tuple(name for name, site in tr.items() if site["type"] == "param")

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def single_particle_elbo(key):
            _, guide_seed = random.split(key)  # Trace_ELBO's split: the same guide draws
            guide_log_probs, guide_trace = compute_log_probs(handlers.seed(guide, guide_seed), args, kwargs,
                                                             param_map)
            values = {name: site["value"] for name, site in guide_trace.items()
                      if site["type"] == "sample" and not site["is_observed"]}
            values.update({name: param_map[name] for name in self._model_params if name in param_map})
            return self._log_joint(values, *args) - sum(guide_log_probs.values(), start=jnp.array(0.0))

        if self.num_particles == 1:
            return {"loss": -single_particle_elbo(rng_key), "mutable_state": None}
        elbos = self.vectorize_particles_fn(single_particle_elbo, random.split(rng_key, self.num_particles))
        return {"loss": -jnp.mean(elbos), "mutable_state": None}
