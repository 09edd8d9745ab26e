"""`Population` back to a NONMEM-style event table (one row per record, ADDL already expanded)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._columns import ROLES

__all__ = ["population_to_pandas"]


def _role_names(columns: tuple) -> dict[str, str]:
    """Original spelling of each role column; roles the input lacked get NONMEM's name."""
    seen = {str(c).strip().upper(): str(c) for c in columns}
    return {role: seen.get(role, role) for role in ROLES}


def _subject_rows(pop, i: int, arr: dict) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    reset_keys = set(arr["reset_index"][i][arr["reset_mask"][i]].tolist())
    for j in np.flatnonzero(arr["mask"][i]):
        rows.append((int(arr["obs_index"][i, j]), {
            "TIME": arr["times"][i, j], "DV": arr["dv"][i, j], "EVID": 0, "CMT": arr["obs_cmt"][i, j],
            "DVID": pop.outputs[arr["dvid"][i, j]], "CENS": arr["cens"][i, j], "LIMIT": arr["limit"][i, j]}))
    for j in np.flatnonzero(arr["dose_mask"][i]):
        key = int(arr["dose_index"][i, j])
        rows.append((key, {
            "TIME": arr["dose_times"][i, j], "AMT": arr["dose_amts"][i, j],
            "EVID": 4 if key - 1 in reset_keys else 1, "CMT": arr["dose_cmts"][i, j],
            "RATE": arr["dose_rates"][i, j], "II": arr["dose_ii"][i, j], "SS": arr["dose_ss"][i, j]}))
    for j in np.flatnonzero(arr["reset_mask"][i]):
        key = int(arr["reset_index"][i, j])
        if key % 2 == 0:  # odd keys are the reset half of an EVID 4 record, written with its dose
            rows.append((key, {"TIME": arr["reset_times"][i, j], "EVID": 3}))
    used = {k for k, _ in rows}
    for p in np.flatnonzero(arr["cov_mask"][i]):
        if 2 * int(p) not in used:
            rows.append((2 * int(p), {"TIME": arr["cov_times"][i, p], "EVID": 2}))
    return sorted(rows, key=lambda r: r[0])


def population_to_pandas(pop) -> pd.DataFrame:
    """One row per record in the original column spelling; covariates decoded back to their labels."""
    arr = {k: np.asarray(getattr(pop, k)) for k in (
        "times", "dv", "mask", "dvid", "obs_cmt", "cens", "limit", "obs_index", "dose_times", "dose_amts",
        "dose_cmts", "dose_rates", "dose_ii", "dose_ss", "dose_mask", "dose_index", "reset_times",
        "reset_mask", "reset_index", "cov_times", "cov_mask")}
    if getattr(pop, "dv_missing", None) is not None:  # written as missing, so they stay missing on reading
        arr["dv"] = np.where(np.asarray(pop.dv_missing), np.nan, arr["dv"])
    covs = {k: np.asarray(v) for k, v in pop.cov_values.items()}
    cats = dict(pop.categories)
    records = []
    for i, sid in enumerate(pop.ids):
        for key, row in _subject_rows(pop, i, arr):
            p = key // 2
            full = {"ID": sid, "TIME": row["TIME"], "DV": row.get("DV", np.nan), "AMT": row.get("AMT", 0.0),
                    "EVID": row["EVID"], "CMT": row.get("CMT", 0), "RATE": row.get("RATE", 0.0),
                    "II": row.get("II", 0.0), "SS": row.get("SS", 0), "DVID": row.get("DVID", ""),
                    "CENS": row.get("CENS", 0), "LIMIT": row.get("LIMIT", -np.inf)}
            for name, values in covs.items():
                v = values[i] if values.ndim == 1 else values[i, p]
                full[name] = cats[name][int(v)] if name in cats else v
            records.append(full)
    frame = pd.DataFrame.from_records(records)
    return _finish(frame, pop)


def _finish(frame: pd.DataFrame, pop) -> pd.DataFrame:
    names = _role_names(pop.columns)
    upper = {str(c).strip().upper() for c in pop.columns}
    frame["CMT"] = frame["CMT"].astype(np.int64)
    out = {names["ID"]: frame["ID"], names["TIME"]: frame["TIME"], names["DV"]: frame["DV"],
           names["AMT"]: frame["AMT"], names["EVID"]: frame["EVID"].astype(np.int64)}
    if "MDV" in upper:
        out[names["MDV"]] = (frame["EVID"] != 0).astype(np.int64)
    if "CMT" in upper or (frame["CMT"] != 1).any():
        out[names["CMT"]] = frame["CMT"]
    for role in ("RATE", "II", "SS"):
        if role in upper or (frame[role] != 0).any():
            out[names[role]] = frame[role]
    if "ADDL" in upper:
        out[names["ADDL"]] = np.zeros(len(frame), np.int64)
    if "DVID" in upper or len(pop.outputs) > 1:
        dvid = frame["DVID"].where(frame["EVID"] == 0, pop.outputs[0])
        numeric = pd.to_numeric(pd.Series(pop.outputs), errors="coerce")
        out[names["DVID"]] = pd.to_numeric(dvid) if numeric.notna().all() else dvid
    censored = (frame["CENS"] != 0).any()
    if "CENS" in upper or ("BLQ" not in upper and censored):
        out[names["CENS"]] = frame["CENS"].astype(np.int64)
    if "BLQ" in upper:
        out[names["BLQ"]] = (frame["CENS"] == 1).astype(np.int64)
    lim = frame["LIMIT"].where(np.isfinite(frame["LIMIT"]), np.nan)
    if "LLOQ" in upper:
        out[names["LLOQ"]] = lim.where(frame["CENS"] != -1, np.nan)
    elif censored:  # keep the limit when DV holds nothing usable
        out[names["DV"]] = frame["DV"].where(frame["CENS"] == 0, lim)
    for name in pop.cov_values:
        out[name] = frame[name]
    ordered = [c for c in pop.columns if c in out] + [c for c in out if c not in pop.columns]
    return pd.DataFrame(out)[ordered]
