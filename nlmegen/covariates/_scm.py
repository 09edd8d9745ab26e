"""Stepwise covariate modelling (SCM): forward inclusion, then backward elimination, by LRT.

PsN's ``scm`` (Jonsson & Karlsson, Pharm Res 1998;15:1463-1468; PsN SCM user guide): starting
from the base model, each forward step fits the current model plus each remaining candidate
relation; the relation with the smallest likelihood-ratio p-value (``dOFV ~ chi2(df)``, df the
number of added coefficients) is included if ``p < p_forward`` (0.05). When none is significant,
each backward step fits the model less each included relation and removes the least significant one
while its ``p >= p_backward`` (0.01). Base relations are never tested or removed.

The fits of one step are independent: they are submitted to an executor (anything with
``submit(fn, *args) -> future`` whose ``.result()`` returns: `concurrent.futures` pools, Dask's
``Client``, nlmegen's own executors) and default to running one after another in this process. With
a process pool or Dask the model factory must be picklable (a module-level function). Each fit
starts from its parent's estimates with the new coefficient at "no effect" (PsN's "update inits").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ._relations import Relation, Relations

__all__ = ["SCMResult", "SequentialExecutor", "scm"]

BAYESIAN = ("nuts", "svi")


class SequentialExecutor(concurrent.futures.Executor):
    """Runs each submitted call at once, in this process (the default executor of `scm`)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(err)
        return future


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What a candidate fit sends back: small and picklable (the FitResult only when kept)."""

    ofv: float
    status: str
    message: str
    n_params: int
    params: dict
    wall_s: float
    fit: Any = None


def _fit_candidate(make_model: Callable, relations: Relations, pop: Any, method: Any, init: dict,
                   options: dict, keep: bool) -> _Outcome:
    from ..infer import fit

    start = time.perf_counter()
    try:
        result = fit(make_model(relations), pop, method, init=init, **options)
    except Exception as err:  # a candidate that cannot be fitted is reported, not fatal to the search
        return _Outcome(np.nan, "failed", f"{type(err).__name__}: {err}", -1, {}, time.perf_counter() - start)
    params = {k: np.asarray(v) for k, v in result.params.items()}
    return _Outcome(float(result.ofv), result.status, result.message, int(result.n_params), params,
                    time.perf_counter() - start, result if keep else None)


@dataclasses.dataclass
class SCMResult:
    """The outcome of `scm`.

    Attributes
    ----------
    relations : Relations
        The final model's relations (base relations included).
    model : callable
        ``make_model(relations)``: the final model.
    fit : FitResult
        The final model's fit (without a covariance step unless ``fit_options`` asked for one;
        ``nlmegen.fit(result.model, pop, init=result.fit.params)`` adds it without recompiling).
    base_fit : FitResult or None
        The base model's fit (None when the executor ran the fits in other processes).
    steps : pandas.DataFrame
        One row per candidate fit: ``step``, ``direction`` (``"base"``, ``"forward"``,
        ``"backward"``), ``relation`` (the relation tested), ``model`` (the relations of the fitted
        model), ``ofv``, ``parent_ofv``, ``dofv`` (parent minus candidate forward, candidate minus
        parent backward), ``df``, ``p_value``, ``criterion`` (the p limit), ``significant``,
        ``chosen`` (the relation included or removed at that step), ``status``, ``n_params``,
        ``wall_s``.
    """

    relations: Relations
    model: Callable
    fit: Any
    steps: pd.DataFrame
    base_fit: Any = None

    def report(self) -> str:
        """The step table as text, with the final model."""
        cols = ["step", "direction", "relation", "ofv", "dofv", "df", "p_value", "significant", "chosen", "status"]
        with pd.option_context("display.width", 200, "display.max_rows", 500):
            text = self.steps[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
        return f"{text}\nfinal model: {self.relations.label} (OFV {self.fit.ofv:.3f})"


def scm(make_model: Callable[[Relations], Callable], pop: Any, candidates: Iterable[Relation], *,
        base: Iterable[Relation] = (), parameters: Iterable[str] = (), method: Any = "focei", p_forward: float = 0.05,
        p_backward: float = 0.01, executor: Any = None, fit_options: Mapping | None = None,
        max_steps: int | None = None) -> SCMResult:
    """Stepwise covariate modelling: forward inclusion at ``p_forward``, backward elimination at ``p_backward``.

    Parameters
    ----------
    make_model
        Model factory: ``make_model(relations) -> model(pop)``; the model calls
        ``relations.factors(pop)`` before the subject plate (see `nlmegen.covariates.Relations`).
    pop
        The data; centres, levels and bounds of every relation are taken from it once.
    candidates
        Relations to test (`nlmegen.covariates.Relation`); several forms of one parameter-covariate
        pair may be given, and one of them at most is included.
    base
        Relations in every model (never tested or removed), e.g. allometric weight.
    parameters
        Every parameter the model asks ``relations.factors(pop)`` for (those of ``base`` and
        ``candidates`` are added): ``f["v"]`` of a parameter without any relation is then 1.
    method
        An estimation method with an objective function (``"focei"``, ``"foce"``, ``"laplace"``,
        ``"fo"``, ``"saem"`` or a backend object); the Bayesian ones have no OFV to test.
    p_forward, p_backward
        Significance levels of inclusion (PsN default 0.05) and of keeping a relation (0.01).
    executor
        Runs the independent fits of a step: anything with ``submit(fn, *args)`` returning a future
        (`concurrent.futures.ProcessPoolExecutor`, ``dask.distributed.Client``); default: one after
        another in this process (`SequentialExecutor`).
    fit_options
        Passed to `nlmegen.fit` (default ``covariance="none"``, ``progress=False``: the standard
        errors of the candidates are not needed); e.g. ``fixed=``.
    max_steps
        Largest number of forward steps (default: until no candidate is significant).

    Returns
    -------
    SCMResult
        The final relations, model and fit, and the table of every step.
    """
    if isinstance(method, str) and method.lower() in BAYESIAN:
        raise ValueError(f"scm needs an objective function value for its likelihood-ratio tests; method {method!r} "
                         "is Bayesian (use 'focei', 'foce', 'laplace', 'fo' or 'saem')")
    if not (0 < p_backward <= p_forward < 1):
        raise ValueError(f"need 0 < p_backward <= p_forward < 1, got p_forward={p_forward}, p_backward={p_backward}")
    candidates, base = _named(list(candidates)), list(base)
    params = [*parameters, *(r.parameter for r in base + candidates)]
    base_set = Relations(base, params).resolve(pop)
    pool = [r.resolve(pop) for r in candidates]
    base_pairs = {(r.parameter, r.covariate) for r in base_set.relations}
    clash = sorted(f"{r.parameter}-{r.covariate}" for r in pool if (r.parameter, r.covariate) in base_pairs)
    if clash:
        raise ValueError(f"candidate relations {clash} are already in the base model")
    if not pool:
        raise ValueError("scm needs at least one candidate relation")
    options = {"covariance": "none", "progress": False} if isinstance(method, str) else {}
    options.update(fit_options or {})
    fixed = set((options.get("fixed") or {}).keys())
    keep = executor is None or isinstance(executor, SequentialExecutor)
    if not keep:  # a Dask client gets its workers' compilation caches, as in bootstrap and multistart
        from ..parallel.executor import as_executor

        executor = as_executor(executor)
    run = _Runner(make_model, pop, method, options, fixed, executor or SequentialExecutor(), keep)

    current = base_set
    (best,) = run([(current, {})])
    if best.status == "failed":
        raise RuntimeError(f"scm: the base model could not be fitted: {best.message}")
    base_fit = best.fit
    rows = [_row(0, "base", "", current, best, None, 0, np.nan)]
    step = 0
    while max_steps is None or step < max_steps:  # forward inclusion
        step += 1
        included = {(x.parameter, x.covariate) for x in current.relations}
        remaining = [r for r in pool if (r.parameter, r.covariate) not in included]
        if not remaining:
            break
        trials = [current.with_relation(r) for r in remaining]
        outcomes = run([(t, _warm(best.params, r.init(), fixed)) for t, r in zip(trials, remaining, strict=True)])
        tested = [_test(best.ofv, o.ofv, r.df) for r, o in zip(remaining, outcomes, strict=True)]
        # the most significant: smallest p, compared as log p (p underflows to 0 for large dOFV)
        pick = _choose([lp for _, _, lp in tested], outcomes, lambda lp: lp < np.log(p_forward))
        for k, (r, o) in enumerate(zip(remaining, outcomes, strict=True)):
            p, dofv, _ = tested[k]
            rows.append(_row(step, "forward", r.label, trials[k], o, best.ofv, r.df, p, dofv, p_forward, k == pick))
        if pick is None:
            break
        current, best = trials[pick], outcomes[pick]
    while True:  # backward elimination
        removable = [r for r in current.relations if r not in base_set.relations]
        if not removable:
            break
        step += 1
        trials = [current.without(r) for r in removable]
        starts = [_warm(best.params, {}, fixed, drop=r.site) for r in removable]
        outcomes = run(list(zip(trials, starts, strict=True)))
        tested = [_test(o.ofv, best.ofv, r.df) for r, o in zip(removable, outcomes, strict=True)]
        # the least significant relation (largest p) goes when it is not significant at p_backward
        pick = _choose([-lp for _, _, lp in tested], outcomes, lambda q: -q >= np.log(p_backward))
        for k, (r, o) in enumerate(zip(removable, outcomes, strict=True)):
            p, dofv, _ = tested[k]
            rows.append(_row(step, "backward", r.label, trials[k], o, best.ofv, r.df, p, dofv, p_backward,
                             k == pick, significant=p < p_backward))
        if pick is None:
            break
        current, best = trials[pick], outcomes[pick]
    final_fit = best.fit
    if final_fit is None:  # the executor ran elsewhere: refit here from the estimates (a few iterations)
        final_fit = _fit_candidate(make_model, current, pop, method, _warm(best.params, {}, fixed), options, True).fit
    model = final_fit.model if getattr(final_fit, "model", None) is not None else make_model(current)
    return SCMResult(current, model, final_fit, pd.DataFrame(rows), base_fit)


class _Runner:
    """Submit the fits of one step to the executor and collect them in order."""

    def __init__(self, make_model, pop, method, options, fixed, executor, keep):
        self.args = (make_model, pop, method, options, fixed, executor, keep)

    def __call__(self, jobs: list[tuple[Relations, dict]]) -> list[_Outcome]:
        make_model, pop, method, options, fixed, executor, keep = self.args
        futures = [executor.submit(_fit_candidate, make_model, rel, pop, method, init, options, keep)
                   for rel, init in jobs]
        return [f.result() for f in futures]


def _named(candidates: list[Relation]) -> list[Relation]:
    """Several forms of one parameter-covariate pair: each coefficient named by its form as well."""
    pairs = [(r.parameter, r.covariate) for r in candidates]
    return [dataclasses.replace(r, name=f"{r.parameter}_{r.covariate}_{r.form}")
            if r.name is None and pairs.count((r.parameter, r.covariate)) > 1 else r for r in candidates]


def _warm(parent: dict, new: dict, fixed: set, drop: str | None = None) -> dict:
    """Start values: the parent's estimates (less a removed coefficient and fixed sites), plus ``new``."""
    out = {k: v for k, v in parent.items() if k != drop and k not in fixed}
    out.update(new)
    return out


def _test(ofv_reduced: float, ofv_full: float, df: int) -> tuple[float, float, float]:
    """Likelihood-ratio test: ``dOFV = OFV_reduced - OFV_full ~ chi2(df)``; (p, dOFV, log p)."""
    dofv = ofv_reduced - ofv_full
    if not np.isfinite(dofv):
        return np.nan, dofv, np.nan
    if df <= 0:
        return 1.0, float(dofv), 0.0
    return float(stats.chi2.sf(max(dofv, 0.0), df)), float(dofv), float(stats.chi2.logsf(max(dofv, 0.0), df))


def _choose(scores: list[float], outcomes: list[_Outcome], ok: Callable[[float], bool]) -> int | None:
    """Index of the smallest score among fitted candidates that pass ``ok``; None if none does."""
    best = None
    for k, (s, o) in enumerate(zip(scores, outcomes, strict=True)):
        if o.status == "failed" or not np.isfinite(s) or not ok(s):
            continue
        if best is None or s < scores[best]:
            best = k
    return best


def _row(step, direction, relation, model, o, parent, df, p, dofv=np.nan, criterion=np.nan, chosen=False,
         significant=None) -> dict:
    if significant is None:
        significant = bool(np.isfinite(p) and np.isfinite(criterion) and p < criterion)
    return {"step": step, "direction": direction, "relation": relation, "model": model.label, "ofv": o.ofv,
            "parent_ofv": np.nan if parent is None else parent, "dofv": dofv, "df": df, "p_value": p,
            "criterion": criterion, "significant": significant, "chosen": chosen, "status": o.status,
            "n_params": o.n_params, "wall_s": o.wall_s, "message": o.message}
