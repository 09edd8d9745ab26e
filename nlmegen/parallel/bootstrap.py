"""Nonparametric bootstrap of a fit: case resampling by subject, percentile intervals.

Each replicate draws as many subjects as the data have, with replacement (stratified: within each
stratum, keeping its size), refits the model from the original estimates and keeps the estimates
(Efron & Tibshirani 1993, ch. 6 and 13; for NLME: PsN's ``bootstrap``, Lindbom et al. 2005).
Intervals are percentiles of the replicates' estimates on the model's own scale. Replicates that
fail (an exception, or status ``failed``) are counted and reported, and so are those that stop
unconverged; by default only converged replicates enter the intervals (PsN's
``-skip_minimization_terminated``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import pandas as pd

from ._spec import backend_of, chunk_results, key_data, quiet, start_of
from ._tasks import fit_chunk, flat_params
from .executor import as_executor, split, worker_count

__all__ = ["BootstrapResult", "bootstrap", "resample_indices"]


def resample_indices(key, n_subjects: int, n: int, strata: np.ndarray | None = None) -> np.ndarray:
    """``[n, n_subjects]`` subject indices: each row a sample with replacement (within strata if given)."""
    if strata is None:
        return np.asarray(jax.random.randint(key, (n, n_subjects), 0, n_subjects))
    strata = np.asarray(strata)
    out = np.empty((n, n_subjects), dtype=np.int64)
    for k, (level, sub) in enumerate(zip(*_levels(strata), strict=True)):
        members = np.flatnonzero(strata == level)
        picks = np.asarray(jax.random.randint(jax.random.fold_in(key, k), (n, members.size), 0, members.size))
        out[:, sub] = members[picks]
    return out


def _levels(strata: np.ndarray) -> tuple[list, list]:
    levels = list(dict.fromkeys(strata.tolist()))  # first-appearance order: stable, not value-sorted
    return levels, [np.flatnonzero(strata == level) for level in levels]


def _strata_of(pop, strata: Any) -> np.ndarray | None:
    if strata is None:
        return None
    if isinstance(strata, str):
        if strata not in pop.covariates:
            raise KeyError(f"strata: no covariate {strata!r}; covariates: {sorted(pop.covariates)}")
        values = np.asarray(pop.covariates[strata])
        if values.ndim != 1:
            raise ValueError(f"strata: covariate {strata!r} changes within subjects; stratify by one value per "
                             "subject (a baseline covariate)")
    else:
        values = np.asarray(strata)
        if values.shape != (pop.n_subjects,):
            raise ValueError(f"strata must be a covariate name or one value per subject ({pop.n_subjects}), not "
                             f"an array of shape {values.shape}")
    if len(set(values.tolist())) == len(values):
        raise ValueError(f"strata: every subject is its own stratum ({len(values)} distinct values), so no "
                         "replicate would differ from the data; stratify by a categorical covariate")
    return values


@dataclass(frozen=True)
class BootstrapResult:
    """Replicate estimates of a bootstrap and their summary.

    Attributes
    ----------
    estimates : pandas.DataFrame
        One row per replicate, one column per parameter element on the model's scale (NaN for
        replicates that raised).
    theta : pandas.DataFrame
        The same on the estimation (unconstrained) scale, columns ``fit.theta_names``.
    status : pandas.Series
        Per replicate: ``converged``, ``not_converged``, ``failed`` or ``error`` (the fit raised).
    ofv, seconds : pandas.Series
        Per replicate.
    messages : pandas.Series
        The message of every replicate that did not converge.
    original : dict
        The original fit's estimates ``{label: value}``.
    indices : ndarray ``[n, n_subjects]``
        The subjects drawn for each replicate (positions in ``fit.pop``).
    used : tuple of str
        Statuses whose replicates enter `summary`.
    """

    estimates: pd.DataFrame
    theta: pd.DataFrame
    status: pd.Series
    ofv: pd.Series
    seconds: pd.Series
    messages: pd.Series
    original: dict
    indices: np.ndarray = field(repr=False)
    used: tuple = ("converged",)

    @property
    def counts(self) -> dict[str, int]:
        """Replicates per status."""
        return {k: int(v) for k, v in self.status.value_counts().items()}

    @property
    def n_failed(self) -> int:
        """Replicates that raised or whose fit failed."""
        return int(self.status.isin(["failed", "error"]).sum())

    def kept(self) -> pd.DataFrame:
        """The estimates of the replicates used (statuses in ``used``)."""
        return self.estimates[self.status.isin(self.used)]

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Original estimate, bootstrap median, SE (SD of the replicates), bias and percentile interval."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), not {level}")
        kept = self.kept()
        lo, hi = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
        pct = lambda q: f"{100 * q:.3g}%"  # noqa: E731
        table = pd.DataFrame({
            "estimate": pd.Series(self.original),
            "median": kept.median(),
            "SE": kept.std(ddof=1),
            "bias": kept.mean() - pd.Series(self.original),
            pct(lo): kept.quantile(lo),
            pct(hi): kept.quantile(hi),
        })
        table.index.name = "parameter"
        table.attrs.update(n_used=len(kept), counts=self.counts, level=level)
        return table

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        lines = [f"BootstrapResult: {len(self.status)} replicates ({counts}); intervals from {len(self.kept())}"]
        if len(self.kept()) >= 2:
            lines.append(self.summary().to_string(float_format=lambda x: f"{x:.4g}"))
        shown = self.messages.head(5)
        lines += [f"  replicate {i}: {m}" for i, m in shown.items()]
        if len(self.messages) > len(shown):
            lines.append(f"  ... {len(self.messages) - len(shown)} more in .messages")
        return "\n".join(lines)


def bootstrap(fit, n: int = 200, *, key=None, strata: Any = None, executor: Any = None, method: Any = None,
              use: tuple[str, ...] = ("converged",), chunks: int | None = None) -> BootstrapResult:
    """Nonparametric (case) bootstrap of ``fit``: refit ``n`` resamples of its subjects.

    Parameters
    ----------
    fit
        A `FitResult` holding its model and data.
    n
        Replicates.
    key
        PRNG key of the resampling (``jax.random.key(0)`` if not given); the same key gives the same
        replicates whatever the executor.
    strata
        A baseline covariate name, or one value per subject: resample within each stratum.
    executor
        Where the refits run: ``None`` (this process), a ``distributed.Client`` or any
        `concurrent.futures.Executor` (see `nlmegen.parallel.as_executor`).
    method
        The backend of the refits (default: the fit's own, rebuilt from ``fit.settings``); refits
        skip the covariance step.
    use
        Statuses whose replicates enter the intervals (add ``"not_converged"`` to keep those too).
    chunks
        Tasks to cut the replicates into (default: twice the executor's workers; 1 locally).
    """
    model, pop = fit.require_model("bootstrap")
    if n < 2:
        raise ValueError(f"bootstrap needs n >= 2 replicates, not {n}")
    key = jax.random.key(0) if key is None else key
    backend = quiet(backend_of(fit, method), covariance="none")
    init, fixed = start_of(fit)
    indices = resample_indices(key, pop.n_subjects, n, _strata_of(pop, strata))
    keys = jax.random.split(jax.random.fold_in(key, 1), n)
    jobs = [{"index": indices[i], "init": init, "fixed": fixed, "key": key_data(keys[i])} for i in range(n)]
    runner = as_executor(executor)
    pieces = split(n, chunks or 2 * worker_count(executor))
    futures = [runner.submit(fit_chunk, model, pop, backend, [jobs[i] for i in piece]) for piece in pieces]
    records = chunk_results(futures, [len(p) for p in pieces])
    return _result(fit, records, indices, tuple(use))


def _result(fit, records: list[dict], indices: np.ndarray, used: tuple) -> BootstrapResult:
    original = flat_params(fit.params)
    labels = list(original)
    estimates = pd.DataFrame([[r["estimates"].get(lab, math.nan) for lab in labels] for r in records],
                             columns=labels)
    theta = pd.DataFrame([r["theta"] if r["theta"] is not None else np.full(len(fit.theta_names), np.nan)
                          for r in records], columns=list(fit.theta_names))
    for frame in (estimates, theta):
        frame.index.name = "replicate"
    status = pd.Series([r["status"] for r in records], name="status")
    messages = pd.Series({i: r["message"] for i, r in enumerate(records) if r["status"] != "converged"},
                         name="message", dtype=object)
    return BootstrapResult(estimates=estimates, theta=theta, status=status,
                           ofv=pd.Series([r["ofv"] for r in records], name="ofv"),
                           seconds=pd.Series([r["seconds"] for r in records], name="seconds"),
                           messages=messages, original=original, indices=indices, used=used)
