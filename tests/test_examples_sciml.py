"""The one-subject SciML examples (tutorials 03 and 04): designs, models and the learned-effect helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlmegen
from nlmegen import examples_sciml as sx
from nlmegen.examples import IDR_TRUTH


@pytest.fixture(scope="module")
def small():
    regimens = [(50.0, 12.0, 2), (200.0, 24.0, 1), (25.0, 8.0, 3)]
    table = sx.simulate_regimens(regimens, key=jax.random.key(0))
    return table, nlmegen.read_nonmem(table)


def test_designs():
    assert len(sx.TRAIN_REGIMENS) == 36
    assert len(set(sx.TRAIN_REGIMENS)) == 36
    train_doses = {d for d, _, _ in sx.TRAIN_REGIMENS}
    train_intervals = {i for _, i, _ in sx.TRAIN_REGIMENS}
    # higher frequency: training doses, shorter intervals; outside: doses not seen in training
    assert all(d in train_doses and i < min(train_intervals) for d, i, _ in sx.TEST_FREQUENT)
    assert all(d < min(train_doses) or d > max(train_doses) for d, _, _ in sx.TEST_OUTSIDE)


def test_regimen_table_and_first_dose(small):
    table, pop = small
    assert pop.n_subjects == 3 and pop.outputs == ("conc", "resp")
    assert table.groupby("ID")["EVID"].sum().tolist() == [2, 1, 3]
    first = sx.first_dose_mask(pop)
    times = np.asarray(pop.times)
    # regimen 1: second dose at 12 h; regimen 2: one dose, first 24 h; regimen 3: second dose at 8 h
    for i, limit in enumerate((12.0, 24.0, 8.0)):
        real = np.asarray(pop.mask)[i]
        assert np.array_equal(first[i][real], times[i][real] < limit)


def test_ude_with_hill_reproduces_the_idr_model(small):
    """The UDE's structure is the IDR model's: with the Hill effect at the truth the predictions agree."""
    _, pop = small
    model = sx.ude_model("hill")
    params = {k: IDR_TRUTH[k] for k in ("log_ka", "log_cl", "log_vc", "log_kin", "log_kout", "log_smax",
                                          "log_sc50", "log_n")}
    params.update(sigma_conc=0.1, sigma_resp=1.0)
    pred = nlmegen.simulate_arrays(model, params, pop, key=jax.random.key(0), noise=False)[0]
    truth = sx.true_predictions(pop)
    real = np.asarray(pop.mask)
    np.testing.assert_allclose(pred[real], truth[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sx.effect_curve(model, params, [0.0, 1.0]), [0.0, 1.0], atol=1e-12)


def test_saturating_effect_is_zero_without_drug_and_flat_far_out():
    model = sx.ude_model("saturating", c_scale=2.0)
    weights = sx.weights_at(model, 3)
    h = sx.effect_curve(model, {"effect$params": weights}, [0.0, 1e3, 1e4, 1e6])
    assert h[0] == 0.0
    assert abs(h[3] - h[2]) < 1e-2 * max(1.0, abs(h[3])) and abs(h[3] - h[1]) < 0.05 * max(1.0, abs(h[3]))
    assert not np.allclose(weights["layers"][0]["kernel"], sx.weights_at(model, 4)["layers"][0]["kernel"])


@pytest.mark.parametrize("which", ["node", "middle", "mlp"])
def test_neural_models_simulate(small, which):
    table, pop = small
    scales = sx.data_scales(table)
    model = {"node": lambda: sx.node_model(scales, hidden=(4,)), "middle": lambda: sx.middle_model(scales, hidden=(4,)),
             "mlp": lambda: sx.ude_model("mlp", hidden=(4,))}[which]()
    values = sx.start_values(model, scales, seed=1, jitter=0.1)
    pred = nlmegen.simulate_arrays(model, values, pop, key=jax.random.key(0), noise=False)[0]
    real = np.asarray(pop.mask)
    assert np.all(np.isfinite(pred[real]))
    assert np.all(np.isnan(pred[~real]))


def test_hill_function():
    c = jnp.array([0.0, 1.0, 1e6])
    np.testing.assert_allclose(sx.hill(c), [0.0, 1.0, 2.0], atol=1e-8)
