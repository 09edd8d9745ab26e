"""Goodness-of-fit plots: gof, plot_individuals, plot_random_effects (Agg backend, theo_sd fit)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import nlmegen  # noqa: E402
from nlmegen.diagnostics._gof import gof_table  # noqa: E402
from nlmegen.diagnostics.plots import GOF_PANELS, gof, plot_individuals, plot_random_effects  # noqa: E402


@pytest.fixture(scope="module")
def fit():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    return nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False, covariance="none")


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _offsets(ax) -> np.ndarray:
    cols = [c for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate([np.asarray(c.get_offsets()) for c in cols])


def _save(fig, path):
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 0


def _lowess_line(ax):
    return next(line for line in ax.get_lines() if line.get_label() == "_LOWESS")


def test_gof_panels(fit, tmp_path):
    table = gof_table(fit, n_sim=50)
    assert list(table.columns) == ["ID", "TIME", "output", "DV", "PRED", "IPRED", "RES", "IWRES", "CWRES", "NPDE"]
    fig = gof(fit, table=table)
    assert isinstance(fig, Figure)
    assert [a.get_title() for a in fig.axes] == list(GOF_PANELS)
    xy = _offsets(fig.axes[0])
    np.testing.assert_allclose(xy[:, 0], fit.pred[fit.mask])
    np.testing.assert_allclose(xy[:, 1], fit.dv[fit.mask])
    xy = _offsets(fig.axes[1])
    np.testing.assert_allclose(xy[:, 0], fit.ipred[fit.mask])
    assert len(_offsets(fig.axes[2])) == fit.mask.sum()
    np.testing.assert_allclose(_offsets(fig.axes[6])[:, 1], np.abs(table["IWRES"].to_numpy()))  # |IWRES|
    np.testing.assert_allclose(_offsets(fig.axes[7]), table[["TIME", "NPDE"]].to_numpy())  # NPDE vs TIME
    # units from the data set's metadata (theo_sd: h, mg/L) on every axis that has one
    assert fig.axes[0].get_xlabel() == "PRED (mg/L)" and fig.axes[0].get_ylabel() == "DV (mg/L)"
    assert fig.axes[3].get_xlabel() == "TIME (h)" and fig.axes[5].get_xlabel() == "IPRED (mg/L)"
    _save(fig, tmp_path / "gof.png")
    _save(gof(fit, table=table, log=True, units={"DV": "ug/mL"}), tmp_path / "gof_log.png")
    assert plt.gcf().axes[0].get_ylabel() == "DV (ug/mL)"


def test_gof_smooth_is_statsmodels_lowess(fit):
    """The smooth drawn in CWRES vs TIME is LOWESS (span 2/3, 3 iterations) of those points, not a running
    median: compared with statsmodels called directly, and with a straight line on exactly linear data."""
    from statsmodels.nonparametric.smoothers_lowess import lowess

    table = gof_table(fit, n_sim=50)
    fig = gof(fit, table=table)
    x, y = (np.asarray(v, float) for v in _lowess_line(fig.axes[3]).get_data())
    expected = lowess(table["CWRES"].to_numpy(), table["TIME"].to_numpy(), frac=2 / 3, it=3)
    np.testing.assert_allclose(np.column_stack([x, y]), expected)
    line = table.assign(CWRES=0.5 * table["TIME"] - 1.0)  # lowess reproduces a line; a running median bends
    fig = gof(fit, table=line)
    x, y = (np.asarray(v, float) for v in _lowess_line(fig.axes[3]).get_data())
    np.testing.assert_allclose(y, 0.5 * x - 1.0, atol=1e-9)


def test_individuals(fit, tmp_path):
    fig = plot_individuals(fit, n_points=50)
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 12
    for i, a in enumerate(axes):
        m = fit.mask[i]
        np.testing.assert_allclose(_offsets(a), np.column_stack([fit.times[i][m], fit.dv[i][m]]))
        ipred = next(line for line in a.get_lines() if line.get_label() == "IPRED")
        t, y = (np.asarray(v, float) for v in ipred.get_data())
        for tj, fj in zip(fit.times[i][m], fit.ipred[i][m], strict=True):
            hit = np.flatnonzero(t == tj)
            assert hit.size, f"time {tj} missing from the curve"
            np.testing.assert_allclose(y[hit], fj, rtol=1e-6, atol=1e-8)
    assert axes[0].get_xlabel() == "TIME (h)" and axes[0].get_ylabel() == "DV (mg/L)"
    _save(fig, tmp_path / "ind.png")


def test_random_effects(fit, tmp_path):
    fig = plot_random_effects(fit)
    assert len(fig.axes) == fit.ebes.shape[1]
    for a in fig.axes:
        assert len(a.patches) > 0  # histogram bars
        assert any(line.get_label().startswith("N(0") for line in a.get_lines())
    _save(fig, tmp_path / "re.png")
    fig = nlmegen.plot_random_effects(fit, covariates=True)  # public: ETAs against covariates
    assert len(fig.axes) == 2 * fit.ebes.shape[1]
    cov_axes = fig.axes[fit.ebes.shape[1]:]
    assert all(a.get_xlabel() == "WT (kg)" for a in cov_axes)
    assert all(any(line.get_label() == "_LOWESS" for line in a.get_lines()) for a in cov_axes)
    _save(fig, tmp_path / "re_cov.png")
