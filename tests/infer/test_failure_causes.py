"""Numerical failures name their cause and the records (issue 18)."""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen


def theo_proportional(pop):
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    prop = numpyro.sample("prop", dist.HalfNormal(0.5))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta[..., 1]), v=jnp.exp(tv + eta[..., 2]),
                                  ka=jnp.exp(tka + eta[..., 0]))
        nlmegen.observe("conc", nlmegen.proportional(conc, prop), pop)


@pytest.fixture(scope="module")
def pop():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))  # every subject has a sample at TIME 0


@pytest.mark.parametrize("method", ["focei", "saem"])
def test_proportional_error_at_predose_records_is_named(pop, method):
    settings = {"key": jax.random.key(0), "n_explore": 10, "n_smooth": 10} if method == "saem" else {}
    fit = nlmegen.fit(theo_proportional, pop, method, progress=False, **settings)
    assert fit.status == "failed"
    assert "residual-error SD is 0 at 12 record(s) where the prediction is 0" in fit.message
    assert "ID 1 TIME 0" in fit.message and "pre-dose" in fit.message and "nlmegen.combined" in fit.message
    assert "eta" not in fit.shrinkage  # no 100% shrinkage reported from a failed fit


def test_explain_nonfinite_names_non_finite_predictions(pop):
    from nlmegen.infer.shared.diagnose import explain_nonfinite
    from nlmegen.model import Density, discover

    def nan_model(pop):
        sd = numpyro.sample("sd", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
            conc = jnp.where(pop.times > 20, jnp.nan, 1.0) + eta[:, None]
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)

    density = Density(nan_model, discover(nan_model, pop))
    text = explain_nonfinite(density, jnp.zeros(1), jnp.zeros((12, 1)), pop)
    assert "prediction is not finite at 12 record(s)" in text and "ID 1 TIME 24.37" in text
