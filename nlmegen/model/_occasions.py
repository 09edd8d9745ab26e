"""Inter-occasion variability: random effects per subject and occasion (kappa).

NONMEM codes IOV as one extra eta per occasion with a shared variance (``$OMEGA BLOCK(1) SAME``),
so that ``CL = TVCL exp(eta_CL + kappa_CL,occ)`` (Karlsson & Sheiner, J Pharmacokinet Biopharm
1993;21:735-750). Here the occasion effects are one more random-effect site inside the subject
plate whose per-subject value has an occasion axis: ``kappa`` is ``[subj, occ, ...]``, every
occasion drawn independently from the site's distribution. Every backend therefore integrates
(FOCEI, Laplace), samples (SAEM, NUTS, SVI) or simulates them jointly with the subject's other
random effects, with no special case: they are part of the subject's random-effect vector (its
Hessian stays block diagonal by subject).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.primitives import Messenger

from .._errors import ModelError

__all__ = ["OCCASIONS_TAG", "by_occasion", "occasion_index", "occasions"]

#: ``infer`` key of a sample site declared inside `occasions`: its number of occasions
OCCASIONS_TAG = "nlmegen_occasions"


class occasions(Messenger):  # noqa: N801  (NumPyro's handler naming)
    """Sample sites inside are drawn once per occasion of ``pop`` (inter-occasion variability).

    Use it inside :func:`nlmegen.subjects`: a site ``numpyro.sample("kappa", d)`` with ``d`` of
    event shape ``E`` gets the value ``[subj, n_occasions, *E]``, each occasion an independent draw
    from ``d`` (its parameters are population parameters, e.g. the IOV standard deviation).
    :func:`nlmegen.by_occasion` then gives each observation (or dose) its occasion's value.

    Examples
    --------
    >>> import numpy as np, pandas as pd, numpyro, numpyro.distributions as dist, nlmegen
    >>> table = pd.DataFrame({"ID": [1, 1, 1, 1], "TIME": [0, 1, 24, 25], "DV": [0, 5.0, 0, 4.0],
    ...                       "AMT": [100, 0, 100, 0], "EVID": [1, 0, 1, 0], "OCC": [1, 1, 2, 2]})
    >>> pop = nlmegen.read_nonmem(table)
    >>> pop.occasions, pop.occ.tolist()
    ((1, 2), [[0, 1]])
    >>> def model(pop):
    ...     with nlmegen.subjects(pop), nlmegen.occasions(pop):
    ...         kappa = numpyro.sample("kappa", dist.Normal(0.0, 0.2))
    ...     return nlmegen.by_occasion(kappa, pop)
    >>> with numpyro.handlers.seed(rng_seed=0):
    ...     kappa_obs = model(pop)
    >>> kappa_obs.shape
    (1, 2)
    """

    def __init__(self, pop: Any, fn=None):
        if getattr(pop, "occ", None) is None:
            raise ModelError("nlmegen.occasions(pop): the population has no occasions; give the data an OCC column, "
                             "or use pop.with_occasions('resets' | column | rule)")
        self.n_occasions = pop.n_occasions
        self.expanded: set[str] = set()
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed"):
            return
        if msg["name"].removesuffix("_decentered") in self.expanded:
            return  # NumPyro's LocScaleReparam (NUTS, SVI) re-samples an expanded site's noise: already per occasion
        fn = msg["fn"]
        if tuple(fn.batch_shape) not in ((), (1,)):
            raise ModelError(f"site {msg['name']!r} inside nlmegen.occasions has batch shape {fn.batch_shape}; give "
                             "one draw's distribution (e.g. dist.Normal(0, omega_iov).to_event(1)): it is drawn "
                             "once per occasion and subject")
        msg["fn"] = dist.Independent(fn.expand((self.n_occasions,)), 1)
        self.expanded.add(msg["name"])
        msg["infer"] = {**(msg.get("infer") or {}), OCCASIONS_TAG: self.n_occasions}


def by_occasion(values: Any, pop: Any, records: str = "obs") -> jax.Array:
    """Each record's occasion value: ``[subj, occ, ...]`` -> ``[subj, obs, ...]`` (or ``[subj, dose, ...]``).

    ``records="obs"`` (default) follows ``pop.occ``, ``records="doses"`` ``pop.dose_occ`` (for per-dose
    lag times or bioavailability, ``[n_subjects, n_doses]``). On one subject's slice (inside
    ``jax.vmap``) it maps ``[occ, ...]`` to ``[obs, ...]``.
    """
    index = {"obs": pop.occ, "doses": pop.dose_occ}.get(records, False)
    if index is False:
        raise ValueError(f"records must be 'obs' or 'doses', not {records!r}")
    if index is None:
        raise ModelError("nlmegen.by_occasion: the population has no occasions (an OCC column or "
                         "pop.with_occasions(...))")
    values = jnp.asarray(values)
    if index.ndim == 1:  # one subject
        return values[index]
    if values.ndim < 2 or values.shape[:2] != (index.shape[0], pop.n_occasions):
        raise ModelError(f"nlmegen.by_occasion: expected values of shape [n_subjects, n_occasions, ...] = "
                         f"[{index.shape[0]}, {pop.n_occasions}, ...], got {tuple(values.shape)}")
    return jax.vmap(lambda v, i: v[i])(values, index)


def occasion_index(t: Any, occ_start: Any) -> jax.Array:
    """Index of the occasion in force at time ``t``: the last one started at or before ``t``.

    For an ODE right-hand side that switches parameters at occasion boundaries: pass
    ``pop.occ_start`` (``[subj, occ]``) and the per-occasion values (``[subj, occ]``) in ``params``,
    then ``k = nlmegen.occasion_index(t, p["occ_start"]); cl = p["cl"][k]`` (see the README).
    """
    t = jnp.asarray(t)
    occ_start = jnp.asarray(occ_start)
    if occ_start.ndim == 2 and t.ndim:
        occ_start = occ_start.reshape(occ_start.shape[:1] + (1,) * (t.ndim - 1) + occ_start.shape[1:])
    started = occ_start <= t[..., None]
    score = jnp.where(started, occ_start, -jnp.inf)  # the latest start at or before t (a subject may lack some)
    score = jnp.where(jnp.any(started, axis=-1, keepdims=True), score, -occ_start)  # before all: the earliest
    return occ_start.shape[-1] - 1 - jnp.argmax(jnp.flip(score, -1), axis=-1)  # ties: the later occasion
