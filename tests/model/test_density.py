"""Site discovery and the shared per-subject density, checked against NumPyro's own log density."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from numpyro.infer.util import potential_energy

import nlmegen
from nlmegen import ModelError
from nlmegen.model import Density, discover

THETA = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": jnp.array([0.6, 0.3, 0.1]), "add_sd": 0.7}


@pytest.fixture(scope="module")
def theo():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


def test_discovery_theo(theo):
    sites = discover(nlmegen.examples.theo_model, theo)
    assert [s.name for s in sites.population] == ["tka", "tcl", "tv", "omega", "add_sd"]
    assert [s.name for s in sites.random_effects] == ["eta"]
    assert sites.random_effects[0].shape == (3,) and sites.n_eta == 3
    assert [s.name for s in sites.observed] == ["conc"]
    assert sites.names["omega"] == "population"


def test_log_joint_equals_numpyro_potential_energy(theo):
    model = nlmegen.examples.theo_model
    density = Density(model, discover(model, theo))
    theta = density.theta_space.unconstrain(THETA)
    eta = jax.random.normal(jax.random.key(1), (12, 3)) * 0.2
    ours = density.log_joint(theta, eta, theo)
    unconstrained = {**{k: v for k, v in zip(["tka", "tcl", "tv"], theta[:3], strict=True)},
                     "omega": theta[3:6], "add_sd": theta[6], "eta": eta}
    ref = -potential_energy(model, (theo,), {}, unconstrained)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_subject_terms_by_hand(theo):
    model = nlmegen.examples.theo_model
    density = Density(model, discover(model, theo))
    theta = density.theta_space.unconstrain(THETA)
    eta = jnp.full((12, 3), 0.1)
    loglik, prior = jax.jit(density.subject_terms)(theta, eta, theo)
    conc = nlmegen.pk.one_cmt(theo, ka=jnp.exp(0.55), cl=jnp.exp(1.1), v=jnp.exp(3.55))
    resid = np.where(theo.mask, theo.dv - conc, 0.0)
    by_hand = np.sum(np.where(theo.mask, -0.5 * np.log(2 * np.pi * 0.49) - resid**2 / (2 * 0.49), 0.0), axis=1)
    np.testing.assert_allclose(loglik, by_hand, rtol=1e-10)
    eta_prior = dist.Normal(0.0, THETA["omega"]).log_prob(eta).sum(-1)
    np.testing.assert_allclose(prior, eta_prior, rtol=1e-12)


def test_subjects_are_independent(theo):
    """Changing one subject's eta changes only that subject's term (block-diagonal Hessian)."""
    model = nlmegen.examples.theo_model
    density = Density(model, discover(model, theo))
    theta = density.theta_space.unconstrain(THETA)
    eta = jnp.zeros((12, 3))
    base = density.subject_log_joint(theta, eta, theo)
    moved = density.subject_log_joint(theta, eta.at[4].set(0.3), theo)
    changed = np.flatnonzero(~np.isclose(base, moved))
    assert changed.tolist() == [4]


def test_space_round_trip_and_jacobian(theo):
    sites = discover(nlmegen.examples.theo_model, theo)
    space = Density(nlmegen.examples.theo_model, sites).theta_space
    u = space.unconstrain(THETA)
    back = space.constrain(u)
    for k, v in THETA.items():
        np.testing.assert_allclose(back[k], v)
    # positive sites are exp-transformed: log|J| = sum of the unconstrained values of those sites
    np.testing.assert_allclose(space.log_abs_det_jacobian(u), jnp.sum(u[3:]))
    with pytest.raises(ModelError, match="add_sd"):
        space.unconstrain({k: v for k, v in THETA.items() if k != "add_sd"})


def test_positive_random_effects_get_their_jacobian(theo):
    def model(pop):
        cl = numpyro.sample("cl", dist.LogNormal(1.0, 0.5))
        with nlmegen.subjects(pop):
            k = numpyro.sample("k", dist.LogNormal(jnp.log(cl / 30.0), 0.3))
            pred = 300.0 / 30.0 * jnp.exp(-k[:, None] * pop.times)
            nlmegen.observe("y", dist.Normal(pred, 1.0), pop)

    density = Density(model, discover(model, theo))
    eta = jnp.full((12, 1), -2.0)
    theta = jnp.array([0.5])
    ours = density.log_joint(theta, eta, theo)
    ref = -potential_energy(model, (theo,), {}, {"cl": theta[0], "k": eta[:, 0]})
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_param_sites_and_nn_weights_are_population_parameters(theo):
    from flax import nnx

    net = nnx.Linear(1, 1, rngs=nnx.Rngs(0))

    def model(pop):
        scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
        f = nlmegen.nn("net", net)
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
            pred = f(pop.times[..., None])[..., 0] + eta[:, None]
            nlmegen.observe("y", dist.Normal(pred, scale), pop)

    sites = discover(model, theo)
    assert [(s.name, s.kind) for s in sites.population] == [("scale", "param"), ("net$params", "param")]
    density = Density(model, sites)
    assert density.theta_space.size == 1 + 2  # scale + kernel (1x1) + bias (1)
    theta = jnp.array([0.0, 0.5, 0.1])
    values = density.theta_space.constrain(theta)
    assert float(values["scale"]) == pytest.approx(1.0)
    lp = density.subject_log_joint(theta, jnp.zeros((12, 1)), theo)
    grads = jax.grad(lambda t: density.subject_log_joint(t, jnp.zeros((12, 1)), theo).sum())(theta)
    assert lp.shape == (12,) and np.all(np.isfinite(grads)) and np.all(grads != 0)


def test_observed_site_outside_plate_is_an_error(theo):
    def model(pop):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu, 1.0).expand(pop.dv.shape).to_event(2), obs=pop.dv)

    with pytest.raises(ModelError, match="'y'.*outside the subject plate"):
        discover(model, theo)


def test_discrete_latent_site_is_an_error(theo):
    def model(pop):
        with nlmegen.subjects(pop):
            numpyro.sample("group", dist.Bernoulli(0.5))

    with pytest.raises(ModelError, match="'group'.*discrete"):
        discover(model, theo)


def test_nested_plate_random_effect_is_an_error(theo):
    def model(pop):
        with nlmegen.subjects(pop):
            with numpyro.plate("occasion", 2, dim=-2):
                numpyro.sample("iov", dist.Normal(0, 1))

    with pytest.raises(ModelError, match="'iov'.*nested"):
        discover(model, theo)


def test_model_without_subject_plate_is_an_error(theo):
    def model(pop):
        numpyro.sample("mu", dist.Normal(0, 1))

    with pytest.raises(ModelError, match="no subject plate"):
        discover(model, theo)


def test_observe_needs_output_for_multi_output_data():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin"))

    def model(pop):
        with nlmegen.subjects(pop):
            nlmegen.observe("y", dist.Normal(jnp.zeros(pop.dv.shape), 1.0), pop)

    with pytest.raises(ModelError, match="outputs \\['cp', 'pca'\\]"):
        discover(model, pop)


def test_observe_masks_outputs_and_padding():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin"))

    def model(pop):
        with nlmegen.subjects(pop):
            nlmegen.observe("cp", dist.Normal(jnp.zeros(pop.dv.shape), 1.0), pop, output="cp")

    density = Density(model, discover(model, pop))
    loglik, _ = density.subject_terms(jnp.zeros(0), jnp.zeros((pop.n_subjects, 0)), pop)
    sel = np.asarray(pop.mask & (pop.dvid == 0))
    by_hand = np.where(sel, dist.Normal(0.0, 1.0).log_prob(pop.dv), 0.0).sum(1)
    np.testing.assert_allclose(loglik, by_hand, rtol=1e-12)


def test_m3_censoring_uses_the_cdf():
    df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [1.0, 2.0, 3.0], "DV": [2.0, 0.5, 9.0], "CENS": [0, 1, -1]})
    pop = nlmegen.read_nonmem(df)

    def model(pop):
        with nlmegen.subjects(pop):
            nlmegen.observe("y", dist.Normal(jnp.full(pop.dv.shape, 1.0), 2.0), pop)

    density = Density(model, discover(model, pop))
    loglik, _ = density.subject_terms(jnp.zeros(0), jnp.zeros((1, 0)), pop)
    normal = dist.Normal(1.0, 2.0)
    expected = normal.log_prob(2.0) + jnp.log(normal.cdf(0.5)) + jnp.log1p(-normal.cdf(9.0))
    np.testing.assert_allclose(loglik[0], expected, rtol=1e-12)
    # with the population a jit argument (as every fit passes it) the reader's static "censoring"
    # feature keeps the M3 path; a table without censored records leaves it out, same values
    assert "censoring" in pop.features
    jitted = jax.jit(lambda p: density.subject_terms(jnp.zeros(0), jnp.zeros((1, 0)), p)[0])
    np.testing.assert_allclose(jitted(pop)[0], expected, rtol=1e-12)
    plain = nlmegen.read_nonmem(df.assign(CENS=0))
    assert "censoring" not in plain.features
    np.testing.assert_allclose(jitted(plain)[0], normal.log_prob(jnp.asarray([2.0, 0.5, 9.0])).sum(), rtol=1e-12)


def test_discovery_idr_and_simulated_study():
    table = nlmegen.examples.simulate_idr(3, key=jax.random.key(0))
    pop = nlmegen.read_nonmem(table)
    sites = discover(nlmegen.examples.idr_model, pop)
    assert [s.name for s in sites.population] == [
        "log_ka", "log_cl", "log_vc", "log_kin", "log_kout", "log_smax", "log_sc50", "log_n", "omega",
        "sigma_conc", "sigma_resp"]
    assert [(s.name, s.shape) for s in sites.random_effects] == [("eta", (4,))]
    assert [(s.name, pop.outputs[s.output]) for s in sites.observed] == [("conc", "conc"), ("resp", "resp")]
    obs = table[table["EVID"] == 0]
    assert np.isfinite(obs["DV"]).all()
    resp = obs[obs["DVID"] == "resp"]["DV"]
    assert 10 < resp.median() < 60  # baseline kin/kout = 20, stimulated up to 3x
    density = Density(nlmegen.examples.idr_model, sites)
    truth = {k: v for k, v in nlmegen.examples.IDR_TRUTH.items()}
    lp = density.subject_log_joint(density.theta_space.unconstrain(truth), jnp.zeros((3, 4)), pop)
    assert lp.shape == (3,) and np.all(np.isfinite(lp))
