"""ODE models with a neural network (DeepNLME: an MLP of the concentration and a random effect as the
drug effect of the seeds' IDR model), fitted end to end by FOCEI (reverse engine) and SAEM (Adam on
the network weights), and everything after the fit on the result."""

import jax
import numpy as np
import pytest
from flax import nnx

import nlmegen
from nlmegen.examples import idr_nn_model, simulate_idr

MODEL = idr_nn_model((3,), n_eta_nn=1)


def _init():
    return {"log_ka": 0.0, "log_cl": 0.7, "log_vc": 3.0, "log_kin": 2.3, "log_kout": -0.7,
            "omega": np.full(3, 0.3), "sigma_conc": 0.1, "sigma_resp": 1.0,
            "effect$params": nnx.to_pure_dict(nnx.state(MODEL.net, nnx.Param))}


@pytest.fixture(scope="module")
def pop():
    # data from the mechanistic (Hill) IDR model: the network has to learn the drug effect
    return nlmegen.read_nonmem(simulate_idr(8, key=jax.random.key(2), n_doses=2, times=(1, 2, 4, 8, 12, 24, 36, 48)))


@pytest.fixture(scope="module")
def focei_fit(pop):
    return nlmegen.fit(MODEL, pop, method=nlmegen.FOCEI(maxiter=60, covariance="none", progress=False),
                       init=_init())


def test_focei_fits_a_deepnlme_model(focei_fit, pop):
    fit = focei_fit
    start = nlmegen.objective(MODEL, pop, _init())
    assert np.isfinite(fit.ofv) and fit.ofv < start - 200.0, (start, fit.ofv)
    assert fit.status in ("converged", "not_converged") and fit.message
    if fit.status == "not_converged":  # said honestly: the iteration cap or the subjects are named
        assert "maximum number of iterations" in fit.message or "EBE" in fit.message
    assert fit.params["effect$params"].size == 2 * 3 + 3 + 3 + 1
    assert fit.ebe_converged.all()


def test_everything_after_the_fit_works_on_a_network_model(focei_fit, pop, tmp_path):
    fit = focei_fit
    sims = nlmegen.simulate(MODEL, fit, pop, key=jax.random.key(0))
    assert np.isfinite(sims["value"].to_numpy()).all()
    table = fit.residuals(n_sim=20)
    assert np.isfinite(table["CWRES"]).all() and np.isfinite(table["IWRES"]).all()
    assert nlmegen.vpc(fit, n_sim=20, key=jax.random.key(1)) is not None
    assert nlmegen.plot_individuals(fit) is not None
    fit.save(tmp_path / "deepnlme.nc")
    loaded = nlmegen.load(tmp_path / "deepnlme.nc")
    np.testing.assert_allclose(loaded.params["effect$params"], fit.params["effect$params"])


def test_saem_moves_network_weights_by_adam(pop):
    settings = dict(n_explore=15, n_smooth=15, n_conditional=10, is_draws=0, focei=False, covariance="none",
                    progress=False, chunk=15)
    fit = nlmegen.fit(MODEL, pop, method=nlmegen.SAEM(**settings), init=_init(), key=jax.random.key(0))
    start = nlmegen.objective(MODEL, pop, _init())
    after = nlmegen.objective(MODEL, pop, fit.params)
    assert np.all(np.isfinite(fit.params["effect$params"]))
    assert not np.allclose(fit.params["effect$params"], _flat(_init()["effect$params"]))
    assert after < start, (start, after)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
