"""`compare`: one table for several fits of the same data (OFV, LRT, AIC, BIC, PSIS-LOO)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["compare"]

BAYESIAN = ("nuts", "svi")


def compare(*fits: Any, names: Sequence[str] | None = None, reference: int | str = 0,
            loo: bool | None = None, loo_draws: int = 1000) -> pd.DataFrame:
    """Compare fits of the same data: OFV difference, likelihood-ratio test, AIC, BIC, and PSIS-LOO.

    Parameters
    ----------
    *fits
        Two or more `FitResult` of the same population (same subjects and observations).
    names
        Row labels (default ``"<method>"`` or ``"model k"``).
    reference
        The fit the others are compared with (index or name; default the first).
    loo
        Add ArviZ's leave-one-*subject*-out comparison (``arviz.compare`` on the ``subject_marginal``
        log-likelihood, each subject's likelihood with its random effects integrated out, so
        maximum-likelihood and Bayesian fits compare on one scale). Default: when a fit is Bayesian.
        A maximum-likelihood fit enters with draws from the asymptotic distribution of its
        estimates, so it needs a covariance step.
    loo_draws
        Draws per maximum-likelihood fit for LOO (`FitResult.to_arviz`'s ``n_draws``).

    Returns
    -------
    pandas.DataFrame
        One row per fit: ``method``, ``status``, ``ofv``, ``n_params``, ``aic``, ``bic``, ``dofv``
        (this fit's OFV minus the reference's), ``df`` (its parameter count minus the reference's),
        ``lrt_p`` (likelihood-ratio test between this fit and the reference: ``|dOFV| ~ chi2(|df|)``
        with the larger model's OFV subtracted from the smaller's; NaN when the parameter counts are
        equal or an OFV is missing), ``daic``, ``dbic``; with ``loo``, ArviZ's ``elpd_loo``,
        ``p_loo``, ``elpd_diff`` (to the reference), ``se``, ``dse``, ``weight``, ``loo_warning``.

    Notes
    -----
    The LRT is valid only for nested models (the smaller a special case of the larger, e.g. a
    covariate coefficient at 0) fitted by maximum likelihood; nesting is not checked. A parameter on
    the boundary of its space (a variance at 0) makes the chi-square reference conservative
    (Self & Liang 1987). Bayesian fits have no OFV: their rows carry only the LOO columns.

    Examples
    --------
    >>> import nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> full = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False, covariance="none")
    >>> small = nlmegen.fit(nlmegen.examples.theo_model_kacl, pop, progress=False, covariance="none")
    >>> table = nlmegen.compare(small, full, names=["no IIV on V", "full"])
    >>> int(table.loc["full", "df"]), bool(table.loc["full", "lrt_p"] < 0.05)
    (1, True)
    """
    if len(fits) < 2:
        raise ValueError("compare needs at least two fits")
    labels = _labels(fits, names)
    _same_data(fits, labels)
    ref = labels.index(reference) if isinstance(reference, str) else int(reference)
    if not 0 <= ref < len(fits):
        raise ValueError(f"reference {reference!r} is not one of the fits {labels}")
    rows = []
    for fit in fits:
        bayes = fit.method in BAYESIAN
        rows.append({"method": fit.method, "status": fit.status, "ofv": np.nan if bayes else float(fit.ofv),
                     "n_params": int(fit.n_params), "aic": float(fit.aic), "bic": float(fit.bic)})
    table = pd.DataFrame(rows, index=pd.Index(labels, name="model"))
    table["dofv"] = table["ofv"] - table["ofv"].iloc[ref]
    table["df"] = table["n_params"] - table["n_params"].iloc[ref]
    table["lrt_p"] = [_lrt(table["dofv"].iloc[k], table["df"].iloc[k]) for k in range(len(fits))]
    table["daic"] = table["aic"] - table["aic"].iloc[ref]
    table["dbic"] = table["bic"] - table["bic"].iloc[ref]
    if loo is None:
        loo = any(f.method in BAYESIAN for f in fits)
    if loo:
        table = table.join(_loo_table(fits, labels, labels[ref], loo_draws))
    return table


def _lrt(dofv: float, df: int) -> float:
    """p of the LRT between a fit and the reference: the larger model must have the lower OFV."""
    if not np.isfinite(dofv) or df == 0:
        return np.nan
    drop = -dofv if df > 0 else dofv  # OFV of the smaller model minus that of the larger
    return float(stats.chi2.sf(max(drop, 0.0), abs(int(df))))


def _labels(fits: Sequence[Any], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(fits) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(fits)} distinct labels, got {names}")
        return names
    methods = [f.method for f in fits]
    if len(set(methods)) == len(methods):
        return methods
    return [f"model {k + 1}" for k in range(len(fits))]


def _same_data(fits: Sequence[Any], labels: list[str]) -> None:
    """OFVs, AIC and LOO compare only on the same subjects and observations."""
    first = fits[0]
    for fit, label in zip(fits[1:], labels[1:], strict=True):
        same = (tuple(fit.ids) == tuple(first.ids) and np.shape(fit.mask) == np.shape(first.mask)
                and np.array_equal(np.asarray(fit.mask), np.asarray(first.mask))
                and np.allclose(np.where(fit.mask, fit.dv, 0.0), np.where(first.mask, first.dv, 0.0)))
        if not same:
            raise ValueError(f"fit {label!r} is not of the same data as {labels[0]!r} (subjects, observations or DV "
                             "differ): their objective functions cannot be compared")


def _loo_table(fits: Sequence[Any], labels: list[str], ref: str, n_draws: int) -> pd.DataFrame:
    import arviz as az

    for fit, label in zip(fits, labels, strict=True):
        if fit.method not in BAYESIAN and (fit.covariance is None or fit.covariance_kind == "none"):
            raise ValueError(f"loo: fit {label!r} has no covariance step, so no draws of its estimates to "
                             "cross-validate over; refit with covariance='sandwich' (or 'R'), or pass loo=False")
    trees = {label: fit.to_arviz(n_draws=n_draws) if fit.method not in BAYESIAN else fit.to_arviz()
             for fit, label in zip(fits, labels, strict=True)}
    out = az.compare(trees, var_name="subject_marginal", reference=ref, round_to="none")
    keep = {"elpd": "elpd_loo", "p": "p_loo", "elpd_diff": "elpd_diff", "se": "se", "dse": "dse",
            "weight": "weight", "warning": "loo_warning"}
    cols = {k: v for k, v in keep.items() if k in out.columns}
    return out[list(cols)].rename(columns=cols)
