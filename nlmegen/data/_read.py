"""`read_nonmem`: a NONMEM-style event table (CSV or DataFrame) to a padded `Population`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._errors import DataError
from ._population import Population
from ._validate import Locator, _missing, assign_roles, validate

__all__ = ["read_nonmem"]

INTERPOLATIONS = ("nocb", "locf")


def read_nonmem(
    source: str | os.PathLike | pd.DataFrame,
    *,
    covariates: Sequence[str] | None = None,
    interpolation: str | Mapping[str, str] = "nocb",
    allow_missing_dv: bool = False,
    require_observations: bool = False,
) -> Population:
    """Read a NONMEM-style event table into a padded, masked :class:`Population`.

    Parameters
    ----------
    source
        Path of a CSV file, or a pandas DataFrame. Column names are matched case-insensitively:
        ID, TIME, DV (required), AMT, EVID, MDV, CMT, RATE, II, ADDL, SS, DVID, LLOQ, BLQ, CENS.
        Every other column is a covariate.
    covariates
        Keep only these covariate columns (default: all non-role columns).
    interpolation
        How a time-varying covariate is read between records and where it is missing: ``"nocb"``
        (next observation carried backward; NONMEM's rule: the value on a record holds for the
        interval that ends at it) or ``"locf"`` (last observation carried forward). One string for
        every covariate or a mapping name -> rule (unnamed covariates use ``"nocb"``).
    allow_missing_dv
        Accept observation records without DV (simulation designs: virtual subjects).
    require_observations
        Raise if a subject has no observation record (what fitting needs).

    Returns
    -------
    Population
        Records sorted within subject; ADDL/II expanded into separate doses (placed after other
        records at the same time, so a trough sample at a dose time is pre-dose).

    Notes
    -----
    - EVID: 0 observation, 1 dose, 2 other (e.g. covariate change), 3 reset, 4 reset and dose,
      101 (rxode2) dose into CMT 1. Without an EVID column, records with AMT > 0 are doses and
      records with MDV = 1 are "other" (NONMEM's rule). An EVID 0 record with MDV = 1 is "other".
    - CMT defaults to 1 on doses. RATE > 0 is a zero-order infusion, -1 a modelled rate,
      -2 a modelled duration. SS = 1 (with II) is a steady-state dose that resets the system.
    - Censoring: BLQ = 1 or CENS = 1 marks a left-censored record (limit: LLOQ, or DV when there is
      no LLOQ column); CENS = -1 a right-censored one (limit: DV). With an LLOQ column and neither
      flag, observations with DV below LLOQ (or missing) are left-censored.
    - Text covariates are coded 0, 1, ... in sorted label order (kept in ``pop.categories``).
    - A covariate constant within every subject is ``[subj]``; otherwise ``[subj, obs]`` at the
      observation times (and every record's value in ``pop.cov_values``).

    Raises
    ------
    DataError
        Naming the row (and line of the file) and the column of the first problem found.

    Examples
    --------
    >>> import nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> pop.n_subjects, pop.n_obs
    (12, 11)
    """
    table, path = _load(source)
    roles = assign_roles(table, list(covariates) if covariates is not None else None)
    where = Locator(tuple(table.index), path)
    rules = _interpolation_rules(interpolation, roles.covariates)
    records = validate(table, roles, where, allow_missing_dv=allow_missing_dv)
    cov_frame, categories = _parse_covariates(table, roles.covariates, where)
    records = pd.concat([records, cov_frame], axis=1)
    records = _expand_addl(records)
    records = _fill_covariates(records, roles.covariates, rules, where)
    if require_observations:
        _require_observations(records, where)
    return _build(records, roles, rules, categories, tuple(str(c) for c in table.columns))


def _load(source: Any) -> tuple[pd.DataFrame, str | None]:
    if isinstance(source, pd.DataFrame):
        return source, None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such data file: {path}")
        try:  # read everything as text first: parsing, and its errors, are ours
            table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not a readable CSV table: {err}") from err
        return table, path
    raise TypeError(f"read_nonmem takes a CSV path or a pandas DataFrame, not {type(source).__name__}")


def _interpolation_rules(interpolation: str | Mapping[str, str], names: Sequence[str]) -> dict[str, str]:
    if isinstance(interpolation, str):
        rules = dict.fromkeys(names, interpolation)
    else:
        unknown = set(interpolation) - set(names)
        if unknown:
            raise DataError(f"interpolation given for unknown covariate(s) {sorted(unknown)}; "
                            f"covariates: {list(names)}")
        rules = {name: interpolation.get(name, "nocb") for name in names}
    for name, rule in rules.items():
        if rule not in INTERPOLATIONS:
            raise DataError(f"covariate {name!r}: interpolation must be 'nocb' or 'locf', not {rule!r}")
    return rules


def _parse_covariates(table: pd.DataFrame, names: Sequence[str], where: Locator):
    """Numeric covariates as float; all-text ones as category codes; mixed ones are an error."""
    columns, categories = {}, []
    for name in names:
        series = table[name]
        missing = _missing(series)
        numeric = pd.to_numeric(series.astype(object).where(~missing, np.nan), errors="coerce").to_numpy(float)
        bad = np.isnan(numeric) & ~missing
        if bad.any() and not bad[~missing].all():
            pos = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where(pos)}, column {name}: non-numeric value {series.iloc[pos]!r} in a numeric "
                            "covariate")
        if bad.any():  # every present value is text: a categorical covariate
            labels = tuple(sorted({str(v).strip() for v, m in zip(series, missing, strict=True) if not m}))
            codes = {label: float(i) for i, label in enumerate(labels)}
            numeric = np.array([np.nan if m else codes[str(v).strip()] for v, m in zip(series, missing, strict=True)])
            categories.append((name, labels))
        columns[name] = numeric
    return pd.DataFrame(columns, index=range(len(table))), tuple(categories)


def _expand_addl(records: pd.DataFrame) -> pd.DataFrame:
    """ADDL/II: one dose row per additional dose; added doses follow other records at the same time."""
    records = records.assign(ADDED=0)
    rows = records[records["ADDL"] > 0]
    if len(rows):
        reps = rows.loc[rows.index.repeat(rows["ADDL"])].copy()
        k = reps.groupby(level=0).cumcount().to_numpy() + 1
        reps["TIME"] = reps["TIME"].to_numpy() + k * reps["II"].to_numpy()
        reps["EVID"] = 1
        reps["SS"] = 0
        reps["DV"] = np.nan
        reps["ADDED"] = k
        cov_cols = [c for c in records.columns if c not in _CANONICAL]
        reps[cov_cols] = np.nan  # filled by the covariate's interpolation
        records = pd.concat([records, reps], ignore_index=True)
    records["ADDL"] = 0
    order = {sid: i for i, sid in enumerate(pd.unique(records["ID"]))}
    records["SUBJ"] = records["ID"].map(order)
    records = records.sort_values(["SUBJ", "TIME", "ADDED", "POS"], kind="stable").reset_index(drop=True)
    return records


_CANONICAL = ("ID", "TIME", "DV", "AMT", "EVID", "CMT", "RATE", "II", "ADDL", "SS", "DVID", "CENS", "LIMIT",
              "POS", "ADDED", "SUBJ")


def _fill_covariates(records: pd.DataFrame, names: Sequence[str], rules: dict, where: Locator) -> pd.DataFrame:
    for name in names:
        grouped = records.groupby("SUBJ", sort=False)[name]
        if rules[name] == "locf":
            filled = grouped.ffill().groupby(records["SUBJ"]).bfill()
        else:
            filled = grouped.bfill().groupby(records["SUBJ"]).ffill()
        empty = filled.isna()
        if empty.any():
            pos = int(records.loc[empty.idxmax(), "POS"])
            raise DataError(f"{where(pos)}, column {name}: subject {records.loc[empty.idxmax(), 'ID']!r} has no "
                            "value of this covariate on any record")
        records[name] = filled
    return records


def _require_observations(records: pd.DataFrame, where: Locator) -> None:
    has_obs = records.assign(OBS=records["EVID"] == 0).groupby("SUBJ", sort=False)["OBS"].any()
    if not has_obs.all():
        subj = int(has_obs.index[~has_obs.to_numpy()][0])
        first = records[records["SUBJ"] == subj].iloc[0]
        raise DataError(f"{where(int(first['POS']))}, column DV: subject {first['ID']!r} has no observation "
                        "records; fitting needs at least one per subject (drop the subject or add data)")


def _pad(groups: list[np.ndarray], fill: list, dtype: Any, width: int) -> np.ndarray:
    out = np.empty((len(groups), width), dtype=dtype)
    for i, (g, f) in enumerate(zip(groups, fill, strict=True)):
        out[i, : len(g)] = g
        out[i, len(g):] = f
    return out


def _build(records: pd.DataFrame, roles, rules: dict, categories: tuple, columns: tuple) -> Population:
    subjects = [g for _, g in records.groupby("SUBJ", sort=True)]
    ids = tuple(g["ID"].iloc[0] for g in subjects)
    outputs = _output_labels(records)
    for g in subjects:  # order keys: 2 * position in subject; an EVID 4 reset comes just before its dose
        g["KEY"] = 2 * np.arange(len(g))
    obs = [g[g["EVID"] == 0] for g in subjects]
    dose = [g[g["EVID"].isin((1, 4))] for g in subjects]
    reset = [g[g["EVID"].isin((3, 4))] for g in subjects]
    last_time = [float(g["TIME"].iloc[-1]) for g in subjects]
    n_o = max(1, *(len(o) for o in obs))
    n_d = max(1, *(len(d) for d in dose))
    n_r = max(1, *(len(r) for r in reset))
    n_rec = max(len(g) for g in subjects)
    last_obs = [float(o["TIME"].iloc[-1]) if len(o) else t for o, t in zip(obs, last_time, strict=True)]
    last_key = [int(g["KEY"].iloc[-1]) for g in subjects]
    code = {label: i for i, label in enumerate(outputs)}
    f64, i64 = np.float64, np.int64

    def obs_pad(col, fill, dtype, fn=None):
        return _pad([fn(o) if fn else o[col].to_numpy(dtype) for o in obs], fill, dtype, n_o)

    def dose_pad(col, fill, dtype):
        return _pad([d[col].to_numpy(dtype) for d in dose], fill, dtype, n_d)

    dv = obs_pad(None, [0.0] * len(obs), f64, lambda o: np.nan_to_num(o["DV"].to_numpy(f64), nan=0.0))
    arrays = dict(
        times=obs_pad("TIME", last_obs, f64), dv=dv,
        mask=_pad([np.ones(len(o), bool) for o in obs], [False] * len(obs), bool, n_o),
        dvid=obs_pad(None, [0] * len(obs), i64, lambda o: np.array([code[v] for v in o["DVID"]], i64)),
        obs_cmt=obs_pad("CMT", [0] * len(obs), i64), cens=obs_pad("CENS", [0] * len(obs), i64),
        limit=obs_pad("LIMIT", [-np.inf] * len(obs), f64), obs_index=obs_pad("KEY", last_key, i64),
        dose_times=dose_pad("TIME", last_time, f64), dose_amts=dose_pad("AMT", [0.0] * len(dose), f64),
        dose_cmts=dose_pad("CMT", [1] * len(dose), i64), dose_rates=dose_pad("RATE", [0.0] * len(dose), f64),
        dose_ii=dose_pad("II", [0.0] * len(dose), f64), dose_ss=dose_pad("SS", [0] * len(dose), i64),
        dose_mask=_pad([np.ones(len(d), bool) for d in dose], [False] * len(dose), bool, n_d),
        dose_index=dose_pad("KEY", last_key, i64),
        reset_times=_pad([r["TIME"].to_numpy(f64) for r in reset], [0.0] * len(reset), f64, n_r),
        reset_mask=_pad([np.ones(len(r), bool) for r in reset], [False] * len(reset), bool, n_r),
        reset_index=_pad([r["KEY"].to_numpy(i64) - (r["EVID"].to_numpy() == 4) for r in reset],
                         [-1] * len(reset), i64, n_r),
        cov_times=_pad([g["TIME"].to_numpy(f64) for g in subjects], last_time, f64, n_rec),
        cov_mask=_pad([np.ones(len(g), bool) for g in subjects], [False] * len(subjects), bool, n_rec),
    )
    cov_values, covs = {}, {}
    for name in roles.covariates:
        per_rec = _pad([g[name].to_numpy(f64) for g in subjects], [g[name].iloc[-1] for g in subjects], f64, n_rec)
        constant = all(np.all(g[name].to_numpy() == g[name].iloc[0]) for g in subjects)
        if constant:
            cov_values[name] = per_rec[:, 0].copy()
            covs[name] = per_rec[:, 0].copy()
        else:
            cov_values[name] = per_rec
            covs[name] = obs_pad(name, [g[name].iloc[-1] for g in subjects], f64)
    to_jax = {k: jnp.asarray(v) for k, v in arrays.items()}
    return Population(
        **to_jax,
        covariates={k: jnp.asarray(v) for k, v in covs.items()},
        cov_values={k: jnp.asarray(v) for k, v in cov_values.items()},
        ids=ids, outputs=outputs, interpolation=tuple(rules.items()), categories=categories, columns=columns,
        features=_features(arrays),
    )


def _features(arrays: dict) -> frozenset:
    """Which dose-event kinds occur, and whether any observation is censored (see `Population.features`)."""
    real = arrays["dose_mask"]
    found = set()
    if np.any(real & (arrays["dose_rates"] != 0)):
        found.add("infusion")
    if np.any(real & (arrays["dose_ss"] != 0)):
        found.add("steady_state")
    if np.any(arrays["reset_mask"]):
        found.add("reset")
    if np.any(arrays["mask"] & (arrays["cens"] != 0)):
        found.add("censoring")
    return frozenset(found)


def _output_labels(records: pd.DataFrame) -> tuple[str, ...]:
    labels = pd.unique(records.loc[records["EVID"] == 0, "DVID"])
    labels = [str(v) for v in labels] or ["DV"]
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))
