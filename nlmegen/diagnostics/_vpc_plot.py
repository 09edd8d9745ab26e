"""The classic VPC figure (matplotlib, imported lazily).

Conventions (Bergstrand et al. 2011; Nguyen et al. 2017, CPT:PSP 6:87): observations as points,
observed percentiles as lines, the simulated percentiles' intervals as ribbons; the ribbons are
censored at the lower limit of the data (0 for non-negative data, the LLOQ where there is one) so
none is drawn below what can be observed; bin boundaries are marked on the time axis; the legend sits
below the panels, and a note gives the number of simulations, the binning and the interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._labels import axis_label

__all__ = ["plot_vpc"]


def _floor(observed, log_y: bool) -> float:
    """Lowest value the data can show: the largest LLOQ, else 0 for non-negative data, else -inf;
    on a log axis, half the smallest positive observation when that is higher."""
    limits = observed["LIMIT"].to_numpy(dtype=float)
    dv = observed["DV_plot"].to_numpy(dtype=float) if "DV_plot" in observed else observed["DV"].to_numpy(float)
    finite = limits[np.isfinite(limits)]
    floor = float(finite.max()) if finite.size else (0.0 if np.nanmin(dv, initial=0.0) >= 0 else -np.inf)
    if log_y:
        positive = dv[np.isfinite(dv) & (dv > 0)]
        floor = max(floor, float(positive.min()) / 2 if positive.size else 1e-3)
    return floor


def _legend(result, median_q) -> tuple[list, list]:
    """Four entries whatever the number of percentiles: points, observed lines, the two ribbons."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    outer = [f"{100 * q:g}" for q in result.quantiles if q != median_q]
    ci = f"{100 * result.ci:g}%"
    handles = [Line2D([], [], marker="o", ls="", ms=4, color="0.35", alpha=0.5),
               Line2D([], [], color="tab:red", lw=1.8), Patch(color="tab:red", alpha=0.22),
               Line2D([], [], color="tab:blue", lw=1.8, ls="--"), Patch(color="tab:blue", alpha=0.22)]
    labels = ["observed", f"observed {100 * median_q:g}th percentile", f"simulated median: {ci} interval",
              f"observed {', '.join(outer)}th percentiles", f"simulated {', '.join(outer)}th: {ci} intervals"]
    return handles, labels


def plot_vpc(result, *, log_y: bool = False, axes: Any = None, units: dict | None = None) -> Any:
    """Observed points, observed percentile lines, shaded simulated percentile intervals."""
    import matplotlib.pyplot as plt

    panels = list(result.table.groupby(["stratum", "output"], sort=True)) if len(result.table) else []
    own = axes is None
    if own:
        ncols = min(3, max(1, len(panels)))
        nrows = int(np.ceil(len(panels) / ncols)) or 1
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows + 0.9), squeeze=False)
    else:
        axes = np.atleast_2d(np.asarray(axes, dtype=object))
        fig = axes.flat[0].figure
    median_q = min(result.quantiles, key=lambda q: abs(q - 0.5))
    xcol = getattr(result, "x", "TIME")
    units = units or {}
    xlabel = axis_label("TAD" if xcol == "TAD" else "TIME", units)
    for ax, ((stratum, output), table) in zip(axes.flat, panels, strict=False):
        obs = result.observed[(result.observed["stratum"] == stratum) & (result.observed["output"] == output)]
        floor = _floor(obs, log_y) if not result.pred_corrected or log_y else -np.inf
        shown = obs[obs["DV_plot"] > floor] if log_y else obs
        ax.plot(shown[xcol], shown["DV_plot"], "o", ms=3, color="0.35", alpha=0.5, label="observed", zorder=1)
        for q, rows in table.groupby("quantile"):
            rows = rows.sort_values("x")
            colour = "tab:red" if q == median_q else "tab:blue"
            lower = np.maximum(rows["sim_lower"].to_numpy(float), floor)
            upper = np.maximum(rows["sim_upper"].to_numpy(float), floor)
            keep = upper > floor  # an interval wholly below the floor is not drawn (censored)
            ax.fill_between(rows["x"], np.where(keep, lower, np.nan), np.where(keep, upper, np.nan), color=colour,
                            alpha=0.22, lw=0, label=f"simulated {100 * q:g}th pct, {100 * result.ci:g}% CI")
            line = rows["observed"].to_numpy(float)
            ax.plot(rows["x"], np.where(line > floor, line, np.nan) if np.isfinite(floor) else line,
                    "-" if q == median_q else "--", color=colour, lw=1.8, label=f"observed {100 * q:g}th pct")
        for edge in getattr(result, "edges", {}).get((stratum, output), []):
            ax.axvline(edge, ymin=0.0, ymax=0.025, color="0.2", lw=1.0)
        title = output if stratum == "all" else f"{output}, {stratum}"
        ylabel = axis_label("DV", units, output, text="prediction-corrected DV" if result.pred_corrected else "DV")
        ax.set(title=("pcVPC: " if result.pred_corrected else "VPC: ") + str(title), xlabel=xlabel, ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        if np.isfinite(floor):
            ax.set_ylim(bottom=floor if log_y else min(floor, ax.get_ylim()[0]) if floor > 0 else floor)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if panels and own:
        fig.legend(*_legend(result, median_q), loc="lower center", ncol=2, frameon=False, fontsize=7.5,
                   bbox_to_anchor=(0.5, 0.03))
        n_sim = getattr(result, "n_sim", 0)
        note = f"{n_sim} simulated replicates; " if n_sim else ""
        note += f"bins: {getattr(result, 'bins', '') or 'given'} (ticks on the time axis); ribbons censored at "
        note += "the LLOQ or 0" if not result.pred_corrected else "the data's lower limit"
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6.5, color="0.35")
        fig.tight_layout(rect=(0, 0.17 if len(panels) <= 3 else 0.08, 1, 1))
    elif panels:
        axes.flat[0].legend(frameon=False, fontsize=7)
        fig.tight_layout()
    return fig
