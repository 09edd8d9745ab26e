"""Mixture models (NONMEM's ``$MIX``): each subject belongs to one of K sub-populations.

``z = nlmegen.mixture("pop", probs)`` inside the subject plate declares the subject's class, a
discrete latent site with mixing probabilities ``probs`` (``[K]``, or ``[n_subjects, K]`` when they
depend on covariates); the model then uses ``z`` (``[n_subjects]`` int) like any array, e.g.
``tcl = jnp.stack([tcl_1, tcl_2])[z]``. No backend samples the label by gradient-based methods; it
is summed out:

- FOCEI/FOCE/Laplace: NONMEM's approach (Users Guide VII, $MIX): each class's likelihood is
  Laplace-approximated at its own EBE and the subject's likelihood is ``sum_k p_k L_ik``.
- NUTS, SVI: `marginalised` turns the model into one without the discrete site, with one copy of
  the random effects per class and the subject likelihood ``sum_k p_k p(y_i | eta_ik, z = k)``, so
  HMC sees a continuous density (NUTS cannot sample discrete latents).
- SAEM: the same model, its E-step sampling every class's random effects; the M-step's Newton
  matrix is EM's, the class responsibilities held fixed (Lavielle & Mbogning 2014; see
  `marginalised`'s ``em_curvature``).

Simulation (`nlmegen.simulate`, VPC) draws each new subject's class from ``probs``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.primitives import Messenger

from ._observe import OBSERVE_TAG
from ._plate import SUBJECT_PLATE, subjects

__all__ = ["MIXTURE_TAG", "SOURCE_ATTR", "class_site", "class_values", "marginalised", "mixture", "typical_class",
           "unclassed"]

#: ``infer`` key of the site declared by `mixture`: the number of classes
MIXTURE_TAG = "nlmegen_mixture"


def mixture(name: str, probs: Any) -> jax.Array:
    """The subject's sub-population (class), ``[n_subjects]`` int in ``0 .. K-1``; use inside
    :func:`nlmegen.subjects`.

    ``probs`` are the mixing probabilities: ``[K]`` for all subjects, or ``[n_subjects, K]`` (e.g. a
    softmax of covariate effects); they must sum to 1. Fitting backends sum the class out (see the
    module docstring); ``fit.classes`` gives each subject's posterior probability per class.

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> def model(pop):
    ...     with nlmegen.subjects(pop):
    ...         return nlmegen.mixture("pop", jnp.array([0.3, 0.7]))
    >>> with numpyro.handlers.seed(rng_seed=0):
    ...     z = model(pop)
    >>> z.shape, int(z.max()) <= 1
    ((12,), True)
    """
    probs = jnp.asarray(probs)
    return numpyro.sample(name, dist.Categorical(probs=probs), infer={MIXTURE_TAG: int(probs.shape[-1])})


def _is_mixture(msg: dict) -> bool:
    return msg["type"] == "sample" and bool((msg.get("infer") or {}).get(MIXTURE_TAG))


class class_values(Messenger):  # noqa: N801  (NumPyro's handler naming)
    """Set every subject's class: ``classes`` an int (all subjects) or ``[n_subjects]`` ints."""

    def __init__(self, fn=None, classes: Any = 0):
        self.classes = classes
        super().__init__(fn)

    def process_message(self, msg):
        if _is_mixture(msg) and msg["value"] is None:
            shape = msg["fn"].batch_shape
            msg["value"] = jnp.broadcast_to(jnp.asarray(self.classes, dtype=jnp.int32), shape)


class typical_class(Messenger):  # noqa: N801
    """Set every subject's class to its most probable one a priori (for typical-value quantities)."""

    def process_message(self, msg):
        if _is_mixture(msg) and msg["value"] is None:
            fn = msg["fn"]
            while not hasattr(fn, "probs"):  # under the plate: an expanded (or masked) Categorical
                fn = fn.base_dist
            best = jnp.argmax(fn.probs, axis=-1)
            msg["value"] = jnp.broadcast_to(best, msg["fn"].batch_shape).astype(jnp.int32)


def class_site(name: str, k: int) -> str:
    """Name of random-effect site ``name``'s copy for class ``k`` in `marginalised` (class 0 keeps it)."""
    return name if k == 0 else f"{name}$class{k}"


def unclassed(label: str) -> str:
    """``label`` (a site name or an element label such as ``eta$class1[0]``) without `class_site`'s suffix."""
    return re.sub(r"\$class\d+", "", label)


def _in_subjects(msg: dict) -> bool:
    return SUBJECT_PLATE in [f.name for f in msg.get("cond_indep_stack", [])]


def _observed(msg: dict) -> bool:
    return msg["type"] == "sample" and bool((msg.get("infer") or {}).get(OBSERVE_TAG))


class _class_run(Messenger):  # noqa: N801
    """One class's run inside `marginalised`.

    The class site gets ``k``; observed sites (and the class site) are kept from the handlers outside
    (recorded by an inner trace); for ``k > 0`` the random-effect sites are renamed (`class_site`) so
    that the outside sees one more set of random effects, and every other site (population
    parameters, network weights, deterministic sites) takes its value from the first run and is
    kept from the outside too.
    """

    def __init__(self, fn=None, k: int = 0, shared: dict | None = None):
        self.k, self.shared = k, shared or {}
        super().__init__(fn)

    def process_message(self, msg):
        if _is_mixture(msg) or _observed(msg):
            msg["stop"] = True
            return
        if self.k == 0 or msg["type"] not in ("sample", "param", "deterministic"):
            return
        if msg["type"] == "sample" and _in_subjects(msg) and not msg.get("is_observed"):
            msg["name"] = class_site(msg["name"], self.k)  # the class's own random effects
            return
        if msg["name"] in self.shared:
            msg["value"] = self.shared[msg["name"]]
        msg["stop"] = True


def _subject_log_probs(trace: dict) -> jax.Array:
    """Sum of the observed subject-plate sites' log-probabilities and the class site's, per subject."""
    total = 0.0
    for site in trace.values():
        if site["type"] != "sample" or not _in_subjects(site) or not (_observed(site) or _is_mixture(site)):
            continue
        lp = site["fn"].log_prob(site["value"])
        if site.get("mask") is not None:
            lp = jnp.where(site["mask"], lp, 0.0)
        if site.get("scale") is not None:
            lp = site["scale"] * lp
        total = total + lp
    return total


#: attribute of a `marginalised` model: the user's model it sums the class out of
SOURCE_ATTR = "nlmegen_mixture_source"


def marginalised(model, n_classes: int, name: str, em_curvature: bool = False):
    """``model`` with the mixture site ``name`` summed out (see the module docstring).

    Each class gets its own copy of the subject's random effects, drawn from their distribution:
    ``p(y_i, eta_i0, .., eta_iK-1) = [sum_k p_ik p(y_i | eta_ik, z = k)] prod_k p(eta_ik | z = k)``,
    whose marginal in ``y_i`` is the mixture ``sum_k p_ik p(y_i | z = k)`` (the copies of the other
    classes integrate to 1). As in NONMEM's $MIX each class thus has its own random effects, and a
    sampler need not move one subject's random effects across classes (Lavielle & Mbogning,
    Stat Comput 2014;24:693-707, sample per-class conditional distributions for the same reason).
    The wrapped model runs ``model`` once per class (``k > 0``: random effects renamed
    ``<site>$class<k>``) and adds ``log sum_k p_ik p(y_i | eta_ik, z = k)`` as a factor in the
    subject plate.

    ``em_curvature`` (SAEM): the factor keeps its value and first derivatives, but its second
    derivatives are those of ``sum_k tau_ik log(p_ik p(y_i | eta_ik, z = k))`` with the class
    responsibilities ``tau_ik`` held fixed: the complete-data Hessian of EM with the class as missing
    data, computed exactly given the random effects (Lavielle & Mbogning 2014, section 3). The Hessian
    of the log-sum-exp itself adds the between-class spread of the scores, is not negative definite
    away from the optimum, and SAEM's Newton M-step collapsed to one class with it.
    """

    def wrapped(pop, *args, **kwargs):
        terms, shared = [], {}
        for k in range(n_classes):
            with _class_run(k=k, shared=shared), handlers.trace() as tr, class_values(classes=k):
                out = model(pop, *args, **kwargs)
            if k == 0:
                shared = {n: s["value"] for n, s in tr.items() if n not in (name,) and not s.get("is_observed")}
                first_out = out
            terms.append(_subject_log_probs(tr))
        with subjects(pop):
            numpyro.factor(f"{name}$marginal", _class_sum(jnp.stack(terms), em_curvature))
        return first_out

    setattr(wrapped, SOURCE_ATTR, model)
    return wrapped


def _class_sum(terms: jax.Array, em_curvature: bool) -> jax.Array:
    """``log sum_k exp(terms[k])`` per subject; with ``em_curvature`` the EM Hessian (see `marginalised`)."""
    total = jax.nn.logsumexp(terms, axis=0)
    if not em_curvature:
        return total
    tau = jax.lax.stop_gradient(jax.nn.softmax(terms, axis=0))
    linear = jnp.sum(tau * jnp.where(tau > 0, terms, 0.0), axis=0)  # (a class of probability 0 adds nothing)
    return linear + jax.lax.stop_gradient(total - linear)
