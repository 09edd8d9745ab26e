"""A simulated population of two sub-populations (NONMEM's $MIX), shared by the mixture tests.

One-compartment IV bolus; 30% of the subjects ("responders", class 1) clear the drug three times
faster (log-CL shift 1.1 against an IIV SD of 0.2 on CL). Exactly ``round(0.3 n)`` subjects are
responders, so the sample's mixing fraction is the truth's.
"""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import nlmegen

TIMES = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0)
TRUTH = {"tcl": 0.0, "dcl": np.log(3.0), "tv": np.log(10.0), "omega": np.array([0.2, 0.15]), "prop_sd": 0.1,
         "p_resp": 0.3}


def simulate_table(n: int, seed: int = 0, p_resp: float = TRUTH["p_resp"]) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    resp = rng.permutation((np.arange(n) < round(p_resp * n)).astype(int))
    eta = rng.normal(0.0, TRUTH["omega"], (n, 2))
    cl = np.exp(TRUTH["tcl"] + TRUTH["dcl"] * resp + eta[:, 0])
    v = np.exp(TRUTH["tv"] + eta[:, 1])
    rows = []
    for i in range(n):
        rows.append({"ID": i + 1, "TIME": 0.0, "DV": np.nan, "AMT": 100.0, "EVID": 1})
        for t in TIMES:
            c = 100.0 / v[i] * np.exp(-cl[i] / v[i] * t)
            rows.append({"ID": i + 1, "TIME": t, "DV": c * (1 + TRUTH["prop_sd"] * rng.normal()), "AMT": 0.0,
                         "EVID": 0})
    return pd.DataFrame(rows), resp


def model(pop):
    tcl = numpyro.sample("tcl", dist.Normal(0.0, 2.0))
    dcl = numpyro.sample("dcl", dist.HalfNormal(1.0))  # responders' log-CL shift (> 0: no label switching)
    tv = numpyro.sample("tv", dist.Normal(2.0, 2.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(2)).to_event(1))
    prop_sd = numpyro.sample("prop_sd", dist.HalfNormal(1.0))
    p_resp = numpyro.sample("p_resp", dist.Uniform(0.0, 1.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        z = nlmegen.mixture("resp", jnp.stack([1.0 - p_resp, p_resp]))
        cl = jnp.exp(tcl + dcl * z + eta[:, 0])
        conc = nlmegen.pk.one_cmt(pop, cl=cl, v=jnp.exp(tv + eta[:, 1]))
        nlmegen.observe("conc", nlmegen.proportional(conc, prop_sd), pop)
