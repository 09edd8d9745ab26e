"""`fit_early_stopping`: the split, the validation curve and the kept fit."""

import _bimodal as B
import jax
import numpy as np
import pytest

import nlmegen
from nlmegen._simulate import model_values

_model = B.gaussian_model


def test_early_stopping_keeps_the_iterate_with_the_best_validation_ofv():
    pop = nlmegen.read_nonmem(B.simulate_table(20))
    method = nlmegen.FOCEI(maxiter=12, progress=False)
    res = nlmegen.fit_early_stopping(_model, pop, method, key=jax.random.key(0), validation=0.25, every=3,
                                     init={"sigma": 0.5})
    assert len(res.validation_ids) == 5 and len(res.train_ids) == 15
    assert sorted(res.train_ids + res.validation_ids) == sorted(pop.ids)
    curve = res.curve
    n = len(res.full_fit.history)
    assert list(curve["step"]) == sorted(set(range(3, n + 1, 3)) | {n})
    best = int(np.argmin(curve["validation_ofv"]))
    assert res.best_step == curve["step"][best]
    assert res.fit.n_subjects == 15 and res.full_fit.n_subjects == 15
    # the curve's value is the held-out subjects' OFV at the kept estimates, and the kept fit's OFV
    # the training subjects' there
    valid = pop.subset(res.validation_ids)
    ofv = nlmegen.objective(_model, valid, model_values(res.fit))
    assert abs(ofv - curve["validation_ofv"][best]) < 1e-6 * max(1.0, abs(ofv))
    assert abs(res.fit.ofv - curve["train_ofv"][best]) < 1e-4 * max(1.0, abs(res.fit.ofv))
    for name, value in res.values.items():
        np.testing.assert_allclose(np.asarray(res.fit.params[name]), np.asarray(value), rtol=1e-10)


def test_early_stopping_rejects_bad_settings():
    pop = nlmegen.read_nonmem(B.simulate_table(6))
    with pytest.raises(ValueError, match="validation"):
        nlmegen.fit_early_stopping(_model, pop, nlmegen.FOCEI(), key=jax.random.key(0), validation=1.5)
    with pytest.raises(TypeError, match="backend object"):
        nlmegen.fit_early_stopping(_model, pop, "focei", key=jax.random.key(0))
    with pytest.raises(ValueError, match="every"):
        nlmegen.fit_early_stopping(_model, pop, nlmegen.FOCEI(), key=jax.random.key(0), every=0)
