"""Occasions: which dosing occasion every record belongs to, for inter-occasion variability (IOV).

An occasion is a period of a subject's record (a study visit, a treatment period) in which its
pharmacokinetic parameters are taken as constant but may differ from the other periods (Karlsson &
Sheiner, J Pharmacokinet Biopharm 1993;21:735-750). Occasions come from

- a column (``OCC`` by default; any covariate column): its values are the occasion labels;
- ``"resets"``: a new occasion starts at every EVID 3/4 reset record (the record itself and every
  later one belong to it), the way a washout-and-redose design is usually coded;
- a rule: a function of the event table (`Population.to_pandas`, one row per record) returning one
  label per row, or those labels directly.

Labels are pooled over subjects and sorted, so occasion index ``k`` means the same label for every
subject (``OCC`` 1, 2 -> 0, 1); a subject without some occasion simply has no data on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._errors import DataError

__all__ = ["OCCASION_COLUMN", "with_occasions"]

OCCASION_COLUMN = "OCC"


def with_occasions(pop, by: str | Callable | Any = OCCASION_COLUMN):
    """A copy of ``pop`` whose records carry occasion indices (see the module docstring).

    Sets ``occasions`` (the labels), ``occ`` (``[subj, obs]`` index of each observation's occasion),
    ``dose_occ`` (``[subj, dose]``) and ``occ_start`` (``[subj, occ]``, the time of each occasion's
    first record; ``inf`` where a subject lacks the occasion).
    """
    labels, valid = _record_labels(pop, by)
    levels = np.unique(labels[valid])
    if levels.size == 0:
        raise DataError("occasions: no record has an occasion label")
    index = np.where(valid, np.searchsorted(levels, np.where(valid, labels, levels[0])), 0).astype(np.int64)
    rows = np.arange(index.shape[0])[:, None]

    def at(keys) -> np.ndarray:  # records by their order key (twice the record's position)
        pos = np.clip(np.asarray(keys) // 2, 0, index.shape[1] - 1)
        return index[rows, pos]

    times = np.asarray(pop.cov_times)
    start = np.full((index.shape[0], levels.size), np.inf)
    for k in range(levels.size):
        hit = valid & (index == k)
        start[:, k] = np.where(hit.any(axis=1), np.min(np.where(hit, times, np.inf), axis=1), np.inf)
    names = tuple(_label(v) for v in levels)
    return dataclasses.replace(pop, occ=jnp.asarray(at(pop.obs_index)), dose_occ=jnp.asarray(at(pop.dose_index)),
                               occ_start=jnp.asarray(start), occasions=names)


def _label(value: float) -> Any:
    return int(value) if float(value).is_integer() else float(value)


def _record_labels(pop, by) -> tuple[np.ndarray, np.ndarray]:
    """``[subj, rec]`` occasion labels of every record and the mask of real records."""
    valid = np.asarray(pop.cov_mask)
    if isinstance(by, str) and by.lower() == "resets":
        return _from_resets(pop), valid
    if isinstance(by, str):
        name = _column(pop, by)
        values = np.asarray(pop.cov_values[name], dtype=float)
        if values.ndim == 1:  # constant within every subject: one occasion each
            values = np.broadcast_to(values[:, None], valid.shape)
        return values, valid
    table = pop.to_pandas()
    labels = by(table) if callable(by) else by
    labels = np.asarray(labels, dtype=float).reshape(-1)
    if labels.size != len(table):
        raise DataError(f"occasions: the rule gave {labels.size} labels for {len(table)} records (one per row of "
                        "pop.to_pandas())")
    bad = np.flatnonzero(~np.isfinite(labels))
    if bad.size:
        raise DataError(f"occasions: the rule gave no finite label for row {int(bad[0])} of pop.to_pandas()")
    if int(valid.sum()) != labels.size:
        raise DataError("occasions: the event table and the population's records disagree")
    out = np.zeros(valid.shape)
    out[valid] = labels  # rows come subject by subject, in record order, one per record
    return out, valid


def _column(pop, by: str) -> str:
    names = [n for n in pop.cov_values if str(n).lower() == by.lower()]
    if not names:
        raise DataError(f"occasions: no column {by!r} (columns read as covariates: {sorted(pop.cov_values)}); give "
                        "occasions='resets', a column name or a rule")
    return names[0]


def _from_resets(pop) -> np.ndarray:
    """Occasion label 1 + the number of EVID 3/4 resets at or before each record."""
    keys = 2 * np.arange(np.asarray(pop.cov_mask).shape[1])
    resets = np.where(np.asarray(pop.reset_mask), np.asarray(pop.reset_index), np.iinfo(np.int64).max)
    return 1.0 + np.sum(resets[:, None, :] <= keys[None, :, None], axis=-1)
