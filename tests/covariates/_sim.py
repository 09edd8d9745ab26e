"""A simulated oral one-compartment population with weight, age and sex (NumPy, independent of nlmegen)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import nlmegen

TRUTH = {"ka": 1.0, "cl": 2.0, "v": 20.0, "cl_WT": 0.75, "omega_cl": 0.2, "prop": 0.1}
TIMES = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0)


def population(n: int = 40, seed: int = 0, cl_age: float = 0.0) -> pd.DataFrame:
    """CL = 2 (WT/70)^0.75 exp(cl_age (AGE - 40)) exp(eta), V = 20, ka = 1; 100 mg oral; 10% proportional error."""
    rng = np.random.default_rng(seed)
    wt = rng.uniform(40, 120, n)
    age = rng.uniform(20, 70, n)
    sex = rng.integers(0, 2, n)
    rows = []
    for i in range(n):
        cl = TRUTH["cl"] * (wt[i] / 70) ** TRUTH["cl_WT"] * np.exp(cl_age * (age[i] - 40))
        cl *= np.exp(TRUTH["omega_cl"] * rng.standard_normal())
        v = TRUTH["v"]
        k, ka = cl / v, TRUTH["ka"]
        common = {"ID": i + 1, "WT": wt[i], "AGE": age[i], "SEX": sex[i]}
        rows.append({**common, "TIME": 0.0, "AMT": 100.0, "EVID": 1, "DV": 0.0})
        for t in TIMES:
            c = 100 * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))
            rows.append({**common, "TIME": t, "AMT": 0.0, "EVID": 0,
                         "DV": c * (1 + TRUTH["prop"] * rng.standard_normal())})
    return pd.DataFrame(rows)


def make_model(rel: nlmegen.covariates.Relations):
    """Oral one-compartment model (ka fixed at its true 1 /h, IIV on CL only) whose CL and V carry ``rel``."""

    def model(pop):
        tcl = numpyro.sample("tcl", dist.Normal(0.5, 2.0))
        tv = numpyro.sample("tv", dist.Normal(3.0, 2.0))
        omega = numpyro.sample("omega", dist.HalfNormal(1.0))
        prop = numpyro.sample("prop", dist.HalfNormal(0.3))
        f = rel.factors(pop)
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            cl = jnp.exp(tcl + eta) * f["cl"]
            conc = nlmegen.pk.one_cmt(pop, cl=cl, v=jnp.exp(tv) * f["v"], ka=TRUTH["ka"])
            nlmegen.observe("conc", nlmegen.proportional(conc, prop), pop)

    return model
