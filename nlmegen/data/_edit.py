"""Edits of a `Population` that return a new one: subsets, counterfactual regimens, new DV values."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._errors import DataError
from ._write import _role_names

__all__ = ["subset", "with_dv", "with_regimen"]

_DOSE_ROLES = ("ID", "TIME", "AMT", "CMT", "RATE", "II", "ADDL", "SS")


def subset(pop, ids: list[Any]):
    """The subjects with these original IDs, in the order given."""
    position = {sid: i for i, sid in enumerate(pop.ids)}
    missing = [sid for sid in ids if sid not in position]
    if missing:
        raise KeyError(f"unknown subject ID(s) {missing}; known IDs: {list(pop.ids)[:20]}"
                       f"{' ...' if len(pop.ids) > 20 else ''}")
    if not ids:
        raise ValueError("subset needs at least one subject ID")
    index = jnp.asarray([position[sid] for sid in ids])
    arrays = jax.tree_util.tree_map(lambda a: a[index], pop)
    return dataclasses.replace(arrays, ids=tuple(ids))


def _dose_table(doses: Any) -> pd.DataFrame:
    table = pd.DataFrame(doses) if not isinstance(doses, pd.DataFrame) else doses.copy()
    table.columns = [str(c).strip().upper() for c in table.columns]
    unknown = [c for c in table.columns if c not in _DOSE_ROLES]
    if unknown:
        raise DataError(f"regimen columns {unknown} are not dose columns (allowed: {list(_DOSE_ROLES)})")
    for role in ("TIME", "AMT"):
        if role not in table.columns:
            raise DataError(f"regimen table needs a {role} column")
    return table


def with_regimen(pop, doses: Any, *, ids: Sequence[Any] | None = None):
    """Replace the doses of the chosen subjects by ``doses`` (see `Population.with_regimen`)."""
    from ._read import read_nonmem

    regimen = _dose_table(doses)
    chosen = list(pop.ids) if ids is None else list(ids)
    unknown = [sid for sid in chosen if sid not in pop.ids]
    if unknown:
        raise KeyError(f"unknown subject ID(s) {unknown}")
    table = pop.to_pandas()
    names = _role_names(pop.columns)
    id_col, evid_col = names["ID"], names["EVID"]
    target = table[id_col].isin(chosen)
    table = table[~(target & (table[evid_col] == 1))].copy()
    reset_dose = target & (table[evid_col] == 4)
    table.loc[reset_dose, evid_col] = 3  # keep the reset, drop its dose (a reset carries no dose items)
    for role in ("AMT", "RATE", "II", "SS"):
        if names[role] in table.columns:
            table.loc[reset_dose, names[role]] = 0
    new_rows = []
    for sid in chosen:
        rows = regimen[regimen["ID"] == sid] if "ID" in regimen.columns else regimen
        for _, row in rows.iterrows():
            new_rows.append({names["ID"]: sid, names["EVID"]: 1, names["DV"]: np.nan, names["CMT"]: 1,
                             **{names[k]: row[k] for k in _DOSE_ROLES[1:] if k in row.index}})
    new = pd.DataFrame(new_rows, columns=list(table.columns) + [c for c in pd.DataFrame(new_rows).columns
                                                                if c not in table.columns])
    for col in new.columns:
        if col not in table.columns:
            table[col] = 0
    merged = pd.concat([new.assign(_NEW=0), table.assign(_NEW=1)], ignore_index=True)
    order = {sid: i for i, sid in enumerate(pop.ids)}
    merged["_SUBJ"] = merged[id_col].map(order)
    time_col = names["TIME"]
    merged = merged.sort_values(["_SUBJ", time_col, "_NEW"], kind="stable").drop(columns=["_SUBJ", "_NEW"])
    merged = merged.fillna({c: 0 for c in (names["AMT"], names["RATE"], names["II"], names["SS"], names["ADDL"],
                                         names["CMT"]) if c in merged.columns})
    return read_nonmem(merged.reset_index(drop=True), interpolation=dict(pop.interpolation),
                       covariates=list(pop.cov_values), allow_missing_dv=True, units=dict(pop.units))


def with_dv(pop, values: Any):
    """The population with ``values`` (``[subj, obs]``) as the DV of its observation records.

    Records with a lower limit of quantification (an LLOQ) whose value falls below it become
    left-censored (the M3 likelihood uses the limit), the others observed; records marked
    right-censored stay so when the value lies above their limit. ``dv_missing`` is cleared.
    """
    values = np.asarray(values, dtype=float)
    mask = np.asarray(pop.mask)
    if values.shape != mask.shape:
        raise ValueError(f"with_dv: values have shape {values.shape}, the population's observations {mask.shape}")
    bad = mask & ~np.isfinite(values)
    if bad.any():
        subj, obs = np.nonzero(bad)
        where = ", ".join(f"ID {pop.ids[i]} TIME {float(pop.times[i, j]):g}" for i, j in zip(subj[:5], obs[:5],
                                                                                             strict=True))
        raise DataError(f"with_dv: {int(bad.sum())} observation record(s) get a non-finite value ({where}"
                        f"{' ...' if bad.sum() > 5 else ''})")
    cens, limit = np.asarray(pop.cens), np.asarray(pop.limit)
    lower = np.isfinite(limit) & (cens >= 0)
    new_cens = np.where(lower & (values < limit), 1, np.where((cens == -1) & (values > limit), -1, 0))
    new_cens = np.where(mask, new_cens, 0)
    dv = np.where(mask & (new_cens == 0), values, 0.0)  # 0 where padded or censored (the limit is what counts)
    features = (set(pop.features) - {"censoring"}) | ({"censoring"} if (new_cens != 0).any() else set())
    return dataclasses.replace(pop, dv=jnp.asarray(dv, dtype=pop.dv.dtype),
                               cens=jnp.asarray(new_cens, dtype=pop.cens.dtype), features=frozenset(features),
                               dv_missing=None)
