"""Goodness-of-fit plots of a fit (matplotlib, imported only when a plot is drawn).

- :func:`gof`: the standard panels (DV vs PRED/IPRED, NPDE QQ plot, CWRES vs TIME/PRED, IWRES and
  |IWRES| vs IPRED, NPDE vs TIME/PRED), with LOWESS smooths.
- :func:`plot_individuals`: observations with IPRED and PRED curves, one panel per subject.
- :func:`plot_random_effects`: EBE histograms (with the fitted N(0, omega^2) where known) and
  EBEs (ETAs) against constant covariates.

Every axis is labelled with its NONMEM name and the data's unit (`nlmegen.diagnostics._labels`).
Smooths are LOWESS (Cleveland 1979, JASA 74:829-836; statsmodels' implementation, span 2/3 and
three robustifying iterations, the defaults of R's ``lowess`` that xpose's smooths follow).
Every function returns the matplotlib ``Figure``; none calls ``plt.show()`` or picks a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._gof import gof_table, prediction_curves
from ._labels import axis_label, plot_units

__all__ = ["gof", "plot_individuals", "plot_random_effects"]

_POINT = {"s": 12, "alpha": 0.6, "linewidths": 0}


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _axes(axes, nrows: int, ncols: int, size: tuple[float, float], **kwargs):
    """(figure, flat list of axes): new ones, or the ``axes`` given (at least ``nrows * ncols``)."""
    if axes is None:
        plt = _pyplot()
        fig, grid = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                                 layout="constrained", **kwargs)
        return fig, list(grid.ravel())
    flat = list(np.ravel(axes))
    if len(flat) < nrows * ncols:
        raise ValueError(f"need {nrows * ncols} axes, got {len(flat)}")
    return flat[0].figure, flat


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)


def _colours(outputs: Sequence) -> dict:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return {o: cycle[i % len(cycle)] for i, o in enumerate(outputs)}


def _lowess(x: np.ndarray, y: np.ndarray, frac: float = 2.0 / 3.0) -> tuple[np.ndarray, np.ndarray]:
    """LOWESS smooth of ``y`` on ``x`` (statsmodels; see the module docstring), sorted by ``x``.

    Fewer than 5 finite points, or fewer than 3 distinct ``x``: no smooth (empty arrays).
    """
    from statsmodels.nonparametric.smoothers_lowess import lowess

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 5 or np.unique(x).size < 3:
        return np.zeros(0), np.zeros(0)
    fitted = lowess(y, x, frac=frac, it=3, return_sorted=True)
    return fitted[:, 0], fitted[:, 1]


def _smooth(ax, x: np.ndarray, y: np.ndarray, **kwargs) -> None:
    sx, sy = _lowess(np.asarray(x, float), np.asarray(y, float), **kwargs)
    if sx.size:
        ax.plot(sx, sy, color="crimson", linewidth=1.3, alpha=0.85, label="_LOWESS")


def _scatter_by_output(ax, table: pd.DataFrame, x: str, y: str, colours: dict, labels: bool) -> None:
    for out, part in table.groupby("output", sort=False):
        ax.scatter(part[x].to_numpy(float), part[y].to_numpy(float), color=colours[out],
                   label=str(out) if labels else None, **_POINT)


def _identity_panel(ax, table, x, colours, labels, log: bool, units: dict) -> None:
    _scatter_by_output(ax, table, x, "DV", colours, labels)
    values = table[[x, "DV"]].to_numpy(float).ravel()
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    if values.size:
        lo, hi = values.min(), values.max()
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            pad = (hi / lo) ** 0.04 if hi > lo else 1.5
            lo, hi = lo / pad, hi * pad
        else:
            pad = 0.04 * (hi - lo) if hi > lo else 1.0
            lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="0.3", linewidth=1, zorder=0)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    _smooth(ax, table[x].to_numpy(float), table["DV"].to_numpy(float))
    ax.set_aspect("equal", adjustable="box")
    output = _single_output(table)
    _style(ax, f"DV vs {x}", axis_label(x, units, output), axis_label("DV", units, output))


def _single_output(table: pd.DataFrame):
    """The output of a one-output table (its DV unit labels the axes), else None (the DV unit, if any)."""
    outputs = pd.unique(table["output"])
    return outputs[0] if len(outputs) == 1 else None


def _residual_panel(ax, table, x, y, colours, labels, units: dict, *, log_x: bool = False,
                    absolute: bool = False) -> None:
    """``y`` (or ``|y|``) against ``x``: reference lines at 0 and +/-2 (|y|: none), LOWESS smooth."""
    values = table[y].to_numpy(float)
    shown = table.assign(**{y: np.abs(values)}) if absolute else table
    _scatter_by_output(ax, shown, x, y, colours, labels)
    if not absolute:
        ax.axhline(0.0, color="0.3", linewidth=1, zorder=0)
        for level in (-2.0, 2.0):
            ax.axhline(level, color="0.5", linewidth=0.8, linestyle="--", zorder=0)
    else:
        ax.set_ylim(bottom=0.0)
    _smooth(ax, table[x].to_numpy(float), np.abs(values) if absolute else values)
    if log_x:
        ax.set_xscale("log")
    name = f"|{y}|" if absolute else y
    _style(ax, f"{name} vs {x}", axis_label(x, units, _single_output(table)), name)


def _qq_panel(ax, table, colours, labels) -> None:
    from scipy.special import ndtri

    for out, part in table.groupby("output", sort=False):
        npde = np.sort(part["NPDE"].to_numpy(float))
        npde = npde[np.isfinite(npde)]
        theory = ndtri((np.arange(1, npde.size + 1) - 0.5) / max(npde.size, 1))
        ax.scatter(theory, npde, color=colours[out], label=str(out) if labels else None, **_POINT)
    finite = table["NPDE"].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    lim = max(3.0, float(np.abs(finite).max()) + 0.2) if finite.size else 3.0
    ax.plot([-lim, lim], [-lim, lim], color="0.3", linewidth=1, zorder=0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal", adjustable="box")
    _style(ax, "NPDE QQ plot", "N(0, 1) quantiles", "NPDE")


#: The panels of :func:`gof`, in order (row-major on a 3 x 3 grid).
GOF_PANELS = ("DV vs PRED", "DV vs IPRED", "NPDE QQ plot", "CWRES vs TIME", "CWRES vs PRED", "IWRES vs IPRED",
              "|IWRES| vs IPRED", "NPDE vs TIME", "NPDE vs PRED")


def gof(fit, *, log: bool = False, n_sim: int = 500, key: Any = None, table: pd.DataFrame | None = None,
        axes: Any = None, units: dict | None = None):
    """The standard goodness-of-fit panels of a fit (:data:`GOF_PANELS`, 3 x 3).

    Row 1: DV vs PRED and DV vs IPRED (identity line, equal limits), the NPDE QQ plot against
    N(0, 1). Row 2: CWRES vs TIME and PRED, IWRES vs IPRED (zero and +/-2 lines). Row 3: |IWRES| vs
    IPRED (a trend shows a misspecified residual error model), NPDE vs TIME and PRED (Brendel et
    al. 2006). Every scatter has a LOWESS smooth (see the module docstring). Points are coloured by
    output when the fit has several. ETAs against covariates: :func:`plot_random_effects`.

    Parameters
    ----------
    fit
        A `FitResult` holding its model and population (unless ``table`` is given).
    log
        Log axes for the DV-vs-prediction panels (and the prediction axis of the residual panels).
    n_sim, key
        NPDE simulations (see :func:`gof_table`); ignored when ``table`` is given.
    table
        A residual table from :func:`gof_table` / :func:`nlmegen.diagnostics.residuals`.
    axes
        Nine matplotlib axes to draw into (default: a new 3 x 3 figure).
    units
        Units for the axis labels (``{"TIME": "h", "DV": "mg/L"}`` or per output name), added to the
        data's own (``fit.pop.units``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if table is None:
        table = gof_table(fit, n_sim=n_sim, key=key)
    units = plot_units(fit, units)
    outputs = list(pd.unique(table["output"]))
    colours = _colours(outputs)
    labels = len(outputs) > 1
    fig, ax = _axes(axes, 3, 3, (3.6, 3.3))
    _identity_panel(ax[0], table, "PRED", colours, labels, log, units)
    _identity_panel(ax[1], table, "IPRED", colours, labels, log, units)
    _qq_panel(ax[2], table, colours, labels)
    _residual_panel(ax[3], table, "TIME", "CWRES", colours, labels, units)
    _residual_panel(ax[4], table, "PRED", "CWRES", colours, labels, units, log_x=log)
    _residual_panel(ax[5], table, "IPRED", "IWRES", colours, labels, units, log_x=log)
    _residual_panel(ax[6], table, "IPRED", "IWRES", colours, labels, units, log_x=log, absolute=True)
    _residual_panel(ax[7], table, "TIME", "NPDE", colours, labels, units)
    _residual_panel(ax[8], table, "PRED", "NPDE", colours, labels, units, log_x=log)
    if labels:
        ax[0].legend(title="output", fontsize=8, title_fontsize=8, markerscale=1.5, frameon=False)
    return fig


def plot_individuals(fit, ids: Sequence | None = None, *, n_points: int = 200, ncols: int = 4, log: bool = False,
                     axes: Any = None, output: str | None = None, curves: pd.DataFrame | None = None,
                     units: dict | None = None):
    """Observations, IPRED and PRED curves of individual subjects, one panel each.

    The curves are simulated without residual noise on ``n_points`` times from 0 to each
    subject's last record plus the observation times (so IPRED passes through ``fit.ipred``),
    with the random effects at the EBEs (IPRED) or at zero (PRED).

    Parameters
    ----------
    fit
        A `FitResult` holding its model and population.
    ids
        Subject IDs to draw (default: the first 12 subjects).
    n_points
        Grid times per subject.
    ncols
        Panels per row.
    log
        Log concentration axis.
    axes
        Matplotlib axes to draw into (at least one per subject; default: a new figure).
    output
        Draw only this output (default: every output, in one panel per subject).
    curves
        Precomputed :func:`nlmegen.diagnostics._gof.prediction_curves` of these subjects (saves the
        simulation when one figure draws several outputs).
    units
        Units for the axis labels, added to the data's own (``fit.pop.units``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    fit.require_model("plot_individuals")
    ids = list(fit.pop.ids[:12]) if ids is None else list(ids)
    if curves is None:
        curves = prediction_curves(fit, ids, n_points=n_points)
    colours = _colours(list(fit.outputs))
    if output is not None and output not in fit.outputs:
        raise ValueError(f"output {output!r} is not one of the fit's outputs {list(fit.outputs)}")
    outputs = list(fit.outputs) if output is None else [output]
    labels = len(outputs) > 1
    units = plot_units(fit, units)
    ylabel = axis_label("DV", units, outputs[0] if len(outputs) == 1 else None)
    ncols = max(1, min(ncols, len(ids)))
    nrows = -(-len(ids) // ncols)
    if axes is None:
        fig, ax = _axes(None, nrows, ncols, (3.0, 2.5), sharex=False)
        for extra in ax[len(ids):]:
            extra.set_visible(False)
    else:
        fig, ax = _axes(axes, 1, len(ids), (3.0, 2.5))
    position = {sid: i for i, sid in enumerate(fit.ids)}
    for a, sid in zip(ax, ids, strict=False):
        i = position[sid]
        mask = fit.mask[i]
        for out in outputs:
            obs = mask & (fit.dvid[i] == list(fit.outputs).index(out))
            part = curves[(curves["ID"] == sid) & (curves["output"] == out)]
            if not obs.any() and part.empty:
                continue
            suffix = f" {out}" if labels else ""
            a.scatter(fit.times[i][obs], fit.dv[i][obs], color=colours[out], s=16, zorder=3,
                      label=f"DV{suffix}")
            t = part["TIME"].to_numpy(float)
            a.plot(t, part["IPRED"].to_numpy(float), color=colours[out], linewidth=1.4, label=f"IPRED{suffix}")
            a.plot(t, part["PRED"].to_numpy(float), color=colours[out], linewidth=1.0, linestyle="--",
                   alpha=0.8, label=f"PRED{suffix}")
        if log:
            a.set_yscale("log")
        _style(a, f"ID {sid}" if output is None else f"ID {sid}: {output}", axis_label("TIME", units), ylabel)
    if ids:
        ax[0].legend(fontsize=7, frameon=False)
    return fig


def plot_random_effects(fit, *, covariates: bool | Sequence[str] | None = None, bins: int = 15, axes: Any = None,
                        units: dict | None = None):
    """Histograms of the EBEs, and EBEs (ETAs) against constant covariates (with LOWESS smooths).

    The fitted density ``N(0, omega_j^2)`` is drawn over the histogram of column ``j`` when the
    fit has a parameter ``omega`` with one entry per EBE column (the usual diagonal-Omega
    parameterisation); the title gives the EBEs' mean and standard deviation.

    Parameters
    ----------
    fit
        A `FitResult`.
    covariates
        True for every constant (per-subject) covariate of ``fit.pop``, or a list of names: adds
        one row of EBE-vs-covariate scatter plots per covariate.
    bins
        Histogram bins.
    axes
        Matplotlib axes to draw into (``n_eta * (1 + n_covariates)``, row-major; default: new).
    units
        Units of the covariates for the axis labels, added to the data's own (``fit.pop.units``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    ebes = fit.ebes
    columns = list(ebes.columns)
    names: list[str] = []
    if covariates:
        if fit.pop is None:
            raise ValueError("covariate plots need the fit's population (fit.pop is None)")
        constant = [k for k, v in fit.pop.covariates.items() if np.ndim(v) == 1]
        names = constant if covariates is True else list(covariates)
        bad = [n for n in names if n not in constant]
        if bad:
            raise KeyError(f"{bad} are not constant covariates of the population (those are {constant})")
    ncols = max(1, len(columns))
    fig, ax = _axes(axes, 1 + len(names), ncols, (3.0, 2.6))
    omega = fit.params.get("omega")
    omega = np.ravel(np.asarray(omega, float)) if omega is not None else None
    if omega is not None and omega.size != len(columns):
        omega = None
    for j, col in enumerate(columns):
        a = ax[j]
        values = ebes[col].to_numpy(float)
        values = values[np.isfinite(values)]
        half = float(np.abs(values).max(initial=0.0)) * 1.05 or 1.0
        if omega is not None and omega[j] > 0:
            half = max(3.0 * omega[j], half)
        a.hist(values, bins=np.linspace(-half, half, bins + 1), density=True, color="C0", alpha=0.55,
               edgecolor="white")
        a.set_xlim(-half, half)
        if omega is not None and omega[j] > 0:
            x = np.linspace(-half, half, 200)
            dens = np.exp(-0.5 * (x / omega[j]) ** 2) / (omega[j] * np.sqrt(2 * np.pi))
            a.plot(x, dens, color="crimson", linewidth=1.4, label=f"N(0, {omega[j]:.3g}²)")
            a.legend(fontsize=7, frameon=False)
        a.axvline(0.0, color="0.3", linewidth=0.8)
        sd = float(np.std(values, ddof=1)) if values.size > 1 else float("nan")
        _style(a, f"{col}  (mean {values.mean():.2g}, SD {sd:.2g})", col, "density")
    if names:
        position = {sid: i for i, sid in enumerate(fit.pop.ids)}
        rows = np.array([position[sid] for sid in ebes.index])
        cats = dict(fit.pop.categories)
        units = plot_units(fit, units)
        for r, name in enumerate(names, start=1):
            cov = np.asarray(fit.pop.covariates[name], float)[rows]
            for j, col in enumerate(columns):
                a = ax[r * ncols + j]
                y = ebes[col].to_numpy(float)
                a.scatter(cov, y, color="C0", **_POINT)
                a.axhline(0.0, color="0.3", linewidth=0.8, zorder=0)
                if name in cats:
                    a.set_xticks(range(len(cats[name])), [str(c) for c in cats[name]])
                else:
                    _smooth(a, cov, y)
                _style(a, f"{col} vs {name}", axis_label(name, units), col)
    return fig
