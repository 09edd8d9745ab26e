"""Visual predictive checks: observed percentiles against intervals of simulated percentiles.

Per bin (and stratum and output) the observed percentiles of DV are compared with the distribution,
over ``n_sim`` simulated replicates of the study, of the same percentiles; the table holds the
``ci`` interval and median of each simulated percentile. Prediction-corrected VPC (Bergstrand,
Hooker, Wallin & Karlsson, AAPS J 2011;13:143-151) multiplies every value by
``median(PRED in bin) / PRED``. Censored observations (BLQ) count as values below their limit: a
percentile that falls below the LLOQ is not shown (NaN), and the fraction below LLOQ is compared
with its simulated interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import pandas as pd

__all__ = ["VPC", "time_after_dose", "vpc"]


@dataclass(frozen=True)
class VPC:
    """Result of :func:`vpc`: ``table`` (percentiles), ``blq`` (fraction below LLOQ), ``observed``."""

    table: pd.DataFrame
    blq: pd.DataFrame
    observed: pd.DataFrame
    quantiles: tuple
    ci: float
    pred_corrected: bool
    x: str = "TIME"
    edges: dict = field(default_factory=dict)  # (stratum, output) -> bin edges on the x axis
    n_sim: int = 0
    bins: str = ""  # how the bins were made, for the figure's note
    units: dict = field(default_factory=dict)  # the data's units (Population.units), for the axis labels

    def plot(self, *, log_y: bool = False, axes: Any = None, units: dict | None = None) -> Any:
        """The classic VPC figure: one panel per stratum and output (see `nlmegen.diagnostics._vpc_plot`).

        Axis units come from the data (``pop.units``); ``units`` (``{"TIME": "h", "DV": "mg/L"}``, or one
        DV unit per output name) adds to or overrides them.
        """
        from ._vpc_plot import plot_vpc

        return plot_vpc(self, log_y=log_y, axes=axes, units={**self.units, **(units or {})})


def _cluster_edges(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin edges from 1-D k-means of the observation times (deterministic, started at quantiles).

    With at most ``n_bins`` distinct times (a nominal sampling schedule) every time is its own bin.
    """
    values = np.unique(x)
    k = min(n_bins, values.size)
    centres = values.astype(float) if values.size <= n_bins else np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(0 if values.size <= n_bins else 100):
        labels = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
        new = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    centres = np.unique(centres)
    mids = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[x.min()], mids, [x.max()]])


def _edges(x: np.ndarray, bins: Any) -> np.ndarray:
    if isinstance(bins, str):
        if bins == "clusters":
            return _cluster_edges(x, 10)
        if bins == "equal":
            return np.unique(np.quantile(x, np.linspace(0, 1, 11)))
        raise ValueError(f"bins must be 'clusters', 'equal', a number of bins or explicit edges, not {bins!r}")
    if np.isscalar(bins):
        return _cluster_edges(x, int(bins))
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("explicit bin edges must be an increasing sequence of at least two numbers")
    return edges


def _censored_quantile(values: np.ndarray, limits: np.ndarray, q: float, axis: int = -1) -> np.ndarray:
    """Quantile where censored values sit at -inf; NaN when it falls below the largest limit."""
    with np.errstate(invalid="ignore"):  # -inf - -inf between censored values: NaN, below the limit anyway
        out = np.quantile(values, q, axis=axis, method="linear")
    lim = np.max(np.where(np.isfinite(limits), limits, -np.inf), axis=axis, initial=-np.inf)
    return np.where(np.isfinite(out) & (out >= lim), out, np.nan)


def time_after_dose(pop: Any) -> np.ndarray:
    """``[subj, obs]`` time after dose (TAD) of every observation, from the subject's dose records.

    TAD is the observation time minus the time of the subject's latest dose record before it (a
    dose at the same time counts when its record comes first, as in NONMEM); the record time, not
    the lagged time, as nlmixr2's ``tad``. Observations before a subject's first dose get their
    (negative or zero) time relative to that first dose; a subject without doses, its time.
    """
    times = np.asarray(pop.times, dtype=float)
    d_times, d_mask = np.asarray(pop.dose_times, dtype=float), np.asarray(pop.dose_mask, dtype=bool)
    o_index, d_index = np.asarray(pop.obs_index), np.asarray(pop.dose_index)
    if d_times.shape[-1] == 0:
        return times.copy()
    before = d_mask[:, None, :] & ((d_times[:, None, :] < times[:, :, None])
                                   | ((d_times[:, None, :] == times[:, :, None])
                                      & (d_index[:, None, :] < o_index[:, :, None])))
    last = np.max(np.where(before, d_times[:, None, :], -np.inf), axis=-1)
    first = np.min(np.where(d_mask, d_times, np.inf), axis=-1)[:, None]
    reference = np.where(np.isfinite(last), last, np.where(np.isfinite(first), first, 0.0))
    return times - reference


def vpc(
    fit: Any,
    pop: Any = None,
    *,
    n_sim: int = 500,
    quantiles: tuple = (0.05, 0.5, 0.95),
    ci: float = 0.9,
    bins: Any = "clusters",
    x: str = "time",
    stratify: str | None = None,
    pred_corrected: bool = False,
    key: jax.Array | None = None,
    model: Any = None,
    params: dict | None = None,
) -> VPC:
    """Visual predictive check of a fit (any backend) or of a model at given parameters.

    Parameters
    ----------
    fit
        A `FitResult` (its model, parameters and population are used), or None with ``model``,
        ``params`` and ``pop`` given.
    pop
        Population to check against (default: the fit's).
    n_sim, quantiles, ci
        Simulated replicates; observed percentiles; width of the simulated intervals.
    bins
        ``"clusters"`` (default: 1-D k-means of the observation times, up to 10 bins),
        ``"equal"`` (equal counts), a number of clusters, or explicit edges, all on the ``x`` axis.
    x
        ``"time"`` (default) or ``"tad"``: time after dose (:func:`time_after_dose`, from each
        subject's dose records), which pools the dosing intervals of multiple-dose studies.
    stratify
        A constant covariate name: one panel per value. Several outputs always get their own panels.
    pred_corrected
        Prediction-corrected VPC (Bergstrand et al. 2011).
    key
        PRNG key of the simulations (default ``jax.random.key(0)``).

    For a Bayesian fit (posterior ``draws``) replicate ``k`` is simulated at the population
    parameters of one posterior draw (``n_sim`` draws evenly spaced over the chains, see
    `nlmegen._simulate.draw_indices`), so the intervals include parameter uncertainty; pass
    ``params`` to simulate at fixed values instead.

    Returns
    -------
    VPC
        ``.table``: per stratum, output, bin and quantile: ``x`` (median time or TAD), ``n``, ``observed``,
        ``sim_lower``, ``sim_median``, ``sim_upper``; ``.blq``: observed and simulated fractions
        below LLOQ; ``.plot()``.
    """
    from .._simulate import _simulate_values, model_values, simulate_arrays

    if x not in ("time", "tad"):
        raise ValueError(f"x must be 'time' or 'tad', not {x!r}")
    if fit is not None:
        model, pop = fit.require_model("vpc", model=model, pop=pop)
    elif model is None or pop is None:
        raise ValueError("vpc without a fit needs model= and pop= (and params=)")
    key = jax.random.key(0) if key is None else key
    if params is None:
        params = model_values(fit)
        sims, _ = _simulate_values(model, fit, pop, key=key, n=n_sim, individual=False, noise=True)
    else:
        sims = simulate_arrays(model, params, pop, key=key, n=n_sim)
    pred = _typical_prediction(model, params, pop) if pred_corrected else None
    observed = _observed_frame(pop, stratify, pred)
    xcol = "TAD" if x == "tad" else "TIME"
    mask = np.asarray(pop.mask)
    sim_values = sims[:, mask]  # [K, n_obs] in the order of `observed`
    rows, blq_rows, all_edges = [], [], {}
    for (stratum, output), group in observed.groupby(["stratum", "output"], sort=True):
        edges = _edges(group[xcol].to_numpy(), bins)
        all_edges[(stratum, output)] = [float(e) for e in edges]
        group = group.assign(bin=np.clip(np.searchsorted(edges, group[xcol], side="right") - 1, 0,
                                         len(edges) - 2))
        for b, in_bin in group.groupby("bin"):
            idx = in_bin.index.to_numpy()
            obs_v, sim_v = _values(in_bin, sim_values[:, idx], pred_corrected)
            observed.loc[idx, "DV_plot"] = np.where(np.isfinite(obs_v), obs_v, np.nan)
            limits = in_bin["LIMIT"].to_numpy()
            x_mid = float(in_bin[xcol].median())
            for q in quantiles:
                sim_q = _censored_quantile(np.where(sim_v < limits, -np.inf, sim_v), limits[None], q)
                some = np.any(np.isfinite(sim_q))
                rows.append({"stratum": stratum, "output": output, "bin": int(b), "x": x_mid, "n": len(idx),
                             "quantile": q, "observed": float(_censored_quantile(obs_v, limits, q)),
                             "sim_lower": np.nanquantile(sim_q, (1 - ci) / 2) if some else np.nan,
                             "sim_median": np.nanmedian(sim_q) if some else np.nan,
                             "sim_upper": np.nanquantile(sim_q, (1 + ci) / 2) if some else np.nan})
            if np.any(np.isfinite(limits)):
                frac = np.mean(sim_v < limits, axis=1)
                blq_rows.append({"stratum": stratum, "output": output, "bin": int(b), "x": x_mid,
                                 "observed": float(np.mean(in_bin["CENS"] == 1)),
                                 "sim_lower": np.quantile(frac, (1 - ci) / 2), "sim_median": np.median(frac),
                                 "sim_upper": np.quantile(frac, (1 + ci) / 2)})
    how = bins if isinstance(bins, str) else ("clusters" if np.isscalar(bins) else "explicit edges")
    return VPC(pd.DataFrame(rows), pd.DataFrame(blq_rows), observed, tuple(quantiles), ci, pred_corrected, xcol,
               all_edges, int(n_sim), str(how), dict(pop.units))


def _typical_prediction(model, params, pop) -> np.ndarray:
    """PRED: the model's mean prediction with random effects at zero, ``[subj, obs]``."""
    import jax.numpy as jnp

    from .._simulate import simulate_arrays
    from ..model import discover

    zeros = {s.name: jnp.zeros((pop.n_subjects, *s.shape)) for s in discover(model, pop).random_effects}
    return simulate_arrays(model, {**params, **zeros}, pop, key=jax.random.key(0), noise=False)[0]


def _observed_frame(pop, stratify, pred) -> pd.DataFrame:
    mask = np.asarray(pop.mask)
    subj, obs = np.nonzero(mask)
    frame = pd.DataFrame({
        "ID": np.asarray(pop.ids, dtype=object)[subj], "TIME": np.asarray(pop.times)[subj, obs],
        "output": np.asarray(pop.outputs, dtype=object)[np.asarray(pop.dvid)[subj, obs]],
        "TAD": time_after_dose(pop)[subj, obs],
        "DV": np.asarray(pop.dv)[subj, obs], "CENS": np.asarray(pop.cens)[subj, obs],
        "LIMIT": np.where(np.asarray(pop.cens)[subj, obs] == -1, -np.inf, np.asarray(pop.limit)[subj, obs]),
    })
    if pred is not None:
        frame["PRED"] = pred[subj, obs]
    if stratify is None:
        frame["stratum"] = "all"
    else:
        if stratify not in pop.covariates or np.ndim(pop.covariates[stratify]) != 1:
            raise ValueError(f"stratify={stratify!r} must name a constant covariate; have {sorted(pop.covariates)}")
        values = np.asarray(pop.covariates[stratify])[subj]
        labels = dict(pop.categories).get(stratify)
        frame["stratum"] = [f"{stratify}={labels[int(v)]}" if labels else f"{stratify}={v:g}" for v in values]
    return frame


def _values(group: pd.DataFrame, sims: np.ndarray, pred_corrected: bool) -> tuple[np.ndarray, np.ndarray]:
    obs = np.where(group["CENS"].to_numpy() == 1, -np.inf, group["DV"].to_numpy())
    if not pred_corrected:
        return obs, sims
    pred = group["PRED"].to_numpy()
    median = np.median(pred)
    # PRED = 0 (before the first dose) cannot be corrected: leave those values as they are
    factor = np.where((pred > 0) & (median > 0), median / np.where(pred > 0, pred, 1.0), 1.0)
    return obs * factor, sims * factor[None, :]
