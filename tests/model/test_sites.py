"""Site discovery refuses the two idioms that would fit silently and wrongly (issue 18)."""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen
from nlmegen import ModelError
from nlmegen.model import discover


@pytest.fixture(scope="module")
def pop():
    frame = nlmegen.datasets.load("theo_sd")
    dropped = frame.drop(frame.index[frame["EVID"].eq(0)][[3, 20, 40, 70]])  # uneven subjects: padding
    return nlmegen.read_nonmem(dropped)


def _population():
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(1.0))
    sd = numpyro.sample("sd", dist.HalfNormal(1.0))
    return tcl, omega, sd


def raw_obs_model(pop):
    tcl, omega, sd = _population()
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega))
        conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta), v=30.0, ka=1.5)
        numpyro.sample("conc", dist.Normal(conc, sd).to_event(1), obs=pop.dv)


def eta_outside_plate_model(pop):
    tcl, omega, sd = _population()
    eta = numpyro.sample("eta", dist.Normal(0.0, omega).expand([pop.n_subjects]).to_event(1))
    with nlmegen.subjects(pop):
        conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta), v=30.0, ka=1.5)
        nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)


def test_padding_exists(pop):
    assert not bool(pop.mask.all())  # the dropped samples leave padded slots, the case that goes wrong


def test_raw_numpyro_observation_raises(pop):
    with pytest.raises(ModelError, match=r"'conc'.*numpyro.sample\(\.\.\., obs=\.\.\.\).*padded.*nlmegen.observe"):
        discover(raw_obs_model, pop)
    with pytest.raises(ModelError, match="nlmegen.observe"):  # and so does every fit, before any work
        nlmegen.fit(raw_obs_model, pop, progress=False)


def test_masked_raw_observation_is_accepted(pop):
    def masked(pop):
        tcl, omega, sd = _population()
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta), v=30.0, ka=1.5)
            numpyro.sample("conc", dist.Normal(conc, sd).mask(pop.mask).to_event(1), obs=pop.dv)

    assert [s.name for s in discover(masked, pop).observed] == ["conc"]


def test_per_subject_eta_outside_plate_raises(pop):
    """A 1-D real eta of the subject count (12) and a 2-D [subj, k] one both raise."""
    with pytest.raises(ModelError, match=r"'eta' has shape \(12,\).*outside the subject plate.*12 population"):
        discover(eta_outside_plate_model, pop)

    def two_d(pop):
        tcl, omega, sd = _population()
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).expand([pop.n_subjects, 2]).to_event(2))
        with nlmegen.subjects(pop):
            conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta[:, 0]), v=30.0, ka=jnp.exp(eta[:, 1]))
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)

    with pytest.raises(ModelError, match=r"'eta' has shape \(12, 2\)"):
        discover(two_d, pop)


def test_population_vector_of_subject_length_can_be_declared(pop):
    def tagged(pop):
        tcl, omega, sd = _population()
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([pop.n_subjects]).to_event(1),
                           infer={"nlmegen_population": True})
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta + w[0]), v=30.0, ka=1.5)
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)

    sites = discover(tagged, pop)
    assert [s.name for s in sites.population] == ["tcl", "omega", "sd", "w"]
    assert [s.name for s in sites.random_effects] == ["eta"]


def test_positive_vectors_and_short_populations_are_not_flagged(pop):
    """omega of length 3 with 3 subjects (positive: not a random effect) and a real 1-D vector whose
    length equals a small subject count are population parameters."""
    few = pop.subset(list(pop.ids[:3]))

    def model(pop):
        tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
        omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        sd = numpyro.sample("sd", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
            conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta[..., 1] + theta[0]), v=30.0, ka=1.5)
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)

    assert [s.name for s in discover(model, few).population] == ["tcl", "omega", "theta", "sd"]
