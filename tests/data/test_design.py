"""Designs from regimens (`nlmegen.regimen`, `nlmegen.design`) and ``simulate(..., as_population=True)``."""

import jax
import numpy as np
import pandas as pd
import pytest

import nlmegen

THEO = nlmegen.examples.theo_model
TIMES = [0.25, 0.5, 1, 2, 3.5, 5, 7, 9, 12, 24]
TRUTH = {"tka": float(np.log(1.5)), "tcl": float(np.log(2.75)), "tv": float(np.log(32.0)),
         "omega": [0.3, 0.3, 0.3], "add_sd": 0.5}


def test_regimen_records_and_bad_values():
    doses = nlmegen.regimen(100, n=3, interval=12, start=2, duration=0.5, cmt=2)
    assert doses["TIME"].tolist() == [2.0, 14.0, 26.0]
    assert doses["RATE"].tolist() == [200.0] * 3 and doses["CMT"].tolist() == [2] * 3
    with pytest.raises(nlmegen.DataError, match="3 doses need a positive interval"):
        nlmegen.regimen(100, n=3)
    with pytest.raises(nlmegen.DataError, match="amount must be a positive"):
        nlmegen.regimen(0)
    with pytest.raises(nlmegen.DataError, match="positive duration"):
        nlmegen.regimen(10, duration=0)


def test_design_groups_per_subject_times_and_covariates():
    pop = nlmegen.design(groups=[
        {"n": 2, "doses": nlmegen.regimen(100, n=2, interval=12, duration=1), "times": [0, 1, 12, 13],
         "covariates": {"WT": [60.0, 80.0]}, "name": "low"},
        {"n": 2, "doses": nlmegen.regimen(300), "times": [[0.5, 2.0], [1.0, 4.0, 8.0]], "covariates": {"WT": 70.0},
         "name": "high"},
    ])
    assert pop.ids == (1, 2, 3, 4) and pop.n_observations == 4 + 4 + 2 + 3
    assert pop.dv_missing is not None and bool(np.asarray(pop.dv_missing)[np.asarray(pop.mask)].all())
    np.testing.assert_allclose(pop.covariates["WT"], [60, 80, 70, 70])
    assert dict(pop.categories)["GROUP"] == ("high", "low")
    np.testing.assert_allclose(np.asarray(pop.dose_rates)[0], [100.0, 100.0])
    np.testing.assert_allclose(np.asarray(pop.dose_amts)[2, :1], [300.0])
    with pytest.raises(nlmegen.DataError, match="sequence of 3"):
        nlmegen.design(3, doses=nlmegen.regimen(1), times=[[1.0], [2.0]])
    with pytest.raises(nlmegen.DataError, match="lacks \\['times'\\]"):
        nlmegen.design(groups=[{"n": 1, "doses": nlmegen.regimen(1)}])
    with pytest.raises(nlmegen.DataError, match="must be finite and >= 0"):
        nlmegen.design(1, doses=nlmegen.regimen(1), times=[-1.0])


def test_samples_at_a_dose_time_are_pre_dose_and_outputs_get_dvid():
    pop = nlmegen.design(1, doses=nlmegen.regimen(100, n=2, interval=12), times=[0.0, 6.0, 12.0], obs_cmt=2)
    pred = nlmegen.simulate(THEO, TRUTH, pop, key=jax.random.key(0), noise=False)["value"].to_numpy()
    assert pred[0] == 0.0  # the sample at the first dose is taken before it
    idr = nlmegen.design(2, doses=nlmegen.regimen(100, n=2, interval=24), times={"conc": [1, 4], "resp": [1, 4, 8]})
    assert idr.outputs == ("conc", "resp") and idr.n_observations == 2 * 5


def test_simulated_population_is_fittable_and_censored_below_lloq():
    pop = nlmegen.design(6, doses=nlmegen.regimen(320), times=[0.0, *TIMES, 48.0], lloq=0.8)
    with pytest.raises(nlmegen.DataError, match="without a DV|allow_missing_dv"):
        nlmegen.fit(THEO, pop, progress=False)
    study = nlmegen.simulate(THEO, TRUTH, pop, key=jax.random.key(1), as_population=True)
    assert study.dv_missing is None and "censoring" in study.features
    cens, mask = np.asarray(study.cens), np.asarray(study.mask)
    sims = nlmegen.simulate(THEO, TRUTH, pop, key=jax.random.key(1))  # the same key: the same values
    below = sims["value"].to_numpy() < 0.8
    assert 0 < below.sum() < below.size
    np.testing.assert_array_equal(cens[mask] == 1, below)  # censored exactly where the value is below the LLOQ
    np.testing.assert_allclose(np.asarray(study.dv)[mask][~below], sims["value"].to_numpy()[~below])
    table = study.to_pandas()
    back = nlmegen.read_nonmem(table)
    np.testing.assert_array_equal(np.asarray(back.cens), cens)
    many = nlmegen.simulate(THEO, TRUTH, pop, key=jax.random.key(2), n=3, as_population=True)
    assert isinstance(many, list) and len(many) == 3 and not np.allclose(many[0].dv, many[1].dv)


def test_simulate_then_fit_recovers_the_truth():
    """60 subjects of the Theoph design simulated at TRUTH, then a FOCEI fit: two lines.

    Tolerances: typical values within 3 SE of the truth; each random-effect SD within 30% (the SD of
    60 draws alone varies by 0.3 / sqrt(120), 9%, so 30% is over 3 sigma); the residual SD within 10%
    (600 observations: about 3%)."""
    study = nlmegen.simulate(THEO, TRUTH, nlmegen.design(60, doses=nlmegen.regimen(320), times=TIMES),
                             key=jax.random.key(2026), as_population=True)
    fit = nlmegen.fit(THEO, study, progress=False)
    assert fit.status == "converged"
    table = fit.table("estimation")
    for name in ("tka", "tcl", "tv"):
        row = table.loc[name]
        assert abs(row["estimate"] - TRUTH[name]) < 3 * row["SE"], (name, row["estimate"], row["SE"])
    np.testing.assert_allclose(np.asarray(fit.params["omega"]), 0.3, rtol=0.3)
    assert fit.params["add_sd"] == pytest.approx(TRUTH["add_sd"], rel=0.1)


def test_with_dv_names_non_finite_records():
    pop = nlmegen.design(2, doses=nlmegen.regimen(10), times=[1.0, 2.0])
    values = np.ones((2, 2))
    values[1, 0] = np.nan
    with pytest.raises(nlmegen.DataError, match="ID 2 TIME 1"):
        pop.with_dv(values)
    assert isinstance(pop.to_pandas(), pd.DataFrame)
