"""Tables behind the goodness-of-fit plots of :mod:`nlmegen.diagnostics.plots`.

Nothing here imports matplotlib: the tables are plain pandas, usable with any plotting library.
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd

from ._residuals import residuals

__all__ = ["gof_table", "prediction_curves"]


def gof_table(fit, *, n_sim: int = 500, key: jax.Array | None = None) -> pd.DataFrame:
    """The residual table that :func:`nlmegen.diagnostics.gof` draws.

    A thin wrapper of :func:`nlmegen.diagnostics.residuals`; compute it once and pass it to
    ``gof(fit, table=...)`` to redraw without recomputing the NPDE simulations.

    Parameters
    ----------
    fit
        A `FitResult` holding its model and population.
    n_sim
        Simulated replicates for NPDE.
    key
        PRNG key of the NPDE simulations (default ``jax.random.key(0)``).

    Returns
    -------
    pandas.DataFrame
        One row per observation: ``ID, TIME, output, DV, PRED, IPRED, RES, IWRES, CWRES, NPDE``.
    """
    return residuals(fit, n_sim=n_sim, key=key)


def _role(table: pd.DataFrame, role: str) -> str | None:
    """The column of ``table`` that plays NONMEM role ``role`` (case-insensitive), or None."""
    for c in table.columns:
        if str(c).strip().upper() == role:
            return c
    return None


def _grid_table(fit, ids: list, n_points: int) -> pd.DataFrame:
    """The fit's event table for ``ids`` plus EVID 0 rows (DV missing) on a fine time grid.

    Grid rows copy an observation record of the subject for each output it has (CMT, DVID and
    constant covariates); time-varying covariates are left missing (filled by the reader's
    interpolation). Original records are kept, before grid rows at the same time.
    """
    pop = fit.pop
    table = pop.to_pandas()
    id_col, time_col, dv_col = _role(table, "ID"), _role(table, "TIME"), _role(table, "DV")
    evid_col, dvid_col = _role(table, "EVID"), _role(table, "DVID")
    table = table[table[id_col].isin(ids)]
    is_obs = table[evid_col] == 0 if evid_col is not None else table[dv_col].notna()
    varying = [k for k, v in pop.covariates.items() if np.ndim(v) == 2 and k in table.columns]
    new = []
    for sid in ids:
        rows = table[(table[id_col] == sid) & is_obs]
        if rows.empty:
            continue
        t_end = float(table.loc[table[id_col] == sid, time_col].max())
        grid = np.linspace(0.0, t_end, n_points)
        groups = [rows] if dvid_col is None else [g for _, g in rows.groupby(dvid_col, sort=False)]
        for g in groups:
            block = g.iloc[[0] * n_points].reset_index(drop=True)
            block[time_col] = grid
            block[dv_col] = np.nan
            for role, value in (("MDV", 0), ("CENS", 0), ("BLQ", 0), ("LLOQ", np.nan)):
                col = _role(block, role)
                if col is not None:
                    block[col] = value
            for name in varying:
                block[name] = np.nan
            new.append(block)
    out = pd.concat([table, *new], ignore_index=True)
    order = {sid: i for i, sid in enumerate(ids)}
    out["_subject"] = out[id_col].map(order)
    out = out.sort_values(["_subject", time_col], kind="mergesort").drop(columns="_subject")
    return out.reset_index(drop=True)


def prediction_curves(fit, ids=None, *, n_points: int = 200) -> pd.DataFrame:
    """IPRED (random effects at the EBEs) and PRED (at zero) on a fine time grid.

    Parameters
    ----------
    fit
        A `FitResult` holding its model and population.
    ids
        Subject IDs (default: every subject of the fit).
    n_points
        Grid times per subject, evenly spaced from 0 to the subject's last record; the observation
        times are included too, so the curves pass through ``fit.ipred`` / ``fit.pred`` there.

    Returns
    -------
    pandas.DataFrame
        ``ID, TIME, output, IPRED, PRED``, sorted by subject (in the order of ``ids``) then time.
    """
    from .._simulate import ebe_values, model_values, simulate_batched
    from ..data import read_nonmem
    from ..model import discover

    fit.require_model("prediction curves (plot_individuals)")
    ids = list(fit.pop.ids) if ids is None else list(ids)
    unknown = [i for i in ids if i not in fit.pop.ids]
    if unknown:
        raise KeyError(f"subjects {unknown[:10]} are not in the fit")
    grid_pop = read_nonmem(_grid_table(fit, ids, n_points), allow_missing_dv=True)
    # one batched simulation of two replicates: random effects at the EBEs (IPRED) and at zero (PRED)
    random_effects = discover(fit.model, grid_pop).random_effects
    ebes = ebe_values(fit, grid_pop, random_effects)
    values = {k: np.stack([v, v]) if not isinstance(v, dict) else jax.tree_util.tree_map(lambda x: np.stack([x, x]), v)
              for k, v in model_values(fit).items()}
    values.update({s.name: np.stack([ebes[s.name], np.zeros_like(ebes[s.name])]) for s in random_effects})
    sims = simulate_batched(fit.model, values, grid_pop, key=jax.random.key(0), noise=False)
    mask = np.asarray(grid_pop.mask)
    subj, obs = np.nonzero(mask)
    ipred = pd.DataFrame({"ID": np.asarray(grid_pop.ids, dtype=object)[subj],
                          "TIME": np.asarray(grid_pop.times)[subj, obs],
                          "output": np.asarray(grid_pop.outputs, dtype=object)[np.asarray(grid_pop.dvid)[subj, obs]],
                          "value": sims[0][subj, obs]})
    out = ipred.rename(columns={"value": "IPRED"})
    out["PRED"] = sims[1][subj, obs]
    return out.reset_index(drop=True)
