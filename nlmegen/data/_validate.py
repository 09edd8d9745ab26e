"""Every check of an input event table, done once at load time.

`validate` turns a raw table into a canonical record table (columns named by role, numbers parsed,
EVID/MDV/CMT defaults applied, censoring resolved) or raises `DataError` naming the row and column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._errors import DataError
from ._columns import MISSING_TOKENS, NUMERIC, REQUIRED, ROLES, VALID_EVID

__all__ = ["Locator", "TableRoles", "assign_roles", "validate"]


@dataclass(frozen=True)
class Locator:
    """Turns a row position into the words a user can find the row with."""

    labels: tuple
    path: str | None = None

    def __call__(self, pos: int) -> str:
        text = f"row {self.labels[pos]!r}" if not isinstance(self.labels[pos], (int, np.integer)) else (
            f"row {self.labels[pos]}"
        )
        if self.path is not None:
            text += f" (line {pos + 2} of {self.path})"
        return text


@dataclass(frozen=True)
class TableRoles:
    """Which original column plays which role, and which columns are covariates."""

    role_to_column: dict
    covariates: tuple

    def has(self, role: str) -> bool:
        return role in self.role_to_column


def assign_roles(table: pd.DataFrame, covariates: list[str] | None) -> TableRoles:
    """Match columns to roles case-insensitively; every other column (or those named) is a covariate."""
    seen: dict[str, str] = {}
    for col in table.columns:
        name = str(col)
        upper = name.strip().upper()
        if upper in seen:
            raise DataError(f"columns {seen[upper]!r} and {name!r} differ only in case; rename one")
        seen[upper] = name
    role_to_column = {role: seen[role] for role in ROLES if role in seen}
    for role in REQUIRED:
        if role not in role_to_column:
            raise DataError(f"missing required column {role} (columns present: {list(map(str, table.columns))})")
    others = tuple(str(c) for c in table.columns if str(c).strip().upper() not in ROLES)
    if covariates is None:
        chosen = others
    else:
        chosen = tuple(covariates)
        for name in chosen:
            if name not in others:
                raise DataError(f"covariate column {name!r} is not in the table (or is a NONMEM role column); "
                                f"covariate candidates: {list(others)}")
    return TableRoles(role_to_column, chosen)


def _text(series: pd.Series) -> pd.Series:
    """Every value as stripped text (vectorised; missing values stay missing)."""
    return series.astype(object).where(series.notna(), None).astype("string").str.strip()


def _missing(series: pd.Series) -> np.ndarray:
    """True where a value is missing: NaN/None, or one of NONMEM's missing tokens ('.', blank, NA)."""
    na = series.isna().to_numpy(bool)
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        return na
    return na | _text(series).isin(MISSING_TOKENS).to_numpy(bool, na_value=False)


def _parse_numbers(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as float with NaN where missing or not a number, missing mask); text is parsed once."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(float, na_value=np.nan)
        return values, np.isnan(values)
    try:  # fast path: every value is a number's text (NumPy's conversion is 4x pandas')
        values = series.to_numpy(object).astype(float)
    except (TypeError, ValueError):  # missing tokens or text: coerce, then sort the two apart
        values = pd.to_numeric(series.astype(object), errors="coerce").to_numpy(float, na_value=np.nan)
    missing = np.zeros(len(series), bool)
    failed = np.flatnonzero(np.isnan(values))
    if failed.size:  # only the values that did not parse can be missing tokens
        missing[failed] = _missing(series.iloc[failed])
    return values, missing


def _numeric(series: pd.Series, column: str, where: Locator) -> np.ndarray:
    """Parse a column as float; NONMEM's '.' and blanks are missing; any other text is an error."""
    values, missing = _parse_numbers(series)
    bad = np.flatnonzero(np.isnan(values) & ~missing)
    if bad.size:
        pos = int(bad[0])
        raise DataError(f"{where(pos)}, column {column}: non-numeric value {series.iloc[pos]!r}")
    _check_finite(values, column, where)
    return values


#: Larger magnitudes cannot be measurements or doses; they overflow the objective to infinity.
ABSURD = 1e100


def _check_finite(values: np.ndarray, column: str, where: Locator) -> None:
    """Infinite values and absurd magnitudes (|x| > 1e100) are errors, not numbers to fit."""
    _fail(np.isinf(values), where, f"column {column}: infinite value")
    huge = np.flatnonzero(np.abs(np.nan_to_num(values)) > ABSURD)
    if huge.size:
        raise DataError(f"{where(int(huge[0]))}, column {column}: absurd magnitude {values[huge[0]]:g} "
                        f"(|value| > {ABSURD:g}); is it a missing-value code?")


def _fail(mask: np.ndarray, where: Locator, message: str) -> None:
    bad = np.flatnonzero(mask)
    if bad.size:
        raise DataError(f"{where(int(bad[0]))}, {message}")


def _ids(table: pd.DataFrame, roles: TableRoles, where: Locator) -> np.ndarray:
    col = roles.role_to_column["ID"]
    series = table[col]
    missing = _missing(series)
    _fail(missing, where, f"column {col}: missing subject ID")
    ids = series.to_numpy(object)
    numeric = pd.to_numeric(series.astype(object), errors="coerce")
    if numeric.notna().all():  # numeric IDs stay numbers (1, 2, ...), integral ones as int
        num = numeric.to_numpy(float)
        ids = num.astype(np.int64).astype(object) if np.all(num == np.round(num)) else num.astype(object)
    else:
        ids = _text(series).to_numpy(object)
    # a subject's records must be contiguous: NONMEM would silently start a new individual
    first = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1] if len(ids) else np.zeros(0, np.int64)
    again = np.flatnonzero(pd.Series(ids[first]).duplicated().to_numpy())
    if again.size:
        pos = int(first[again[0]])
        raise DataError(f"{where(pos)}, column {col}: subject {ids[pos]!r} appears again after other subjects' "
                        "records; sort the table by ID so each subject's records are together")
    return ids


def _event_ids(num: dict, roles: TableRoles, where: Locator) -> np.ndarray:
    amt = num["AMT"]
    if roles.has("EVID"):
        evid = num["EVID"]
        col = roles.role_to_column["EVID"]
        _fail(np.isnan(evid), where, f"column {col}: missing EVID")
        _fail(~np.isin(evid, VALID_EVID), where,
              f"column {col}: unknown EVID (allowed: 0 observation, 1 dose, 2 other, 3 reset, "
              "4 reset and dose, 101 dose into CMT 1)")
        evid = evid.astype(np.int64)
    else:  # NONMEM's rule: records with AMT > 0 are doses
        evid = np.where(amt > 0, 1, 0).astype(np.int64)
        if roles.has("MDV"):
            evid = np.where((evid == 0) & (num["MDV"] == 1), 2, evid)
    if roles.has("MDV"):
        mdv = num["MDV"]
        col = roles.role_to_column["MDV"]
        _fail(~np.isnan(mdv) & ~np.isin(mdv, (0, 1)), where, f"column {col}: MDV must be 0 or 1")
        evid = np.where((evid == 0) & (mdv == 1), 2, evid)  # an EVID 0 record with MDV 1 is not an observation
    return evid


def _check_doses(num: dict, evid: np.ndarray, roles: TableRoles, where: Locator) -> None:
    name = roles.role_to_column.get
    dose = np.isin(evid, (1, 4, 101))
    amt, rate, ii, addl, ss = num["AMT"], num["RATE"], num["II"], num["ADDL"], num["SS"]
    _fail(amt < 0, where, f"column {name('AMT', 'AMT')}: negative amount")
    _fail(~dose & (amt != 0), where,
          f"column {name('AMT', 'AMT')}: conflicting AMT on a record that is not a dose (EVID 0 observation, "
          "2 other or 3 reset); give the dose EVID 1 (or 4), or set AMT to 0 or '.'")
    const_infusion = (ss == 1) & (ii == 0) & (rate > 0)
    _fail(dose & const_infusion & (amt > 0), where,
          f"columns {name('SS', 'SS')}/{name('AMT', 'AMT')}: conflicting AMT > 0 on a steady-state constant "
          "infusion (SS=1, II=0, RATE>0); NONMEM requires AMT=0 there: the RATE alone defines it")
    _fail(dose & (np.isnan(amt) | ((amt == 0) & ~const_infusion)) if roles.has("AMT") else dose,
          where, f"column {name('AMT', 'AMT')}: dose record (EVID {{1,4}}) without an amount")
    _fail(~np.isin(ss, (0, 1, 2)), where, f"column {name('SS', 'SS')}: SS must be 0, 1 or 2")
    _fail((addl < 0) | (addl != np.round(addl)), where,
          f"column {name('ADDL', 'ADDL')}: ADDL must be a non-negative whole number")
    _fail(ii < 0, where, f"column {name('II', 'II')}: negative interdose interval")
    _fail((rate < 0) & ~np.isin(rate, (-1, -2)), where,
          f"column {name('RATE', 'RATE')}: RATE must be >= 0, -1 (modelled rate) or -2 (modelled duration)")
    _fail(dose & (addl > 0) & (ii <= 0), where,
          f"columns {name('ADDL', 'ADDL')}/{name('II', 'II')}: conflicting ADDL > 0 with II = 0")
    _fail(dose & (ss > 0) & (ii <= 0) & ~const_infusion, where,
          f"columns {name('SS', 'SS')}/{name('II', 'II')}: conflicting steady-state dose without II "
          "(only a constant infusion, RATE > 0 with AMT = 0, may have II = 0)")
    _fail(dose & (ss > 0) & (ii == 0) & (addl > 0), where,
          f"columns {name('SS', 'SS')}/{name('ADDL', 'ADDL')}: conflicting constant-infusion steady state with ADDL")
    for role, values in (("RATE", rate), ("II", ii), ("ADDL", addl), ("SS", ss)):
        _fail(~dose & (values != 0), where,
              f"column {name(role, role)}: conflicting {role} on a record that is not a dose")


def _censoring(num: dict, evid: np.ndarray, roles: TableRoles, where: Locator,
               allow_missing_dv: bool) -> tuple[np.ndarray, np.ndarray]:
    """Resolve BLQ/CENS/LLOQ into (cens, limit) per record; check DV on observation records."""
    dv = num["DV"]
    obs = evid == 0
    lloq = num["LLOQ"] if roles.has("LLOQ") else np.full(dv.shape, -np.inf)
    cens = np.zeros(dv.shape, np.int64)
    if roles.has("CENS"):
        c = num["CENS"]
        _fail(~np.isin(c, (-1, 0, 1)), where, f"column {roles.role_to_column['CENS']}: CENS must be -1, 0 or 1")
        cens = c.astype(np.int64)
    if roles.has("BLQ"):
        b = num["BLQ"]
        _fail(~np.isin(b, (0, 1)), where, f"column {roles.role_to_column['BLQ']}: BLQ must be 0 or 1")
        cens = np.where(b == 1, 1, cens)
    if roles.has("LLOQ") and not (roles.has("CENS") or roles.has("BLQ")):
        cens = np.where(obs & (np.isnan(dv) | (dv < lloq)), 1, cens)
    limit = np.where(cens == 1, np.where(np.isfinite(lloq), lloq, dv), np.where(cens == -1, dv, lloq))
    limit = np.where(np.isnan(limit), -np.inf, limit)
    _fail(obs & (cens != 0) & ~np.isfinite(limit), where,
          f"column {roles.role_to_column['DV']}: censored observation without a limit (give DV or LLOQ)")
    if not allow_missing_dv:
        _fail(obs & (cens == 0) & np.isnan(dv), where,
              f"column {roles.role_to_column['DV']}: missing (NaN) DV on an observation record "
              "(set MDV=1 or EVID=2 if it is not an observation)")
    return cens, limit


def _dvid(table: pd.DataFrame, roles: TableRoles, where: Locator) -> np.ndarray:
    if not roles.has("DVID"):
        return np.full(len(table), "DV", dtype=object)
    series = table[roles.role_to_column["DVID"]]
    values, missing = _parse_numbers(series)
    if not np.any(np.isnan(values) & ~missing):  # numeric labels: 1.0 -> "1" (formatted once per value)
        unique, inverse = np.unique(values, return_inverse=True)
        text = np.array([_number_label(v) for v in unique], object)
        return text[inverse.reshape(-1)]
    return _text(series).where(~missing, "").to_numpy(object)


def _outputs(table: pd.DataFrame, obs: np.ndarray, cmt: np.ndarray, dose: np.ndarray, roles: TableRoles,
             where: Locator) -> np.ndarray:
    """Each record's output label: its DVID; without DVID, its CMT when observations are in several
    compartments (NONMEM/nlmixr2: the compartment tells PK from PD), else the single output "DV"."""
    labels = _dvid(table, roles, where)
    given = obs & ~np.isnan(cmt) & (cmt != 0)  # CMT 0 on an observation: NONMEM's default compartment
    ccol = roles.role_to_column.get("CMT", "CMT")
    if roles.has("DVID") and (obs & (labels != "")).any():
        _fail(obs & (labels == ""), where,
              f"column {roles.role_to_column['DVID']}: observation without a DVID while other observations "
              "have one; give every observation its output")
        _check_output_compartments(labels, given, cmt, np.unique(cmt[dose]), ccol, where)
        return labels
    compartments = np.unique(cmt[given])
    if compartments.size < 2:
        return np.full(len(table), "DV", dtype=object)
    found = ", ".join(_number_label(c) for c in compartments)
    _fail(obs & ~given, where,
          f"column {ccol}: observation without a CMT while other observations are in compartments {found} "
          "(with no DVID column, CMT tells the outputs apart); give its CMT, or add a DVID column naming each "
          "observation's output")
    unique, inverse = np.unique(np.nan_to_num(cmt), return_inverse=True)
    by_cmt = np.array([_number_label(c) for c in unique], object)[inverse.reshape(-1)]
    return np.where(obs, by_cmt, "DV").astype(object)


def _check_output_compartments(labels: np.ndarray, given: np.ndarray, cmt: np.ndarray, dosed: np.ndarray,
                               column: str, where: Locator) -> None:
    """An observation whose CMT is neither its output's usual compartment, nor any output's, nor a dosed
    one names a compartment nothing in the data uses: almost surely a typing error."""
    main = {}  # per output, its most used compartment(s)
    for label in pd.unique(labels[given]):
        values, counts = np.unique(cmt[given & (labels == label)], return_counts=True)
        main[label] = values[counts == counts.max()]
    known = np.union1d(np.concatenate([np.zeros(0), *main.values()]), dosed)
    bad = np.flatnonzero(given & ~np.isin(cmt, known))
    if bad.size:
        usual = main[labels[bad[0]]][0]
        pos = int(bad[0])
        raise DataError(f"{where(pos)}, column {column}: observation in CMT {_number_label(cmt[pos])}, a compartment "
                        f"no dose goes into and no output is observed in (output {labels[pos]!r} is observed in "
                        f"CMT {_number_label(usual)}); correct the CMT, or give the record its own DVID")


#: Values NONMEM data sets use for "missing" that would otherwise be fitted as measurements.
SENTINELS = (-99.0, -999.0, -9999.0, -99999.0)


def _check_sentinels(dv: np.ndarray, observed: np.ndarray, roles: TableRoles, where: Locator) -> None:
    """A DV of -99 (or -999, ...) on an observation is almost always a missing-value code."""
    col = roles.role_to_column["DV"]
    bad = np.flatnonzero(observed & np.isin(dv, SENTINELS))
    if bad.size:
        raise DataError(f"{where(int(bad[0]))}, column {col}: DV {dv[bad[0]]:g} on an observation record looks "
                        "like a missing-value code; write '.' (with MDV=1 or EVID=2 if it is not an observation), "
                        "or read with allow_sentinel_dv=True if it is a measured value")


def _number_label(value: float) -> str:
    """A numeric DVID as its label: "" when missing, whole numbers without ".0"."""
    if np.isnan(value):
        return ""
    return str(int(value)) if np.isfinite(value) and value == int(value) else str(value)


def validate(table: pd.DataFrame, roles: TableRoles, where: Locator, *,
             allow_missing_dv: bool = False, allow_sentinel_dv: bool = False) -> pd.DataFrame:
    """Check a raw event table and return the canonical record table (see module docstring)."""
    if len(table) == 0:
        raise DataError("the table has no rows")
    num = {}
    for role in NUMERIC:
        if roles.has(role):
            num[role] = _numeric(table[roles.role_to_column[role]], roles.role_to_column[role], where)
    n = len(table)
    for role, default in (("AMT", 0.0), ("RATE", 0.0), ("II", 0.0), ("ADDL", 0.0), ("SS", 0.0), ("CMT", np.nan)):
        num[role] = np.nan_to_num(num[role], nan=default) if role in num and role != "CMT" else (
            num.get(role, np.full(n, default)))
    ids = _ids(table, roles, where)
    time = num["TIME"]
    tcol = roles.role_to_column["TIME"]
    _fail(np.isnan(time), where, f"column {tcol}: missing TIME")
    _fail(time < 0, where, f"column {tcol}: negative time")
    same = np.r_[False, ids[1:] == ids[:-1]]
    _fail(same & (time < np.r_[np.inf, time[:-1]]), where,
          f"column {tcol}: time goes backwards within subject (times must be sorted within each ID)")
    evid = _event_ids(num, roles, where)
    _check_doses(num, evid, roles, where)
    cmt = num["CMT"]
    dose = np.isin(evid, (1, 4, 101))
    _fail((evid == 101) & ~np.isnan(cmt) & (cmt != 1), where,
          f"column {roles.role_to_column.get('CMT', 'CMT')}: conflicting CMT on an EVID 101 record (rxode2's "
          "dose into CMT 1); use EVID 1 with the CMT meant, or CMT 1")
    cmt = np.where(evid == 101, 1, cmt)
    cmt = np.where(dose & np.isnan(cmt), 1, cmt)
    ccol = roles.role_to_column.get("CMT", "CMT")
    _fail(dose & ((cmt < 1) | (cmt != np.round(cmt))), where,
          f"column {ccol}: dose compartment must be a positive whole number (NONMEM numbering, 1 = first)")
    evid = np.where(evid == 101, 1, evid)
    cens, limit = _censoring(num, evid, roles, where, allow_missing_dv)
    if not allow_sentinel_dv:
        _check_sentinels(num["DV"], (evid == 0) & (cens == 0), roles, where)
    out = pd.DataFrame({
        "ID": ids, "TIME": time, "DV": num["DV"], "AMT": num["AMT"],
        "EVID": evid, "CMT": np.nan_to_num(cmt, nan=0).astype(np.int64),
        "RATE": num["RATE"], "II": num["II"], "ADDL": num["ADDL"].astype(np.int64),
        "SS": num["SS"].astype(np.int64),
        "DVID": _outputs(table, evid == 0, cmt, np.isin(evid, (1, 4)), roles, where),
        "CENS": cens, "LIMIT": limit, "POS": np.arange(n),
    })
    return out
