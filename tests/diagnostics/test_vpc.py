"""VPC: observed percentiles are pandas' percentiles; a wrong absorption model is caught, the true one is not."""

import dataclasses

import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen

matplotlib.use("Agg")

TRUTH = {"tka": 0.5, "tcl": 1.0, "tv": 3.5, "omega": np.array([0.3, 0.3, 0.2]), "add_sd": 0.3}
EDGES = [0.0, 0.4, 1.5, 4.0, 8.0, 13.0, 30.0]


def slow_absorption_model(pop):
    """The theo model with ka divided by 8: the wrong absorption."""
    tka = numpyro.sample("tka", dist.Normal(0.5, 2.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 2.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        conc = nlmegen.pk.one_cmt(pop, ka=jnp.exp(tka + eta[:, 0]) / 8.0, cl=jnp.exp(tcl + eta[:, 1]),
                                  v=jnp.exp(tv + eta[:, 2]))
        nlmegen.observe("conc", nlmegen.additive(conc, add_sd), pop)


@pytest.fixture(scope="module")
def study(simulated_theo):
    return simulated_theo(5, TRUTH, 5)


def test_observed_quantiles_are_pandas_quantiles(study):
    result = nlmegen.vpc(None, study, model=nlmegen.examples.theo_model, params=TRUTH, n_sim=50, bins=EDGES)
    obs = result.observed
    bins = np.clip(np.searchsorted(EDGES, obs["TIME"], side="right") - 1, 0, len(EDGES) - 2)
    for (b, q), row in result.table.set_index(["bin", "quantile"]).iterrows():
        expected = obs.loc[bins == b, "DV"].quantile(q)
        assert row["observed"] == pytest.approx(expected, rel=1e-12), (b, q)
        assert row["sim_lower"] <= row["sim_median"] <= row["sim_upper"]


def _outside(result) -> int:
    t = result.table
    return int(((t["observed"] < t["sim_lower"]) | (t["observed"] > t["sim_upper"])).sum())


def test_misspecified_absorption_is_visible(study):
    # One simulated study: its bins share the same 60 subjects' random effects, so they are correlated
    # and a few chance excursions are expected even for the true model. At 99% intervals the true model
    # stays inside in all but a few of the 30 comparisons (seeds 5-10 gave 1-3), the wrong one does not
    # (21-23).
    true = nlmegen.vpc(None, study, model=nlmegen.examples.theo_model, params=TRUTH, n_sim=200, ci=0.99)
    wrong = nlmegen.vpc(None, study, model=slow_absorption_model, params=TRUTH, n_sim=200, ci=0.99)
    assert _outside(true) <= 3
    assert _outside(wrong) >= 15
    early = wrong.table[(wrong.table["x"] < 2.0) & (wrong.table["quantile"] == 0.5)]
    assert (early["observed"] > early["sim_upper"]).any()  # the data absorb faster than the wrong model


def test_pred_corrected_and_plot(study, tmp_path):
    result = nlmegen.vpc(None, study, model=nlmegen.examples.theo_model, params=TRUTH, n_sim=50,
                         pred_corrected=True, bins="equal")
    assert result.pred_corrected and len(result.table) == 3 * result.table["bin"].nunique()
    fig = result.plot()
    fig.savefig(tmp_path / "vpc.png")
    assert (tmp_path / "vpc.png").stat().st_size > 10_000


def test_blq_fraction_and_censored_percentiles(study):
    lloq = 2.0
    cens = jnp.where(study.mask & (study.dv < lloq), 1, 0)
    pop = dataclasses.replace(study, cens=cens, limit=jnp.full(study.dv.shape, lloq))
    result = nlmegen.vpc(None, pop, model=nlmegen.examples.theo_model, params=TRUTH, n_sim=100)
    assert len(result.blq) > 0
    first = result.blq.sort_values("x").iloc[0]
    assert first["observed"] > 0.3 and first["sim_lower"] <= first["observed"] <= first["sim_upper"]
    low = result.table[(result.table["x"] == result.table["x"].min()) & (result.table["quantile"] == 0.05)]
    assert low["observed"].isna().all()  # the 5th percentile of the first bin is below the LLOQ


def test_bad_arguments(study):
    with pytest.raises(ValueError, match="constant covariate"):
        nlmegen.vpc(None, study, model=nlmegen.examples.theo_model, params=TRUTH, n_sim=5, stratify="HT")
    with pytest.raises(ValueError, match="bins"):
        nlmegen.vpc(None, study, model=nlmegen.examples.theo_model, params=TRUTH, n_sim=5, bins="weird")


def _pandas_tad(table):
    """Reference TAD: time minus the latest dose record seen so far in the subject's record order."""
    dose_time = table["TIME"].where(table["EVID"] != 0).groupby(table["ID"]).ffill()
    first = table["TIME"].where(table["EVID"] != 0).groupby(table["ID"]).transform("min")
    return (table["TIME"] - dose_time.fillna(first))[table["EVID"] == 0].to_numpy()


def test_time_after_dose_matches_the_dose_records():
    table = nlmegen.datasets.load("theo_md")
    pop = nlmegen.read_nonmem(table)
    tad = nlmegen.diagnostics.time_after_dose(pop)[np.asarray(pop.mask)]
    np.testing.assert_allclose(tad, _pandas_tad(table))
    assert tad.max() < 25.0 and np.asarray(pop.times)[np.asarray(pop.mask)].max() > 100.0


def test_tad_binning(key):
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_md"))
    edges = [0.0, 1.0, 3.0, 8.0, 13.0, 25.0]
    params = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": np.array([0.6, 0.3, 0.1]), "add_sd": 0.7}
    result = nlmegen.vpc(None, pop, model=nlmegen.examples.theo_model, params=params, n_sim=30, bins=edges,
                         x="tad", key=key)
    obs = result.observed
    assert result.x == "TAD" and obs["TAD"].max() < 25.0
    bins = np.clip(np.searchsorted(edges, obs["TAD"], side="right") - 1, 0, len(edges) - 2)
    for (b, q), row in result.table.set_index(["bin", "quantile"]).iterrows():
        assert row["observed"] == pytest.approx(obs.loc[bins == b, "DV"].quantile(q), rel=1e-12), (b, q)
        assert row["x"] == pytest.approx(obs.loc[bins == b, "TAD"].median())
    fig = result.plot()
    assert fig.axes[0].get_xlabel() == "TAD (h)"  # theo_md's units (h), NONMEM's names
    with pytest.raises(ValueError, match="'time' or 'tad'"):
        nlmegen.vpc(None, pop, model=nlmegen.examples.theo_model, params=params, n_sim=2, x="dose")


def test_nominal_times_get_one_bin_each():
    from nlmegen.diagnostics._vpc import _cluster_edges

    times = np.repeat([0.0, 24.0, 36.0, 48.0, 72.0, 96.0, 120.0, 144.0], [30, 30, 30, 30, 30, 30, 25, 10])
    edges = _cluster_edges(times, 10)
    bins = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
    assert len(edges) == 9 and len(np.unique(bins)) == 8
    assert all(len(np.unique(times[bins == b])) == 1 for b in np.unique(bins))
