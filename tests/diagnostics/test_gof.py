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
from nlmegen.diagnostics.plots import gof, plot_individuals, plot_random_effects  # noqa: E402


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


def test_gof_panels(fit, tmp_path):
    table = gof_table(fit, n_sim=50)
    assert list(table.columns) == ["ID", "TIME", "output", "DV", "PRED", "IPRED", "RES", "IWRES", "CWRES", "NPDE"]
    fig = gof(fit, table=table)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    xy = _offsets(fig.axes[0])
    np.testing.assert_allclose(xy[:, 0], fit.pred[fit.mask])
    np.testing.assert_allclose(xy[:, 1], fit.dv[fit.mask])
    xy = _offsets(fig.axes[1])
    np.testing.assert_allclose(xy[:, 0], fit.ipred[fit.mask])
    assert len(_offsets(fig.axes[5])) == fit.mask.sum()
    _save(fig, tmp_path / "gof.png")
    _save(gof(fit, table=table, log=True), tmp_path / "gof_log.png")


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
    _save(fig, tmp_path / "ind.png")


def test_random_effects(fit, tmp_path):
    fig = plot_random_effects(fit)
    assert len(fig.axes) == fit.ebes.shape[1]
    for a in fig.axes:
        assert len(a.patches) > 0  # histogram bars
        assert any(line.get_label().startswith("N(0") for line in a.get_lines())
    _save(fig, tmp_path / "re.png")
    fig = plot_random_effects(fit, covariates=True)
    assert len(fig.axes) == 2 * fit.ebes.shape[1]
    _save(fig, tmp_path / "re_cov.png")
