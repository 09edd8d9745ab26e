# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Data, models and simulation: an NLME model is a conditional generative model
#
# This tutorial reads a NONMEM-style data set, writes the classic theophylline model as a plain
# NumPyro program, and uses it the generative way: draw new random effects (latent variables),
# push them through the dynamics (the decoder) and add residual noise. Then the seeds'
# indirect-response PK/PD model, solved as an ODE with dose events, and the same model with its
# drug effect replaced by a neural network (a universal differential equation).

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import nlmegen

SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size
N_SIM = 20 if SMALL else 500

# %% [markdown]
# ## Data: a NONMEM event table becomes a padded `Population`
# Column names are matched case-insensitively; doses, observations, covariates and censoring are
# recognised by their NONMEM roles. Every per-subject array has a leading subject axis, padded to a
# common length with a mask beside it.

# %%
table = nlmegen.datasets.load("theo_sd")
pop = nlmegen.read_nonmem(table)
print(pop)
print("observation times of subject 1:", np.asarray(pop.times[0]))
print("weight covariate:", np.asarray(pop.covariates["WT"]))

# %% [markdown]
# ## The model: population parameters outside, random effects inside the subject plate

# %%
def theo(pop):
    tka = numpyro.sample("tka", dist.Normal(0.5, 2.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 2.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))  # latent variables
        conc = nlmegen.pk.one_cmt(pop, ka=jnp.exp(tka + eta[:, 0]), cl=jnp.exp(tcl + eta[:, 1]),
                                  v=jnp.exp(tv + eta[:, 2]))               # the decoder
        nlmegen.observe("conc", nlmegen.additive(conc, add_sd), pop)      # the error model


from nlmegen.model import discover  # noqa: E402

sites = discover(theo, pop)
print("population parameters:", [s.name for s in sites.population])
print("random effects:", [s.name for s in sites.random_effects], "per subject:", sites.n_eta)

# %% [markdown]
# ## Generative use: simulate new studies
# `simulate` draws new random effects from their population distribution and new observations.
# The same program that scores data simulates it.

# %%
theta = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": [0.64, 0.26, 0.14], "add_sd": 0.69}
sims = nlmegen.simulate(theo, theta, pop, key=jax.random.key(0), n=N_SIM)
print(sims.groupby(sims["TIME"].round(0))["value"].quantile([0.05, 0.5, 0.95]).unstack().head(8))

# %% [markdown]
# Counterfactuals are data edits: the same subjects on a twice-daily regimen.

# %%
bid = pop.with_regimen({"TIME": [0.0], "AMT": [160.0], "ADDL": [3], "II": [12.0]})
conc = nlmegen.pk.one_cmt(bid, ka=np.exp(0.45), cl=np.exp(1.0), v=np.exp(3.45))
print("typical concentration at the last sample, BID regimen:", float(conc[0, -1]))

# %% [markdown]
# ## The seeds' indirect-response model: an ODE with dose events
# Depot and central compartments drive a turnover response through a Hill function. The ODE is
# solved segment by segment between dose events, for all subjects at once.

# %%
n_subjects = 4 if SMALL else 40
study = nlmegen.examples.simulate_idr(n_subjects, key=jax.random.key(1))
idr_pop = nlmegen.read_nonmem(study)
print(idr_pop)
print(study[study["EVID"] == 0].groupby("DVID")["DV"].describe()[["mean", "min", "max"]])

# %% [markdown]
# ## DeepNLME: a neural network where knowledge is missing
# Replace the Hill function by a small network of the concentration and a per-subject random
# effect. `nlmegen.nn` registers its weights as population parameters; the ODE solver does not
# know the term is neural.

# %%
from flax import nnx  # noqa: E402


class Effect(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(2, 8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))[..., 0]


net = Effect(nnx.Rngs(0))


def deep_idr(pop):
    f = nlmegen.nn("effect", net)
    omega = numpyro.sample("omega", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega))
        p = {"ka": 1.0, "cl": 2.0, "vc": 20.0, "kin": 10.0, "kout": 0.5, "eta": eta}

        def rhs(t, y, p):
            c = y[1] / p["vc"]
            effect = f(jnp.stack([c, p["eta"]]))
            return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["cl"] / p["vc"] * y[1],
                              p["kin"] * (1 + effect) - p["kout"] * y[2]])

        states = nlmegen.ode.solve(rhs, pop, p, y0=lambda p: jnp.stack([0.0, 0.0, p["kin"] / p["kout"]]))
        nlmegen.observe("resp", nlmegen.additive(states[..., 2], sigma), pop, output="resp")
        nlmegen.observe("conc", nlmegen.additive(states[..., 1] / p["vc"], sigma), pop, output="conc")


deep_sites = discover(deep_idr, idr_pop)
print("DeepNLME population parameters:", [s.name for s in deep_sites.population])
