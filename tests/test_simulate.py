"""simulate: reproducible, correct predictions without noise, clear errors, noise of the right size."""

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
