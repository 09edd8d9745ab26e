# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # One model, many backends: theo_sd by FOCEI, Laplace, SAEM, NUTS and SVI
#
# The theophylline model is written once, as a plain NumPyro program. Every estimation backend
# reads that same program through NumPyro's effect handlers: the maximum-likelihood ones
# (FOCEI, Laplace, SAEM) use only the supports of the population parameters, the Bayesian ones
# (NUTS, SVI) use their priors too. All return the same `FitResult`, so the comparison below is a
# loop and a `pandas.concat`.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import nlmegen

SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size

# %% [markdown]
# ## The model, once
# Population parameters outside the subject plate (with weakly informative priors on the log
# scale), log-normal random effects inside it, additive residual error.


# %%
def theo(pop):
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        conc = nlmegen.pk.one_cmt(pop, ka=jnp.exp(tka + eta[..., 0]), cl=jnp.exp(tcl + eta[..., 1]),
                                  v=jnp.exp(tv + eta[..., 2]))
        nlmegen.observe("conc", nlmegen.additive(conc, add_sd), pop)


pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))

# %% [markdown]
# ## Every backend on the same model
# The settings are the backends' defaults, shortened when the test suite runs this file.

# %%
backends = {
    "FOCEI": nlmegen.FOCEI(progress=False),
    "Laplace": nlmegen.Laplace(progress=False),
    "SAEM": nlmegen.SAEM(progress=False, **({"n_explore": 100, "n_smooth": 50} if SMALL else {})),
    "NUTS": nlmegen.NUTS(progress=False, **({"num_warmup": 100, "num_samples": 100, "num_chains": 2}
                                            if SMALL else {})),
    "SVI (IAF flow)": nlmegen.SVI(guide="iaf", progress=False, **({"num_steps": 300} if SMALL else {})),
}
fits = {}
for name, backend in backends.items():
    fits[name] = nlmegen.fit(theo, pop, backend, key=jax.random.key(0))
    t = fits[name].timings
    print(f"{name:15s} status={fits[name].status:14s} compile {t.get('compile_s', float('nan')):6.1f} s, "
          f"run {t.get('run_s', float('nan')):6.1f} s")

# %% [markdown]
# ## Estimates and intervals side by side
# For the maximum-likelihood fits the interval is the asymptotic 95% confidence interval (delta
# method; log scale for positive parameters); for NUTS and SVI the equal-tailed 95% credible
# interval of the posterior draws.

# %%
table = pd.concat({name: fit.summary()[["estimate", "CI95_lower", "CI95_upper"]] for name, fit in fits.items()},
                  axis=1)
print(table.round(3).to_string())

# %% [markdown]
# The typical values on the natural scale (ka in 1/h, CL in L/h, V in L):

# %%
typical = pd.DataFrame({name: {p: float(np.exp(fit.params[t])) for p, t in (("ka", "tka"), ("CL", "tcl"),
                                                                            ("V", "tv"))}
                        for name, fit in fits.items()}).T
print(typical.round(2).to_string())

# %% [markdown]
# The OFV is defined for the likelihood-based fits (FOCEI's linearised, Laplace's second-order,
# SAEM's by importance sampling); a posterior has none:

# %%
for name, fit in fits.items():
    print(f"{name:15s} OFV {fit.ofv:9.3f}  -2LL {-2 * fit.loglik:9.3f}")

# %% [markdown]
# ## When to use which
# - **FOCEI** (or FOCE) is the workhorse: the NONMEM objective, seconds to fit, standard errors
#   from the covariance step, directly comparable with NONMEM/nlmixr2 runs. Use it first, and for
#   covariate searches where hundreds of fits are needed.
# - **Laplace** uses the exact Hessian of the individual log-density instead of the FOCE
#   approximation: needed for non-Gaussian observations (counts, categorical, censored data
#   with M3) and more accurate when residual errors are large relative to the prediction.
# - **SAEM** maximises the exact marginal likelihood without linearisation, by MCMC on the random
#   effects: the choice when data are sparse and the individual posteriors are far from Gaussian
#   (Monolix's algorithm), and for models whose EBE optimisation is fragile.
# - **NUTS** gives the full posterior of all parameters, with priors: the reference answer when the
#   uncertainty itself matters (small studies, decisions that depend on tail probabilities), at a
#   higher cost; check R-hat, ESS and divergences (`fit.summary()`, `fit.to_arviz()`).
# - **SVI** approximates that posterior by optimisation: much faster than NUTS on large populations,
#   and with the amortized encoder guide (`guide="encoder"`) a new subject's random effects cost a
#   single network evaluation. Normalizing-flow guides (`"iaf"`, `"bnaf"`) capture skewed and
#   correlated posteriors that a Gaussian guide misses; check against NUTS on a subset.
