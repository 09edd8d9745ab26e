"""The classic VPC figure (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_vpc"]


def plot_vpc(result, *, log_y: bool = False, axes: Any = None) -> Any:
    """Observed points, observed percentile lines, shaded simulated percentile intervals."""
    import matplotlib.pyplot as plt

    panels = list(result.table.groupby(["stratum", "output"], sort=True)) if len(result.table) else []
    if axes is None:
        ncols = min(3, max(1, len(panels)))
        nrows = int(np.ceil(len(panels) / ncols)) or 1
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    else:
        axes = np.atleast_2d(np.asarray(axes, dtype=object))
        fig = axes.flat[0].figure
    median_q = min(result.quantiles, key=lambda q: abs(q - 0.5))
    xcol = getattr(result, "x", "TIME")
    xlabel = "time after dose" if xcol == "TAD" else "time"
    for ax, ((stratum, output), table) in zip(axes.flat, panels, strict=False):
        obs = result.observed[(result.observed["stratum"] == stratum) & (result.observed["output"] == output)]
        ax.plot(obs[xcol], obs["DV_plot"], "o", ms=3, color="0.35", alpha=0.5, label="observed", zorder=1)
        for q, rows in table.groupby("quantile"):
            rows = rows.sort_values("x")
            colour = "tab:red" if q == median_q else "tab:blue"
            ax.fill_between(rows["x"], rows["sim_lower"], rows["sim_upper"], color=colour, alpha=0.22, lw=0,
                            label=f"simulated {100 * q:g}th pct ({100 * result.ci:g}% CI)")
            ax.plot(rows["x"], rows["observed"], "-" if q == median_q else "--", color=colour, lw=1.8,
                    label=f"observed {100 * q:g}th pct")
        title = output if stratum == "all" else f"{output}, {stratum}"
        ax.set(title=("pcVPC: " if result.pred_corrected else "VPC: ") + str(title), xlabel=xlabel,
               ylabel="prediction-corrected DV" if result.pred_corrected else "DV")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if panels:
        axes.flat[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
