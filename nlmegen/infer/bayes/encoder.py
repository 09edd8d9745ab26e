"""The amortized encoder guide of `SVI`: one network maps a subject's data to q(eta_i).

In the VAE view of NLME (the seeds), the structural model is the decoder ``eta -> y`` and
inference needs the inverse map. The encoder is that map, shared by all subjects: it reads one
subject's padded, masked record and returns a Gaussian over the subject's random effects in their
unconstrained space, ``q(u_i) = N(mu(x_i), L(x_i) L(x_i)')``. Population parameters get an
ordinary (mean-field or full-rank) Gaussian autoguide. A new subject then costs one forward pass
(`encode`), with no optimisation.

The network is a deep-sets encoder (Zaheer et al. 2017), invariant to the order and number of
observations: every real observation ``j`` gives a feature vector (time, DV, DV relative to the dose
given so far, time since the last dose, last dose amount, output one-hot), a per-observation MLP
``phi`` maps it to ``h_ij``, the masked mean and masked max of ``h_ij`` over observations are
concatenated with subject-level features (total dose, number of observations, baseline covariates)
and an MLP ``rho`` gives ``mu``, the log-diagonal and the strictly lower part of ``L``.
Inputs are scaled by constants taken from the training population and kept with the guide, so
that a new population is encoded on the same scale.

References
----------
Kingma DP, Welling M. Auto-encoding variational Bayes. ICLR 2014.
Zaheer M, Kottur S, Ravanbakhsh S, Poczos B, Salakhutdinov R, Smola A. Deep sets. NeurIPS 2017.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to

from ..._errors import ModelError
from ...model import subjects

__all__ = ["EncoderConfig", "EncoderGuide", "encoder_config", "encoder_forward"]

ENCODER_PARAM = "encoder_weights"
ENCODER_LATENT = "_encoder_latent"


@dataclass(frozen=True)
class EncoderConfig:
    """Static description of the encoder: input scaling, covariates, layer sizes."""

    n_eta: int
    n_outputs: int
    covariates: tuple[str, ...]
    cov_loc: tuple[float, ...]
    cov_scale: tuple[float, ...]
    t_scale: float
    dv_scale: float
    amt_scale: float
    n_obs_scale: float
    hidden: tuple[int, ...]
    init_sd: float

    @property
    def n_obs_features(self) -> int:
        return 6 + self.n_outputs

    @property
    def n_subject_features(self) -> int:
        return 2 + len(self.covariates)

    @property
    def n_out(self) -> int:
        return self.n_eta + self.n_eta + self.n_eta * (self.n_eta - 1) // 2


def encoder_config(pop, n_eta: int, hidden: tuple[int, ...], init_sd: float) -> EncoderConfig:
    """Scaling constants of the inputs from the training population ``pop``."""
    mask = np.asarray(pop.mask)
    if not mask.any():
        raise ModelError("encoder guide: the population has no observations")
    times, dv = np.asarray(pop.times)[mask], np.asarray(pop.dv)[mask]
    amts = np.asarray(pop.dose_amts)[np.asarray(pop.dose_mask)]
    covs = tuple(sorted(pop.covariates))
    locs, scales = [], []
    for name in covs:
        x = np.asarray(pop.covariates[name], dtype=float)
        x = x.reshape(x.shape[0], -1)[:, 0]
        locs.append(float(np.mean(x)))
        scales.append(float(np.std(x)) or 1.0)
    n_obs = mask.sum(axis=1)
    return EncoderConfig(
        n_eta=int(n_eta), n_outputs=len(pop.outputs), covariates=covs, cov_loc=tuple(locs), cov_scale=tuple(scales),
        t_scale=float(np.max(np.abs(times))) or 1.0, dv_scale=float(np.quantile(np.abs(dv), 0.9)) or 1.0,
        amt_scale=float(np.mean(np.abs(amts))) if amts.size and np.mean(np.abs(amts)) > 0 else 1.0,
        n_obs_scale=float(np.max(n_obs)) or 1.0, hidden=tuple(int(h) for h in hidden), init_sd=float(init_sd),
    )


# ------------------------------------------------------------------------- features
def _observation_features(cfg: EncoderConfig, pop):
    """``[subj, obs, n_obs_features]``: what each observation tells about its subject."""
    t = pop.times
    given = pop.dose_mask[:, None, :] & (pop.dose_times[:, None, :] <= t[:, :, None])  # [subj, obs, dose]
    amts = jnp.where(given, pop.dose_amts[:, None, :], 0.0)
    total = jnp.sum(amts, axis=-1) / cfg.amt_scale
    last_time = jnp.max(jnp.where(given, pop.dose_times[:, None, :], -jnp.inf), axis=-1)
    has_dose = jnp.isfinite(last_time)
    since = jnp.where(has_dose, t - last_time, t) / cfg.t_scale
    last_index = jnp.argmax(jnp.where(given, pop.dose_times[:, None, :], -jnp.inf), axis=-1)
    last_amt = jnp.where(has_dose, jnp.take_along_axis(pop.dose_amts[:, None, :], last_index[..., None],
                                                       axis=-1)[..., 0], 0.0) / cfg.amt_scale
    y = jnp.where(pop.mask, pop.dv, 0.0) / cfg.dv_scale
    per_dose = y / jnp.maximum(total, 1e-3) * jnp.where(total > 0, 1.0, 0.0)
    onehot = jax.nn.one_hot(pop.dvid, cfg.n_outputs)
    feats = jnp.stack([t / cfg.t_scale, y, jnp.sign(y) * jnp.log1p(jnp.abs(y)), per_dose, since, last_amt], axis=-1)
    return jnp.concatenate([feats, onehot], axis=-1)


def _subject_features(cfg: EncoderConfig, pop):
    """``[subj, n_subject_features]``: total dose, number of observations, baseline covariates."""
    total = jnp.sum(jnp.where(pop.dose_mask, pop.dose_amts, 0.0), axis=1) / cfg.amt_scale
    n_obs = jnp.sum(pop.mask, axis=1) / cfg.n_obs_scale
    cols = [total, n_obs]
    for name, loc, scale in zip(cfg.covariates, cfg.cov_loc, cfg.cov_scale, strict=True):
        if name not in pop.covariates:
            raise ModelError(f"encoder guide: the population has no covariate {name!r} (trained with "
                             f"{list(cfg.covariates)})")
        x = jnp.asarray(pop.covariates[name], dtype=float)
        cols.append((x.reshape(x.shape[0], -1)[:, 0] - loc) / scale)
    return jnp.stack(cols, axis=-1)


# ------------------------------------------------------------------------- network
def _dense_init(key, n_in: int, n_out: int, zero: bool = False) -> dict:
    scale = 0.0 if zero else jnp.sqrt(1.0 / n_in)
    return {"w": scale * jax.random.normal(key, (n_in, n_out)), "b": jnp.zeros(n_out)}


@functools.partial(jax.jit, static_argnums=0)
def init_weights(cfg: EncoderConfig, key) -> dict:
    """Initial weights; the last layer is zero so that q(u_i) starts at N(0, init_sd^2 I)."""
    keys = iter(jax.random.split(key, 2 * len(cfg.hidden) + 2))
    sizes_phi = (cfg.n_obs_features, *cfg.hidden)
    phi = [_dense_init(next(keys), a, b) for a, b in zip(sizes_phi[:-1], sizes_phi[1:], strict=True)]
    sizes_rho = (2 * cfg.hidden[-1] + cfg.n_subject_features, *cfg.hidden)
    rho = [_dense_init(next(keys), a, b) for a, b in zip(sizes_rho[:-1], sizes_rho[1:], strict=True)]
    out = _dense_init(next(keys), cfg.hidden[-1], cfg.n_out, zero=True)
    # softplus^-1(init_sd) on the diagonal part of the output
    out["b"] = out["b"].at[cfg.n_eta:2 * cfg.n_eta].set(jnp.log(jnp.expm1(cfg.init_sd)))
    return {"phi": phi, "rho": rho, "out": out}


def _mlp(layers: list, x):
    for layer in layers:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return x


@functools.partial(jax.jit, static_argnums=0)  # one compiled call (also when SVI.init runs the guide eagerly)
def encoder_forward(cfg: EncoderConfig, weights: dict, pop):
    """One forward pass: ``(mu [subj, n_eta], scale_tril [subj, n_eta, n_eta])`` of q(u_i)."""
    h = _mlp(weights["phi"], _observation_features(cfg, pop))  # [subj, obs, hidden]
    m = pop.mask[..., None]
    count = jnp.maximum(jnp.sum(pop.mask, axis=1), 1)[:, None]
    mean = jnp.sum(jnp.where(m, h, 0.0), axis=1) / count
    top = jnp.max(jnp.where(m, h, -jnp.inf), axis=1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # subjects without observations
    z = _mlp(weights["rho"], jnp.concatenate([mean, top, _subject_features(cfg, pop)], axis=-1))
    raw = z @ weights["out"]["w"] + weights["out"]["b"]
    n = cfg.n_eta
    mu = raw[:, :n]
    diag = jax.nn.softplus(raw[:, n:2 * n]) + 1e-6
    rows, cols = np.tril_indices(n, -1)
    tril = jnp.zeros((raw.shape[0], n, n)).at[:, rows, cols].set(raw[:, 2 * n:])
    return mu, tril + jax.vmap(jnp.diag)(diag)


# ------------------------------------------------------------------------- the guide
class EncoderGuide:
    """Guide: ``population_guide`` for the population sites, the encoder for the random effects.

    Called as ``guide(pop)`` like the model. The random-effect sites are sampled through an
    auxiliary latent ``u_i ~ N(mu(x_i), L L')`` (all random-effect sites of a subject, flat and
    unconstrained, in the order of the model's random-effect space) and then mapped to each site's
    support, with the log-Jacobian carried by a ``Delta`` site (as NumPyro's ``AutoContinuous``).
    """

    def __init__(self, population_guide, cfg: EncoderConfig, random_sites, init_key):
        self.population_guide = population_guide
        self.cfg = cfg
        self.random_sites = tuple(random_sites)
        self._init_key = init_key

    def __call__(self, pop, *args, **kwargs):
        values = dict(self.population_guide(pop, *args, **kwargs)) if self.population_guide is not None else {}
        weights = numpyro.param(ENCODER_PARAM, lambda _: init_weights(self.cfg, self._init_key))
        mu, tril = encoder_forward(self.cfg, weights, pop)
        with subjects(pop):
            u = numpyro.sample(ENCODER_LATENT, dist.MultivariateNormal(mu, scale_tril=tril),
                               infer={"is_auxiliary": True})
            start = 0
            for site in self.random_sites:
                transform = biject_to(site.support)
                inv = tuple(transform.inverse_shape(tuple(site.shape)))
                size = int(np.prod(inv))
                piece = u[:, start:start + size].reshape((u.shape[0],) + inv)
                start += size
                value = transform(piece)
                event_dim = len(site.shape)
                ladj = transform.log_abs_det_jacobian(piece, value)
                ladj = jnp.sum(ladj.reshape(ladj.shape[:1] + (-1,)), axis=-1) if jnp.ndim(ladj) > 1 else ladj
                values[site.name] = numpyro.sample(site.name, dist.Delta(value, log_density=-ladj,
                                                                         event_dim=event_dim))
        return values
