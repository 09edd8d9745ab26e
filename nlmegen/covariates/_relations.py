"""Parameter-covariate relations a model can include or leave out: what SCM searches over.

A `Relation` is one covariate effect on one parameter (``("cl", "WT", "power")``); a `Relations`
is the set a model includes, plus the parameters that may carry relations. A model *factory* takes a
`Relations` and returns a model; inside the model ``rel.factors(pop)`` samples each included
relation's coefficient (a population site, outside the subject plate) and returns, per parameter,
the product of its factors (1 where it has none):

>>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist, nlmegen
>>> def make_model(rel):
...     def model(pop):
...         tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
...         f = rel.factors(pop)                       # before the subject plate
...         with nlmegen.subjects(pop):
...             cl = jnp.exp(tcl) * f["cl"]           # [subj]
...     return model
>>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin"))
>>> rel = nlmegen.covariates.Relations([nlmegen.covariates.Relation("cl", "wt", "power")], parameters=["cl", "v"])
>>> rel = rel.resolve(pop)  # centres (the median weight), bounds and levels from the data
>>> rel.relations[0].ref, rel.sites
(71.65, ('cl_wt',))

Each relation's coefficient is 0 for "no effect" (factor 1), so a model with a relation nests the
model without it, as the likelihood-ratio test needs; `Relations.init` gives those zeros as start
values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array

from .._errors import ModelError
from ..model._plate import SUBJECT_PLATE
from . import _forms

__all__ = ["FORMS", "Relation", "Relations"]

FORMS = ("power", "exponential", "linear", "categorical")


@dataclasses.dataclass(frozen=True)
class Relation:
    """One covariate effect ``factor(covariate)`` on the typical value of ``parameter``.

    Parameters
    ----------
    parameter
        The name the model uses (``f["cl"]``).
    covariate
        A covariate of the population (its baseline: the value on the subject's first record).
    form
        ``"power"``, ``"exponential"``, ``"linear"`` or ``"categorical"`` (see `nlmegen.covariates`).
    ref
        Centre of a continuous covariate (default: the median over subjects, PsN's choice).
    value
        A fixed coefficient (e.g. the allometric 0.75): the relation then has no site and no degree
        of freedom.
    levels, reference
        Categorical levels (default: those in the data) and the reference level (default: the most
        common, PsN's choice).
    bounds
        ``(low, high)`` of a linear coefficient (default: what keeps ``1 + theta (x - ref)`` positive
        over the data, PsN's bounds).
    name
        Name of the coefficient's sample site (default ``"<parameter>_<covariate>"``).
    """

    parameter: str
    covariate: str
    form: str = "power"
    ref: float | None = None
    value: float | None = None
    levels: tuple | None = None
    reference: Any = None
    bounds: tuple[float, float] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"relation {self.parameter}-{self.covariate}: form must be one of {FORMS}, "
                             f"not {self.form!r}")
        if self.form == "categorical" and self.value is not None:
            raise ValueError(f"relation {self.label}: a categorical relation cannot have a fixed value")

    @property
    def label(self) -> str:
        """``"cl-WT(power)"``: how reports name the relation."""
        return f"{self.parameter}-{self.covariate}({self.form})"

    @property
    def site(self) -> str:
        """Name of the coefficient's sample site: ``name``, by default ``"<parameter>_<covariate>"``."""
        return self.name or f"{self.parameter}_{self.covariate}"

    @property
    def df(self) -> int:
        """Estimated coefficients: 0 when fixed, one per non-reference level when categorical, else 1."""
        if self.value is not None:
            return 0
        if self.form == "categorical":
            return len(self.levels) - 1 if self.levels is not None else -1
        return 1

    def resolve(self, pop: Any) -> Relation:
        """This relation with its centre, levels, reference and bounds taken from ``pop`` where unset."""
        x = baseline(pop, self.covariate)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"relation {self.label}: covariate {self.covariate!r} has missing or infinite "
                             "baseline values")
        if self.form == "categorical":
            levels = self.levels or tuple(_plain(v) for v in np.unique(x))
            if len(levels) < 2:
                raise ValueError(f"relation {self.label}: covariate {self.covariate!r} has one level {levels}")
            reference = self.reference
            if reference is None:
                counts = [(int(np.sum(x == level)), -k) for k, level in enumerate(levels)]
                reference = levels[-max(counts)[1]]
            if reference not in levels:
                raise ValueError(f"relation {self.label}: reference {reference!r} is not one of {levels}")
            return dataclasses.replace(self, levels=levels, reference=reference)
        ref = float(np.median(x)) if self.ref is None else float(self.ref)
        if self.form == "power" and (ref <= 0 or np.any(x <= 0)):
            raise ValueError(f"relation {self.label}: a power relation needs a positive covariate and centre")
        bounds = self.bounds
        if self.form == "linear" and bounds is None:
            lo = -1.0 / (x.max() - ref) if x.max() > ref else -np.inf
            hi = 1.0 / (ref - x.min()) if x.min() < ref else np.inf
            bounds = (float(lo), float(hi))
        return dataclasses.replace(self, ref=ref, bounds=bounds)

    def factor(self, pop: Any) -> Array:
        """Sample the coefficient (a population site) and return the factor ``[subj]``."""
        missing = self.ref is None if self.form != "categorical" else self.levels is None
        if missing:
            raise ModelError(f"relation {self.label} is not resolved: call Relations.resolve(pop) on the "
                             "estimation population first (its centre must not change with the population)")
        x = jnp.asarray(baseline(pop, self.covariate))
        if self.form == "categorical":
            theta = numpyro.sample(self.site, dist.Normal(0.0, 1.0).expand([self.df]).to_event(1))
            return _forms.categorical(x, theta, self.levels, self.reference)
        theta = self.value if self.value is not None else numpyro.sample(self.site, self._prior())
        return getattr(_forms, self.form)(x, self.ref, theta)

    def _prior(self) -> dist.Distribution:
        if self.form == "linear" and self.bounds is not None and np.all(np.isfinite(self.bounds)):
            lo, hi = self.bounds
            return dist.Uniform(lo, hi)  # support (lo, hi): the ML backends optimise inside it
        return dist.Normal(0.0, 1.0)

    def init(self) -> dict[str, Any]:
        """Start value "no effect" (factor 1) of the coefficient: ``{site: 0}`` (none when fixed)."""
        if self.value is not None:
            return {}
        return {self.site: np.zeros(self.df) if self.form == "categorical" else 0.0}


@dataclasses.dataclass(frozen=True)
class Relations:
    """The relations a model includes, and the parameters that may carry one (``f[name]`` works for these).

    ``parameters`` defaults to the parameters of ``relations``; pass every parameter the model asks
    ``f`` for (SCM passes the parameters of all its candidates).
    """

    relations: tuple[Relation, ...] = ()
    parameters: tuple[str, ...] = ()

    def __init__(self, relations: Iterable[Relation] = (), parameters: Sequence[str] | None = None):
        rels = tuple(relations)
        for r in rels:
            if not isinstance(r, Relation):
                raise TypeError(f"Relations takes Relation objects, got {r!r}")
        sites = [r.site for r in rels] + [(r.parameter, r.covariate) for r in rels]
        twice = sorted({str(s) for s in sites if sites.count(s) > 1})
        if twice:
            raise ValueError(f"more than one relation of the same site or parameter and covariate: {twice}")
        params = tuple(dict.fromkeys([*(parameters or ()), *(r.parameter for r in rels)]))
        object.__setattr__(self, "relations", rels)
        object.__setattr__(self, "parameters", params)

    def resolve(self, pop: Any) -> Relations:
        """Every relation resolved on ``pop`` (see `Relation.resolve`)."""
        return Relations([r.resolve(pop) for r in self.relations], self.parameters)

    def with_relation(self, relation: Relation) -> Relations:
        """These relations and one more."""
        return Relations([*self.relations, relation], self.parameters)

    def without(self, relation: Relation) -> Relations:
        """These relations less one."""
        return Relations([r for r in self.relations if r != relation], self.parameters)

    @property
    def sites(self) -> tuple[str, ...]:
        """Sample sites of the estimated coefficients."""
        return tuple(r.site for r in self.relations if r.value is None)

    @property
    def label(self) -> str:
        """The included relations, ``"+"``-joined (``"base"`` when none)."""
        return " + ".join(r.label for r in self.relations) or "base"

    def init(self) -> dict[str, Any]:
        """Start values "no effect" of every coefficient (see `Relation.init`)."""
        out: dict[str, Any] = {}
        for r in self.relations:
            out.update(r.init())
        return out

    def factors(self, pop: Any) -> Mapping[str, Array]:
        """Sample the coefficients and return ``{parameter: factor [subj]}`` (1.0 without relations).

        Call it in the model *outside* `nlmegen.subjects` (the coefficients are population
        parameters).
        """
        if any(getattr(frame, "name", None) == SUBJECT_PLATE for frame in _plates()):
            raise ModelError("Relations.factors(pop) was called inside nlmegen.subjects(pop): call it before the "
                             "subject plate (its coefficients are population parameters, not random effects)")
        out: dict[str, Any] = {p: 1.0 for p in self.parameters}
        for r in self.relations:
            out[r.parameter] = out[r.parameter] * r.factor(pop)
        return _Factors(out)


class _Factors(dict):
    """``{parameter: factor}`` whose KeyError names the parameters there are."""

    def __missing__(self, name):
        raise KeyError(f"no parameter {name!r} among the relations' parameters {sorted(self)}; declare it with "
                       "Relations(..., parameters=[...])")


def baseline(pop: Any, name: str) -> np.ndarray | Array:
    """One value per subject: the covariate itself if constant, else its value on the first record."""
    try:
        values = pop.cov_values[name]
    except KeyError:
        raise KeyError(f"no covariate {name!r}; this population has covariates {sorted(pop.cov_values)}") from None
    constant = values.ndim == pop.cov_times.ndim - 1  # (as `Population.covariate_at` tells them apart)
    return values if constant else values[..., 0]


def _plain(v: Any) -> Any:
    v = np.asarray(v).item()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _plates() -> list:
    from numpyro.primitives import _PYRO_STACK

    return [m for m in _PYRO_STACK if isinstance(m, numpyro.plate)]
