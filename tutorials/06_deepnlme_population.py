# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # DeepNLME on a population: a neural drug effect with random effects as network inputs
#
# The seeds' third experiment ("train the NLME model on 60 subjects with various dosage
# regimens"). Data come from the indirect-response (IDR) model with a Hill stimulation of
# production and between-subject variability on ka, kout, Smax and n. The DeepNLME model keeps
# the PK and the turnover structure but replaces the Hill term by a network,
#
#     dR/dt = kin (1 + NN(C; eta_nn)) - kout R,
#
# whose inputs are the concentration and two random effects `eta_nn` (log-normal variability on
# ka and kout stays mechanistic). Nothing tells the network that the drug effect saturates, or
# which subject-level quantities vary: it has to find both. We compare it on held-out subjects with
# the true-structure NLME (Hill) and a misspecified one (Emax, n = 1), look at what the network
# learned, and use the fitted model generatively.
#
# Fits: FOCEI (its `joint_steps` warm start runs first for the network model: Pumas' JointMAP).

# %%
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from flax import nnx

import nlmegen
from nlmegen._simulate import model_values
from nlmegen.examples import IDR_TRUTH, idr_model, idr_nn_model, idr_population

SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size
N_TRAIN, N_TEST = (8, 4) if SMALL else (60, 30)
OUT = Path(tempfile.mkdtemp()) if SMALL else Path(__file__).parent / "results"
OUT.mkdir(exist_ok=True)
timings: dict[str, float] = {}

# %% [markdown]
# ## The study: three dose levels, random effects kept for later
# Each subject gets 4 daily doses of 50, 100 or 200 mg; PK and PD are sampled over 5 days. We draw
# the random effects ourselves (rather than inside `simulate`) to keep each subject's true Smax
# and n: the network's random effects should find them.

# %%
def study(n: int, first_id: int, key) -> tuple[pd.DataFrame, np.ndarray]:
    doses = (50.0, 100.0, 200.0)
    parts = []
    for k, dose in enumerate(doses):
        m = len(range(k, n, len(doses)))
        if m:
            part = idr_population(m, dose=dose)
            part["ID"] = part["ID"] + first_id + sum(len(range(j, n, len(doses))) for j in range(k))
            parts.append(part)
    table = pd.concat(parts, ignore_index=True).sort_values(["ID", "TIME", "EVID"], kind="stable")
    table = table.reset_index(drop=True)
    pop = nlmegen.read_nonmem(table, allow_missing_dv=True)
    eta = np.asarray(IDR_TRUTH["omega"]) * np.asarray(jax.random.normal(key, (pop.n_subjects, 4)))
    sims = nlmegen.simulate(idr_model, {**IDR_TRUTH, "eta": eta}, pop, key=jax.random.fold_in(key, 1))
    table.loc[table["EVID"] == 0, "DV"] = sims["value"].to_numpy()
    return table, eta


train_table, train_eta = study(N_TRAIN, 0, jax.random.key(11))
test_table, test_eta = study(N_TEST, 1000, jax.random.key(12))
train = nlmegen.read_nonmem(train_table)
test = nlmegen.read_nonmem(test_table)
print(train.n_subjects, "training subjects,", test.n_subjects, "held out")

# %% [markdown]
# ## Three models
# The DeepNLME model is `nlmegen.examples.idr_nn_model` (an MLP 3-8-1 with tanh: inputs C and
# the two `eta_nn`). The misspecified NLME is the IDR model with an Emax effect (n = 1) and
# random effects on ka, kout and Smax.


# %%
def emax_model(pop):
    names = ("ka", "cl", "vc", "kin", "kout", "smax", "sc50")
    centres = (0.0, 0.7, 3.0, 2.3, -0.7, 0.7, 0.0)
    logs = {k: numpyro.sample(f"log_{k}", dist.Normal(c, 2.0)) for k, c in zip(names, centres, strict=True)}
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    sigma_conc = numpyro.sample("sigma_conc", dist.HalfNormal(1.0))
    sigma_resp = numpyro.sample("sigma_resp", dist.HalfNormal(5.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        shape = (pop.n_subjects,)
        varying = {"ka": 0, "kout": 1, "smax": 2}
        p = {k: jnp.broadcast_to(jnp.exp(logs[k] + (eta[..., varying[k]] if k in varying else 0.0)), shape)
             for k in names}
        p["n"] = jnp.ones(shape)
        states = nlmegen.ode.solve(nlmegen.examples.idr_rhs, pop, p, y0=nlmegen.examples._idr_y0)
        nlmegen.observe("conc", nlmegen.proportional(states[..., 1] / p["vc"][:, None], sigma_conc), pop,
                        output="conc")
        nlmegen.observe("resp", nlmegen.additive(states[..., 2], sigma_resp), pop, output="resp")


deep = idr_nn_model((8,), n_eta_nn=2, seed=0)
deep_init = {"log_ka": 0.0, "log_cl": 0.7, "log_vc": 3.0, "log_kin": 2.3, "log_kout": -0.7, "omega": np.full(2, 0.3),
             "sigma_conc": 0.2, "sigma_resp": 2.0,
             "effect$params": nnx.to_pure_dict(nnx.state(deep.net, nnx.Param))}
models = {"DeepNLME": (deep, deep_init), "Hill (true structure)": (idr_model, None), "Emax (n = 1)": (emax_model, None)}
if SMALL:  # the test suite: the network model only (each model compiles its own programs; the Hill and
    del models["Emax (n = 1)"], models["Hill (true structure)"]  # Emax models take the package's tested path)

# %%
fits = {}
for name, (model, init) in models.items():
    settings = dict(covariance="none", progress=False, maxiter=500)
    if SMALL:
        settings.update(maxiter=3, joint_steps=10)
    start = time.perf_counter()
    fits[name] = nlmegen.fit(model, train, method=nlmegen.FOCEI(**settings), init=init)
    timings[name] = time.perf_counter() - start
    f = fits[name]
    print(f"{name:22s} {f.status:14s} OFV {f.ofv:10.3f}  {timings[name]:6.1f} s  {f.message[:90]}")

# %% [markdown]
# ## Held-out subjects
# Two numbers per model on the 30 held-out subjects, at the fitted population parameters:
# - the marginal -2 log-likelihood (FOCEI's Laplace approximation over each new subject's random
#   effects): how well the model's population distribution predicts new subjects' data;
# - individual fits from sparse data: each held-out subject's random effects estimated from its
#   first day only (EBEs with all population parameters fixed), then its PD response over days
#   2-5 predicted; the RMSE against the observations.

# %%
def held_out(name: str) -> dict:
    model, _ = models[name]
    params = model_values(fits[name])
    minus2ll = float(nlmegen.objective(model, test, params))
    early = test_table[(test_table["EVID"] != 0) | (test_table["TIME"] <= 24.0)]
    sparse = nlmegen.read_nonmem(early)
    ebe_fit = nlmegen.fit(model, sparse, method=nlmegen.FOCEI(covariance="none", progress=False), init=params,
                          fixed=params)
    pred = nlmegen.simulate(model, {**params, "eta": np.asarray(ebe_fit.ebes)}, test, key=jax.random.key(0),
                            noise=False)
    obs = test_table[test_table["EVID"] == 0].reset_index(drop=True)
    late = (obs["TIME"] > 24.0) & (pred["output"].to_numpy() == "resp")
    rmse = float(np.sqrt(np.mean((pred["value"].to_numpy()[late] - obs["DV"].to_numpy()[late]) ** 2)))
    return {"heldout_minus2ll": minus2ll, "sparse_pd_rmse": rmse, "train_ofv": float(fits[name].ofv),
            "status": fits[name].status, "fit_s": timings[name], "ebes": np.asarray(ebe_fit.ebes), "pred": pred}


held = {name: held_out(name) for name in models}
table = pd.DataFrame({name: {k: v for k, v in h.items() if k not in ("ebes", "pred")} for name, h in held.items()}).T
print(table)

# %% [markdown]
# ## Individual fits of held-out subjects from their first day
# Observed PD (dots; the first day was used), and each model's individual prediction.

# %%
obs = test_table[test_table["EVID"] == 0].reset_index(drop=True)
ids = obs["ID"].unique()[:4]
fig, axes = plt.subplots(1, len(ids), figsize=(3.2 * len(ids), 3), sharey=True)
for ax, sid in zip(np.atleast_1d(axes), ids, strict=False):
    rows = (obs["ID"] == sid).to_numpy() & (next(iter(held.values()))["pred"]["output"].to_numpy() == "resp")
    ax.plot(obs["TIME"][rows], obs["DV"][rows], "ko", ms=3, label="observed")
    for name, h in held.items():
        ax.plot(obs["TIME"][rows], h["pred"]["value"].to_numpy()[rows], label=name)
    ax.axvline(24.0, color="grey", lw=0.8, ls=":")
    ax.set_title(f"ID {sid}")
    ax.set_xlabel("time (h)")
np.atleast_1d(axes)[0].set_ylabel("response R")
np.atleast_1d(axes)[-1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "06_heldout_individual_fits.png", dpi=110)

# %% [markdown]
# ## What the network learned: the family of drug-effect curves
# `c -> NN(c; eta_nn)` at the fitted weights, for a grid of the two network random effects
# (standard normal, as in DeepPumas: their scale is in the network's first-layer weights), beside
# the true Hill curves of subjects at the same quantiles of Smax and n.

# %%
fit = fits["DeepNLME"]
graphdef, state = nnx.split(deep.net, nnx.Param)
nnx.replace_by_pure_dict(state, model_values(fit)["effect$params"])  # the fitted weights as the net's pytree
trained = nnx.merge(graphdef, state)
conc = np.linspace(0.0, 12.0, 200)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for z in (-1.5, 0.0, 1.5):
    for k in range(2):
        e = np.zeros(2)
        e[k] = z
        h = jax.vmap(lambda c, e=e: trained(jnp.concatenate([c[None], jnp.asarray(e)]))[0])(jnp.asarray(conc))
        axes[k].plot(conc, np.asarray(h), label=f"eta_nn[{k}] = {z:+.1f} SD")
smax, sc50, n_hill = np.exp(IDR_TRUTH["log_smax"]), np.exp(IDR_TRUTH["log_sc50"]), np.exp(IDR_TRUTH["log_n"])
for ax in axes:
    ax.plot(conc, smax * conc**n_hill / (sc50**n_hill + conc**n_hill), "k--", label="true Hill (typical)")
    ax.set_xlabel("concentration C (mg/L)")
    ax.set_ylabel("drug effect NN(C; eta_nn)")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "06_learned_effect_family.png", dpi=110)

# %% [markdown]
# ## Do the network's random effects take distinct roles? EBEs as embeddings
# The training subjects' EBEs of `eta_nn`, coloured by each subject's true Smax and true n.

# %%
ebes = np.asarray(fit.ebes)
true_smax, true_n = train_eta[:, 2], train_eta[:, 3]
corr = np.array([[np.corrcoef(ebes[:, 2 + k], t)[0, 1] for t in (true_smax, true_n)] for k in range(2)])
print("correlation of EBE eta_nn[k] (rows) with true log Smax / log n deviations (columns):\n", corr.round(2))
fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
for ax, values, label in zip(axes, (true_smax, true_n), ("true eta Smax", "true eta n"), strict=True):
    sc = ax.scatter(ebes[:, 2], ebes[:, 3], c=values, cmap="viridis", s=18)
    fig.colorbar(sc, ax=ax, label=label)
    ax.set_xlabel("EBE eta_nn[0]")
    ax.set_ylabel("EBE eta_nn[1]")
fig.tight_layout()
fig.savefig(OUT / "06_ebe_embeddings.png", dpi=110)

# %% [markdown]
# ## The generative view: new virtual subjects
# A VPC of both outputs (new random effects drawn from the fitted distribution), the fitted model
# used as a simulator.

# %%
vpc_fig = nlmegen.vpc(fit, n_sim=20 if SMALL else 200, key=jax.random.key(3)).plot()
vpc_fig.savefig(OUT / "06_deepnlme_vpc.png", dpi=110)

# %%
results = {
    "n_train": N_TRAIN, "n_test": N_TEST, "small": SMALL,
    "models": {name: {k: v for k, v in h.items() if k not in ("ebes", "pred")} for name, h in held.items()},
    "ebe_eta_nn_corr_with_true_smax_n": corr.tolist(),
    "deepnlme_timings": fit.timings,
}
(OUT / "06_deepnlme_population.json").write_text(json.dumps(results, indent=2, default=float))
print(json.dumps(results["models"], indent=1, default=float))
