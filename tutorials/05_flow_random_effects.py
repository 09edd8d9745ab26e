# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Learning the random-effect distribution: flows, covariates and free text
#
# NLME models assume the random effects are Gaussian. Here they are not: 30% of the subjects are
# non-responders with an Emax near zero, the responders' Emax rises non-linearly with a covariate
# ``X``, and the baseline depends non-linearly on ``X`` and on Emax. A short clinical note per subject
# mentions the genotype (most of the time). We fit, on the same data and with the same structural
# model, five random-effect distributions, one line each inside `nlmegen.subjects(pop)`:
#
# 1. a Gaussian ``N(mu, Omega)`` (the usual NLME model);
# 2. a normalizing flow (`nlmegen.spline_flow`);
# 3. a Gaussian whose mean and covariance are a network of ``X`` (`nlmegen.CovariateGaussian`);
# 4. a flow conditioned on ``X``;
# 5. a flow conditioned on ``X`` and on an embedding of the note (`nlmegen.TextEmbedding`),
#
# plus the two-stage route (a flow fitted to the Gaussian model's random-effect draws), alone and
# as the start of a joint refit, and the flow on ``X`` and the note regularised by early stopping on
# a validation split; and compare them on held-out subjects: marginal log-likelihood, VPC band and
# coverage, and the 90% prediction interval of a new subject with no data against the true model's.

# %%
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from jax.scipy.special import logsumexp

import nlmegen

SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size
# "full" size: what ran in the time available on 2 shared CPU cores (see the closing note)
N_TRAIN, N_TEST = (24, 12) if SMALL else (100, 100)
MAXITER = 5 if SMALL else 150
IS_DRAWS = 200 if SMALL else 4000
N_SIM = 20 if SMALL else 500
T0 = time.perf_counter()

# %% [markdown]
# ## The true population
# A direct-effect Emax model on a known concentration profile: ``E0_i = 10 exp(eta_0)``,
# ``Emax_i = 10 eta_1``, ``y = E0 + Emax C / (EC50 + C) + eps``. Only the random-effect distribution
# (and the residual SD) is estimated, so the comparison isolates it.

# %%
TIMES = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 12.0])
EC50, SIGMA = 2.0, 0.5


def conc(t):
    return 10.0 * jnp.exp(-0.25 * t)


def response(eta, t):
    c = conc(t)
    return 10.0 * jnp.exp(eta[..., 0:1]) + 10.0 * eta[..., 1:2] * c / (EC50 + c)


def true_parts(x):
    """Mixture weights and per-genotype means/SDs of eta_1 (Emax / 10) given X."""
    m_resp = 0.8 + 0.3 * jnp.tanh(2.0 * x)
    return jnp.array([0.3, 0.7]), jnp.stack([jnp.full_like(x, 0.02), m_resp], -1), jnp.array([0.03, 0.12])


def true_logpdf(eta, x, geno=None):
    """log p(eta | X) (genotype marginalised) or log p(eta | X, genotype): the truth, exactly."""
    w, m, s = true_parts(x)
    lp1 = dist.Normal(m, s).log_prob(eta[..., 1:2])  # [..., 2 genotypes]
    m0 = 0.2 * (x**2 - 1.0) - 0.3 * eta[..., 1] ** 2
    lp0 = dist.Normal(m0, 0.1).log_prob(eta[..., 0])
    if geno is None:
        return lp0 + logsumexp(jnp.log(w) + lp1, axis=-1)
    return lp0 + jnp.where(geno == 1, lp1[..., 1], lp1[..., 0])


def simulate_table(n, seed, id0=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    geno = (rng.uniform(size=n) < 0.7).astype(int)  # 1 = responder
    w, m, s = true_parts(jnp.asarray(x))
    eta1 = np.where(geno == 1, rng.normal(np.asarray(m[:, 1]), 0.12), rng.normal(0.02, 0.03, n))
    eta0 = rng.normal(0.2 * (x**2 - 1.0) - 0.3 * eta1**2, 0.1)
    eta = np.stack([eta0, eta1], -1)
    y = np.asarray(response(jnp.asarray(eta), jnp.asarray(TIMES)[None])) + rng.normal(0, SIGMA, (n, len(TIMES)))
    fill = ["tolerating well", "mild headache day 2", "no adverse events", "good adherence", "nausea resolved"]
    notes = []
    for g in geno:
        if rng.uniform() < 0.1:
            gene = "genotype not recorded"
        else:
            gene = "CYP responder allele carrier" if g == 1 else "homozygous null variant, poor metaboliser"
        notes.append(f"{gene}; {fill[rng.integers(len(fill))]}")
    rows = [{"ID": id0 + i + 1, "TIME": t, "DV": y[i, j], "X": x[i], "NOTE": notes[i]}
            for i in range(n) for j, t in enumerate(TIMES)]
    return pd.DataFrame(rows), eta, geno


train_table, train_eta, train_geno = simulate_table(N_TRAIN, seed=1)
test_table, test_eta, test_geno = simulate_table(N_TEST, seed=2, id0=10_000)
print(train_table.head(3))
print("non-responders in training:", float(np.mean(train_geno == 0)))

# %% [markdown]
# ## Free text as a covariate
# TF-IDF + SVD fitted on the training notes (offline, NumPy only); held-out notes use the same
# vocabulary and projection. Any function ``texts -> [n, k]`` (a local sentence-transformer, say)
# can replace it: ``nlmegen.TextEmbedding(embed=model.encode)``.

# %%
embedding = nlmegen.TextEmbedding(n_components=2).fit_table(train_table, "NOTE")
train_pop = nlmegen.read_nonmem(embedding.add_to(train_table, "NOTE"))
test_pop = nlmegen.read_nonmem(embedding.add_to(test_table, "NOTE"))
TEXT = ["NOTE_0", "NOTE_1"]
note0 = np.asarray(train_pop.covariates["NOTE_0"])
print("note component 0 by genotype (mean):", {g: float(note0[train_geno == g].mean()) for g in (0, 1)})

# %% [markdown]
# ## Five random-effect distributions, one line each
# The structural model is shared; ``re(pop)`` returns the distribution (called outside the plate).


# %%
def make_model(re):
    def model(pop):
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
        d = re(pop)
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", d)
            nlmegen.observe("y", dist.Normal(response(eta, pop.times), sigma), pop)

    return model


def gaussian(pop):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    omega = numpyro.sample("omega", dist.HalfNormal(1.0).expand([2]).to_event(1))
    rho = numpyro.sample("rho", dist.Uniform(-1.0, 1.0))
    tril = jnp.array([[omega[0], 0.0], [rho * omega[1], jnp.sqrt(1 - rho**2) * omega[1]]])
    return dist.MultivariateNormal(mu, scale_tril=tril)


def covariates(pop, names):
    return jnp.stack([pop.covariates[n] for n in names], -1)


key = jax.random.key(0)
SIZE = dict(layers=1, knots=8, width=8) if not SMALL else dict(layers=1, knots=4, width=4)
modules = {
    "flow": nlmegen.spline_flow(2, key=key, **SIZE),
    "gaussian(X)": nlmegen.CovariateGaussian(2, 1, key=key, hidden=(16,), cov="full", init_scale=0.3),
    "flow(X)": nlmegen.spline_flow(2, key=key, cond_dim=1, **SIZE),
    "flow(X, note)": nlmegen.spline_flow(2, key=key, cond_dim=3, **SIZE),
}
conditions = {"flow": None, "gaussian(X)": ["X"], "flow(X)": ["X"], "flow(X, note)": ["X", *TEXT]}


def learned(name):
    def re(pop):
        names = conditions[name]
        return nlmegen.flow("re", modules[name], condition=None if names is None else covariates(pop, names))

    return re


res = {"gaussian": gaussian} | {name: learned(name) for name in modules}
if SMALL:  # each fit compiles its own program (tens of seconds): the test run fits two of the five
    res = {k: res[k] for k in ("gaussian", "flow(X, note)")}
models = {name: make_model(fn) for name, fn in res.items()}

# %% [markdown]
# ## Fits (FOCEI: the flows' log densities enter with their exact curvature)

# %%
fits, wall = {}, {}
for name, model in models.items():
    start = time.perf_counter()
    init = {"sigma": 1.0} | ({"mu": jnp.array([0.0, 0.5]), "omega": jnp.array([0.3, 0.4])} if name == "gaussian"
                             else {})
    focei = nlmegen.FOCEI(maxiter=MAXITER, covariance="none", progress=not SMALL, print_every=25)
    fits[name] = nlmegen.fit(model, train_pop, focei, init=init)
    wall[name] = time.perf_counter() - start
    print(f"{name:14s} OFV {fits[name].ofv:10.2f}  sigma {float(fits[name].params['sigma']):.3f}  "
          f"{fits[name].status}  {wall[name]:.0f} s")

# %% [markdown]
# ## The two-stage route
# A flow fitted by maximum likelihood to draws of the Gaussian fit's random effects (EBE plus
# conditional covariance), then used in the model as is (weights from `nlmegen.flow_values`).

# %%
start = time.perf_counter()
draws = nlmegen.eta_draws(fits["gaussian"], key=jax.random.key(1), n=20)
two_stage = nlmegen.fit_flow(draws, nlmegen.spline_flow(2, key=key, **SIZE), key=jax.random.key(2),
                             steps=300 if SMALL else 3000)
modules["two-stage flow"] = two_stage
conditions["two-stage flow"] = None
wall["two-stage flow"] = wall["gaussian"] + time.perf_counter() - start
two_stage_values = {"sigma": fits["gaussian"].params["sigma"]} | nlmegen.flow_values("re", two_stage)

# %% [markdown]
# ### ... then a joint refit
# The two-stage flow's weights (and the Gaussian fit's residual SD) as the start of a FOCEI fit of
# the flow model: one call, ``init=`` the values `nlmegen.flow_values` gives.

# %%
REFIT = "two-stage + joint refit"
if not SMALL:  # each new model compiles its own program: the test run skips this fit and the next
    start = time.perf_counter()
    modules[REFIT], conditions[REFIT] = modules["flow"], None
    focei = nlmegen.FOCEI(maxiter=MAXITER, covariance="none", progress=not SMALL, print_every=25)
    refit_model = models["flow"] if "flow" in models else make_model(learned(REFIT))  # the flow model, compiled once
    fits[REFIT] = nlmegen.fit(refit_model, train_pop, focei, init=two_stage_values)
    wall[REFIT] = wall["two-stage flow"] + time.perf_counter() - start
    print(f"{REFIT}: OFV {fits[REFIT].ofv:.2f} ({fits[REFIT].status}), {wall[REFIT]:.0f} s")

# %% [markdown]
# ## Regularisation: early stopping on a validation split
# The flow conditioned on ``X`` and the note has 556 weights for 100 subjects. `nlmegen.fit_early_stopping`
# holds out 20% of the training subjects, fits the rest, and keeps the iterate (of every fifth
# accepted FOCEI step) with the lowest OFV of the held-out ones.

# %%
EARLY = "flow(X, note), early stopping"
if not SMALL:
    start = time.perf_counter()
    modules[EARLY], conditions[EARLY] = modules["flow(X, note)"], conditions["flow(X, note)"]
    stopped = nlmegen.fit_early_stopping(make_model(learned(EARLY)), train_pop,
                                         nlmegen.FOCEI(maxiter=MAXITER, progress=False), key=jax.random.key(21),
                                         init={"sigma": 1.0}, every=5)
    fits[EARLY], wall[EARLY] = stopped.fit, time.perf_counter() - start
    print(stopped.curve.iloc[::3].round(2).to_string(index=False))
    print(f"kept after {stopped.best_step} of {len(stopped.full_fit.history)} steps; {wall[EARLY]:.0f} s")

# %% [markdown]
# ## The fitted distributions
# ``prior(name, pop)`` is each model's fitted random-effect distribution for the subjects of
# ``pop`` (batch shape ``[subj]`` when it depends on covariates).

# %%
from nlmegen._simulate import model_values  # noqa: E402 (a notebook cell)


def values_of(name):
    """The population values of a fitted (or two-stage) model."""
    return two_stage_values if name == "two-stage flow" else model_values(fits[name])


def prior(name, pop):
    fn = gaussian if name == "gaussian" else learned(name)  # learned(name) reads modules[name], conditions[name]
    with numpyro.handlers.substitute(data=values_of(name)):
        return fn(pop)


def sample_prior(name, pop, n, key):
    d = prior(name, pop)
    return d.sample(key, (n,) if d.batch_shape else (n, pop.n_subjects))


names = list(res) + ["two-stage flow"] + ([] if SMALL else [REFIT, EARLY])
FLOW = "flow(X, note)" if SMALL else "flow"
fig = nlmegen.plot_eta_density({"flow": sample_prior(FLOW, train_pop, 20, jax.random.key(3)),
                                "Gaussian": sample_prior("gaussian", train_pop, 20, jax.random.key(4))},
                               ebes=fits[FLOW].ebes, labels=["eta_0 (log E0)", "eta_1 (Emax/10)"],
                               title="learned random-effect density (training subjects' EBEs in black)")
OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" if "__file__" in globals() else Path(".")
if not SMALL:
    fig.savefig(OUT / "flows-eta-density.png", dpi=110)


COND = "flow(X, note)" if SMALL else "flow(X)"


def sample_at(x, n):
    cond = jnp.broadcast_to(jnp.array([x] + [0.0] * (len(conditions[COND]) - 1)), (n, len(conditions[COND])))
    with numpyro.handlers.substitute(data=values_of(COND)):
        d = nlmegen.flow("re", modules[COND], condition=cond)
    return d.sample(jax.random.key(5))


fig2 = nlmegen.plot_eta_by_covariate(sample_at, [-1.5, 0.0, 1.5], index=1, covariate="X", label="eta_1 (Emax/10)",
                                     n=200 if SMALL else 4000)
if not SMALL:
    fig2.savefig(OUT / "flows-eta-by-covariate.png", dpi=110)

# %% [markdown]
# ## Held-out marginal log-likelihood
# ``log p(y_i | X_i) = log E_q[p(y_i | eta) p(eta | X_i) / q(eta)]`` by importance sampling, with
# one proposal per subject shared by every model: a Student-t (4 df) at the subject's posterior mode
# under the true distribution, covariance 2x the inverse Hessian there, mixed 20/80 with a wide
# Gaussian. The Monte Carlo standard error is the delta-method SE of each log-mean, summed in
# quadrature.


# %%
def loglik_y(eta, pop):
    pred = response(eta, pop.times)
    return jnp.sum(jnp.where(pop.mask, dist.Normal(pred, SIGMA_HAT).log_prob(pop.dv), 0.0), -1)


def proposal(pop, x):
    """Per-subject posterior mode and inverse Hessian under the true distribution (vmapped Newton)."""

    def neg(e, t, dv, mask, xi):
        pred = response(e[None], t[None])[0]
        return -(jnp.sum(jnp.where(mask, dist.Normal(pred, SIGMA_HAT).log_prob(dv), 0.0)) + true_logpdf(e, xi))

    def newton(t, dv, mask, xi):
        def body(e, _):
            g, h = jax.grad(neg)(e, t, dv, mask, xi), jax.hessian(neg)(e, t, dv, mask, xi)
            ok = jnp.all(jnp.linalg.eigvalsh(h) > 0)
            step = jnp.where(ok, jnp.linalg.solve(h + 1e-9 * jnp.eye(2), g), 0.05 * g)
            return e - jnp.clip(step, -0.5, 0.5), None

        e, _ = jax.lax.scan(body, jnp.array([0.0, 0.6]), None, length=60)
        e = jnp.where(jnp.all(jnp.isfinite(e)), e, jnp.array([0.0, 0.6]))
        lam, vec = jnp.linalg.eigh(jax.hessian(neg)(e, t, dv, mask, xi))
        lam = jnp.clip(jnp.nan_to_num(lam, nan=1.0), 1.0, 1e6)  # a proposal: SDs between 0.001 and 1
        return e, (vec / lam) @ vec.T

    return jax.jit(jax.vmap(newton))(pop.times, pop.dv, pop.mask, x)


def heldout_loglik(logprior, pop, modes, covs, key, k=IS_DRAWS):
    """Sum over subjects of log p(y_i | X_i) and its Monte Carlo SE, for one prior log density."""
    chol = jnp.linalg.cholesky(2.0 * covs)
    k1, k2, k3 = jax.random.split(key, 3)
    z = jax.random.t(k1, 4.0, (k, pop.n_subjects, 2))
    wide = jax.random.normal(k2, (k, pop.n_subjects, 2)) * 0.5
    use_wide = jax.random.uniform(k3, (k, pop.n_subjects, 1)) < 0.2
    eta = jnp.where(use_wide, modes + wide, modes + jnp.einsum("skl,nsl->nsk", chol, z))
    t_lp = (jnp.sum(dist.StudentT(4.0).log_prob(jnp.linalg.solve(chol, (eta - modes)[..., None])[..., 0]), -1)
            - jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1))
    q = jnp.logaddexp(jnp.log(0.8) + t_lp, jnp.log(0.2) + dist.Normal(modes, 0.5).to_event(1).log_prob(eta))
    logw = jax.vmap(lambda e: loglik_y(e, pop))(eta) + logprior(eta) - q
    est = logsumexp(logw, 0) - jnp.log(k)
    w = jnp.exp(logw - jnp.max(logw, 0))
    se = jnp.std(w, 0) / (jnp.sqrt(k) * jnp.mean(w, 0))
    return float(jnp.sum(est)), float(jnp.sqrt(jnp.sum(se**2)))


SIGMA_HAT = SIGMA  # the likelihood of y uses the true residual SD for every model (they estimate it well)
x_test = jnp.asarray(test_pop.covariates["X"])
modes, covs = proposal(test_pop, x_test)
# the true marginal p(eta) integrates X ~ N(0, 1) out: Gauss-Hermite quadrature, 40 nodes
nodes, gh_weights = np.polynomial.hermite_e.hermegauss(40)
x_nodes, log_gh = jnp.asarray(nodes), jnp.log(jnp.asarray(gh_weights / np.sqrt(2 * np.pi)))

lls = {
    "truth p(eta | X)": heldout_loglik(lambda e: true_logpdf(e, x_test), test_pop, modes, covs, jax.random.key(8)),
    "truth p(eta | X, genotype)": heldout_loglik(lambda e: true_logpdf(e, x_test, jnp.asarray(test_geno)), test_pop,
                                                 modes, covs, jax.random.key(8)),
    "truth p(eta)": heldout_loglik(
        lambda e: logsumexp(log_gh + true_logpdf(e[..., None, :], x_nodes), -1), test_pop, modes, covs,
        jax.random.key(8)),
}
for name in names:
    d = prior(name, test_pop)
    lls[name] = heldout_loglik(d.log_prob, test_pop, modes, covs, jax.random.key(8))
for name, (ll, se) in lls.items():
    print(f"{name:28s} held-out log-likelihood {ll:10.2f} +/- {se:.2f}")
gap = lls["truth p(eta)"][0] - lls["gaussian"][0]
closed = {name: (lls[name][0] - lls["gaussian"][0]) / gap for name in ("flow", "two-stage flow", REFIT)
          if name in lls}
print("share of the Gaussian-to-truth gap closed:", {k: round(v, 3) for k, v in closed.items()})

# %% [markdown]
# ## VPC on held-out subjects and the 90% interval of a new subject with no data
# For each model: simulate the held-out subjects (their covariates, new random effects, residual
# noise) and take, per time, the 5-95% band of the simulated observations: its width and the share
# of observed held-out values inside it. Then the 90% prediction interval of one new subject
# without data at each held-out subject's covariates, at t = 1 h (near the peak effect): its width
# against the true model's, and how often the held-out subject's observation falls inside.


# %%
def simulate_y(eta_draws, key, sigma):
    y = response(eta_draws, jnp.asarray(TIMES))
    return y + sigma * jax.random.normal(key, y.shape)


def true_eta(n, x, geno_known=None, *, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w, m, s = true_parts(x)
    shape = (n,) + x.shape
    g = jax.random.bernoulli(k1, 0.7, shape).astype(int) if geno_known is None else jnp.broadcast_to(geno_known, shape)
    e1 = jnp.where(g == 1, m[..., 1] + 0.12 * jax.random.normal(k2, shape), 0.02 + 0.03 * jax.random.normal(k3, shape))
    e0 = 0.2 * (x**2 - 1.0) - 0.3 * e1**2 + 0.1 * jax.random.normal(k4, shape)
    return jnp.stack([e0, e1], -1)


y_obs = np.asarray(test_pop.dv)
T1 = int(np.flatnonzero(TIMES == 1.0)[0])
sources = {"truth p(eta | X)": lambda k: true_eta(N_SIM, x_test, key=k),
           "truth p(eta | X, genotype)": lambda k: true_eta(N_SIM, x_test, jnp.asarray(test_geno), key=k)}
sources |= {name: (lambda k, name=name: sample_prior(name, test_pop, N_SIM, k)) for name in names}
table = []
for name, draw in sources.items():
    sims = np.asarray(simulate_y(draw(jax.random.key(12)), jax.random.key(13), SIGMA))  # [sim, subj, time]
    lo, hi = np.percentile(sims.reshape(-1, len(TIMES)), [5, 95], axis=0)
    band = float(np.mean(hi - lo))
    vpc_cov = float(np.mean((y_obs >= lo) & (y_obs <= hi)))
    lo_i, hi_i = np.percentile(sims[..., T1], [5, 95], axis=0)  # per subject: covariates known, no data
    table.append({"model": name, "heldout_loglik": lls[name][0], "loglik_mc_se": lls[name][1],
                  "vpc_band_width": band, "vpc_coverage": vpc_cov,
                  "new_subject_pi90_width": float(np.mean(hi_i - lo_i)),
                  "new_subject_pi90_coverage": float(np.mean((y_obs[:, T1] >= lo_i) & (y_obs[:, T1] <= hi_i))),
                  "fit_wall_s": wall.get(name, float("nan"))})
results = pd.DataFrame(table).set_index("model")
ref = results.loc["truth p(eta | X)", "new_subject_pi90_width"]
ref_g = results.loc["truth p(eta | X, genotype)", "new_subject_pi90_width"]
results["pi90_width_vs_truth_X"] = results["new_subject_pi90_width"] / ref
results["pi90_width_vs_truth_X_genotype"] = results["new_subject_pi90_width"] / ref_g
pd.set_option("display.width", 200)
print(results.round(3).to_string())

# %% [markdown]
# ## The targets
# - the flow closes at least 80% of the held-out log-likelihood gap between the Gaussian model and
#   the true distribution (``p(eta)``, the flow sees no covariates);
# - the conditional flow's new-subject 90% interval is within 20% of the true model's width (given
#   the same information: ``X``; with the note, ``X`` and the genotype) with coverage >= 85%.

# %%
targets = {
    "two_stage_gap_closed": closed["two-stage flow"],
    "text_flow_pi_ratio": float(results.loc["flow(X, note)", "pi90_width_vs_truth_X_genotype"]),
    "text_flow_pi_coverage": float(results.loc["flow(X, note)", "new_subject_pi90_coverage"]),
}
if not SMALL:
    targets |= {
        "two_stage_refit_gap_closed": closed[REFIT],
        "early_stopped_text_flow_pi_ratio": float(results.loc[EARLY, "pi90_width_vs_truth_X_genotype"]),
        "early_stopped_text_flow_pi_coverage": float(results.loc[EARLY, "new_subject_pi90_coverage"]),
        "flow_gap_closed": closed["flow"],
        "flow_gap_target_met": bool(closed["flow"] >= 0.8),
        "conditional_flow_pi_ratio": float(results.loc["flow(X)", "pi90_width_vs_truth_X"]),
        "conditional_flow_pi_coverage": float(results.loc["flow(X)", "new_subject_pi90_coverage"]),
    }
    targets["conditional_flow_target_met"] = bool(abs(targets["conditional_flow_pi_ratio"] - 1) <= 0.2
                                                  and targets["conditional_flow_pi_coverage"] >= 0.85)
print(json.dumps(targets, indent=1))

# `simulate` and `vpc` take the flow models unchanged (new subjects' random effects come from the flow)
vpc = nlmegen.vpc(fits[COND], test_pop, n_sim=N_SIM, key=jax.random.key(14))
print(vpc.table.head() if hasattr(vpc, "table") else vpc)

if not SMALL:
    out = {"n_train": N_TRAIN, "n_test": N_TEST, "is_draws": IS_DRAWS, "n_sim": N_SIM, "maxiter": MAXITER,
           "fits": {k: {"ofv": float(f.ofv), "status": f.status, "sigma": float(f.params["sigma"]),
                        "message": f.message} for k, f in fits.items()},
           "early_stopping": {"best_step": stopped.best_step, "validation_s": stopped.seconds,
                              "curve": stopped.curve.to_dict(orient="records")},
           "table": results.reset_index().to_dict(orient="records"), "targets": targets,
           "total_wall_s": time.perf_counter() - T0,
           "machine": "2 shared CPU cores, no GPU"}
    (OUT / "flows-experiment.json").write_text(json.dumps(out, indent=1, default=float))

# %% [markdown]
# ## What the full-size run found (100 + 100 subjects; `benchmarks/results/flows-experiment.json`)
# - The flow closes 68% of the held-out log-likelihood gap between the Gaussian and the true
#   ``p(eta)`` (the target is 80%: not met). FOCEI ends in a failed line search (a few
#   subjects' EBE searches do not converge under the bimodal flow, so the OFV is not smooth in the
#   weights); fitting longer lowers the training OFV but not the held-out log-likelihood (see the
#   README). The two-stage flow closes 56%, its joint refit 59%.
# - The flow conditioned on ``X`` has the best held-out log-likelihood of the fitted models and a
#   new-subject 90% interval 1.14x the true model's with 85% coverage (target met, at its limit).
# - The flow conditioned on ``X`` and the note overfits 100 training subjects (training OFV 38 vs
#   259, held-out -1097, 63% coverage); so, less dramatically, does the Gaussian with a network
#   mean and covariance. Early stopping on a validation split avoids the damage (held-out -816,
#   96% coverage) but keeps a near-initial, wide flow (new-subject interval 4.6x the true one):
#   the validation OFV is noisy along the path.
