"""Relation forms and `Relations`: centring, bounds, levels, and the factors a model sees."""

from __future__ import annotations

import _sim
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen
from nlmegen.covariates import Relation, Relations, categorical, exponential, linear, power


@pytest.fixture(scope="module")
def pop():
    return nlmegen.read_nonmem(_sim.population(12, seed=2))


def test_forms_are_one_at_their_centre():
    x = jnp.array([40.0, 70.0, 100.0])
    for f in (lambda: power(x, 70.0, 0.75), lambda: exponential(x, 70.0, 0.3), lambda: linear(x, 70.0, 0.01)):
        assert float(f()[1]) == pytest.approx(1.0)
    np.testing.assert_allclose(power(x, 70.0, 0.75), (np.asarray(x) / 70) ** 0.75)
    np.testing.assert_allclose(linear(x, 70.0, 0.01), [0.7, 1.0, 1.3])
    np.testing.assert_allclose(categorical(jnp.array([1, 2, 3]), jnp.array([0.1, -0.2]), (1, 2, 3), 2),
                               [np.exp(0.1), 1.0, np.exp(-0.2)])
    with pytest.raises(ValueError, match="2 non-reference levels"):
        categorical(jnp.array([1]), jnp.array([0.1]), (1, 2, 3), 2)


def test_resolve_takes_centres_bounds_and_levels_from_the_data(pop):
    wt = np.asarray(pop.covariates["WT"])
    sex = np.asarray(pop.covariates["SEX"])
    rel = Relations([Relation("cl", "WT", "linear"), Relation("v", "SEX", "categorical"),
                     Relation("cl", "AGE", "power", ref=40.0)]).resolve(pop)
    lin, cat, pw = rel.relations
    assert lin.ref == pytest.approx(np.median(wt))
    lo, hi = lin.bounds  # 1 + theta (x - ref) > 0 over the data at both bounds
    assert np.all(1 + lo * (wt - lin.ref) >= -1e-12) and np.all(1 + hi * (wt - lin.ref) >= -1e-12)
    assert min(1 + lo * (wt - lin.ref)) == pytest.approx(0.0, abs=1e-12)
    assert cat.levels == (0, 1) and cat.reference == int(np.bincount(sex.astype(int)).argmax())  # the most common
    assert pw.ref == 40.0 and [r.df for r in rel.relations] == [1, 1, 1]
    assert rel.sites == ("cl_WT", "v_SEX", "cl_AGE") and rel.parameters == ("cl", "v")
    assert rel.init() == {"cl_WT": 0.0, "v_SEX": pytest.approx(np.zeros(1)), "cl_AGE": 0.0}
    assert Relation("cl", "WT", "power", value=0.75).df == 0


def test_factors_inside_a_model(pop):
    rel = Relations([Relation("cl", "WT", "power")], parameters=["cl", "v"]).resolve(pop)

    def model(pop):
        f = rel.factors(pop)
        numpyro.deterministic("f_cl", f["cl"])
        numpyro.deterministic("f_v", jnp.asarray(f["v"]))
        with nlmegen.subjects(pop):
            numpyro.sample("eta", dist.Normal(0.0, 1.0))

    tr = numpyro.handlers.trace(numpyro.handlers.substitute(numpyro.handlers.seed(model, 0),
                                                            data={"cl_WT": 0.75})).get_trace(pop)
    wt = np.asarray(pop.covariates["WT"])
    np.testing.assert_allclose(tr["f_cl"]["value"], (wt / np.median(wt)) ** 0.75)
    assert float(tr["f_v"]["value"]) == 1.0
    sites = nlmegen.model.discover(model, pop)
    assert "cl_WT" in [s.name for s in sites.population]  # a population parameter, not a random effect


def test_errors_name_the_problem(pop):
    rel = Relations([Relation("cl", "WT")], parameters=["cl"]).resolve(pop)

    def inside(pop):
        with nlmegen.subjects(pop):
            rel.factors(pop)

    with pytest.raises(nlmegen.ModelError, match="inside nlmegen.subjects"):
        numpyro.handlers.seed(inside, 0)(pop)

    def typo(pop):
        rel.factors(pop)["V"]

    with pytest.raises(KeyError, match="no parameter 'V'"):
        numpyro.handlers.seed(typo, 0)(pop)
    with pytest.raises(nlmegen.ModelError, match="not resolved"):
        numpyro.handlers.seed(lambda p: Relations([Relation("cl", "WT")]).factors(p), 0)(pop)
    with pytest.raises(ValueError, match="form must be one of"):
        Relation("cl", "WT", "hockey-stick")
    with pytest.raises(ValueError, match="same site or parameter and covariate"):
        Relations([Relation("cl", "WT"), Relation("cl", "WT", "linear")])


def test_time_varying_covariates_enter_by_their_baseline():
    import pandas as pd

    rows = [dict(ID=i, TIME=t, AMT=100.0 if t == 0 else 0.0, EVID=int(t == 0), DV=1.0, WT=60.0 + 10 * i + t)
            for i in (1, 2) for t in (0.0, 1.0, 2.0)]
    pop = nlmegen.read_nonmem(pd.DataFrame(rows))
    assert np.asarray(pop.covariates["WT"]).ndim == 2  # varies within subjects
    np.testing.assert_allclose(nlmegen.covariates.baseline(pop, "WT"), [70.0, 80.0])
    assert Relation("cl", "WT").resolve(pop).ref == pytest.approx(75.0)
