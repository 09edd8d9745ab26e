"""Study designs: event tables built from dosing regimens and sampling times, without DV.

`regimen` gives the dose records of one regimen (amount, interval, number of doses, infusion
time); `design` lays regimens and sampling times out for ``n`` subjects, per subject or in groups,
and reads the table as a `Population` whose observations have no DV yet (``pop.dv_missing``).
``nlmegen.simulate(model, params, design, key=key, as_population=True)`` fills them in, so a
simulation-estimation study is two lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._errors import DataError

__all__ = ["design", "regimen"]


def regimen(amt: float, *, n: int = 1, interval: float | None = None, start: float = 0.0,
            duration: float | None = None, cmt: int = 1) -> pd.DataFrame:
    """Dose records of one regimen: ``n`` doses of ``amt`` every ``interval`` from ``start``.

    Parameters
    ----------
    amt
        Amount per dose (> 0).
    n
        Number of doses (>= 1); more than one needs ``interval``.
    interval
        Time between doses (NONMEM's II).
    start
        Time of the first dose.
    duration
        Zero-order infusion time (RATE = amt / duration); None: a bolus (or first-order absorption
        from a depot, as the model says).
    cmt
        Compartment the doses go into (NONMEM numbering: 1 is the depot of an oral model).

    Returns
    -------
    pandas.DataFrame
        ``TIME, AMT, CMT, RATE``, one row per dose. Concatenate two (``pd.concat``) for a loading
        dose followed by maintenance doses.

    Examples
    --------
    >>> import nlmegen
    >>> nlmegen.regimen(100, n=3, interval=12, duration=0.5)["TIME"].tolist()
    [0.0, 12.0, 24.0]
    """
    if not (np.isfinite(amt) and amt > 0):
        raise DataError(f"regimen: the amount must be a positive number (got {amt!r})")
    if int(n) != n or n < 1:
        raise DataError(f"regimen: the number of doses must be a positive integer (got {n!r})")
    if n > 1 and (interval is None or not interval > 0):
        raise DataError(f"regimen: {n} doses need a positive interval (got interval={interval!r})")
    if duration is not None and not duration > 0:
        raise DataError(f"regimen: an infusion needs a positive duration (got duration={duration!r})")
    times = float(start) + (float(interval) if n > 1 else 0.0) * np.arange(int(n))
    return pd.DataFrame({"TIME": times, "AMT": float(amt), "CMT": int(cmt),
                         "RATE": float(amt) / duration if duration is not None else 0.0})


def _per_subject(value: Any, n: int, what: str, is_one) -> list:
    """``value`` for each of ``n`` subjects: shared (``is_one(value)``) or a sequence of ``n``."""
    if is_one(value):
        return [value] * n
    items = list(value)
    if len(items) != n or not all(is_one(v) for v in items):
        raise DataError(f"design: {what} must be one for all subjects or a sequence of {n} (one per subject)")
    return items


def _is_times(v: Any) -> bool:
    """One subject's sampling times: a mapping output -> times, or a flat sequence of numbers."""
    if isinstance(v, Mapping):
        return True
    items = list(np.ravel(v)) if isinstance(v, np.ndarray) and v.ndim == 1 else list(v)
    return len(items) > 0 and all(np.ndim(t) == 0 for t in items)


def _check_doses(doses: pd.DataFrame) -> pd.DataFrame:
    table = doses.rename(columns=lambda c: str(c).strip().upper())
    missing = [c for c in ("TIME", "AMT") if c not in table.columns]
    if missing:
        raise DataError(f"design: dose records need the columns {missing} (build them with nlmegen.regimen)")
    return table


def _subject_rows(sid: Any, doses: pd.DataFrame, times: Any, obs_cmt: int, lloq: float | None) -> list[dict]:
    """One subject's records in time order; at equal times samples come before doses (pre-dose troughs)."""
    sampling = times if isinstance(times, Mapping) else {None: times}
    rows = []
    for output, ts in sampling.items():
        ts = np.asarray(ts, dtype=float)
        if ts.ndim != 1 or not np.all(np.isfinite(ts)) or (ts < 0).any():
            raise DataError(f"design: sampling times of subject {sid} must be finite and >= 0 (got {ts.tolist()})")
        for t in ts:
            row = {"ID": sid, "TIME": float(t), "DV": np.nan, "AMT": 0.0, "EVID": 0, "CMT": obs_cmt, "RATE": 0.0}
            if output is not None:
                row["DVID"] = str(output)
            if lloq is not None:  # CENS 0: not yet known to be censored (DV missing is not "below LLOQ")
                row["LLOQ"], row["CENS"] = float(lloq), 0
            rows.append((float(t), 0, row))
    for dose in doses.to_dict("records"):
        row = {"ID": sid, "TIME": float(dose["TIME"]), "DV": np.nan, "AMT": float(dose["AMT"]), "EVID": 1,
               "CMT": int(dose.get("CMT", 1)), "RATE": float(dose.get("RATE", 0.0))}
        if isinstance(times, Mapping):
            row["DVID"] = str(next(iter(times)))
        if lloq is not None:
            row["CENS"] = 0
        rows.append((row["TIME"], 1, row))
    return [r for _, _, r in sorted(rows, key=lambda r: (r[0], r[1]))]


def _group_table(n: int, doses: Any, times: Any, covariates: Mapping[str, Any] | None, obs_cmt: int,
                 lloq: float | None, first_id: int) -> pd.DataFrame:
    if int(n) != n or n < 1:
        raise DataError(f"design: the number of subjects must be a positive integer (got {n!r})")
    n = int(n)
    dose_list = [_check_doses(d) for d in _per_subject(doses, n, "doses", lambda v: isinstance(v, pd.DataFrame))]
    time_list = _per_subject(times, n, "times", _is_times)
    rows = [r for i in range(n) for r in _subject_rows(first_id + i, dose_list[i], time_list[i], obs_cmt, lloq)]
    table = pd.DataFrame(rows)
    for name, value in (covariates or {}).items():
        per = np.broadcast_to(np.asarray(value), (n,)) if np.ndim(value) == 0 else np.asarray(value)
        if per.shape != (n,):
            raise DataError(f"design: covariate {name!r} must be one value or {n} values (got shape {per.shape})")
        table[name] = table["ID"].map(dict(zip(range(first_id, first_id + n), per.tolist(), strict=True)))
    return table


def design(
    n: int | None = None,
    *,
    doses: pd.DataFrame | Sequence[pd.DataFrame] | None = None,
    times: Any = None,
    covariates: Mapping[str, Any] | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
    obs_cmt: int = 0,
    lloq: float | None = None,
    first_id: int = 1,
):
    """A simulation design: ``n`` subjects' doses and sampling times, as a `Population` without DV.

    Parameters
    ----------
    n
        Number of subjects (one group; or give ``groups``).
    doses
        Dose records (:func:`regimen`, or several concatenated) shared by every subject, or a
        sequence of ``n`` of them (one per subject).
    times
        Sampling times shared by every subject, a sequence of ``n`` of them (per subject), or a
        mapping output -> times for several outputs (the records get a DVID of that name).
    covariates
        Constant covariates: name -> one value or ``n`` values.
    groups
        Several groups (arms), each a mapping with the keys ``n``, ``doses``, ``times`` and
        optionally ``covariates`` and ``name``. Subjects are numbered on from group to group and a
        ``GROUP`` covariate (the names, or 1, 2, ...) tells the groups apart (e.g. to stratify a VPC).
    obs_cmt
        CMT of the observation records (0: NONMEM's default compartment).
    lloq
        Lower limit of quantification: simulated values below it become left-censored records (M3).
    first_id
        ID of the first subject.

    Returns
    -------
    Population
        Observation records without DV (``pop.dv_missing``); doses and samples at the same time:
        the sample is taken first (a pre-dose trough). ``pop.to_pandas()`` is the event table.

    Examples
    --------
    >>> import nlmegen
    >>> pop = nlmegen.design(12, doses=nlmegen.regimen(320), times=[0.25, 0.5, 1, 2, 4, 8, 12, 24])
    >>> pop.n_subjects, pop.n_observations
    (12, 96)
    """
    from ._read import read_nonmem

    if groups is None:
        if n is None or doses is None or times is None:
            raise DataError("design needs n, doses and times (or groups=[{'n': ..., 'doses': ..., 'times': ...}])")
        table = _group_table(n, doses, times, covariates, obs_cmt, lloq, first_id)
    else:
        if n is not None or doses is not None or times is not None or covariates is not None:
            raise DataError("design: give either groups or n/doses/times/covariates, not both")
        parts, next_id = [], first_id
        for k, group in enumerate(groups, start=1):
            unknown = sorted(set(group) - {"n", "doses", "times", "covariates", "name"})
            missing = [key for key in ("n", "doses", "times") if key not in group]
            if unknown or missing:
                raise DataError(f"design: group {k} has unknown keys {unknown} / lacks {missing} (keys: n, doses, "
                                "times, covariates, name)")
            part = _group_table(group["n"], group["doses"], group["times"], group.get("covariates"), obs_cmt, lloq,
                                next_id)
            part["GROUP"] = group.get("name", k)
            parts.append(part)
            next_id += int(group["n"])
        names = [set(p.columns) for p in parts]
        if any(c != names[0] for c in names):
            raise DataError("design: every group must give the same covariates and outputs")
        table = pd.concat(parts, ignore_index=True)
    return read_nonmem(table, allow_missing_dv=True)
