"""SVI backend: every guide fits theo_sd; agreement with FOCEI and the nlmixr2 VI reference; the
amortized encoder on held-out subjects; reproducibility, FitResult schema, ArviZ export, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest

import nlmegen
from nlmegen.infer import SVI, encode, svi_guide

# FOCEI estimates of theo_sd (nlmixr2 reference, test_focei.py)
THEO_FOCEI = {"tka": 0.464, "tcl": 1.012, "tv": 3.460, "add_sd": 0.694}
# nlmixr2 full-Bayes VI on theo_sd, random effects on ka and CL only: median [95% interval]
KACL_REFERENCE = {"tka": (1.51, 1.30, 1.75), "tcl": (2.72, 2.45, 3.01), "tv": (30.35, 28.65, 32.16)}
DRAWS = 400


@pytest.fixture(scope="module")
def theo():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


@pytest.fixture(scope="module")
def theo_normal(theo):
    backend = SVI(guide="normal", num_steps=1500, num_draws=DRAWS, progress=False)
    return backend.fit(nlmegen.examples.theo_model, theo, key=jax.random.key(0))


def test_mean_field_agrees_with_focei(theo_normal):
    """Posterior medians of the typical values within two posterior SDs of FOCEI (as for NUTS)."""
    fit = theo_normal
    assert fit.method == "svi"
    for name in ("tka", "tcl", "tv"):
        assert abs(float(fit.params[name]) - THEO_FOCEI[name]) < 2 * float(fit.se[name]), (name, fit.params[name])
        assert float(fit.params[name]) == pytest.approx(float(np.median(fit.draws[name])), abs=1e-12)
    assert float(fit.params["add_sd"]) == pytest.approx(THEO_FOCEI["add_sd"], rel=0.2)
    # FOCEI omega^2 = 0.402, 0.069, 0.019: the posterior of the IIV SDs is wide with 12 subjects
    np.testing.assert_allclose(np.asarray(fit.params["omega"]) ** 2, [0.402, 0.069, 0.019], atol=0.25)
    assert np.isnan(fit.ofv) and np.isnan(fit.aic)


def test_status_reflects_pareto_k(theo_normal):
    """The mean-field guide's ELBO is flat, but its importance weights fail the k-hat diagnostic
    (about 3 on theo_sd): the status says not converged and names the diagnostic (issue 18)."""
    from nlmegen.infer.bayes.svi import _elbo_status, good_k

    fit = theo_normal
    assert _elbo_status(fit.history["elbo"].to_numpy())[0] == "converged"  # the optimiser itself stopped
    assert fit.settings["pareto_k"] > good_k(DRAWS)
    assert fit.status == "not_converged"
    assert "not a reliable approximation of the posterior: Pareto k-hat" in fit.message
    assert any("Pareto k-hat" in w and "NUTS" in w for w in fit.warnings)
    assert good_k(1000) == pytest.approx(2 / 3) and good_k(10**8) == 0.7


def test_result_schema(theo_normal, theo):
    fit = theo_normal
    assert set(fit.draws) == {"tka", "tcl", "tv", "omega", "add_sd", "eta"}
    assert fit.draws["tka"].shape == (1, DRAWS) and fit.draws["omega"].shape == (1, DRAWS, 3)
    assert fit.draws["eta"].shape == (1, DRAWS, 12, 3)
    assert fit.settings["noncentered_sites"] == ["eta"] and fit.settings["guide"] == "normal"
    assert list(fit.ebes.index) == list(theo.ids) and list(fit.ebes.columns) == ["eta[0]", "eta[1]", "eta[2]"]
    np.testing.assert_allclose(fit.ebes.to_numpy(), np.median(fit.draws["eta"][0], axis=0))
    assert fit.ebe_cov.shape == (12, 3, 3) and np.all(np.linalg.eigvalsh(fit.ebe_cov) > 0)
    assert fit.theta_names == ("tka", "tcl", "tv", "omega[0]", "omega[1]", "omega[2]", "add_sd")
    assert fit.n_params == 7 and fit.covariance is None
    assert list(fit.history.columns) == ["iteration", "elbo"] and len(fit.history) == 1500
    assert fit.history["elbo"].iloc[-100:].mean() > fit.history["elbo"].iloc[:100].mean()
    assert set(fit.timings) == {"compile_s", "run_s", "draws_s"}
    assert all(v >= 0 for v in fit.timings.values())
    mask = np.asarray(theo.mask)
    assert np.mean((fit.ipred - fit.dv)[mask] ** 2) < np.mean((fit.pred - fit.dv)[mask] ** 2)
    assert "ELBO" in fit.message and "k-hat" in fit.message
    trained = svi_guide(fit)
    assert trained.kind == "normal" and trained.free == ("tka", "tcl", "tv", "omega", "add_sd")


def test_to_arviz(theo_normal):
    import arviz as az

    tree = theo_normal.to_arviz()
    assert dict(tree["posterior"]["tka"].sizes) == {"chain": 1, "draw": DRAWS}
    assert dict(tree["posterior"]["eta"].sizes) == {"chain": 1, "draw": DRAWS, "subject": 12, "eta_dim_0": 3}
    assert tree.attrs["posterior_kind"] == "draws"
    table = az.summary(tree, var_names=["tka", "tcl", "tv"])
    assert len(table) == 3


# NUTS reference posterior of theo_sd (theo_model): nlmegen.NUTS(num_warmup=1000, num_samples=2000,
# num_chains=4), key=jax.random.key(42); max R-hat 1.003, 0 divergent transitions, min bulk ESS 2195.
# Posterior mean and SD of each population site (omega: the three IIV SDs).
NUTS_REFERENCE = {"tka": (0.467, 0.228), "tcl": (1.010, 0.101), "tv": (3.454, 0.054),
                  "omega": ([0.738, 0.313, 0.161], [0.194, 0.092, 0.054]), "add_sd": (0.708, 0.052)}


def test_default_guide_passes_pareto_k_and_matches_nuts(theo):
    """The default guide (4-flow IAF, learned centring) passes k-hat on theo_sd and its posterior
    means and SDs agree with NUTS: means within 0.25 NUTS SDs, SDs within 25% (issue 18). With
    keys 0-7 the default's k-hat was 0.25, 0.61, 0.51, 0.74, 0.56, 1.06, 0.58, 0.64 (threshold 0.67
    for 1000 draws): it passes on most keys (6 of 8), not all; key 0 is the one checked here."""
    from nlmegen.infer.bayes.svi import good_k

    fit = SVI(progress=False).fit(nlmegen.examples.theo_model, theo, key=jax.random.key(0))
    assert fit.settings["pareto_k"] <= good_k(1000), fit.message
    assert fit.status == "converged", fit.message
    assert fit.settings["guide"] == "iaf" and set(fit.settings["centering"]) == {"eta"}
    assert np.all((np.array(fit.settings["centering"]["eta"]) >= 0) & (np.array(fit.settings["centering"]["eta"]) <= 1))
    for name, (mean, sd) in NUTS_REFERENCE.items():
        draws = np.asarray(fit.draws[name])[0]
        np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 0.25 * np.asarray(sd), err_msg=name)
        np.testing.assert_array_less(np.abs(draws.std(0) / np.asarray(sd) - 1), 0.25, err_msg=name)


@pytest.mark.slow
def test_iaf_lands_in_nlmixr2_intervals(theo):
    """The flow guide on theo_sd with IIV on ka and CL: medians inside nlmixr2's VI intervals."""
    backend = SVI(guide="iaf", num_steps=3000, num_draws=1000, progress=False)
    fit = nlmegen.fit(nlmegen.examples.theo_model_kacl, theo, method=backend, key=jax.random.key(1))
    assert fit.status == "converged", fit.message
    for name, (median, lo, hi) in KACL_REFERENCE.items():
        value = float(np.exp(fit.params[name]))
        assert lo < value < hi, (name, value, (lo, hi))
        assert abs(value - median) / median < 0.05, (name, value, median)
    assert fit.draws["eta"].shape == (1, 1000, 12, 2)


@pytest.mark.parametrize("guide", ["mvn", "iaf", pytest.param("lowrank", marks=pytest.mark.slow),
                                   pytest.param("bnaf", marks=pytest.mark.slow)])
def test_other_guides_run(theo, guide):
    """Short fits: each guide trains (the ELBO rises), draws have the schema, estimates are sane."""
    backend = SVI(guide=guide, num_steps=300, num_draws=100, num_flows=1, hidden_factors=(4,), progress=False,
                  learning_rate=0.02)
    fit = backend.fit(nlmegen.examples.theo_model_kacl, theo, key=jax.random.key(0))
    assert fit.draws["tka"].shape == (1, 100) and fit.draws["eta"].shape == (1, 100, 12, 2)
    elbo = fit.history["elbo"].to_numpy()
    assert np.all(np.isfinite(elbo)) and elbo[-30:].mean() > elbo[:30].mean()
    assert abs(float(fit.params["tcl"]) - THEO_FOCEI["tcl"]) < 0.3
    assert svi_guide(fit).kind == guide


def test_same_key_same_result(theo):
    """Same key, same fit (also with a site held fixed, which is then not in the draws)."""
    backend = SVI(num_steps=50, num_draws=20, progress=False, chunk_size=25)
    a = backend.fit(nlmegen.examples.theo_model, theo, key=jax.random.key(3), fixed={"add_sd": 0.694})
    b = backend.fit(nlmegen.examples.theo_model, theo, key=jax.random.key(3), fixed={"add_sd": 0.694})
    assert "add_sd" not in a.draws and a.fixed == ("add_sd",) and float(a.params["add_sd"]) == pytest.approx(0.694)
    assert a.n_params == 6 and not a.free[-1] and np.isnan(a.se["add_sd"])
    for name in a.draws:
        np.testing.assert_array_equal(a.draws[name], b.draws[name])
    np.testing.assert_array_equal(a.history["elbo"], b.history["elbo"])
    other, _ = svi_guide(a).sample(jax.random.key(4), theo, 20)  # another key, other draws
    assert not np.array_equal(a.draws["tka"][0], other["tka"])


# ---------------------------------------------------------------------- amortized encoder
TRUTH = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": np.array([0.6, 0.3, 0.1]), "add_sd": 0.5}


def _study(copies: int, seed: int):
    """``copies`` x theo_sd's design, etas drawn from TRUTH's omega and DV simulated given them."""
    table = nlmegen.datasets.load("theo_sd")
    pop = nlmegen.read_nonmem(pd.concat([table.assign(ID=table["ID"] + 100 * k) for k in range(copies)],
                                        ignore_index=True))
    k_eta, k_dv = jax.random.split(jax.random.key(seed))
    eta = np.asarray(jax.random.normal(k_eta, (pop.n_subjects, 3))) * TRUTH["omega"]
    dv = nlmegen.simulate_arrays(nlmegen.examples.theo_model, {**TRUTH, "eta": eta}, pop, key=k_dv)[0]
    return dataclasses.replace(pop, dv=jnp.asarray(np.nan_to_num(dv))), eta


@pytest.fixture(scope="module")
def encoder_fit():
    pop, _ = _study(6, seed=11)
    # one particle (the default before issue 18): with 16 the mean-field population part of the guide
    # converges further and its SD of tka collapses to 0.013 (it ignores the tka-eta correlation)
    backend = SVI(guide="encoder", num_steps=2000, num_draws=200, learning_rate=0.005, num_particles=1,
                  progress=False)
    return backend.fit(nlmegen.examples.theo_model, pop, key=jax.random.key(0))


def test_encoder_fit(encoder_fit):
    fit = encoder_fit
    assert fit.settings["guide"] == "encoder" and fit.settings["noncentered_sites"] == []
    for name in ("tka", "tcl", "tv"):
        assert abs(float(fit.params[name]) - TRUTH[name]) < 3 * float(fit.se[name]), (name, fit.params[name])
    assert fit.draws["eta"].shape == (1, 200, 72, 3)


def test_encoder_on_new_subjects(encoder_fit):
    """Held-out subjects: one forward pass gives q(eta) close to the truth and to their posterior."""
    new, eta_true = _study(2, seed=12)  # 24 subjects never seen in the fit
    enc = encode(encoder_fit, new)
    assert enc.mean.shape == (24, 3) and enc.scale_tril.shape == (24, 3, 3)
    assert list(enc.ebes.index) == list(new.ids) and list(enc.ebes.columns) == ["eta[0]", "eta[1]", "eta[2]"]
    assert np.all(enc.sd > 0)
    # ka and CL are well identified by the data: the encoded means track the true etas
    for k in (0, 1):
        r = np.corrcoef(enc.mean[:, k], eta_true[:, k])[0, 1]
        rmse = np.sqrt(np.mean((enc.mean[:, k] - eta_true[:, k]) ** 2))
        assert r > 0.8 and rmse < 0.6 * TRUTH["omega"][k], (k, r, rmse)
    # the same pass on the training subjects reproduces the guide's q(eta_i) (medians of its draws)
    again = encode(svi_guide(encoder_fit), encoder_fit.pop)
    np.testing.assert_allclose(again.ebes.to_numpy(), encoder_fit.ebes.to_numpy(), atol=0.1)


@pytest.mark.slow
def test_encoder_agrees_with_focei_ebes(encoder_fit):
    """Held-out subjects: encoded means close to FOCEI's EBEs at the same population parameters."""
    new, _ = _study(2, seed=12)
    enc = encode(encoder_fit, new)
    params = {k: np.asarray(v) for k, v in encoder_fit.params.items()}
    focei = nlmegen.FOCEI(progress=False, covariance="none").fit(nlmegen.examples.theo_model, new, fixed=params)
    ebes = focei.ebes.to_numpy()
    for k in (0, 1):
        r = np.corrcoef(enc.mean[:, k], ebes[:, k])[0, 1]
        rmse = np.sqrt(np.mean((enc.mean[:, k] - ebes[:, k]) ** 2))
        assert r > 0.9 and rmse < 0.4 * TRUTH["omega"][k], (k, r, rmse)


# ---------------------------------------------------------------------- errors
def test_unknown_guide():
    with pytest.raises(ValueError, match="unknown SVI guide 'planar'.*'iaf'"):
        SVI(guide="planar")
    with pytest.raises(ValueError, match="unknown schedule"):
        SVI(schedule="linear")
    with pytest.raises(ValueError, match="noncentered must be 'learned', True or False"):
        SVI(noncentered="partial")
    assert SVI(guide="full_rank").guide == "full_rank"


def test_needs_key(theo):
    with pytest.raises(ValueError, match="SVI needs key"):
        SVI(progress=False).fit(nlmegen.examples.theo_model, theo)


def test_param_site_needs_fixed(theo):
    def model(pop):
        tka = numpyro.param("tka", 0.5)
        tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
        sd = numpyro.sample("sd", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, 0.3))
            conc = nlmegen.pk.one_cmt(pop, ka=jnp.exp(tka), cl=jnp.exp(tcl + eta), v=30.0)
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)

    with pytest.raises(nlmegen.ModelError, match=r"\['tka'\] are numpyro.param sites.*fixed="):
        SVI(progress=False).fit(model, theo, key=jax.random.key(0))


def test_nan_elbo_names_the_step(theo):
    def model(pop):  # the likelihood is NaN once t > 10: a huge learning rate gets there in a step
        t = numpyro.sample("t", dist.Normal(0.0, 1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
            mean = jnp.sqrt(10.0 - t) + eta
            nlmegen.observe("conc", dist.Normal(mean[..., None] * jnp.ones(pop.dv.shape[1:]), 1.0), pop)

    # the steps from there on are skipped (their gradient is NaN too) and the fit must not end on one
    backend = SVI(num_steps=5, progress=False, learning_rate=100.0, schedule="constant", clip_norm=None)
    with pytest.raises(FloatingPointError, match=r"not finite from step [2-5] of 5 on.*smaller learning_rate"):
        backend.fit(model, theo, key=jax.random.key(0))
    backend = SVI(num_steps=60, chunk_size=10, progress=False, learning_rate=100.0, schedule="constant",
                  clip_norm=None)  # more than MAX_SKIPPED in a row: stops before the end
    with pytest.raises(FloatingPointError, match=r"not finite from step [2-5] of 60 on.*at most 20 in a row"):
        backend.fit(model, theo, key=jax.random.key(0))


def test_encode_and_guide_errors(theo_normal):
    with pytest.raises(ValueError, match="needs an amortized encoder"):
        encode(theo_normal, theo_normal.pop)
    with pytest.raises(ValueError, match="result of an SVI fit"):
        svi_guide(dataclasses.replace(theo_normal, method="nuts"))
    with pytest.raises(ValueError, match="no trained guide"):
        svi_guide(dataclasses.replace(theo_normal))


def test_a_step_with_a_non_finite_gradient_is_skipped():
    """A particle drawn in the guide's far tail can make one step's gradient NaN (the default guide on the
    96-subject conformance population did, at step 3485 of 20000): the step is skipped, not applied, and
    the fit stops only after MAX_SKIPPED such steps in a row."""
    from nlmegen.infer.bayes import svi as svi_module

    opt = nlmegen.SVI().optimizer()
    params = jnp.ones(3)
    state = opt.init(params)
    updates, state = opt.update(jnp.array([jnp.nan, 1.0, 1.0]), state, params)
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
    updates, state = opt.update(jnp.array([1.0, 1.0, 1.0]), state, params)
    assert np.all(np.asarray(updates) < 0)  # the next finite step is applied
    assert svi_module._longest_nonfinite_run(np.array([1.0, np.nan, np.nan, 2.0, np.inf])) == 2
    status, final, _ = svi_module._elbo_status(np.r_[np.full(50, -10.0), np.nan, np.full(49, -10.0)])
    assert status == "converged" and final == -10.0
