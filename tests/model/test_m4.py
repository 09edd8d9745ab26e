"""Beal's M4 (``observe(..., blq="m4")``): the M3 likelihood conditioned on a positive value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from scipy import stats

import nlmegen
from nlmegen.model import Censored

TRUTH = {"cl": 1.0, "v": 10.0, "omega": 0.3, "sd": 0.6}
LLOQ = 0.4


def test_log_prob_is_the_truncated_likelihood():
    loc, scale = jnp.array([1.0, 0.3, 0.3, 2.0]), 0.5
    y = jnp.array([1.2, 0.0, 0.0, 0.0])
    cens = jnp.array([0, 1, 1, -1])
    limit = jnp.array([-jnp.inf, 0.4, -0.1, 2.5])
    got = Censored(dist.Normal(loc, scale), cens, limit, lower=0.0).log_prob(y)
    sf0 = stats.norm.logsf(0.0, np.asarray(loc), scale)
    want = [stats.norm.logpdf(1.2, 1.0, scale) - sf0[0],
            np.log(stats.norm.cdf(0.4, 0.3, scale) - stats.norm.cdf(0.0, 0.3, scale)) - sf0[1],
            -np.inf, stats.norm.logsf(2.5, 2.0, scale) - sf0[3]]
    np.testing.assert_allclose(np.asarray(got)[[0, 1, 3]], np.array(want)[[0, 1, 3]], rtol=1e-10)
    assert float(got[2]) < -25  # a limit below 0 leaves no probability (finite: gradients stay finite)
    m3 = Censored(dist.Normal(loc, scale), cens, limit).log_prob(y)
    assert float(m3[1]) == pytest.approx(stats.norm.logcdf(0.4, 0.3, scale))
    draws = Censored(dist.Normal(jnp.full(20000, 0.2), 0.5), jnp.zeros(20000), jnp.zeros(20000),
                     lower=0.0).sample(jax.random.key(0))
    assert float(draws.min()) > 0  # draws from the truncated law
    assert float(draws.mean()) == pytest.approx(stats.truncnorm.mean(-0.4, np.inf, loc=0.2, scale=0.5), abs=0.01)


def _data(n: int = 40, seed: int = 3) -> pd.DataFrame:
    """IV bolus, additive error large at late times; observations positive by nature (truncated at 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cl = TRUTH["cl"] * np.exp(TRUTH["omega"] * rng.standard_normal())
        rows.append({"ID": i + 1, "TIME": 0.0, "AMT": 100.0, "EVID": 1, "DV": 0.0, "BLQ": 0, "LLOQ": LLOQ})
        for t in (1.0, 4.0, 8.0, 16.0, 24.0, 36.0, 48.0):
            c = 100 / TRUTH["v"] * np.exp(-cl / TRUTH["v"] * t)
            y = stats.truncnorm.rvs(-c / TRUTH["sd"], np.inf, loc=c, scale=TRUTH["sd"], random_state=rng)
            blq = int(y < LLOQ)
            rows.append({"ID": i + 1, "TIME": t, "AMT": 0.0, "EVID": 0, "DV": LLOQ if blq else y, "BLQ": blq,
                         "LLOQ": LLOQ})
    return pd.DataFrame(rows)


def _model(blq: str):
    def model(pop):
        tcl = numpyro.sample("tcl", dist.Normal(0.0, 2.0))
        tv = numpyro.sample("tv", dist.Normal(2.0, 2.0))
        omega = numpyro.sample("omega", dist.HalfNormal(1.0))
        sd = numpyro.sample("sd", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta), v=jnp.exp(tv))
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop, blq=blq)

    return model


def test_m4_recovers_simulated_truth():
    pop = nlmegen.read_nonmem(_data())
    assert 0.1 < float(np.asarray(pop.cens).sum()) / float(np.asarray(pop.mask).sum()) < 0.5  # BLQ share
    fit = nlmegen.fit(_model("m4"), pop, "laplace", progress=False)
    est, se = fit.params, fit.se
    for site, truth in (("tcl", np.log(TRUTH["cl"])), ("tv", np.log(TRUTH["v"])), ("omega", TRUTH["omega"]),
                        ("sd", TRUTH["sd"])):
        assert abs(float(est[site]) - truth) < 3 * float(se[site]), (site, float(est[site]), float(se[site]))


def test_bad_blq_method():
    pop = nlmegen.read_nonmem(_data(2))
    with pytest.raises(nlmegen.ModelError, match="blq must be 'm3' or 'm4'"):
        numpyro.handlers.seed(_model("m5"), 0)(pop)
