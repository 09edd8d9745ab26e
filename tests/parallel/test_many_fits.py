"""Bootstrap, SIR and multistart (nlmegen.parallel) on the local executor."""

import concurrent.futures as cf

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from scipy import stats

import nlmegen
from nlmegen.parallel import LocalExecutor
from nlmegen.parallel.bootstrap import resample_indices
from nlmegen.parallel.sir import weighted_without_replacement


@pytest.fixture(scope="module")
def theo_fit():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    return nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)


def linear_model(pop):
    """y_ij = mu + eta_i + eps_ij: with omega and sd fixed the OFV is exactly quadratic in mu."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    omega = numpyro.sample("omega", dist.HalfNormal(1.0))
    sd = numpyro.sample("sd", dist.HalfNormal(1.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega))
        nlmegen.observe("y", nlmegen.additive(mu + eta[:, None] + 0.0 * pop.times, sd), pop)


def test_local_executor_is_a_concurrent_futures_executor():
    ex = LocalExecutor()
    assert isinstance(ex, cf.Executor)
    assert ex.submit(pow, 2, 5).result() == 32
    failed = ex.submit(int, "x")
    assert isinstance(failed.exception(), ValueError)
    assert list(ex.map(abs, [-1, -2])) == [1, 2]
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)


def test_resampling_by_subject_and_strata():
    idx = resample_indices(jax.random.key(3), 12, 400)
    assert idx.shape == (400, 12) and idx.min() >= 0 and idx.max() <= 11
    counts = np.bincount(idx.ravel(), minlength=12) / idx.size
    assert np.allclose(counts, 1 / 12, atol=0.01)  # uniform draws with replacement
    assert np.mean([len(set(r)) for r in idx]) < 10  # repeats happen (expected distinct 12(1-(11/12)^12) = 7.7)
    strata = np.array([0] * 4 + [1] * 8)
    idx = resample_indices(jax.random.key(3), 12, 50, strata)
    assert np.all(strata[idx] == strata[None, :])  # every replicate keeps each stratum's size
    again = resample_indices(jax.random.key(3), 12, 50, strata)
    assert np.array_equal(idx, again)


def test_weighted_resampling_without_replacement():
    w = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    log_w = np.array([0.0, np.log(2), np.log(3), np.log(4), -np.inf])
    first = [weighted_without_replacement(jax.random.key(i), log_w, 2)[0] for i in range(2000)]
    freq = np.bincount(first, minlength=5) / 2000
    assert np.allclose(freq, w / w.sum(), atol=0.035)  # the first draw is proportional to the weights
    picks = weighted_without_replacement(jax.random.key(0), log_w, 4)
    assert sorted(picks) == [0, 1, 2, 3]  # no repeats; weight 0 never drawn
    with pytest.raises(ValueError, match="finite importance ratio"):
        weighted_without_replacement(jax.random.key(0), log_w, 5)


def test_bootstrap_of_theo_sd_against_the_sandwich(theo_fit):
    boot = nlmegen.bootstrap(theo_fit, n=20, key=jax.random.key(1))
    assert boot.counts == {"converged": 20} and boot.n_failed == 0
    table = boot.summary()
    se = theo_fit.summary()["SE"]
    ratio = table["SE"] / se.loc[table.index]
    assert np.all((ratio > 1 / 3) & (ratio < 3)), ratio  # same order of magnitude as the sandwich
    # the percentile interval holds the estimate and has the sandwich interval's width within a factor 3
    assert np.all((table["2.5%"] < table["estimate"]) & (table["estimate"] < table["97.5%"]))
    width = (table["97.5%"] - table["2.5%"]) / (theo_fit.summary()["CI95_upper"] - theo_fit.summary()["CI95_lower"])
    assert np.all((width > 1 / 3) & (width < 3)), width
    # each replicate is the fit of its resample: refit replicate 0 directly
    data = nlmegen.parallel._tasks.resample(theo_fit.pop, boot.indices[0])
    direct = nlmegen.fit(nlmegen.examples.theo_model, data, progress=False, covariance="none",
                         init={k: v for k, v in theo_fit.params.items()})
    assert abs(direct.ofv - boot.ofv[0]) < 1e-6


def test_bootstrap_counts_unconverged_and_failed_replicates(theo_fit):
    boot = nlmegen.bootstrap(theo_fit, n=4, key=jax.random.key(2), method=nlmegen.FOCEI(maxiter=1, progress=False))
    assert boot.counts == {"not_converged": 4}
    assert len(boot.kept()) == 0 and len(boot.messages) == 4
    kept = nlmegen.bootstrap(theo_fit, n=4, key=jax.random.key(2), method=nlmegen.FOCEI(maxiter=1, progress=False),
                             use=("converged", "not_converged"))
    assert len(kept.kept()) == 4
    # a replicate that raises is an "error", counted as failed, and the others go on
    from nlmegen.parallel._spec import chunk_results
    from nlmegen.parallel._tasks import fit_chunk

    jobs = [{"index": None, "init": {"tka": -1.0, "omega": [-1.0, 0.1, 0.1]}, "fixed": {}},
            {"index": None, "init": dict(theo_fit.params), "fixed": {}}]
    backend = nlmegen.FOCEI(progress=False, covariance="none")
    records = chunk_results([LocalExecutor().submit(fit_chunk, theo_fit.model, theo_fit.pop, backend, jobs)], [2])
    assert records[0]["status"] == "error" and "omega" in records[0]["message"]
    assert records[1]["status"] == "converged"
    with pytest.raises(KeyError, match="no covariate 'SEX'"):
        nlmegen.bootstrap(theo_fit, n=2, strata="SEX")
    with pytest.raises(ValueError, match="its own stratum"):
        nlmegen.bootstrap(theo_fit, n=2, strata=np.arange(12.0))  # every subject alone: nothing resampled
    with pytest.raises(ValueError, match="one value per subject"):
        nlmegen.bootstrap(theo_fit, n=2, strata=[0, 1])


def test_sir_on_theo_sd_is_reproducible_by_key(theo_fit):
    a = nlmegen.sir(theo_fit, samples=200, resamples=50, key=jax.random.key(5))
    b = nlmegen.sir(theo_fit, samples=200, resamples=50, key=jax.random.key(5))
    c = nlmegen.sir(theo_fit, samples=200, resamples=50, key=jax.random.key(6))
    pd.testing.assert_frame_equal(a.resamples, b.resamples)
    assert not a.resamples.equals(c.resamples)
    assert abs(a.ofv_estimate - theo_fit.ofv) < 1e-6  # the OFV at the estimate, recomputed
    d = a.diagnostics.iloc[0]
    assert d["samples"] == 200 and d["resamples"] == 50 and d["failed"] == 0
    w = a.samples["weight"].to_numpy()
    assert np.isclose(w.sum(), 1.0) and np.isclose(d["ess"], 1 / np.sum(w ** 2))
    assert a.samples["resampled"].sum() == 50
    q = a.dofv_quantiles()
    upper = q.loc[0.5:]  # resampling removes the poorly fitting vectors: the upper dOFV quantiles fall
    assert np.all(upper["resampled"] < upper["proposal"])
    prop = a.resampled_proportion()
    assert prop.shape == (7, 10) and np.isclose(prop.attrs["expected"], 0.25)
    summary = a.summary()
    assert np.all((summary["2.5%"] < summary["estimate"]) & (summary["estimate"] < summary["97.5%"]))
    two = nlmegen.sir(theo_fit, samples=(100, 100), resamples=(40, 40), key=jax.random.key(5))
    assert list(two.diagnostics.index) == [1, 2] and len(two.resamples) == 40


def test_sir_importance_ratios_are_exact_for_a_quadratic_objective():
    rng = np.random.default_rng(0)
    ids, times = np.repeat(np.arange(1, 9), 4), np.tile([1.0, 2.0, 3.0, 4.0], 8)
    eta = np.repeat(rng.normal(0, 0.5, 8), 4)
    table = pd.DataFrame({"ID": ids, "TIME": times, "DV": 2.0 + eta + rng.normal(0, 1.0, 32)})
    pop = nlmegen.read_nonmem(table)
    fit = nlmegen.fit(linear_model, pop, progress=False, covariance="R", fixed={"omega": 0.5, "sd": 1.0})
    assert fit.status == "converged" and int(fit.free.sum()) == 1
    out = nlmegen.sir(fit, samples=200, resamples=50, key=jax.random.key(0))
    rows = out.samples
    z2 = ((rows["mu"] - fit.params["mu"]) / fit.se["mu"]) ** 2
    # the proposal is the exact posterior: dOFV = z^2, every importance ratio 1, ESS = M
    assert np.allclose(rows["dofv"], z2, rtol=1e-5, atol=1e-7)
    assert out.diagnostics.iloc[0]["ess"] > 199.9
    assert stats.kstest(rows["dofv"], stats.chi2(1).cdf).pvalue > 0.01


def test_multistart_reports_best_and_spread(theo_fit):
    ms = nlmegen.multistart(theo_fit, n=3, spread=0.3, key=jax.random.key(4))
    assert list(ms.table["status"]) == ["converged"] * 3
    assert abs(ms.best_ofv - theo_fit.ofv) < 1e-3 and ms.best.ofv == ms.best_ofv
    assert ms.spread["ofv_range"] < 1e-3 and ms.spread["tcl"] < 1e-3
    starts = ms.starts.to_numpy()
    assert np.all(np.abs(starts - theo_fit.theta[theo_fit.free]).max(axis=1) > 0.01)  # they did start elsewhere
    with pytest.raises(ValueError, match="spread"):
        nlmegen.multistart(theo_fit, n=2, spread=0.0)


def test_sir_needs_a_covariance(theo_fit):
    import dataclasses

    with pytest.raises(ValueError, match="covariance"):
        nlmegen.sir(dataclasses.replace(theo_fit, covariance=None), samples=10, resamples=5)
    with pytest.raises(ValueError, match="must not exceed"):
        nlmegen.sir(theo_fit, samples=10, resamples=20)


def test_a_model_sent_by_value_is_one_model_per_worker():
    import pickle

    import cloudpickle

    from nlmegen.parallel._tasks import same_model

    def make(scale):
        def model(pop):
            return scale * pop

        return model

    first, second = (pickle.loads(cloudpickle.dumps(make(2.0))) for _ in range(2))
    assert first is not second and same_model(first) is same_model(second)  # the compiled program is reused
    assert same_model(pickle.loads(cloudpickle.dumps(make(3.0)))) is not same_model(first)  # other content
    assert same_model(nlmegen.examples.theo_model) is nlmegen.examples.theo_model
