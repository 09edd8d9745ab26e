"""SCM: the PsN decision rules on scripted objective values, and a search on simulated truth."""

from __future__ import annotations

import concurrent.futures
import pickle

import _sim
import numpy as np
import pytest
from scipy import stats

import nlmegen
from nlmegen.covariates import Relation, _scm


@pytest.fixture(scope="module")
def pop():
    return nlmegen.read_nonmem(_sim.population(30, seed=1))


def _scripted(effects: dict[str, float], base_ofv: float = 100.0):
    """A stand-in for one candidate fit: OFV = base - sum of the effects of the included covariates."""

    def fit_candidate(make_model, relations, pop, method, init, options, keep):
        ofv = base_ofv - sum(effects[r.covariate] for r in relations.relations)
        params = {r.site: np.asarray(0.1) for r in relations.relations}
        return _scm._Outcome(ofv, "converged", "", 5 + len(relations.relations), params, 0.0, fit=relations)

    return fit_candidate


def test_forward_then_backward_follow_psn_rules(pop, monkeypatch):
    # WT: dOFV 40 (in, kept); AGE: 4.5 (p 0.034: in at 0.05, out at 0.01); SEX: 0.3 (never in)
    monkeypatch.setattr(_scm, "_fit_candidate", _scripted({"WT": 40.0, "AGE": 4.5, "SEX": 0.3}))
    cands = [Relation("cl", "WT", "power"), Relation("cl", "AGE", "exponential"), Relation("v", "SEX", "categorical")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool_exec:  # any executor with submit
        res = nlmegen.scm(lambda rel: None, pop, cands, executor=pool_exec, parameters=["cl", "v"])
    steps = res.steps
    assert [r.label for r in res.relations.relations] == ["cl-WT(power)"]
    assert list(steps["direction"]) == ["base"] + ["forward"] * 6 + ["backward"] * 3
    chosen = steps[steps["chosen"]]
    assert list(zip(chosen["step"], chosen["direction"], chosen["relation"], strict=True)) == [
        (1, "forward", "cl-WT(power)"), (2, "forward", "cl-AGE(exponential)"), (4, "backward", "cl-AGE(exponential)")]
    age2 = steps[(steps["step"] == 2) & (steps["relation"] == "cl-AGE(exponential)")].iloc[0]
    assert age2["dofv"] == pytest.approx(4.5) and age2["p_value"] == pytest.approx(stats.chi2.sf(4.5, 1))
    assert age2["model"] == "cl-WT(power) + cl-AGE(exponential)"
    # the final fit is refitted here (the executor ran elsewhere), from the estimates reached
    assert res.fit == res.relations


def test_warm_start_and_degrees_of_freedom(pop, monkeypatch):
    seen = []

    def fit_candidate(make_model, relations, pop, method, init, options, keep):
        seen.append((relations.label, dict(init)))
        return _scripted({"SEX": 10.0, "WT": 0.0})(make_model, relations, pop, method, init, options, keep)

    monkeypatch.setattr(_scm, "_fit_candidate", fit_candidate)
    res = nlmegen.scm(lambda rel: None, pop, [Relation("v", "SEX", "categorical")], base=[Relation("cl", "WT")])
    assert [r.label for r in res.relations.relations] == ["cl-WT(power)", "v-SEX(categorical)"]
    assert seen[1][1] == {"cl_WT": 0.1, "v_SEX": pytest.approx(np.zeros(1))}  # parent estimates + "no effect"
    assert res.steps["df"].iloc[1] == 1  # two sexes: one coefficient
    backward = res.steps[res.steps["direction"] == "backward"]
    assert list(backward["relation"]) == ["v-SEX(categorical)"]  # the base relation is never tested


def test_bad_requests(pop):
    with pytest.raises(ValueError, match="Bayesian"):
        nlmegen.scm(_sim.make_model, pop, [Relation("cl", "WT")], method="nuts")
    with pytest.raises(ValueError, match="already in the base"):
        nlmegen.scm(_sim.make_model, pop, [Relation("cl", "WT")], base=[Relation("cl", "WT", "linear")])
    with pytest.raises(KeyError, match="no covariate 'WGT'"):
        nlmegen.scm(_sim.make_model, pop, [Relation("cl", "WGT")])


def test_scm_finds_the_simulated_weight_effect(pop):
    # truth: CL ~ (WT/70)^0.75, no age effect. FOCE on a one-random-effect model keeps the five fits
    # (one compile each) fast; FO is not used: its bias makes null covariates significant (here AGE,
    # p = 0.0002; Wahlby et al., J Pharmacokinet Pharmacodyn 2001;28:231-252)
    cands = [Relation("cl", "WT", "power"), Relation("cl", "AGE", "exponential")]
    res = nlmegen.scm(_sim.make_model, pop, cands, parameters=["cl", "v"], method="foce")
    assert [r.label for r in res.relations.relations] == ["cl-WT(power)"], res.report()
    first = res.steps[res.steps["step"] == 1].set_index("relation")
    assert first.loc["cl-WT(power)", "p_value"] < 1e-4
    assert first.loc["cl-AGE(exponential)", "p_value"] > 0.05
    assert res.fit.params["cl_WT"] == pytest.approx(_sim.TRUTH["cl_WT"], abs=0.25)
    weights = _sim.population(30, seed=1).groupby("ID").WT.first()
    assert res.relations.relations[0].ref == pytest.approx(np.median(weights))  # centred on the median
    assert "final model: cl-WT(power)" in res.report()


def test_a_candidate_job_pickles_for_process_pools(pop):
    # what a process pool or Dask sends: the factory (module level), the relations, the population
    rel = nlmegen.covariates.Relations([Relation("cl", "WT")], ["cl", "v"]).resolve(pop)
    factory, rel2, pop2 = pickle.loads(pickle.dumps((_sim.make_model, rel, pop)))
    assert rel2 == rel and factory is _sim.make_model
    np.testing.assert_array_equal(np.asarray(pop2.covariates["WT"]), np.asarray(pop.covariates["WT"]))
    assert pickle.loads(pickle.dumps(_scm._fit_candidate)) is _scm._fit_candidate


@pytest.mark.slow
def test_scm_runs_its_fits_in_worker_processes(pop):
    """The same search as above with each step's candidate fits in two spawned worker processes (about
    a minute: each worker imports JAX and compiles its models); the same decisions and estimates."""
    import multiprocessing

    cands = [Relation("cl", "WT", "power"), Relation("cl", "AGE", "exponential")]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool_exec:
        res = nlmegen.scm(_sim.make_model, pop, cands, parameters=["cl", "v"], method="foce", executor=pool_exec)
    here = nlmegen.scm(_sim.make_model, pop, cands, parameters=["cl", "v"], method="foce", max_steps=1)
    assert [r.label for r in res.relations.relations] == ["cl-WT(power)"], res.report()
    first = res.steps[res.steps["step"] == 1].set_index("relation")
    ref = here.steps[here.steps["step"] == 1].set_index("relation")
    np.testing.assert_allclose(first["ofv"], ref.loc[first.index, "ofv"], rtol=0, atol=1e-3)
    assert res.fit.params["cl_WT"] == pytest.approx(here.fit.params["cl_WT"], abs=1e-3)
