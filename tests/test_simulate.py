"""simulate: reproducible, correct predictions without noise, clear errors, noise of the right size;
Bayesian fits simulate from their posterior draws."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlmegen
from nlmegen import ModelError

THETA = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": [0.6, 0.3, 0.1], "add_sd": 0.7}


@pytest.fixture(scope="module")
def theo():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


def test_same_key_same_result(theo):
    a = nlmegen.simulate(nlmegen.examples.theo_model, THETA, theo, key=jax.random.key(3), n=2)
    b = nlmegen.simulate(nlmegen.examples.theo_model, THETA, theo, key=jax.random.key(3), n=2)
    c = nlmegen.simulate(nlmegen.examples.theo_model, THETA, theo, key=jax.random.key(4), n=2)
    assert a.equals(b) and not a.equals(c)
    assert list(a.columns) == ["replicate", "ID", "TIME", "output", "value"]
    assert len(a) == 2 * theo.n_observations


def test_fixed_random_effects_without_noise_give_the_prediction(theo):
    eta = jnp.zeros((12, 3))
    sims = nlmegen.simulate(nlmegen.examples.theo_model, {**THETA, "eta": eta}, theo, key=jax.random.key(0),
                            noise=False)
    pred = nlmegen.pk.one_cmt(theo, ka=np.exp(0.45), cl=np.exp(1.0), v=np.exp(3.45))
    np.testing.assert_allclose(sims["value"], np.asarray(pred)[np.asarray(theo.mask)], rtol=1e-12)


def test_residual_noise_has_the_model_sd(theo):
    eta = jnp.zeros((12, 3))
    sims = nlmegen.simulate(nlmegen.examples.theo_model, {**THETA, "eta": eta}, theo, key=jax.random.key(0), n=200)
    pred = np.asarray(nlmegen.pk.one_cmt(theo, ka=np.exp(0.45), cl=np.exp(1.0), v=np.exp(3.45)))
    resid = sims["value"].to_numpy() - np.tile(pred[np.asarray(theo.mask)], 200)
    assert abs(resid.mean()) < 0.02  # 26400 draws: SE 0.0043
    assert resid.std() == pytest.approx(0.7, rel=0.02)


def test_missing_and_unknown_parameters(theo):
    with pytest.raises(ModelError, match="add_sd"):
        nlmegen.simulate(nlmegen.examples.theo_model, {k: v for k, v in THETA.items() if k != "add_sd"}, theo,
                         key=jax.random.key(0))
    with pytest.raises(ModelError, match="tkaa"):
        nlmegen.simulate(nlmegen.examples.theo_model, {**THETA, "tkaa": 1.0}, theo, key=jax.random.key(0))


@pytest.fixture(scope="module")
def bayes_fit(theo):
    """A FOCEI fit given three hand-made posterior draws (very different CL, near-zero IIV and error)."""
    fit = nlmegen.fit(nlmegen.examples.theo_model, theo, progress=False, covariance="none")
    rng = np.random.default_rng(0)
    draws = {"tka": np.full((1, 3), 0.45), "tcl": np.array([[0.0, 1.0, 2.0]]), "tv": np.full((1, 3), 3.45),
             "omega": np.full((1, 3, 3), 1e-9), "add_sd": np.full((1, 3), 1e-9),
             "eta": rng.normal(0.0, 0.3, (1, 3, 12, 3)), "lp": np.zeros((1, 3))}
    return dataclasses.replace(fit, draws=draws)


def test_draw_indices():
    from nlmegen._simulate import draw_indices

    np.testing.assert_array_equal(draw_indices(10, 10), np.arange(10))
    np.testing.assert_array_equal(draw_indices(10, 3), [0, 4, 9])  # evenly spaced
    np.testing.assert_array_equal(draw_indices(2, 5), [0, 1, 0, 1, 0])  # cycled


def test_bayesian_fit_takes_theta_and_eta_from_the_draws(bayes_fit, theo):
    mask = np.asarray(theo.mask)
    draws = bayes_fit.draws
    sims = nlmegen.simulate(None, bayes_fit, key=jax.random.key(0), n=3, individual=True, noise=False)
    for r in range(3):
        values = {k: draws[k][0, r] for k in ("tka", "tcl", "tv", "omega", "add_sd", "eta")}
        expected = nlmegen.simulate_arrays(nlmegen.examples.theo_model, values, theo, key=jax.random.key(1),
                                           noise=False)[0][mask]
        np.testing.assert_allclose(sims.loc[sims["replicate"] == r, "value"], expected, rtol=1e-10)
    # population simulation: theta of draw r, new (here ~zero) random effects: the typical curve of draw r
    pop_sims = nlmegen.simulate(None, bayes_fit, key=jax.random.key(0), n=3, noise=False)
    for r, tcl in enumerate((0.0, 1.0, 2.0)):
        pred = nlmegen.pk.one_cmt(theo, ka=np.exp(0.45), cl=np.exp(tcl), v=np.exp(3.45))
        np.testing.assert_allclose(pop_sims.loc[pop_sims["replicate"] == r, "value"], np.asarray(pred)[mask],
                                   rtol=1e-6)
    noisy = [nlmegen.simulate(None, bayes_fit, key=jax.random.key(5), n=4, individual=True) for _ in range(2)]
    assert noisy[0].equals(noisy[1])  # a fixed key reproduces the posterior simulations
    # posterior=False: the point estimates, as for a maximum-likelihood fit
    point = nlmegen.simulate(None, bayes_fit, key=jax.random.key(0), n=1, individual=True, noise=False,
                             posterior=False)
    np.testing.assert_allclose(point["value"], bayes_fit.ipred[mask], rtol=1e-8)


def test_bayesian_vpc_intervals_include_parameter_uncertainty(bayes_fit):
    # near-zero IIV and residual error: the simulated intervals are the spread of theta over the draws
    bayes = nlmegen.vpc(bayes_fit, n_sim=3, bins=[0, 2, 30])
    middle = {k: v[0, 1] for k, v in bayes_fit.draws.items() if k not in ("eta", "lp")}
    point = nlmegen.vpc(None, bayes_fit.pop, model=bayes_fit.model, params=middle, n_sim=3, bins=[0, 2, 30])
    width = lambda v: (v.table["sim_upper"] - v.table["sim_lower"]).to_numpy()  # noqa: E731
    assert np.all(width(point) < 1e-6)
    assert np.all(width(bayes)[bayes.table["bin"] == 1] > 1.0)  # 2-30 h: CL differs e-fold between draws


def test_posterior_predictive_aligns_with_to_arviz(bayes_fit):
    from nlmegen._simulate import posterior_predictive

    pp = posterior_predictive(bayes_fit, key=jax.random.key(0), noise=False)
    assert pp["DV"].dims == ("chain", "draw", "obs") and pp["DV"].shape == (1, 3, bayes_fit.n_obs)
    observed = bayes_fit.to_arviz(log_likelihood=False)["observed_data"]
    np.testing.assert_array_equal(pp["TIME"].values, observed["TIME"].values)
    np.testing.assert_array_equal(pp["ID"].values, observed["ID"].values)
    same = nlmegen.simulate(None, bayes_fit, key=jax.random.key(0), n=3, individual=True, noise=False)
    np.testing.assert_allclose(pp["DV"].values[0].ravel(), same["value"].to_numpy())
    via_simulate = nlmegen.simulate(None, bayes_fit, key=jax.random.key(0), individual=True, as_arviz=True)
    assert via_simulate["DV"].shape == (1, 3, bayes_fit.n_obs)
    ml = posterior_predictive(dataclasses.replace(bayes_fit, draws=None), key=jax.random.key(0), n=4)
    assert ml["DV"].shape == (1, 4, bayes_fit.n_obs)
    tree = bayes_fit.to_arviz(log_likelihood=False)
    tree["posterior_predictive"] = pp  # how to_arviz can attach it
    assert tree["posterior_predictive"]["DV"].sizes == {"chain": 1, "draw": 3, "obs": bayes_fit.n_obs}
    # draws given explicitly (e.g. to_arviz's posterior of a maximum-likelihood fit) are used as they are
    posterior = {k: tree["posterior"][k].values for k in tree["posterior"].data_vars}
    again = posterior_predictive(dataclasses.replace(bayes_fit, draws=None), key=jax.random.key(0), noise=False,
                                 draws=posterior)
    np.testing.assert_allclose(again["DV"].values, pp["DV"].values)
