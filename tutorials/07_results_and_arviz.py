# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Results on the natural scale, ArviZ 1.x, and result files
#
# A fit gives the table a pharmacometrician reads (typical values, OMEGA as variances with CV% and
# shrinkage), an ArviZ `DataTree` whatever the backend, and a result file that ArviZ opens and
# `nlmegen.load` reads back with everything, so diagnostics run on it in a later session.

# %%
import os
import tempfile
from pathlib import Path

import arviz as az
import jax
import matplotlib

import nlmegen

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size
OUT = Path(tempfile.mkdtemp(prefix="nlmegen-tutorial-03-"))

# %% [markdown]
# ## The natural-scale table
# `nlmegen.examples.theo_model_named` is theo_sd's one-compartment model with its individual
# parameters named by `numpyro.deterministic` (`ka`, `cl`, `v`, and the typical half-life
# `thalf`). The table reports their typical values with delta-method SEs and intervals mapped from
# the estimation scale; OMEGA rows are variances, named after the parameter each random effect
# drives, with CV% and shrinkage.

# %%
pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
focei = nlmegen.fit(nlmegen.examples.theo_model_named, pop, progress=False)
print(focei.table().round(4))
print("condition number:", round(focei.condition_number, 1))
print(focei.table("estimation").round(4))  # what the optimiser sees

# %% [markdown]
# One element of a vector site can be held fixed, as NONMEM's FIX on one OMEGA:

# %%
held = nlmegen.fit(nlmegen.examples.theo_model_named, pop, fixed={"omega[2]": 0.1}, progress=False)
print(held.table().loc[["OMEGA(eta[2]:v)"], ["estimate", "SE", "fixed"]])

# %% [markdown]
# ## ArviZ 1.x
# Every backend's result converts to the same groups. For a maximum-likelihood fit the posterior
# holds draws from the asymptotic normal of the estimates (not a Bayesian posterior). The
# `log_likelihood` group has `subject_marginal`, each subject's likelihood with its random effects
# integrated out, and `DV`, each observation's likelihood given the random effects. Leave-one-subject-out
# LOO on `subject_marginal` compares maximum-likelihood and Bayesian fits.

# %%
nuts = nlmegen.fit(nlmegen.examples.theo_model_named, pop, "nuts", key=jax.random.key(0), progress=False,
                   num_warmup=100 if SMALL else 1000, num_samples=100 if SMALL else 1000,
                   num_chains=1 if SMALL else 4)
trees = {"focei": focei.to_arviz(n_draws=200 if SMALL else 1000), "nuts": nuts.to_arviz()}
print(az.summary(trees["nuts"], var_names=["tka", "tcl", "tv", "omega", "add_sd"]))
print(az.loo(trees["focei"], var_name="subject_marginal"))  # = focei.loo()
print(az.compare(trees, var_name="subject_marginal"))

# %% [markdown]
# Plots: `plot_posterior` and `plot_ppc` are gone in ArviZ 1.x; `plot_dist`, `plot_trace_dist`,
# `plot_forest` and `plot_ppc_dist` replace them. Each returns a `PlotCollection`.

# %%
az.plot_ppc_dist(trees["nuts"], num_samples=50).savefig(OUT / "ppc.png")
az.plot_forest(trees["nuts"], var_names=["tka", "tcl", "tv", "omega"]).savefig(OUT / "forest.png")
az.plot_trace_dist(trees["nuts"], var_names=["tcl", "omega"]).savefig(OUT / "trace.png")
az.plot_dist(trees["nuts"], var_names=["tka", "tcl", "tv"]).savefig(OUT / "dist.png")

# %% [markdown]
# ## Result files
# A saved fit is an ArviZ file (plus nlmegen's own group). It is written to a unique temporary file
# and renamed into place, and it carries a checksum and a format version, both checked on load.
# `nlmegen.load` gives back the result, its ArviZ groups, the natural-scale table, the data (from
# the stored event table) and the model (re-imported by name), so diagnostics run on it.

# %%
focei.save(OUT / "theo.nc")
dt = az.from_netcdf(OUT / "theo.nc")
print(sorted(dt.children))
back = nlmegen.load(OUT / "theo.nc")
assert back == focei and back.model is nlmegen.examples.theo_model_named
nlmegen.vpc(back, n_sim=50 if SMALL else 500).plot().savefig(OUT / "vpc.png")  # units: theo_sd's, kept in the file
print("figures and files in", OUT)
