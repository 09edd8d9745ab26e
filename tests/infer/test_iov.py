"""Inter-occasion variability: simulation and re-estimation with a known IOV (two occasions, kappa SD
0.2) by FOCEI and SAEM; kappas are part of each subject's random-effect vector (EBEs per occasion),
and simulation draws new ones."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from _iov import TRUTH, model, simulated_population

import nlmegen

N_SUBJECTS = 40


@pytest.fixture(scope="module")
def pop():
    return simulated_population(N_SUBJECTS, seed=0)


@pytest.fixture(scope="module")
def focei(pop):
    return nlmegen.FOCEI(progress=False).fit(model, pop)


@pytest.fixture(scope="module")
def saem(pop):
    return nlmegen.SAEM(progress=False).fit(model, pop, key=jax.random.key(1))


def _within_3se(fit, name, truth):
    table = fit.table("estimation")
    est, se = float(table.loc[name, "estimate"]), float(table.loc[name, "SE"])
    assert abs(est - truth) < 3 * se, f"{name}: {est:.4f} +/- {se:.4f}, truth {truth}"
    return est


@pytest.mark.parametrize("method", ["focei", "saem"])
def test_iov_is_recovered_within_3_se(method, request):
    fit = request.getfixturevalue(method)
    assert fit.status == "converged", fit.message
    _within_3se(fit, "kappa_sd", TRUTH["kappa_sd"])
    _within_3se(fit, "omega[0]", TRUTH["omega"][0])
    _within_3se(fit, "tcl", TRUTH["tcl"])


def test_saem_iov_is_not_biased_to_zero(focei, saem):
    """nlmixr2's SAEM once shrank IOV towards zero; ours agrees with FOCEI on the same data."""
    k_focei, k_saem = float(focei.params["kappa_sd"]), float(saem.params["kappa_sd"])
    assert abs(k_saem - k_focei) < 0.02, (k_saem, k_focei)
    assert k_saem > 0.12


def test_ebes_per_occasion(focei, pop):
    """One EBE per subject and occasion; the two occasions' EBEs differ and have IOV shrinkage rows."""
    ebes = focei.ebes
    assert {"kappa[0]", "kappa[1]"} <= set(ebes.columns) and len(ebes) == N_SUBJECTS
    assert np.std(ebes["kappa[0]"] - ebes["kappa[1]"]) > 0.1
    table = focei.table()
    assert "OMEGA(kappa[0])" in table.index and "OMEGA(kappa[1])" in table.index


def test_simulation_draws_new_kappas(pop):
    sims = nlmegen.simulate(model, TRUTH, pop, key=jax.random.key(3), n=2, noise=False)
    a = sims[sims.replicate == 0]["value"].to_numpy()
    b = sims[sims.replicate == 1]["value"].to_numpy()
    assert not np.allclose(a, b)
    # with the IIV held at 0, the log-ratio of a subject's two occasions' predictions at the same
    # time after dose is kappa_1 - kappa_2: its SD is sqrt(2) kappa_sd
    truth = {**TRUTH, "omega": np.array([1e-8, 1e-8])}
    big = simulated_population(400, seed=5)
    sims = nlmegen.simulate(model, truth, big, key=jax.random.key(4), noise=False)
    values = sims["value"].to_numpy().reshape(400, 2, -1)
    ratio = np.log(values[:, 0, -1] / values[:, 1, -1])  # last time: exp(-CL/V t), log-linear in CL
    cl_ratio = ratio / (-(np.exp(TRUTH["tcl"]) / np.exp(TRUTH["tv"])) * 12.0)  # ~ kappa_1 - kappa_2 to first order
    assert 0.22 < np.std(cl_ratio) < 0.35


def test_occasions_outside_the_subject_plate_is_refused(pop):
    def bad(pop):
        with nlmegen.occasions(pop):
            numpyro.sample("kappa", dist.Normal(0.0, 0.2))
        with nlmegen.subjects(pop):
            nlmegen.observe("y", dist.Normal(pop.times * 0.0, 1.0), pop)

    with pytest.raises(nlmegen.ModelError, match="outside the subject plate"):
        nlmegen.model.discover(bad, pop)


def test_nuts_samples_kappa_as_any_latent_site():
    """NUTS (non-centred: LocScaleReparam passes through nlmegen.occasions) draws kappa per subject and
    occasion; about 20 s."""
    small = simulated_population(20, seed=1)
    fit = nlmegen.NUTS(num_warmup=200, num_samples=200, num_chains=2, progress=False).fit(
        model, small, key=jax.random.key(0))
    assert fit.draws["kappa"].shape == (2, 200, 20, 2)
    lo, hi = np.quantile(fit.draws["kappa_sd"], [0.025, 0.975])
    assert lo < TRUTH["kappa_sd"] < hi
