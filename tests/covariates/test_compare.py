"""`nlmegen.compare` on nested fits of simulated data with a true weight effect on CL."""

from __future__ import annotations

import dataclasses

import _sim
import numpy as np
import pytest
from scipy import stats

import nlmegen
from nlmegen.covariates import Relation, Relations


@pytest.fixture(scope="module")
def fits():
    pop = nlmegen.read_nonmem(_sim.population(30, seed=1))
    opts = {"progress": False, "covariance": "R"}
    base = nlmegen.fit(_sim.make_model(Relations([], ["cl", "v"])), pop, "foce", **opts)
    full = nlmegen.fit(_sim.make_model(Relations([Relation("cl", "WT")], ["v"]).resolve(pop)), pop, "foce", **opts)
    return pop, base, full


def test_table_of_nested_fits(fits):
    _, base, full = fits
    table = nlmegen.compare(base, full, names=["base", "weight"], loo=False)
    assert list(table.index) == ["base", "weight"]
    row = table.loc["weight"]
    assert row["ofv"] == pytest.approx(full.ofv) and row["aic"] == pytest.approx(full.aic)
    assert row["dofv"] == pytest.approx(full.ofv - base.ofv) and row["df"] == 1
    assert row["lrt_p"] == pytest.approx(stats.chi2.sf(base.ofv - full.ofv, 1))
    assert row["lrt_p"] < 1e-4  # the simulated effect is found
    assert row["daic"] == pytest.approx(full.aic - base.aic) and row["daic"] < 0
    assert np.isnan(table.loc["base", "lrt_p"])  # the reference against itself
    # the same test with the larger model as the reference
    swapped = nlmegen.compare(base, full, names=["base", "weight"], reference="weight", loo=False)
    assert swapped.loc["base", "df"] == -1 and swapped.loc["base", "lrt_p"] == pytest.approx(row["lrt_p"])


@pytest.mark.slow  # the per-draw subject marginals compile and run for ~25 s
def test_loo_columns_rank_the_true_model_first(fits):
    _, base, full = fits
    table = nlmegen.compare(base, full, names=["base", "weight"], loo=True, loo_draws=200)
    assert {"elpd_loo", "p_loo", "elpd_diff", "weight"} <= set(table.columns)
    assert table.loc["weight", "elpd_loo"] > table.loc["base", "elpd_loo"]
    assert table.loc["base", "elpd_diff"] == 0.0  # the reference


def test_refuses_fits_of_other_data(fits):
    _, base, full = fits
    other = dataclasses.replace(full, dv=full.dv * 1.1)
    with pytest.raises(ValueError, match="not of the same data"):
        nlmegen.compare(base, other)
    no_cov = dataclasses.replace(full, covariance=None, covariance_kind="none")
    with pytest.raises(ValueError, match="no covariance step"):
        nlmegen.compare(base, no_cov, loo=True)
    with pytest.raises(ValueError, match="at least two"):
        nlmegen.compare(base)
