"""NUTS backend: full Bayes on theo_sd agrees with FOCEI; draws, diagnostics and ArviZ export."""

import jax
import numpy as np
import pytest

import nlmegen
from nlmegen.infer.bayes.nuts import NUTS

# FOCEI estimates of theo_sd (nlmixr2 reference, test_focei.py)
THEO_THETA = {"tka": 0.464, "tcl": 1.01, "tv": 3.46}
CHAINS, DRAWS = 2, 300


@pytest.fixture(scope="module")
def theo():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


@pytest.fixture(scope="module")
def theo_nuts(theo):
    backend = NUTS(num_warmup=300, num_samples=DRAWS, num_chains=CHAINS, progress=False)
    return backend.fit(nlmegen.examples.theo_model, theo, key=jax.random.key(0))


def test_theo_sd_posterior_agrees_with_focei(theo_nuts):
    fit = theo_nuts
    assert fit.method == "nuts" and fit.status in ("converged", "not_converged")
    assert int(fit.draws["diverging"].sum()) <= 3, fit.message
    import arviz as az

    for name, ref in THEO_THETA.items():
        draws = fit.draws[name]
        assert float(az.rhat(draws, chain_axis=0, draw_axis=1)) < 1.05, name
        assert abs(float(fit.params[name]) - ref) < 2 * float(fit.se[name]), (name, fit.params[name], fit.se[name])
        assert float(fit.params[name]) == pytest.approx(float(np.median(draws)), abs=1e-12)
    assert np.isnan(fit.ofv) and np.isnan(fit.loglik) and np.isnan(fit.aic)
    assert "R-hat" in fit.message and "divergent" in fit.message


def test_result_contents(theo_nuts, theo):
    fit = theo_nuts
    assert fit.draws["tka"].shape == (CHAINS, DRAWS)
    assert fit.draws["omega"].shape == (CHAINS, DRAWS, 3)
    assert fit.draws["eta"].shape == (CHAINS, DRAWS, 12, 3)
    assert "eta_decentered" not in fit.draws  # non-centred internally, original scale reported
    assert fit.settings["noncentered_sites"] == ["eta"]
    assert fit.draws["diverging"].shape == (CHAINS, DRAWS)
    assert list(fit.ebes.index) == list(theo.ids) and list(fit.ebes.columns) == ["eta[0]", "eta[1]", "eta[2]"]
    np.testing.assert_allclose(fit.ebes.to_numpy(), np.median(fit.draws["eta"].reshape(-1, 12, 3), axis=0))
    assert fit.ebe_cov.shape == (12, 3, 3)
    assert np.all(np.linalg.eigvalsh(fit.ebe_cov) > 0)
    assert fit.theta_names == ("tka", "tcl", "tv", "omega[0]", "omega[1]", "omega[2]", "add_sd")
    assert fit.n_params == 7 and fit.free.all() and fit.covariance is None
    typical = nlmegen.pk.one_cmt(theo, ka=np.exp(fit.params["tka"]), cl=np.exp(fit.params["tcl"]),
                                 v=np.exp(fit.params["tv"]))
    mask = np.asarray(theo.mask)
    np.testing.assert_allclose(fit.pred[mask], np.asarray(typical)[mask], rtol=1e-10)
    assert np.mean((fit.ipred - fit.dv)[mask] ** 2) < np.mean((fit.pred - fit.dv)[mask] ** 2)
    assert set(fit.timings) >= {"compile_s", "run_s", "warmup_s", "sample_s"}


def test_to_arviz_summary(theo_nuts):
    import arviz as az

    tree = theo_nuts.to_arviz()
    assert "diverging" in tree["sample_stats"]
    assert "diverging" not in tree["posterior"]
    assert dict(tree["posterior"]["tka"].sizes) == {"chain": CHAINS, "draw": DRAWS}
    table = az.summary(tree, var_names=["tka", "tcl", "tv", "omega", "add_sd"])
    assert {"r_hat", "ess_bulk"} <= set(table.columns)
    assert np.all(np.asarray(table["ess_bulk"], dtype=float) > 50)
    assert {"diverging", "tree_depth", "step_size", "acceptance_rate", "n_steps", "lp"} <= set(
        tree["sample_stats"].data_vars)
    steps = np.asarray(tree["sample_stats"]["n_steps"])
    depth = np.asarray(tree["sample_stats"]["tree_depth"])
    assert np.all(steps <= 2 ** depth - 1) and np.all(steps >= 2 ** (depth - 1))
    assert list(tree["posterior"]["eta"].coords["subject"].values) == list(range(1, 13))


def test_pointwise_log_likelihood_and_loo(theo_nuts, theo):
    import arviz as az
    import jax.numpy as jnp
    from scipy.stats import norm

    tree = theo_nuts.to_arviz()
    ll = tree["log_likelihood"]["DV"]
    assert dict(ll.sizes) == {"chain": CHAINS, "draw": DRAWS, "obs": int(np.sum(theo.mask))}
    # one draw, one observation, by hand: Normal(C, add_sd) at the drawn parameters
    c, d, i = 1, 17, 40
    subj, col = np.argwhere(np.asarray(theo.mask))[i]
    draw = {k: theo_nuts.draws[k][c, d] for k in ("tka", "tcl", "tv", "add_sd", "eta")}
    eta = draw["eta"]
    conc = nlmegen.pk.one_cmt(theo, ka=jnp.exp(draw["tka"] + eta[:, 0]), cl=jnp.exp(draw["tcl"] + eta[:, 1]),
                              v=jnp.exp(draw["tv"] + eta[:, 2]))
    expected = norm.logpdf(float(theo.dv[subj, col]), float(conc[subj, col]), float(draw["add_sd"]))
    assert float(ll[c, d, i]) == pytest.approx(expected, rel=1e-10)
    loo = az.loo(tree, var_name="DV")  # "subject_marginal" is leave-one-subject-out
    assert np.isfinite(loo.elpd) and loo.elpd < 0
    pp = tree["posterior_predictive"]["DV"]
    assert dict(pp.sizes) == dict(ll.sizes)
    np.testing.assert_array_equal(pp.coords["TIME"].values, tree["observed_data"]["DV"].coords["TIME"].values)
    # replicated data scatter around the observations with about the residual SD
    resid = np.asarray(pp.mean(("chain", "draw"))) - np.asarray(tree["observed_data"]["DV"])
    assert np.sqrt(np.mean(resid**2)) < 1.0


def test_summary_is_the_posterior_table(theo_nuts):
    table = theo_nuts.summary()
    assert {"estimate", "SE", "CI95_lower", "CI95_upper", "r_hat", "ess_bulk", "ess_tail"} <= set(table.columns)
    draws = theo_nuts.draws["tcl"].ravel()
    row = table.loc["tcl"]
    assert row["estimate"] == pytest.approx(np.median(draws))
    assert row["CI95_lower"] == pytest.approx(np.quantile(draws, 0.025))
    assert row["CI95_upper"] == pytest.approx(np.quantile(draws, 0.975))
    assert row["SE"] == pytest.approx(np.std(draws, ddof=1))
    assert 0.99 < row["r_hat"] < 1.05 and row["ess_bulk"] > 50
    assert list(table.index[:3]) == ["tka", "tcl", "tv"] and "omega[2]" in table.index


def test_needs_key(theo):
    with pytest.raises(ValueError, match="NUTS needs key"):
        NUTS(progress=False).fit(nlmegen.examples.theo_model, theo)


def test_unknown_fixed_site(theo):
    with pytest.raises(nlmegen.ModelError, match="not_a_site"):
        NUTS(progress=False).fit(nlmegen.examples.theo_model, theo, fixed={"not_a_site": 1.0},
                                 key=jax.random.key(0))
    with pytest.raises(nlmegen.ModelError, match="random-effect"):
        NUTS(progress=False).fit(nlmegen.examples.theo_model, theo, fixed={"eta": 0.0}, key=jax.random.key(0))
