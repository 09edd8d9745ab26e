"""Why is the objective not finite? One evaluation of the observation sites, read record by record.

Backends call `explain_nonfinite` when a fit fails with a non-finite objective, so the message
names the cause and the records (``ID``, ``TIME``) instead of "objective is not finite".
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["explain_nonfinite"]

MAX_RECORDS = 5  # records named in a message


def _base(fn: Any) -> Any:
    import numpyro.distributions as dist

    from ...model import Censored

    while True:
        if isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
            fn = fn.base_dist
        elif isinstance(fn, Censored):
            fn = fn.base
        else:
            return fn


def _records(pop, where: np.ndarray) -> str:
    subj, slot = np.nonzero(where)
    times = np.asarray(pop.times)
    shown = [f"ID {pop.ids[i]} TIME {times[i, j]:g}" for i, j in zip(subj[:MAX_RECORDS], slot[:MAX_RECORDS],
                                                                    strict=True)]
    more = f" and {subj.size - MAX_RECORDS} more" if subj.size > MAX_RECORDS else ""
    return ", ".join(shown) + more


def explain_nonfinite(density: Any, theta: Any, eta: Any, pop: Any) -> str:
    """A sentence naming why observation log-densities are not finite at ``theta``, ``eta``
    (unconstrained; random effects taken at 0 where ``eta`` is not finite), or ``""``.

    Causes told apart, per observed site: a prediction that is not finite; a residual-error scale
    of 0 where the prediction is 0 (an error proportional to the prediction at pre-dose records);
    any other zero or non-finite scale; a density that is not finite at the observed value.
    """
    import jax.numpy as jnp
    import numpyro

    eta = np.asarray(eta, dtype=float)
    if eta.size and not np.all(np.isfinite(eta)):
        eta = np.where(np.isfinite(eta), eta, 0.0)
    try:
        with numpyro.validation_enabled(False):
            tr = density.trace(jnp.asarray(theta), jnp.asarray(eta), pop)
    except Exception as err:  # noqa: BLE001 - diagnosing must never hide the original failure
        return f"(evaluating the model to find the cause failed: {err})"
    mask, dv = np.asarray(pop.mask), np.asarray(pop.dv)
    reasons = []
    for site in density.sites.observed:
        covered = mask if site.output is None else mask & (np.asarray(pop.dvid) == site.output)
        base = _base(tr[site.name]["fn"])
        mean = np.broadcast_to(np.asarray(getattr(base, "mean", np.nan)), dv.shape)
        bad_mean = covered & ~np.isfinite(mean)
        if bad_mean.any():
            reasons.append(f"observation site {site.name!r}: the prediction is not finite at {int(bad_mean.sum())} "
                           f"record(s) ({_records(pop, bad_mean)}); check the model at the start values")
            continue
        scale = getattr(base, "scale", None)
        if scale is not None:
            scale = np.broadcast_to(np.asarray(scale), dv.shape)
            zero = covered & (scale == 0)
            at_zero_pred = zero & (mean == 0)
            if at_zero_pred.any():
                reasons.append(
                    f"observation site {site.name!r}: the residual-error SD is 0 at {int(at_zero_pred.sum())} "
                    f"record(s) where the prediction is 0 ({_records(pop, at_zero_pred)}): an error proportional "
                    "to the prediction has zero variance there (pre-dose samples?). Use an additive or combined "
                    "error (nlmegen.combined), or leave those records out of the fit (MDV=1)")
                continue
            bad_scale = covered & ~(np.isfinite(scale) & (scale > 0))
            if bad_scale.any():
                reasons.append(f"observation site {site.name!r}: the residual-error scale is 0 or not finite at "
                               f"{int(bad_scale.sum())} record(s) ({_records(pop, bad_scale)})")
                continue
        with np.errstate(all="ignore"):
            lp = np.asarray(base.log_prob(jnp.asarray(dv)))
        bad = covered & ~np.isfinite(np.broadcast_to(lp, dv.shape))
        if bad.any():
            reasons.append(f"observation site {site.name!r}: the log-density is not finite at {int(bad.sum())} "
                           f"record(s) ({_records(pop, bad)}); is DV outside the distribution's support (e.g. "
                           "DV <= 0 under a log-normal error)?")
    return "; ".join(reasons)
