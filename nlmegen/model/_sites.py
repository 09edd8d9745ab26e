"""Site discovery: which sites of a model are population parameters, random effects, observations.

One abstract trace of the model (under `jax.eval_shape`, so no dynamics are computed) is read the
way NumPyro's `infer.inspect.get_model_relations` does: a site's plates come from its
``cond_indep_stack``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_sample

from .._collect import ODE_SOLVES, collecting
from .._errors import ModelError
from ..data._covariates import reading, time_varying_hint
from ._mixture import MIXTURE_TAG
from ._observe import OBSERVE_TAG, OUTPUT_TAG, SUPPORT_TAG
from ._occasions import OCCASIONS_TAG
from ._plate import SUBJECT_PLATE

__all__ = ["POPULATION_TAG", "Site", "Sites", "discover"]

#: ``infer={POPULATION_TAG: True}`` on a latent site outside the subject plate whose leading axis
#: happens to equal the number of subjects says "this really is a population parameter"
POPULATION_TAG = "nlmegen_population"


@dataclass(frozen=True)
class Site:
    """One site of the model.

    ``shape`` is the value's full shape (population site) or its shape for one subject (random
    effect, observed); ``support`` is the constraint the value lives in; ``kind`` is ``"sample"``
    or ``"param"``; ``size`` the number of unconstrained scalars it contributes (per subject for
    random effects).
    """

    name: str
    shape: tuple
    support: Any
    kind: str = "sample"
    size: int = 0
    tree: Any = None  # pytree structure of a param site whose value is a pytree (e.g. NN weights)
    leaf_shapes: tuple | None = None  # shapes of that pytree's leaves
    output: int | None = None  # observed sites from nlmegen.observe: index of the output (None: all)
    value_support: Any = None  # observed sites from nlmegen.observe: where each DV must lie (uncensored)
    gaussian: bool = True  # random effects: False when drawn from a non-Gaussian distribution (nlmegen.flow)
    occasions: int = 0  # random effects drawn per occasion (nlmegen.occasions): the number of occasions


@dataclass(frozen=True)
class Sites:
    """The model's sites by role, in program order."""

    population: tuple[Site, ...]
    random_effects: tuple[Site, ...]
    observed: tuple[Site, ...]
    deterministic: tuple[str, ...]
    n_subjects: int
    mixtures: tuple[Site, ...] = ()  # sub-population sites (nlmegen.mixture); size = number of classes
    ode_solves: tuple[int, ...] = ()  # one entry per `nlmegen.ode.solve` call: its steady-state dose records

    @property
    def n_eta(self) -> int:
        """Number of unconstrained random-effect scalars per subject."""
        return sum(s.size for s in self.random_effects)

    @property
    def names(self) -> dict[str, str]:
        """Site name -> role ("population", "random_effect", "observed", "deterministic")."""
        out = {s.name: "population" for s in self.population}
        out.update({s.name: "random_effect" for s in self.random_effects})
        out.update({s.name: "observed" for s in self.observed})
        out.update(dict.fromkeys(self.deterministic, "deterministic"))
        out.update({s.name: "mixture" for s in self.mixtures})
        return out


def _abstract_trace(model, args, kwargs) -> dict:
    captured: dict = {}

    def run():
        traced = handlers.trace(handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_sample))
        tr = traced.get_trace(*args, **kwargs)
        captured.update(_static_view(tr))
        return ()

    jax.eval_shape(run)
    return captured


def _static_view(trace: dict) -> dict:
    """What discovery needs from each site, as plain Python (no tracers escape eval_shape)."""
    view = {}
    for name, site in trace.items():
        if site["type"] not in ("sample", "param", "deterministic"):
            continue
        value = site["value"]
        leaves, tree = jax.tree_util.tree_flatten(value)
        entry = {
            "type": site["type"],
            "shape": tuple(np.shape(value)) if len(leaves) == 1 and tree.num_nodes == 1 else None,
            "leaf_shapes": [tuple(np.shape(x)) for x in leaves],
            "tree": tree,
            "observed": bool(site.get("is_observed")),
            "plates": [(f.name, f.dim, f.size) for f in site.get("cond_indep_stack", [])],
            "tag": bool((site.get("infer") or {}).get(OBSERVE_TAG)),
            "output": (site.get("infer") or {}).get(OUTPUT_TAG),
            "masked": site.get("mask") is not None or _masked_fn(site.get("fn")),
            "population_tag": bool((site.get("infer") or {}).get(POPULATION_TAG)),
            "value_support": (site.get("infer") or {}).get(SUPPORT_TAG),
            "occasions": int((site.get("infer") or {}).get(OCCASIONS_TAG, 0)),
            "mixture": int((site.get("infer") or {}).get(MIXTURE_TAG, 0)),
        }
        if site["type"] == "sample":
            fn = site["fn"]
            entry["support"] = fn.support
            entry["event_shape"] = tuple(fn.event_shape)
            entry["gaussian"] = not _is_flow(fn)
        elif site["type"] == "param":
            entry["support"] = site["kwargs"].get("constraint", constraints.real)
        view[name] = entry
    return view


def discover(model, pop, *args, **kwargs) -> Sites:
    """Find the population parameters, random effects and observations of ``model(pop, ...)``.

    Raises
    ------
    ModelError
        Naming the site: an observed site outside the subject plate, a latent site in a plate nested
        inside the subject plate, a discrete latent site, a model without a subject plate, an
        observed ``[subj, obs]`` site written with ``numpyro.sample(..., obs=pop.dv)`` instead of
        `nlmegen.observe` (it would count the padding as data), or a latent site outside the
        subject plate whose leading axis has one value per subject (it would become that many
        fixed effects; tag a true population vector of that length with
        ``infer={"nlmegen_population": True}``).

    Examples
    --------
    >>> import nlmegen
    >>> from nlmegen.model import discover
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> sites = discover(nlmegen.examples.theo_model, pop)
    >>> [s.name for s in sites.random_effects], sites.n_eta
    (['eta'], 3)
    """
    with reading() as covariates_read, collecting(ODE_SOLVES) as solves:
        try:
            view = _abstract_trace(model, (pop, *args), kwargs)
        except (ValueError, TypeError) as err:  # name a time-varying covariate behind a shape error
            hint = None if isinstance(err, ModelError) else time_varying_hint(
                err, covariates_read, getattr(pop, "covariates", {}))
            if hint is None:
                raise
            raise ModelError(hint) from err
    population, random_effects, observed, deterministic, mixtures = [], [], [], [], []
    n_subj = pop.n_subjects
    # Bayesian networks (nlmegen.nn(..., prior=...)): numpyro names their weight sites "<name>/<path>"
    # beside a param site "<name>$params"; a weight matrix may have as many rows as there are subjects
    modules = {n[: -len("$params")] for n in view if n.endswith("$params")}
    # ... whose "$params" site is numpyro's record of the module's shapes, not used by the model
    sampled = {n.split("/")[0] for n, v in view.items() if v["type"] == "sample" and n.split("/")[0] in modules}
    for name, site in view.items():
        if site["type"] == "deterministic":
            deterministic.append(name)
            continue
        in_subject = [p for p in site["plates"] if p[0] == SUBJECT_PLATE]
        nested = [p for p in site["plates"] if p[0] != SUBJECT_PLATE and in_subject]
        if site["type"] == "param":
            if not site["leaf_shapes"] or name[: -len("$params")] in sampled:  # a Bayesian network's shapes
                continue
            size = int(sum(int(np.prod(s)) for s in site["leaf_shapes"]))
            population.append(Site(name, site["shape"] or (), site["support"], "param", size, site["tree"],
                                   tuple(site["leaf_shapes"])))
            continue
        if site["observed"]:
            if not in_subject:
                raise ModelError(f"observed site {name!r} is outside the subject plate; declare observations "
                                 "inside `with nlmegen.subjects(pop):` (nlmegen.observe)")
            _check_raw_observation(name, site, pop)
            observed.append(Site(name, site["shape"][1:] if site["shape"] else (), site["support"],
                                 output=site["output"], value_support=site["value_support"]))
            continue
        if site["mixture"] and not site["observed"]:
            if not in_subject:
                raise ModelError(f"mixture site {name!r} is outside the subject plate; declare a subject's class "
                                 "inside `with nlmegen.subjects(pop):`")
            if mixtures:
                raise ModelError(f"mixture sites {mixtures[0].name!r} and {name!r}: one mixture per model (combine "
                                 "them into one with the product of their classes)")
            mixtures.append(Site(name, (), site["support"], "sample", site["mixture"]))
            continue
        if site["support"].is_discrete:
            raise ModelError(f"latent site {name!r} is discrete; nlmegen needs continuous parameters and random "
                             "effects (marginalise it, or make it observed)")
        if in_subject:
            if nested:
                raise ModelError(f"random effect {name!r} is in plate {nested[0][0]!r} nested with the subject "
                                 "plate; give each subject's random effects as one vector site "
                                 "(e.g. dist.Normal(...).to_event(1)) instead")
            shape = _per_subject_shape(name, site["shape"], in_subject[0], n_subj)
            random_effects.append(Site(name, shape, site["support"], "sample", _unconstrained_size(site, shape),
                                       gaussian=site["gaussian"], occasions=site["occasions"]))
        elif site["occasions"]:
            raise ModelError(f"site {name!r} is inside nlmegen.occasions(pop) but outside the subject plate; "
                             "nest them: `with nlmegen.subjects(pop), nlmegen.occasions(pop):`")
        else:
            shape = site["shape"]
            if name.split("/")[0] not in modules:
                _check_per_subject_outside_plate(name, site, n_subj)
            population.append(Site(name, shape, site["support"], "sample", _unconstrained_size(site, shape)))
    if not random_effects and not any(SUBJECT_PLATE in [p[0] for p in s["plates"]] for s in view.values()):
        raise ModelError("the model has no subject plate; wrap random effects and observations in "
                         "`with nlmegen.subjects(pop):`")
    return Sites(tuple(population), tuple(random_effects), tuple(observed), tuple(deterministic), n_subj,
                 tuple(mixtures), tuple(int(c.n_ss) for c in solves))


def _masked_fn(fn: Any) -> bool:
    """Whether a distribution (under any ``Independent`` wrappers) carries a mask of its own."""
    import numpyro.distributions as dist

    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return isinstance(fn, dist.MaskedDistribution)


def _check_raw_observation(name: str, site: dict, pop) -> None:
    """An observed ``[subj, obs]`` site not declared by `nlmegen.observe` and not masked counts the
    padding slots of the event table as observations (DV = 0 there): a silently wrong likelihood."""
    shape, grid = site["shape"] or (), tuple(pop.dv.shape)
    if site["tag"] or site["masked"] or tuple(shape[:2]) != grid:
        return
    n_pad = int(np.size(pop.mask) - np.sum(np.asarray(pop.mask)))
    raise ModelError(
        f"observed site {name!r} was declared with numpyro.sample(..., obs=...) over the [subj, obs] grid "
        f"{grid}; that grid is padded ({n_pad} slots are not observations, and dose records, censoring and outputs "
        f"are not handled), so the likelihood would count them as data. Declare it with "
        f"nlmegen.observe({name!r}, distribution, pop) instead")


#: a 1-D real latent site outside the plate with one value per subject is flagged from this many
#: subjects on (below it, e.g. 3 subjects and 3 typical values, the coincidence is too likely)
MIN_SUBJECTS_1D = 8


def _real(support: Any) -> bool:
    """Real-valued support (random effects are; SDs and variances, positive, are not)."""
    while isinstance(support, constraints._IndependentConstraint):
        support = support.base_constraint
    return isinstance(support, (constraints._Real, constraints._RealVector))


def _check_per_subject_outside_plate(name: str, site: dict, n_subj: int) -> None:
    """A real-valued latent site outside the subject plate with one value per subject on its leading
    axis (2-D, or 1-D with at least `MIN_SUBJECTS_1D` subjects) is almost always a random effect
    written without the plate: it would become ``n_subj`` fixed effects."""
    shape = site["shape"]
    if site["population_tag"] or n_subj < 2 or not shape or shape[0] != n_subj or not _real(site["support"]):
        return
    if len(shape) == 1 and n_subj < MIN_SUBJECTS_1D:  # a short real vector may be a population vector
        return
    raise ModelError(
        f"latent site {name!r} has shape {shape} (one value per subject on its leading axis) but is sampled "
        f"outside the subject plate, so it would be estimated as {int(np.prod(shape))} population parameters "
        f"(fixed effects), not as random effects. Sample it inside `with nlmegen.subjects(pop):` with the "
        f"per-subject distribution (e.g. dist.Normal(0, omega).to_event(1)). If it really is a population "
        f"parameter of that length, pass infer={{{POPULATION_TAG!r}: True}} to numpyro.sample")


def _is_flow(fn) -> bool:
    """A distribution from `nlmegen.flow` (possibly expanded by the plate or masked)."""
    from ._flows import FlowDistribution

    while fn is not None:
        if isinstance(fn, FlowDistribution):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _per_subject_shape(name: str, shape: tuple | None, plate: tuple, n_subj: int) -> tuple:
    """Shape of one subject's value: the subject axis (plate dim -1 of the batch shape) comes first."""
    size = plate[2]
    if size != n_subj:
        raise ModelError(f"site {name!r}: subject plate has size {size} but the population has {n_subj} subjects")
    if not shape or shape[0] != n_subj:
        raise ModelError(f"site {name!r} has shape {shape}; expected the subject axis ({n_subj}) first "
                         "(use the subject plate's default dim=-1 and put per-subject vectors in the event shape)")
    return tuple(shape[1:])


def _unconstrained_size(site: dict, shape: tuple) -> int:
    from numpyro.distributions.transforms import biject_to

    transform = biject_to(site["support"])
    return int(np.prod(transform.inverse_shape(shape))) if shape else int(np.prod(transform.inverse_shape(())))
