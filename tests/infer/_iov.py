"""A small simulated problem with known inter-occasion variability, shared by the IOV tests.

One-compartment IV bolus; two occasions per subject (a dose at 0 and, after a reset, at 48 h: an
EVID 4 record, so the occasions do not overlap and the closed form is exact); IIV on CL and V,
IOV on CL with SD ``KAPPA_SD`` (NONMEM's ``$OMEGA BLOCK(1)`` + ``BLOCK(1) SAME``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import nlmegen

TIMES = (0.5, 2.0, 6.0, 12.0)
TRUTH = {"tcl": np.log(2.0), "tv": np.log(20.0), "omega": np.array([0.3, 0.2]), "kappa_sd": 0.2, "prop_sd": 0.05}


def design(n: int, occasion_start: float = 48.0) -> pd.DataFrame:
    rows = []
    for i in range(1, n + 1):
        for occ, t0 in ((1, 0.0), (2, occasion_start)):
            rows.append({"ID": i, "TIME": t0, "DV": np.nan, "AMT": 100.0, "EVID": 4 if occ == 2 else 1, "OCC": occ})
            rows += [{"ID": i, "TIME": t0 + t, "DV": np.nan, "AMT": 0.0, "EVID": 0, "OCC": occ} for t in TIMES]
    return pd.DataFrame(rows)


def model(pop):
    tcl = numpyro.sample("tcl", dist.Normal(0.5, 2.0))
    tv = numpyro.sample("tv", dist.Normal(3.0, 2.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(2)).to_event(1))
    kappa_sd = numpyro.sample("kappa_sd", dist.HalfNormal(1.0))
    prop_sd = numpyro.sample("prop_sd", dist.HalfNormal(1.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        with nlmegen.occasions(pop):
            kappa = numpyro.sample("kappa", dist.Normal(0.0, kappa_sd))  # [subj, occ]
        cl = jnp.exp(tcl + eta[:, :1] + nlmegen.by_occasion(kappa, pop))  # [subj, obs]
        conc = nlmegen.pk.one_cmt(pop, cl=cl, v=jnp.exp(tv + eta[:, 1]))
        nlmegen.observe("conc", nlmegen.proportional(conc, prop_sd), pop)


def simulated_population(n: int, seed: int = 0):
    design_pop = nlmegen.read_nonmem(design(n), allow_missing_dv=True)
    sims = nlmegen.simulate(model, TRUTH, design_pop, key=jax.random.key(seed))
    table = design(n)
    obs = table["EVID"] == 0
    table.loc[obs, "DV"] = sims["value"].to_numpy()
    return nlmegen.read_nonmem(table)
