"""Plots of a learned random-effect distribution (matplotlib, imported only when drawing).

- :func:`plot_eta_density`: pairwise panels of random-effect draws from several distributions
  (e.g. a flow against the Gaussian fit) with the subjects' EBEs on top.
- :func:`plot_eta_by_covariate`: one random effect's density at several covariate values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_eta_by_covariate", "plot_eta_density"]

_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5")


def _flat(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim < 2:
        raise ValueError(f"{name}: expected draws of shape [..., n_eta], got {a.shape}")
    return a.reshape(-1, a.shape[-1])


def plot_eta_density(draws: Mapping[str, np.ndarray], ebes=None, *, labels: Sequence[str] | None = None,
                     bins: int = 40, max_points: int = 3000, title: str | None = None):
    """Pairwise view of random-effect distributions: histograms on the diagonal, draws below it.

    Parameters
    ----------
    draws
        ``{label: [..., n_eta] draws}``, e.g. ``{"flow": ..., "Gaussian": ...}`` (from
        ``FlowDistribution.sample`` or `numpyro` draws of the fitted Gaussian).
    ebes
        ``[subj, n_eta]`` (array or ``fit.ebes``) shown as black points / a step histogram.
    labels
        Axis label of each random effect.
    bins, max_points
        Histogram bins; at most this many draws per distribution in the scatter panels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    sets = {k: _flat(v, k) for k, v in draws.items()}
    if not sets:
        raise ValueError("plot_eta_density needs at least one set of draws")
    d = next(iter(sets.values())).shape[1]
    if any(v.shape[1] != d for v in sets.values()):
        raise ValueError(f"all draws need the same number of random effects; got {[v.shape[1] for v in sets.values()]}")
    e = None if ebes is None else _flat(getattr(ebes, "to_numpy", lambda: ebes)(), "ebes")
    if e is not None and e.shape[1] != d:
        raise ValueError(f"ebes have {e.shape[1]} columns; the draws {d}")
    if labels is None:
        labels = list(getattr(ebes, "columns", [])) or [f"eta[{i}]" for i in range(d)]
    fig, axes = plt.subplots(d, d, figsize=(2.8 * d + 0.6, 2.6 * d), squeeze=False, layout="constrained")
    stacked = np.concatenate(list(sets.values()) + ([e] if e is not None else []))
    lo, hi = np.nanpercentile(stacked, 0.5, axis=0), np.nanpercentile(stacked, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    rng = np.random.default_rng(0)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                edges = np.linspace(lo[i], hi[i], bins + 1)
                for c, (name, v) in zip(_COLORS, sets.items(), strict=False):
                    ax.hist(v[:, i], bins=edges, density=True, alpha=0.35, color=c, label=name)
                if e is not None:
                    ax.hist(e[:, i], bins=edges, density=True, histtype="step", color="k", lw=1.2, label="EBEs")
                ax.set_yticks([])
            else:
                for c, v in zip(_COLORS, sets.values(), strict=False):
                    pick = v if len(v) <= max_points else v[rng.choice(len(v), max_points, replace=False)]
                    ax.scatter(pick[:, j], pick[:, i], s=3, alpha=0.25, color=c, linewidths=0)
                if e is not None:
                    ax.scatter(e[:, j], e[:, i], s=10, color="k", linewidths=0)
                ax.set_ylim(lo[i], hi[i])
            ax.set_xlim(lo[j], hi[j])
            if i == d - 1:
                ax.set_xlabel(labels[j])
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
    axes[0, 0].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    return fig


def plot_eta_by_covariate(sample_at, values: Sequence[float], *, index: int = 0, covariate: str = "x",
                          label: str | None = None, bins: int = 40, n: int = 4000):
    """One random effect's distribution at several covariate values (a conditional flow's change).

    Parameters
    ----------
    sample_at
        ``f(value, n) -> [n, n_eta]`` draws of the random effects at covariate ``value``, e.g.
        ``lambda v, n: d.flow.sample(key, (n,), condition=jnp.array([v]))``.
    values
        Covariate values, one histogram each.
    index
        Which random effect.
    covariate, label
        Names on the legend and the x axis.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    draws = [np.asarray(sample_at(v, n))[:, index] for v in values]
    allv = np.concatenate(draws)
    edges = np.linspace(np.percentile(allv, 0.5), np.percentile(allv, 99.5), bins + 1)
    for k, (v, x) in enumerate(zip(values, draws, strict=True)):
        ax.hist(x, bins=edges, density=True, histtype="step", lw=1.5, color=plt.cm.viridis(k / max(1, len(values) - 1)),
                label=f"{covariate} = {v:g}")
    ax.set_xlabel(label or f"eta[{index}]")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig
