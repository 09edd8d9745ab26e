"""The VPC figure follows the field's conventions (issue 18): no simulated ribbon below what the data
can show, a log scale without blocks down to the axis floor, bin boundaries marked, one compact legend
below the panels, the number of simulations and the binning noted, units on the axes."""

import jax
import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

import nlmegen

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def check():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
    return nlmegen.vpc(fit, n_sim=100, key=jax.random.key(0))


def _ribbon_ys(ax):
    ys = [p.vertices[:, 1] for c in ax.collections if isinstance(c, PolyCollection) for p in c.get_paths()]
    return np.concatenate(ys)


def test_ribbons_are_censored_at_zero(check):
    raw = check.table["sim_lower"].min()
    assert raw < 0  # additive error: simulated 5th percentiles below zero exist in the table
    fig = check.plot(units={"time": "h", "DV": "mg/L"})  # given (any case), or from the data's own units
    ax = fig.axes[0]
    assert _ribbon_ys(ax).min() >= 0.0 and ax.get_ylim()[0] == 0.0
    assert ax.get_xlabel() == "TIME (h)" and ax.get_ylabel() == "DV (mg/L)"
    edges = check.edges[("all", "DV")]
    ticks = [line for line in ax.lines if tuple(line.get_xdata()) in {(e, e) for e in edges}]
    assert len(ticks) == len(edges)
    texts = [t.get_text() for t in fig.texts]
    assert any("100 simulated replicates" in t and "bins: clusters" in t for t in texts)
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 5 and ax.get_legend() is None


def test_log_scale_has_a_floor_above_zero(check):
    ax = check.plot(log_y=True).axes[0]
    bottom = ax.get_ylim()[0]
    positive = check.observed["DV"][check.observed["DV"] > 0].min()
    assert bottom == pytest.approx(positive / 2)
    assert np.nanmin(_ribbon_ys(ax)) >= bottom
