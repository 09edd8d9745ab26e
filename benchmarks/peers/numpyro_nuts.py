"""Hand-written NumPyro NUTS for theo_sd: the baseline for nlmegen's NUTS overhead (case 4).

The same model as `nlmegen.examples.theo_model` (same priors, same non-centred random effects,
same closed-form one-compartment oral solution for one dose), written directly on padded arrays
without nlmegen. Usage: python benchmarks/peers/numpyro_nuts.py data.csv warmup samples chains
Prints one JSON line: run times, min bulk ESS over the population parameters, ESS per second.
"""

from __future__ import annotations

import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import pandas as pd  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402


def padded(path: str):
    table = pd.read_csv(path)
    obs = table[table["EVID"] == 0]
    doses = table[table["AMT"] > 0].groupby("ID")["AMT"].first()
    ids = sorted(obs["ID"].unique())
    n_obs = obs.groupby("ID").size().max()
    t = np.zeros((len(ids), n_obs))
    y = np.zeros((len(ids), n_obs))
    mask = np.zeros((len(ids), n_obs), bool)
    for i, sid in enumerate(ids):
        rows = obs[obs["ID"] == sid]
        t[i, :len(rows)], y[i, :len(rows)], mask[i, :len(rows)] = rows["TIME"], rows["DV"], True
    return jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask), jnp.asarray(doses.loc[ids].to_numpy())


def model(t, y, mask, dose):
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with numpyro.plate("subjects", t.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        eta = omega * z
        ka = jnp.exp(tka + eta[:, 0])[:, None]
        v = jnp.exp(tv + eta[:, 2])[:, None]
        ke = jnp.exp(tcl + eta[:, 1])[:, None] / v
        conc = dose[:, None] * ka / (v * (ka - ke)) * (jnp.exp(-ke * t) - jnp.exp(-ka * t))
        numpyro.sample("y", dist.Normal(conc, add_sd).mask(mask).to_event(1), obs=y)


def main() -> None:
    import arviz as az

    path, warmup, samples, chains = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    data = padded(path)
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method="vectorized", progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.key(0), *data)
    run_s = time.perf_counter() - start
    draws = mcmc.get_samples(group_by_chain=True)
    ess = []
    for name in ("tka", "tcl", "tv", "omega", "add_sd"):
        x = np.asarray(draws[name]).reshape(chains, samples, -1)
        ess.extend(np.atleast_1d(az.ess(x, chain_axis=0, draw_axis=1)).tolist())
    n_div = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    print(json.dumps({"ok": True, "run_s": run_s, "ess_bulk_min": float(min(ess)),
                      "ess_per_s": float(min(ess)) / run_s, "divergences": n_div,
                      "medians": {k: np.median(np.asarray(draws[k]), axis=(0, 1)).tolist()
                                  for k in ("tka", "tcl", "tv", "add_sd")}}))


if __name__ == "__main__":
    main()
