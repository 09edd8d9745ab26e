"""Residuals of a fit to data simulated from the true model are standard normal; simulate from fits."""

import dataclasses

import jax
import numpy as np
import pytest

import nlmegen

TRUTH = {"tka": 0.5, "tcl": 1.0, "tv": 3.5, "omega": np.array([0.5, 0.3, 0.2]), "add_sd": 0.5}


@pytest.fixture(scope="module")
def simulated_fit(simulated_theo):
    pop = simulated_theo(8, TRUTH, 11)
    return nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False, covariance="none")


def test_cwres_and_npde_are_standard_normal(simulated_fit):
    table = simulated_fit.residuals(n_sim=500, key=jax.random.key(1))
    assert len(table) == simulated_fit.n_obs  # 1056 observations
    for column in ("CWRES", "NPDE"):
        values = table[column].to_numpy()
        assert np.all(np.isfinite(values)), column
        # mean: SE ~ 0.03, variance: SE ~ 0.045 for ~1000 values (3 SE tolerances)
        assert abs(values.mean()) < 0.1, (column, values.mean())
        assert 0.85 < values.var() < 1.15, (column, values.var())
    np.testing.assert_allclose(table["RES"], table["DV"] - table["PRED"])


def test_iwres_uses_the_residual_sd(simulated_fit):
    table = simulated_fit.residuals(n_sim=50)
    sd = float(simulated_fit.params["add_sd"])
    np.testing.assert_allclose(table["IWRES"], (table["DV"] - table["IPRED"]) / sd, rtol=1e-8)


def test_simulate_from_a_fit(simulated_fit):
    ipred = nlmegen.simulate(None, simulated_fit, key=jax.random.key(0), individual=True, noise=False)
    mask = np.asarray(simulated_fit.mask)
    np.testing.assert_allclose(ipred["value"], simulated_fit.ipred[mask], rtol=1e-8)
    pred = nlmegen.simulate(None, simulated_fit, key=jax.random.key(0), noise=True, n=3)
    assert pred["replicate"].nunique() == 3 and np.isfinite(pred["value"]).all()


def test_residuals_need_the_model(simulated_fit):
    with pytest.raises(ValueError, match=r"residuals needs the fit's model: .*dataclasses.replace"):
        dataclasses.replace(simulated_fit, model=None).residuals()
