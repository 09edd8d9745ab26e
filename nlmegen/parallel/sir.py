"""Sampling importance resampling (SIR) of a fit's parameter uncertainty, as PsN's ``sir`` does.

Dosne AG, Bergstrand M, Harling K, Karlsson MO. Improving the estimation of parameter uncertainty
distributions in nonlinear mixed effects models using sampling importance resampling. J
Pharmacokinet Pharmacodyn 2016;43:583-596; iterations: Dosne et al., J Pharmacokinet Pharmacodyn
2017;44:509-520.

1. Sample ``M`` parameter vectors from a proposal: the multivariate normal at the estimate with the
   covariance step's matrix (times ``inflation``), on the estimation scale (nlmegen's unconstrained
   space, where that matrix lives: samples never leave a support).
2. Importance ratio of each: ``IR = exp(-dOFV / 2) / relPDF``, ``dOFV = OFV(theta) - OFV(estimate)``
   and ``relPDF`` the proposal density relative to its value at the estimate.
3. Resample ``m`` vectors *without* replacement with probabilities proportional to IR (successive
   draws; by Efraimidis & Spirakis' keys ``u^(1/IR)``, Inf Process Lett 2006;97:181-185).
4. Iterations (``samples``/``resamples`` sequences): each next proposal is the multivariate normal
   at the estimate with the covariance of the previous iteration's resamples.

Diagnostics (Dosne 2016): the dOFV distribution of the proposal and of the resamples against the
chi-square with as many degrees of freedom as estimated parameters (the resamples' should lie on
or below it), the effective sample size of the importance weights, and the resampled proportion
per bin of each parameter's proposal values (flat at ``m/M`` when the proposal was adequate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from ._spec import backend_of, quiet
from ._tasks import flat_params, ofv_chunk
from .executor import as_executor, split, worker_count

__all__ = ["SIRResult", "sir", "weighted_without_replacement"]

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
BINS = 10


def weighted_without_replacement(key, log_weights: np.ndarray, m: int) -> np.ndarray:
    """Indices of ``m`` items drawn one after another without replacement, with probability
    proportional to ``exp(log_weights)`` among those left (Efraimidis & Spirakis 2006: the ``m``
    largest ``log(u_i) / w_i``). Items of weight 0 are never drawn."""
    log_weights = np.asarray(log_weights, dtype=float)
    finite = np.isfinite(log_weights)
    if finite.sum() < m:
        raise ValueError(f"SIR: only {int(finite.sum())} samples have a finite importance ratio; cannot "
                         f"resample {m} without replacement (more samples, or a wider/narrower proposal)")
    w = np.where(finite, np.exp(log_weights - np.max(log_weights[finite])), 0.0)
    u = np.asarray(jax.random.uniform(key, log_weights.shape, minval=1e-300, maxval=1.0))
    with np.errstate(divide="ignore"):
        score = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
    return np.argsort(-score, kind="stable")[:m]


@dataclass(frozen=True)
class SIRResult:
    """Resampled parameter vectors and the SIR diagnostics.

    Attributes
    ----------
    resamples : pandas.DataFrame
        The final iteration's resampled vectors on the model's scale (one column per element).
    samples : pandas.DataFrame
        Every proposal sample: ``iteration``, the free parameters on the estimation scale,
        ``ofv``, ``dofv``, ``log_ir`` (log importance ratio), ``weight`` (normalised within its
        iteration), ``resampled`` and ``ebe_converged``.
    diagnostics : pandas.DataFrame
        Per iteration: samples, resamples, failed evaluations, effective sample size, the largest
        normalised weight, and the dOFV quantiles (`dofv_quantiles`).
    original : dict
        The fit's estimates.
    ofv_estimate : float
        The OFV at the estimate, as SIR recomputed it.
    df : int
        Degrees of freedom of the reference chi-square (estimated parameters).
    """

    resamples: pd.DataFrame
    samples: pd.DataFrame
    diagnostics: pd.DataFrame
    original: dict
    ofv_estimate: float
    df: int
    free_names: tuple = field(default=(), repr=False)

    def dofv_quantiles(self, iteration: int = -1) -> pd.DataFrame:
        """Quantiles of dOFV: chi-square(df), the proposal samples and the resamples of one iteration."""
        it = self._iteration(iteration)
        rows = self.samples[self.samples["iteration"] == it]
        table = pd.DataFrame({"chi2": stats.chi2.ppf(QUANTILES, self.df),
                              "proposal": np.nanquantile(rows["dofv"], QUANTILES),
                              "resampled": np.nanquantile(rows.loc[rows["resampled"], "dofv"], QUANTILES)},
                             index=pd.Index(QUANTILES, name="quantile"))
        return table

    def resampled_proportion(self, iteration: int = -1) -> pd.DataFrame:
        """Per free parameter, the share of proposal samples resampled in each of 10 bins of equal
        count (by that parameter's proposal values); ``attrs["expected"]`` is ``m / M``."""
        it = self._iteration(iteration)
        rows = self.samples[self.samples["iteration"] == it]
        out = {}
        for name in self.free_names:
            bins = pd.qcut(rows[name].rank(method="first"), BINS, labels=range(1, BINS + 1))
            out[name] = rows["resampled"].groupby(bins, observed=False).mean()
        table = pd.DataFrame(out).T
        table.index.name = "parameter"
        table.columns.name = "bin"
        table.attrs["expected"] = float(rows["resampled"].mean())
        return table

    def _iteration(self, iteration: int) -> int:
        its = sorted(self.samples["iteration"].unique())
        return its[iteration]

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Estimate, median, SE (SD of the resamples) and percentile interval of the resamples."""
        lo, hi = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
        pct = lambda q: f"{100 * q:.3g}%"  # noqa: E731
        table = pd.DataFrame({"estimate": pd.Series(self.original), "median": self.resamples.median(),
                              "SE": self.resamples.std(ddof=1), pct(lo): self.resamples.quantile(lo),
                              pct(hi): self.resamples.quantile(hi)})
        table.index.name = "parameter"
        return table

    def __repr__(self) -> str:
        last = self.diagnostics.iloc[-1]
        lines = [f"SIRResult: {len(self.diagnostics)} iteration(s); last: {int(last['samples'])} samples, "
                 f"{int(last['resamples'])} resampled, ESS {last['ess']:.1f}, {int(last['failed'])} failed "
                 f"evaluations, largest weight {last['max_weight']:.3g}",
                 self.summary().to_string(float_format=lambda x: f"{x:.4g}"),
                 f"dOFV quantiles (chi-square df={self.df}):",
                 self.dofv_quantiles().to_string(float_format=lambda x: f"{x:.3g}")]
        if last["ess"] < last["resamples"]:
            lines.append(f"note: the effective sample size ({last['ess']:.0f}) is below the resamples "
                         f"({int(last['resamples'])}): resampling without replacement then takes many vectors of "
                         "small weight and leans on the proposal; use more samples, iterations or inflation")
        return "\n".join(lines)


def _as_list(value: int | Sequence[int], name: str) -> list[int]:
    values = [int(value)] if np.ndim(value) == 0 else [int(v) for v in value]
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be a positive integer or a sequence of them, not {value!r}")
    return values


def sir(fit, samples: int | Sequence[int] = 1000, resamples: int | Sequence[int] = 200, *, key=None,
        inflation: float = 1.0, executor: Any = None, method: Any = None, chunks: int | None = None) -> SIRResult:
    """Sampling importance resampling of ``fit``'s parameter uncertainty (PsN's ``sir``; see the module).

    Parameters
    ----------
    fit
        A maximum-likelihood `FitResult` with a covariance step, holding its model and data.
    samples, resamples
        ``M`` proposal samples and ``m`` resamples; sequences of equal length give iterations
        (PsN's default is ``(1000, 1000, 1000, 2000, 2000)`` / ``(200, 400, 500, 1000, 1000)``).
    key
        PRNG key (``jax.random.key(0)`` if not given): the same key gives the same result whatever
        the executor.
    inflation
        Factor on the proposal's covariance (every iteration).
    executor
        Where the objective evaluations run (see `nlmegen.parallel.as_executor`).
    method
        The backend whose OFV is used (default: the fit's own).
    chunks
        Tasks per iteration (default: twice the executor's workers).
    """
    model, pop = fit.require_model("sir")
    m_list, r_list = _as_list(samples, "samples"), _as_list(resamples, "resamples")
    if len(m_list) != len(r_list):
        raise ValueError(f"samples {m_list} and resamples {r_list} must give the same number of iterations")
    bad = [(m, r) for m, r in zip(m_list, r_list, strict=True) if r > m]
    if bad:
        raise ValueError(f"SIR resamples without replacement: resamples must not exceed samples, got {bad}")
    if fit.covariance is None or not np.all(np.isfinite(fit.covariance)):
        raise ValueError("SIR needs the fit's covariance matrix (a fit with covariance='sandwich', 'R' or 'S')")
    if inflation <= 0:
        raise ValueError(f"inflation must be positive, not {inflation}")
    backend = quiet(backend_of(fit, method))
    if not hasattr(backend, "objective_for"):
        raise ValueError(f"SIR evaluates the OFV of FOCEI/FOCE/Laplace/FO; the fit's method is {fit.method!r}: "
                         "pass method=nlmegen.FOCEI() (or another of these)")
    key = jax.random.key(0) if key is None else key
    runner = as_executor(executor)
    n_chunks = chunks or 2 * worker_count(executor)
    free = np.asarray(fit.free)
    names = tuple(np.asarray(fit.theta_names)[free])
    center = np.asarray(fit.theta, dtype=float)[free]
    cov = np.asarray(fit.covariance, dtype=float)

    def evaluate(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = np.tile(np.asarray(fit.theta, dtype=float), (len(rows), 1))
        full[:, free] = rows
        pieces = split(len(rows), n_chunks)
        futures = [runner.submit(ofv_chunk, model, pop, backend, full[list(p)]) for p in pieces]
        parts = [f.result() for f in futures]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    ofv_hat = float(evaluate(center[None, :])[0][0])
    if not np.isfinite(ofv_hat):
        raise ValueError("SIR: the OFV at the fit's estimate is not finite")
    tables, diagnostics, chosen = [], [], None
    for it, (m_samples, m_resamples) in enumerate(zip(m_list, r_list, strict=True)):
        k_draw, k_pick = jax.random.split(jax.random.fold_in(key, it))
        proposal = cov * inflation
        chol = np.linalg.cholesky(proposal)
        z = np.asarray(jax.random.normal(k_draw, (m_samples, center.size)))
        rows = center + z @ chol.T
        ofv, converged = evaluate(rows)
        dofv = ofv - ofv_hat
        log_ir = np.where(np.isfinite(dofv), -0.5 * dofv + 0.5 * np.sum(z * z, axis=1), -np.inf)
        chosen = weighted_without_replacement(k_pick, log_ir, m_resamples)
        finite = np.isfinite(log_ir)
        w = np.where(finite, np.exp(log_ir - np.max(log_ir[finite])), 0.0)
        w = w / w.sum()
        table = pd.DataFrame(rows, columns=list(names))
        table.insert(0, "iteration", it + 1)
        resampled = np.zeros(m_samples, bool)
        resampled[chosen] = True
        table = table.assign(ofv=ofv, dofv=dofv, log_ir=log_ir, weight=w, resampled=resampled,
                             ebe_converged=converged)
        tables.append(table)
        diagnostics.append({"iteration": it + 1, "samples": m_samples, "resamples": m_resamples,
                            "failed": int((~finite).sum()), "ebe_unconverged": int((~converged).sum()),
                            "ess": float(1.0 / np.sum(w * w)), "max_weight": float(w.max()),
                            "inflation": inflation})
        cov = np.cov(rows[chosen], rowvar=False).reshape(center.size, center.size)
    samples_table = pd.concat(tables, ignore_index=True)
    last_rows = tables[-1][list(names)].to_numpy()[chosen]
    return SIRResult(resamples=_natural(fit, model, pop, last_rows, free), samples=samples_table,
                     diagnostics=pd.DataFrame(diagnostics).set_index("iteration"),
                     original=flat_params(fit.params), ofv_estimate=ofv_hat, df=int(free.sum()), free_names=names)


def _natural(fit, model, pop, rows: np.ndarray, free: np.ndarray) -> pd.DataFrame:
    """Free unconstrained rows -> the model-scale values of every element (fixed ones constant)."""
    from ..model import Density, discover

    space = Density(model, discover(model, pop)).theta_space
    full = np.tile(np.asarray(fit.theta, dtype=float), (len(rows), 1))
    full[:, free] = rows
    values = jax.jit(jax.vmap(space.constrain))(jnp.asarray(full))
    out = {}
    for name, value in values.items():
        if isinstance(value, dict):
            continue
        value = np.asarray(value, dtype=float).reshape(len(rows), -1)
        labels = list(flat_params({name: value[0].reshape(np.shape(fit.params[name]))}))
        out.update({lab: value[:, j] for j, lab in enumerate(labels)})
    table = pd.DataFrame(out)
    table.index.name = "resample"
    return table
