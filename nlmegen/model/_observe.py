"""Observed sites: padding masks, output (DVID) selection, M3/M4 censoring, residual error models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array
from numpyro.distributions import constraints

from .._errors import ModelError
from ..data._population import ALL_FEATURES

__all__ = ["Censored", "additive", "combined", "observe", "proportional"]

OBSERVE_TAG = "nlmegen_observe"
OUTPUT_TAG = "nlmegen_output"  # index of the output a site describes (None: every output)
SUPPORT_TAG = "nlmegen_support"  # support of the user's distribution (where a DV must lie), before censoring


class Censored(dist.Distribution):
    """A distribution whose censored records contribute a CDF (Beal's M3 and M4 methods).

    ``cens`` is 0 (observed: density), 1 (left-censored below ``limit``: log CDF) or -1
    (right-censored above ``limit``: log survival). With ``lower`` (M4, ``lower = 0``) every record
    is conditioned on ``Y > lower`` (the variable is known to be positive): an observed value
    contributes ``p(y) / P(Y > 0)``, a left-censored one ``(P(Y < LLOQ) - P(Y < 0)) / P(Y > 0)``,
    a right-censored one ``P(Y > ULOQ) / P(Y > 0)``. Sampling ignores censoring; under M4 it draws
    from the truncated distribution when ``base`` has an inverse CDF (Normal does).

    References: Beal SL, J Pharmacokinet Pharmacodyn 2001;28:481-504 (methods M3 and M4);
    Ahn JE et al., J Pharmacokinet Pharmacodyn 2008;35:401-421 (M3 and M4 compared).
    """

    arg_constraints = {}
    support = constraints.real
    pytree_data_fields = ("base", "cens", "limit", "lower")

    def __init__(self, base: dist.Distribution, cens: Array, limit: Array, *, lower: Array | None = None,
                 validate_args=None):
        self.base, self.cens, self.limit = base, jnp.asarray(cens), jnp.asarray(limit)
        self.lower = None if lower is None else jnp.asarray(lower, dtype=float)
        batch = jnp.broadcast_shapes(base.batch_shape, self.cens.shape, self.limit.shape)
        super().__init__(batch_shape=batch, event_shape=base.event_shape, validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        if self.lower is not None and hasattr(self.base, "icdf"):  # inverse CDF of the truncated law
            p0 = jnp.exp(_log_cdf_and_survival(self.base, jnp.broadcast_to(self.lower, self.batch_shape))[0])
            u = jax.random.uniform(key, shape, minval=0.0, maxval=1.0)
            return self.base.icdf(p0 + u * (1.0 - p0))
        return jnp.broadcast_to(self.base.sample(key, sample_shape), shape)

    def log_prob(self, value):
        censored = self.cens != 0
        # uncensored records evaluate the CDF at the mean, censored ones the density at the limit:
        # both branches stay finite, so neither poisons gradients (the double-where rule)
        limit = jnp.where(censored & jnp.isfinite(self.limit), self.limit, self.base.mean)
        density = self.base.log_prob(jnp.where(censored, limit, value))
        log_cdf, log_surv = _log_cdf_and_survival(self.base, limit)
        if self.lower is None:
            return jnp.where(self.cens == 1, log_cdf, jnp.where(self.cens == -1, log_surv, density))
        # M4: log P(lower < Y <= L) = log F(L) + log(1 - F(lower) / F(L)); every term / P(Y > lower)
        log_f0, log_s0 = _log_cdf_and_survival(self.base, jnp.broadcast_to(self.lower, jnp.shape(limit)))
        ratio = jnp.minimum(log_f0 - log_cdf, -1e-12)  # a limit at or below `lower` leaves (almost) no mass
        between = log_cdf + jnp.log(-jnp.expm1(ratio))
        out = jnp.where(self.cens == 1, between, jnp.where(self.cens == -1, log_surv, density))
        return out - log_s0

    @property
    def mean(self):
        return self.base.mean

    @property
    def variance(self):
        return self.base.variance


def _log_cdf_and_survival(base: dist.Distribution, x: Array) -> tuple[Array, Array]:
    """log P(Y <= x) and log P(Y > x), accurate in the tails for Gaussians (log_ndtr)."""
    if isinstance(base, dist.Normal):
        z = (x - base.loc) / base.scale
        return jax.scipy.special.log_ndtr(z), jax.scipy.special.log_ndtr(-z)
    cdf = base.cdf(x)
    tiny = jnp.finfo(jnp.result_type(cdf)).tiny
    return jnp.log(jnp.clip(cdf, tiny, 1.0)), jnp.log(jnp.clip(1.0 - cdf, tiny, 1.0))


def observe(name: str, distribution: dist.Distribution, pop, *, output: str | int | None = None,
            blq: str = "m3"):
    """Declare the observations of one output as the observed site ``name``.

    Parameters
    ----------
    name
        Site name.
    distribution
        The residual-error distribution of every observation, batch shape ``[subj, obs]``
        (e.g. ``dist.Normal(conc, sigma)`` with ``conc`` from :mod:`nlmegen.pk`).
    pop
        The population; its ``dv`` is the observed value.
    output
        Which output (DVID label) this site describes; required when ``pop`` has several.
    blq
        ``"m3"`` (default): censored (BLQ) records contribute their CDF, ``P(Y < LLOQ)`` (Beal's M3).
        ``"m4"``: the same likelihood conditioned on ``Y > 0`` for every record of the site
        (Beal's M4, for quantities known to be positive such as concentrations):
        ``p(y) / P(Y > 0)`` observed, ``(P(Y < LLOQ) - P(Y < 0)) / P(Y > 0)`` censored.

    Notes
    -----
    Padded entries and other outputs' records are masked out; censored (BLQ) records contribute
    their CDF (M3, or M4 with ``blq="m4"``). The site has batch shape ``[subj]`` and event shape ``[obs]`` so its
    log-probability is one number per subject. Call it inside :func:`nlmegen.subjects`.

    Examples
    --------
    >>> import numpyro.distributions as dist, jax.numpy as jnp, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> def model(pop):
    ...     with nlmegen.subjects(pop):
    ...         nlmegen.observe("conc", dist.Normal(jnp.zeros(pop.dv.shape), 1.0), pop)
    """
    mask = pop.mask
    if output is None and len(pop.outputs) > 1:
        raise ModelError(f"observe({name!r}): this population has outputs {list(pop.outputs)}; pass output=")
    if output is not None:
        try:
            mask = mask & (pop.dvid == pop.output_index(output))
        except KeyError as err:
            raise ModelError(f"observe({name!r}): {err.args[0]}") from None
    shape = tuple(pop.dv.shape)
    _check_batch_shape(name, tuple(distribution.batch_shape), shape)
    if distribution.event_shape:
        raise ModelError(f"observe({name!r}): give a distribution with one value per observation "
                         f"(event shape (), not {distribution.event_shape})")
    if blq not in ("m3", "m4"):
        raise ModelError(f"observe({name!r}): blq must be 'm3' or 'm4', not {blq!r}")
    base = distribution.expand(shape)
    if blq == "m4":  # conditioned on Y > 0 whether or not a record is censored
        fn = Censored(base, pop.cens, pop.limit, lower=0.0)
    else:
        fn = Censored(base, pop.cens, pop.limit) if _has_censoring(pop) else base
    site_fn = fn.mask(mask).to_event(1)
    index = None if output is None else pop.output_index(output)
    return numpyro.sample(name, site_fn, obs=pop.dv,
                          infer={OBSERVE_TAG: True, OUTPUT_TAG: index, SUPPORT_TAG: distribution.support})


def _check_batch_shape(name: str, batch: tuple, shape: tuple) -> None:
    """The predictions must cover ``[subj, obs]``: name the site and both shapes when they do not.

    A batch shape without the subject axis (``[obs]`` or ``[1, obs]``: one subject's curve, e.g. a
    prediction indexed ``[0]``) broadcasts to every subject without complaint and fits subject 0's
    curve to everyone, so it is refused as well. A scalar (one distribution for every record) is
    allowed.
    """
    try:
        fits = tuple(jnp.broadcast_shapes(batch, shape)) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ModelError(f"observe({name!r}): the predictions have shape {batch}, which does not match the "
                         f"observations' shape {shape} [subj, obs]; give one prediction per subject and "
                         "observation time (e.g. from nlmegen.pk or nlmegen.ode.solve on this population)")
    n_subj, n_obs = shape
    no_subject_axis = len(batch) == 1 or (len(batch) == 2 and batch[0] == 1)
    if n_subj > 1 and n_obs > 1 and no_subject_axis and batch[-1] == n_obs:
        raise ModelError(f"observe({name!r}): the predictions have shape {batch}, without the subject axis of the "
                         f"observations' shape {shape} [subj, obs]: every subject would be given the same curve "
                         "(was one subject's prediction selected, e.g. with [0]?)")


def _has_censoring(pop) -> bool:
    """Whether the M3 path is needed. A traced population (a `jax.jit` argument) is judged by its
    static ``features`` (the reader records ``"censoring"``; hand-built populations default to all
    features): the censoring path costs a log-CDF per observation in every evaluation."""
    if isinstance(pop.cens, jax.core.Tracer):
        return "censoring" in getattr(pop, "features", ALL_FEATURES)
    return bool(np.any(np.asarray(pop.cens) != 0))


def additive(pred: Array, sd: Array) -> dist.Normal:
    """Additive residual error: ``y = f + eps``, ``eps ~ N(0, sd^2)``."""
    return dist.Normal(pred, sd)


def proportional(pred: Array, cv: Array) -> dist.Normal:
    """Proportional residual error: ``y = f (1 + eps)``, ``eps ~ N(0, cv^2)``."""
    return dist.Normal(pred, cv * jnp.abs(pred))


def combined(pred: Array, sd: Array, cv: Array) -> dist.Normal:
    """Combined error with variances added (NONMEM ``W = sqrt(add^2 + (prop*f)^2)``, nlmixr2 combined2)."""
    return dist.Normal(pred, jnp.sqrt(sd**2 + (cv * pred) ** 2))
