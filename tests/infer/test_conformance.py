"""Conformance across backends: one model, written once, fitted by every backend.

A population simulated from `nlmegen.examples.theo_model` with known parameters (96 subjects, the
theo_sd design) is fitted by FOCEI, Laplace, NUTS, SVI and SAEM. Each must recover the truth
within stated tolerances and return a `FitResult` with the same schema. Sampling-based backends run
short here (the tolerances allow for it); their long runs are in the backends' own test modules.
"""

import jax
import numpy as np
import pandas as pd
import pytest

import nlmegen
from nlmegen.infer._fit import BACKENDS

TRUTH = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": np.array([0.5, 0.3, 0.2]), "add_sd": 0.5}
COPIES, SEED = 8, 2024  # 96 subjects

#: Short settings per backend: (settings, tolerance on tka/tcl/tv (absolute, log scale),
#: relative tolerance on omega and add_sd). The thetas are estimated to about 0.05 (tka), 0.03
#: (tcl) and 0.02 (tv) standard error with 96 subjects; omega's to 10-15%.
BACKEND_SETTINGS = {
    "focei": ({"progress": False, "covariance": "none"}, 0.15, 0.3),
    "laplace": ({"progress": False, "covariance": "none"}, 0.15, 0.3),
    "nuts": ({"progress": False, "num_warmup": 150, "num_samples": 150, "num_chains": 2}, 0.15, 0.35),
    # a mean-field guide, short: the default guide (IAF, 16 particles, 20000 steps) takes minutes at 96 subjects and
    # has its own test against NUTS in test_svi.py
    "svi": ({"progress": False, "guide": "normal", "num_steps": 5000, "num_particles": 4}, 0.15, 0.4),
    "saem": ({"progress": False, "covariance": "none", "focei": False}, 0.15, 0.3),
}
AVAILABLE = [name for name in BACKEND_SETTINGS if name in BACKENDS]


def model(pop):
    """The one model every backend fits (the package's theophylline model)."""
    nlmegen.examples.theo_model(pop)


@pytest.fixture(scope="module")
def study(simulated_theo):
    return simulated_theo(COPIES, TRUTH, SEED)


@pytest.fixture(scope="module")
def fits(study):
    out = {}
    for name in AVAILABLE:
        settings, _, _ = BACKEND_SETTINGS[name]
        out[name] = nlmegen.fit(model, study, name, key=jax.random.key(1), **settings)
    return out


def test_every_known_backend_is_in_the_conformance_suite():
    assert {"focei", "laplace", "nuts"} <= set(AVAILABLE)
    missing = sorted(set(BACKENDS) - set(BACKEND_SETTINGS) - {"foce", "fo"})  # FOCE/FO: same family as FOCEI
    assert not missing, f"backends without a conformance entry: {missing}"


@pytest.mark.parametrize("name", AVAILABLE)
def test_recovers_the_truth(fits, name):
    fit = fits[name]
    _, tol_theta, tol_var = BACKEND_SETTINGS[name]
    assert fit.method == name
    for site in ("tka", "tcl", "tv"):
        assert abs(float(fit.params[site]) - TRUTH[site]) < tol_theta, (name, site, fit.params[site])
    np.testing.assert_allclose(fit.params["omega"], TRUTH["omega"], rtol=tol_var, err_msg=name)
    assert float(fit.params["add_sd"]) == pytest.approx(TRUTH["add_sd"], rel=tol_var), name


@pytest.mark.parametrize("name", AVAILABLE)
def test_same_result_schema(fits, study, name):
    fit = fits[name]
    reference = fits["focei"]
    n_subj = study.n_subjects
    assert isinstance(fit, nlmegen.FitResult)
    assert list(fit.params) == list(reference.params)
    assert {k: np.shape(v) for k, v in fit.params.items()} == {k: np.shape(v) for k, v in reference.params.items()}
    assert fit.theta_names == reference.theta_names
    assert list(fit.ebes.columns) == list(reference.ebes.columns)
    assert list(fit.ebes.index) == list(study.ids)
    assert fit.ebe_cov.shape == (n_subj, 3, 3)
    assert fit.pred.shape == fit.ipred.shape == study.dv.shape
    assert fit.status in ("converged", "not_converged")
    assert set(fit.timings) >= {"compile_s", "run_s"}
    table = fit.summary()
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == list(reference.summary().index)
    assert {"estimate", "SE", "CI95_lower", "CI95_upper"} <= set(table.columns)
    assert np.all(np.isfinite(table["estimate"]))
    # EBEs agree with FOCEI's (posterior medians / conditional means vs modes: loose)
    diff = fit.ebes.to_numpy() - reference.ebes.to_numpy()
    assert np.median(np.abs(diff)) < 0.1, name
    tree = fit.to_arviz(n_draws=20, log_likelihood=False)
    assert {"posterior", "observed_data", "constant_data"} <= set(tree.children)
    assert int(tree["observed_data"]["DV"].size) == int(np.sum(study.mask))
    assert list(tree["posterior"]["eta"].coords["subject"].values) == list(study.ids)
