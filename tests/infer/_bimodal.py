"""A small problem with a known bimodal random-effect distribution, shared by the flow tests.

Each subject has ``y_ij = a_i + b_i * t_j + eps`` at four times; ``a_i ~ N(0, 0.3^2)`` and the slope
``b_i`` is bimodal: 30% "non-responders" at -1.5, 70% at +1 (sd 0.25), carried by the covariate
``GENO`` (1 for non-responders). The data pin each subject's random effects down, so a fitted
random-effect distribution must put 30% of its mass in the lower mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import nlmegen

TIMES = (0.0, 1.0, 2.0, 3.0)
LOW, HIGH, WEIGHT_LOW = -1.5, 1.0, 0.3
THRESHOLD = 0.5 * (LOW + HIGH)
#: the modes as intervals: within 3 SDs (0.25) of each centre; the truth has 0.2% of its mass in the gap
LOW_MODE, HIGH_MODE = LOW + 0.75, HIGH - 0.75


def simulate_table(n: int, seed: int = 0, weight_low: float = WEIGHT_LOW) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    geno = (np.arange(n) < round(weight_low * n)).astype(float)  # exactly 30% non-responders
    a = rng.normal(0.0, 0.3, n)
    b = np.where(geno == 1, LOW, HIGH) + rng.normal(0.0, 0.25, n)
    rows = []
    for i in range(n):
        for t in TIMES:
            rows.append({"ID": i + 1, "TIME": t, "DV": a[i] + b[i] * t + rng.normal(0.0, 0.1), "GENO": geno[i]})
    return pd.DataFrame(rows)


def make_model(module, *, conditional: bool = False, prior: float | None = None):
    def model(pop):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        cond = pop.covariates["GENO"][:, None] if conditional else None
        re = nlmegen.flow("re", module, condition=cond, prior=prior)
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", re)
            pred = eta[..., 0:1] + eta[..., 1:2] * pop.times
            nlmegen.observe("y", dist.Normal(pred, sigma), pop)

    return model


def gaussian_model(pop):
    """The same problem with a Gaussian random-effect distribution (it cannot carry the two modes)."""
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    omega = numpyro.sample("omega", dist.HalfNormal(2.0).expand([2]).to_event(1))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(mu, omega).to_event(1))
        nlmegen.observe("y", dist.Normal(eta[..., 0:1] + eta[..., 1:2] * pop.times, sigma), pop)


def mode_weights(module, weights, pop, *, conditional=False, n=4000, seed=1):
    """Masses of the slope's two modes, ``(P(b < -0.75), P(b > 0.25))``, under the distribution with
    these ``weights`` (the value of the ``re$params`` site; marginal over the subjects' covariates
    when conditional). The truth: (0.3, 0.7)."""
    cond = pop.covariates["GENO"][:, None] if conditional else None
    with numpyro.handlers.substitute(data={"re$params": weights}):
        d = nlmegen.flow("re", module, condition=cond)
    reps = max(1, n // int(np.prod(d.batch_shape, dtype=int)))
    b = d.sample(jax.random.key(seed), (reps,))[..., 1]
    return np.array([float(jnp.mean(b < LOW_MODE)), float(jnp.mean(b > HIGH_MODE))])
