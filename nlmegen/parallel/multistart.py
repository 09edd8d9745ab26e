"""Multistart: refit from random starts around the estimate, to see whether a better optimum exists.

Each start moves every free parameter of the estimate by ``spread * N(0, 1)`` on the estimation
(unconstrained) scale, where ``spread = 0.5`` multiplies a log-scale parameter by ``exp(+-0.5)``
at one SD (PsN's ``-jitter`` / NONMEM's ``$EST`` retries perturb the initial estimates in the same
way). The report gives every start's OFV and estimates, the best OFV, and the spread of the OFVs
and of the estimates over the converged starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import pandas as pd

from ._spec import backend_of, chunk_results, key_data, quiet, start_of
from ._tasks import fit_chunk, flat_params
from .executor import as_executor, split, worker_count

__all__ = ["MultistartResult", "multistart"]


@dataclass(frozen=True)
class MultistartResult:
    """The fits from every start.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per start: ``status``, ``ofv``, ``dofv`` (against the original fit; negative: a
        better optimum), ``message`` and the estimates on the model's scale.
    starts : pandas.DataFrame
        The starting values (estimation scale, free parameters).
    best : FitResult or None
        The converged fit with the lowest OFV (None when no start converged).
    original_ofv : float
        The OFV of the fit the starts were drawn around.
    """

    table: pd.DataFrame
    starts: pd.DataFrame
    best: Any = field(repr=False)
    original_ofv: float
    results: list = field(default_factory=list, repr=False)

    @property
    def best_ofv(self) -> float:
        ok = self.table[self.table["status"] == "converged"]["ofv"]
        return float(ok.min()) if len(ok) else float("nan")

    @property
    def spread(self) -> pd.Series:
        """Over the converged starts: OFV range and, per estimate, (max - min) / |median|."""
        ok = self.table[self.table["status"] == "converged"]
        est = ok.drop(columns=["status", "ofv", "dofv", "message"])
        rel = (est.max() - est.min()) / est.median().abs()
        return pd.concat([pd.Series({"ofv_range": ok["ofv"].max() - ok["ofv"].min()}), rel.rename(lambda c: f"{c}")])

    def __repr__(self) -> str:
        counts = self.table["status"].value_counts().to_dict()
        lines = [f"MultistartResult: {len(self.table)} starts {counts}; original OFV {self.original_ofv:.4f}, "
                 f"best {self.best_ofv:.4f} ({self.best_ofv - self.original_ofv:+.4f})",
                 self.table[["status", "ofv", "dofv"]].to_string(float_format=lambda x: f"{x:.4f}")]
        return "\n".join(lines)


def multistart(fit, n: int = 10, *, spread: float = 0.5, key=None, executor: Any = None, method: Any = None,
               chunks: int | None = None) -> MultistartResult:
    """Refit ``fit``'s model from ``n`` random starts around its estimate (see the module docstring).

    Parameters
    ----------
    fit
        A `FitResult` holding its model and data.
    n
        Starts.
    spread
        SD of the perturbation on the estimation scale.
    key
        PRNG key (``jax.random.key(0)`` if not given).
    executor, method, chunks
        As for `nlmegen.parallel.bootstrap` (refits skip the covariance step).
    """
    model, pop = fit.require_model("multistart")
    if n < 1 or spread <= 0:
        raise ValueError(f"multistart needs n >= 1 and spread > 0, not n={n}, spread={spread}")
    key = jax.random.key(0) if key is None else key
    backend = quiet(backend_of(fit, method), covariance="none")
    _, fixed = start_of(fit)
    from ..model import Density, discover

    space = Density(model, discover(model, pop)).theta_space
    free = np.asarray(fit.free)
    k_start, k_fit = jax.random.split(key)
    z = np.asarray(jax.random.normal(k_start, (n, int(free.sum()))))
    starts = np.tile(np.asarray(fit.theta, dtype=float), (n, 1))
    starts[:, free] += spread * z
    keys = jax.random.split(k_fit, n)
    jobs = []
    for i in range(n):
        values = space.constrain(starts[i])
        init = {k: np.asarray(v) if not isinstance(v, dict) else v for k, v in values.items() if k not in fixed}
        jobs.append({"index": None, "init": init, "fixed": fixed, "key": key_data(keys[i])})
    runner = as_executor(executor)
    pieces = split(n, chunks or 2 * worker_count(executor))
    futures = [runner.submit(fit_chunk, model, pop, backend, [jobs[i] for i in piece], True) for piece in pieces]
    records = chunk_results(futures, [len(p) for p in pieces])
    labels = list(flat_params(fit.params))
    table = pd.DataFrame({"status": [r["status"] for r in records], "ofv": [r["ofv"] for r in records],
                          "message": [r["message"] for r in records]})
    table["dofv"] = table["ofv"] - fit.ofv
    table = pd.concat([table, pd.DataFrame([[r["estimates"].get(lab, np.nan) for lab in labels] for r in records],
                                           columns=labels)], axis=1)
    table.index.name = "start"
    results = [r.get("result") for r in records]
    ok = [i for i, r in enumerate(records) if r["status"] == "converged"]
    best = results[min(ok, key=lambda i: records[i]["ofv"])] if ok else None
    start_table = pd.DataFrame(starts[:, free], columns=list(np.asarray(fit.theta_names)[free]))
    start_table.index.name = "start"
    return MultistartResult(table=table, starts=start_table, best=best, original_ofv=fit.ofv, results=results)
