"""`read_nonmem`: a NONMEM-style event table (CSV or DataFrame) to a padded `Population`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._errors import DataError
from ._occasions import OCCASION_COLUMN, with_occasions
from ._population import Population
from ._units import normalise_units
from ._validate import Locator, TableRoles, _check_finite, _parse_numbers, _text, assign_roles, validate

__all__ = ["read_nonmem"]

INTERPOLATIONS = ("nocb", "locf")


def read_nonmem(
    source: str | os.PathLike | pd.DataFrame,
    *,
    covariates: Sequence[str] | None = None,
    interpolation: str | Mapping[str, str] = "nocb",
    allow_missing_dv: bool = False,
    require_observations: bool = False,
    allow_sentinel_dv: bool = False,
    units: Mapping[str, str] | None = None,
    occasions: Any = "auto",
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
        Accept observation records without DV (simulation designs: virtual subjects). They are
        marked in ``pop.dv_missing``; fitting such a population raises a `DataError` naming them.
    require_observations
        Raise if a subject has no observation record (what fitting needs).
    allow_sentinel_dv
        Accept a DV of -99, -999, -9999 or -99999 on an observation record as a measured value
        (by default it is refused as a missing-value code).
    units
        Units of the columns, outputs and covariates (``{"TIME": "h", "DV": "mg/L", "WT": "kg"}``;
        one DV unit per output name for several outputs), kept in ``pop.units`` for plot labels.
        Default: ``source.attrs["units"]`` of a DataFrame (the bundled data sets carry them), less
        the names the table no longer has (e.g. after keeping one output of several).
    occasions
        Occasions for inter-occasion variability (``pop.occasions``, ``pop.occ``): ``"auto"``
        (default) takes an ``OCC`` column when there is one (it stays a covariate too); a column
        name; ``"resets"`` (a new occasion at every EVID 3/4 record); a function of the event table
        giving one label per row (see `Population.with_occasions`); ``None`` for none.

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
    - Outputs: one per DVID value; without a DVID column, one per CMT of the observation records
      when they are in several compartments (NONMEM/nlmixr2), labelled "2", "3", ...; else "DV".
    - Refused (DataError): duplicate column names, AMT on a record that is not a dose, EVID 101
      with a CMT other than 1, AMT > 0 on a steady-state constant infusion, an observation without
      DVID (or CMT) when others have one, an observation in a compartment that no dose goes into and
      no output is observed in, infinite values or magnitudes above 1e100, more than
      10,000 doses per subject after ADDL expansion, an empty file. A stray delimiter at the end
      of every row of a CSV file is ignored.
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
    records = validate(table, roles, where, allow_missing_dv=allow_missing_dv, allow_sentinel_dv=allow_sentinel_dv)
    cov_frame, categories = _parse_covariates(table, roles.covariates, where)
    records = pd.concat([records, cov_frame], axis=1)
    _check_expansion(records, roles, where)
    records = _expand_addl(records)
    records = _fill_covariates(records, roles.covariates, rules, where)
    if require_observations:
        _require_observations(records, where)
    pop = _build(records, roles, rules, categories, tuple(str(c) for c in table.columns))
    strict = units is not None  # units given here must name the data; a table's attrs may be stale
    if units is None and isinstance(source, pd.DataFrame):
        units = source.attrs.get("units")
    if units:
        pop = dataclasses.replace(pop, units=normalise_units(units, pop.columns, pop.outputs, roles.covariates,
                                                             strict=strict))
    if isinstance(occasions, str) and occasions == "auto":
        has_occ = any(str(c).upper() == OCCASION_COLUMN for c in pop.cov_values)
        occasions = OCCASION_COLUMN if has_occ else None
    return pop if occasions is None else with_occasions(pop, occasions)


def _load(source: Any) -> tuple[pd.DataFrame, str | None]:
    """The raw table (every value as text when read from a file) and the file's path, if any."""
    if isinstance(source, pd.DataFrame):
        _check_unique_names([str(c).strip() for c in source.columns], None)
        return source, None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such data file: {path}")
        return _read_csv(path), path
    raise TypeError(f"read_nonmem takes a CSV path or a pandas DataFrame, not {type(source).__name__}")


_CSV_OPTIONS = dict(dtype=str, keep_default_na=False, skipinitialspace=True)


def _read_csv(path: str) -> pd.DataFrame:
    """Read a CSV file as text; refuse what pandas would silently rename, shift or fail on obscurely."""
    try:  # read everything as text first: parsing, and its errors, are ours
        header = pd.read_csv(path, header=None, nrows=1, **_CSV_OPTIONS).iloc[0].tolist()
        table = pd.read_csv(path, **_CSV_OPTIONS)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path} is empty: a data file needs a header line (ID, TIME, DV, ...) and records") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable CSV table: {err}") from err
    _check_unique_names([str(c).strip() for c in header], path)
    if not isinstance(table.index, pd.RangeIndex):  # rows have one field more than the header
        table = _drop_trailing_field(table, header, path)
    return table


def _check_unique_names(names: list[str], path: str | None) -> None:
    """Two columns of one name: pandas would read the second as 'DV.1' and nobody would use it."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            where = f"line 1 of {path}: " if path else ""
            raise DataError(f"{where}columns {seen[name] + 1} and {i + 1} are both named {name!r}; rename or "
                            "remove one (only one column may hold each role or covariate)")
        seen[name] = i


def _drop_trailing_field(table: pd.DataFrame, header: list, path: str) -> pd.DataFrame:
    """Rows ending in a stray delimiter: pandas takes their first field as an index. Undo that when
    the extra last field is empty on every row; otherwise the rows really have more values than names."""
    last = table.iloc[:, -1].astype(str).str.strip()
    if (last != "").any():
        pos = int(np.flatnonzero((last != "").to_numpy())[0])
        raise DataError(f"row {pos} (line {pos + 2} of {path}): the records have {len(header) + 1} fields but "
                        f"the header names {len(header)} columns; add the missing column name")
    values = np.column_stack([table.index.to_numpy(object), table.iloc[:, :-1].to_numpy(object)])
    return pd.DataFrame(values, columns=[str(h) for h in header]).astype(str)


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


def _parse_covariates(table: pd.DataFrame, names: Sequence[str],
                      where: Locator) -> tuple[pd.DataFrame, tuple]:
    """Numeric covariates as float; all-text ones as category codes; mixed ones are an error."""
    columns, categories = {}, []
    for name in names:
        series = table[name]
        numeric, missing = _parse_numbers(series)
        bad = np.isnan(numeric) & ~missing
        if bad.any() and not bad[~missing].all():
            pos = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where(pos)}, column {name}: non-numeric value {series.iloc[pos]!r} in a numeric "
                            "covariate")
        if bad.any():  # every present value is text: a categorical covariate
            text = _text(series).to_numpy(object)
            labels, codes = np.unique(text[~missing], return_inverse=True)
            numeric = np.full(len(series), np.nan)
            numeric[~missing] = codes.reshape(-1)
            categories.append((name, tuple(str(label) for label in labels)))
        _check_finite(numeric, name, where)
        columns[name] = numeric
    return pd.DataFrame(columns, index=range(len(table))), tuple(categories)


#: More doses than this per subject (after ADDL expansion) are refused: every prediction is a sum over
#: doses, so the working arrays grow as subjects x observations x doses (1e5 doses crashed XLA).
MAX_DOSES_PER_SUBJECT = 10_000


def _check_expansion(records: pd.DataFrame, roles: TableRoles, where: Locator) -> None:
    """Refuse ADDL that would expand beyond MAX_DOSES_PER_SUBJECT, with the count and the memory."""
    ids = records["ID"].to_numpy(object)
    subj = np.cumsum(np.r_[True, ids[1:] != ids[:-1]]) - 1
    dose = np.isin(records["EVID"].to_numpy(), (1, 4))
    addl = records["ADDL"].to_numpy(np.int64)
    n_dose = np.bincount(subj, weights=dose * (1.0 + addl))
    worst = int(np.argmax(n_dose))
    if n_dose[worst] <= MAX_DOSES_PER_SUBJECT:
        return
    n_obs = max(1, int(np.bincount(subj, weights=records["EVID"].to_numpy() == 0).max()))
    n_subj, n_doses = int(subj[-1]) + 1, int(np.max(n_dose))
    tables = 8 * n_subj * n_doses * 8 / 2**30  # eight padded [subj, dose] arrays of 8 bytes
    working = 8 * n_subj * n_obs * n_doses / 2**30  # one [subj, obs, dose] array of predictions
    pos = int(np.flatnonzero(subj == worst)[np.argmax(addl[subj == worst])])
    raise DataError(f"{where(int(records['POS'].iloc[pos]))}, column {roles.role_to_column.get('ADDL', 'ADDL')}: "
                    f"ADDL {addl[pos]} expands subject {ids[pos]!r} to {int(n_dose[worst]):,} doses (at most "
                    f"{MAX_DOSES_PER_SUBJECT:,} per subject): the padded dose arrays would take {tables:.2g} GiB and "
                    f"each [subjects x observations x doses] prediction array {working:.2g} GiB; for a long regimen "
                    "give a steady-state dose (SS=1 with II) before the observations instead")


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


class _Layout:
    """Where each record goes in the padded ``[subj, slot]`` arrays: computed once, by NumPy indexing.

    Records arrive sorted by subject (``SUBJ`` = 0, 1, ...), so a subject's records are one block;
    a record's slot among a selection (observations, doses, resets) is its running count within
    the subject's block. This replaces per-subject pandas slicing, which cost seconds per 10,000 rows.
    """

    def __init__(self, subj: np.ndarray, n_subjects: int):
        self.subj = subj
        self.n_subjects = n_subjects
        self.counts = np.bincount(subj, minlength=n_subjects)
        self.starts = np.cumsum(self.counts) - self.counts
        self.ends = self.starts + self.counts - 1
        self.position = np.arange(len(subj)) - self.starts[subj]  # record position within its subject

    def select(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(rows, subject, slot, padded width) of the selected records; width is at least 1."""
        rows = np.flatnonzero(keep)
        subj = self.subj[rows]
        counts = np.bincount(subj, minlength=self.n_subjects)
        first = np.cumsum(counts) - counts
        slot = np.arange(len(rows)) - first[subj]
        return rows, subj, slot, max(1, int(counts.max(initial=0)))

    def last(self, rows: np.ndarray, subj: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Per subject, the value index of its last selected record, or ``fallback`` where it has none."""
        out = np.array(fallback, copy=True)
        out[subj] = rows  # rows ascend, so the last assignment per subject wins
        return out


def _pad(values: np.ndarray, subj: np.ndarray, slot: np.ndarray, fill: Any, dtype: Any, shape: tuple) -> np.ndarray:
    """``[subj, width]`` array: ``values`` at (subj, slot), ``fill`` (scalar or one per subject) elsewhere."""
    out = np.empty(shape, dtype=dtype)
    out[...] = np.asarray(fill, dtype=dtype)[:, None] if np.ndim(fill) else fill
    out[subj, slot] = values
    return out


def _build(records: pd.DataFrame, roles: TableRoles, rules: dict, categories: tuple, columns: tuple) -> Population:
    """The padded arrays of every subject at once (records sorted by SUBJ, TIME, ADDED, POS)."""
    f64, i64 = np.float64, np.int64
    n_subjects = int(records["SUBJ"].iloc[-1]) + 1
    lay = _Layout(records["SUBJ"].to_numpy(i64), n_subjects)
    evid = records["EVID"].to_numpy(i64)
    time = records["TIME"].to_numpy(f64)
    # order keys: 2 * position in subject; an EVID 4 reset comes just before its dose
    key = 2 * lay.position
    ids = tuple(records["ID"].to_numpy()[lay.starts])
    outputs = _output_labels(records)
    last_time = time[lay.ends]
    last_key = key[lay.ends]

    o_rows, o_subj, o_slot, n_o = lay.select(evid == 0)
    d_rows, d_subj, d_slot, n_d = lay.select(np.isin(evid, (1, 4)))
    r_rows, r_subj, r_slot, n_r = lay.select(np.isin(evid, (3, 4)))
    last_obs = time[lay.last(o_rows, o_subj, lay.ends)]

    def col(name: str, dtype: Any) -> np.ndarray:
        return records[name].to_numpy(dtype)

    def obs(values, fill, dtype):
        return _pad(values[o_rows], o_subj, o_slot, fill, dtype, (n_subjects, n_o))

    def dose(values, fill, dtype):
        return _pad(values[d_rows], d_subj, d_slot, fill, dtype, (n_subjects, n_d))

    def reset(values, fill, dtype):
        return _pad(values[r_rows], r_subj, r_slot, fill, dtype, (n_subjects, n_r))

    def record(values, fill, dtype):
        return _pad(values, lay.subj, lay.position, fill, dtype, (n_subjects, int(lay.counts.max())))

    true = np.ones(len(records), bool)
    dvid = pd.Index(outputs).get_indexer(records["DVID"].to_numpy(object)[o_rows])
    arrays = dict(
        times=obs(time, last_obs, f64), dv=obs(np.nan_to_num(col("DV", f64), nan=0.0), 0.0, f64),
        mask=obs(true, False, bool),
        dvid=_pad(dvid, o_subj, o_slot, 0, i64, (n_subjects, n_o)),
        obs_cmt=obs(col("CMT", i64), 0, i64), cens=obs(col("CENS", i64), 0, i64),
        limit=obs(col("LIMIT", f64), -np.inf, f64), obs_index=obs(key, last_key, i64),
        dose_times=dose(time, last_time, f64), dose_amts=dose(col("AMT", f64), 0.0, f64),
        dose_cmts=dose(col("CMT", i64), 1, i64), dose_rates=dose(col("RATE", f64), 0.0, f64),
        dose_ii=dose(col("II", f64), 0.0, f64), dose_ss=dose(col("SS", i64), 0, i64),
        dose_mask=dose(true, False, bool), dose_index=dose(key, last_key, i64),
        reset_times=reset(time, 0.0, f64), reset_mask=reset(true, False, bool),
        reset_index=reset(key - (evid == 4), -1, i64),
        cov_times=record(time, last_time, f64), cov_mask=record(true, False, bool),
    )
    missing = obs(np.isnan(col("DV", f64)) & (col("CENS", i64) == 0), False, bool)
    cov_values, covs = {}, {}
    for name in roles.covariates:
        values = col(name, f64)
        if np.all(values == values[lay.starts][lay.subj]):  # constant within every subject
            cov_values[name] = values[lay.starts].copy()
            covs[name] = values[lay.starts].copy()
        else:
            cov_values[name] = record(values, values[lay.ends], f64)
            covs[name] = obs(values, values[lay.ends], f64)
    return Population(
        **{k: jnp.asarray(v) for k, v in arrays.items()},
        covariates={k: jnp.asarray(v) for k, v in covs.items()},
        cov_values={k: jnp.asarray(v) for k, v in cov_values.items()},
        ids=ids, outputs=outputs, interpolation=tuple(rules.items()), categories=categories, columns=columns,
        features=_features(arrays), dv_missing=jnp.asarray(missing) if missing.any() else None,
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
