"""Example models written as plain NumPyro programs, and a simulated study of the IDR model.

- :func:`theo_model`: theophylline, one-compartment oral, log-normal ka, CL, V, additive error
  (the classic nlmixr2/NONMEM theo_sd model); :func:`theo_model_named` the same with ka, CL, V
  and the half-life named (``numpyro.deterministic``) for the natural-scale table.
- :func:`idr_model`: the seeds' indirect-response PK/PD model (Depot, Central, R; Hill drug effect
  on the production rate; oral doses), solved as an ODE. :func:`idr_population` builds a study
  design and :func:`simulate_idr` fills it with data simulated from known parameters.
- :func:`warfarin_model`: the warfarin PK/PD data (``cp`` and ``pca``): one-compartment oral PK
  with a lag time and a PCA turnover model with inhibited synthesis (``nlmegen demo --dataset
  warfarin``).

Priors on population parameters are weakly informative; maximum-likelihood backends use only
their supports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from flax import nnx

from .data import Population, read_nonmem
from .dynamics import ode, pk
from .model import additive, combined, nn, observe, proportional, subjects

__all__ = ["IDR_TRUTH", "MLP", "WARFARIN_ETAS", "idr_model", "idr_nn_model", "idr_population", "idr_rhs",
           "simulate_idr", "theo_model", "theo_model_full", "theo_model_kacl", "theo_model_named", "warfarin_model",
           "warfarin_pk_covariate_model", "warfarin_rhs"]


def theo_model(pop: Population) -> None:
    """Theophylline one-compartment oral model (nlmixr2's theo_sd example).

    ``ka = exp(tka + eta_ka)``, ``CL = exp(tcl + eta_cl)``, ``V = exp(tv + eta_v)``; ``eta`` is
    ``N(0, diag(omega^2))``; ``DV ~ N(C, add_sd^2)`` with ``C`` the central concentration (mg/L,
    doses in mg, V in L). Dose into CMT 1 (depot), observations of CMT 2.

    The priors (log scale, SD 1: a factor e per SD) are weakly informative yet matter for full
    Bayes: the one-compartment oral curve is unchanged when ka and CL/V swap (flip-flop) with V
    rescaled, so with flat priors the posterior has a second, physiologically absurd mode
    (V of about 2 L) that NUTS chains can fall into. These priors give it negligible mass.
    """
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        ka = jnp.exp(tka + eta[..., 0])
        cl = jnp.exp(tcl + eta[..., 1])
        v = jnp.exp(tv + eta[..., 2])
        conc = pk.one_cmt(pop, cl=cl, v=v, ka=ka)
        observe("conc", additive(conc, add_sd), pop)


def theo_model_named(pop: Population) -> None:
    """:func:`theo_model` with its parameters named for the natural-scale table (`FitResult.table`).

    ``ka``, ``cl`` and ``v`` are ``numpyro.deterministic`` sites inside the subject plate: the table
    reports their typical values (random effects 0) with delta-method SEs and names each random
    effect by the parameter it drives (``OMEGA(eta[1]:cl)``); ``thalf``, the typical elimination
    half-life ``log 2 V / CL`` (h), is a derived population quantity. Same likelihood as
    :func:`theo_model`.
    """
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    numpyro.deterministic("thalf", jnp.log(2.0) * jnp.exp(tv - tcl))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        ka = numpyro.deterministic("ka", jnp.exp(tka + eta[..., 0]))
        cl = numpyro.deterministic("cl", jnp.exp(tcl + eta[..., 1]))
        v = numpyro.deterministic("v", jnp.exp(tv + eta[..., 2]))
        observe("conc", additive(pk.one_cmt(pop, cl=cl, v=v, ka=ka), add_sd), pop)


def theo_model_full(pop: Population) -> None:
    """:func:`theo_model` with a full-block Omega: ``eta ~ N(0, diag(omega) C diag(omega))``.

    The correlation matrix is parameterised by its Cholesky factor (``LKJCholesky`` support), so
    the unconstrained parameters are log standard deviations and the corr-Cholesky coordinates.
    """
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    corr = numpyro.sample("omega_corr", dist.LKJCholesky(3, 2.0))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.MultivariateNormal(jnp.zeros(3), scale_tril=omega[..., None] * corr))
        conc = pk.one_cmt(pop, ka=jnp.exp(tka + eta[..., 0]), cl=jnp.exp(tcl + eta[..., 1]),
                          v=jnp.exp(tv + eta[..., 2]))
        observe("conc", additive(conc, add_sd), pop)


def idr_rhs(t, y, p):
    """Seed IDR right-hand side: Depot, Central, response R with a Hill stimulation of production."""
    depot, central, r = y[0], y[1], y[2]
    c = central / p["vc"]
    # c ** n with a gradient that stays finite at c = 0 (before the first dose) for any n > 0
    positive = c > 0.0
    cn = jnp.where(positive, jnp.where(positive, c, 1.0) ** p["n"], 0.0)
    effect = p["smax"] * cn / (p["sc50"] ** p["n"] + cn)
    return jnp.stack([
        -p["ka"] * depot,
        p["ka"] * depot - p["cl"] / p["vc"] * central,
        p["kin"] * (1.0 + effect) - p["kout"] * r,
    ])


def _idr_y0(p):
    return jnp.stack([jnp.zeros_like(p["kin"]), jnp.zeros_like(p["kin"]), p["kin"] / p["kout"]])


#: Log-scale truth used by :func:`simulate_idr` (ka, CL, Vc, kin, kout, Smax, SC50, n; IIV SDs).
IDR_TRUTH = {
    "log_ka": np.log(1.0), "log_cl": np.log(2.0), "log_vc": np.log(20.0), "log_kin": np.log(10.0),
    "log_kout": np.log(0.5), "log_smax": np.log(2.0), "log_sc50": np.log(1.0), "log_n": np.log(1.5),
    "omega": np.array([0.3, 0.2, 0.2, 0.1]), "sigma_conc": 0.1, "sigma_resp": 1.0,
}


def idr_model(pop: Population) -> None:
    """The seeds' IDR PK/PD model as a NumPyro program (outputs ``conc`` and ``resp``).

    CL, Vc, kin, SC50 are population parameters; ka, kout, Smax, n are log-normal per subject
    (``MvLogNormal`` with diagonal covariance). Concentrations have proportional error, the
    response additive error.
    """
    names = ("ka", "cl", "vc", "kin", "kout", "smax", "sc50", "n")
    centres = (0.0, 0.7, 3.0, 2.3, -0.7, 0.7, 0.0, 0.4)
    logs = {k: numpyro.sample(f"log_{k}", dist.Normal(c, 2.0)) for k, c in zip(names, centres, strict=True)}
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(4)).to_event(1))
    sigma_conc = numpyro.sample("sigma_conc", dist.HalfNormal(1.0))
    sigma_resp = numpyro.sample("sigma_resp", dist.HalfNormal(5.0))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        individual = {"ka": 0, "kout": 1, "smax": 2, "n": 3}
        shape = (pop.n_subjects,)
        p = {k: jnp.broadcast_to(jnp.exp(logs[k] + (eta[..., individual[k]] if k in individual else 0.0)), shape)
             for k in names}
        states = ode.solve(idr_rhs, pop, p, y0=_idr_y0)
        conc = states[..., 1] / p["vc"][:, None]
        observe("conc", proportional(conc, sigma_conc), pop, output="conc")
        observe("resp", additive(states[..., 2], sigma_resp), pop, output="resp")


class MLP(nnx.Module):
    """A small multilayer perceptron: tanh hidden layers, linear output; ``sizes = (in, *hidden, out)``."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def idr_nn_model(hidden: tuple[int, ...] = (16, 16), *, n_eta_nn: int = 0, seed: int = 0, rtol: float = 1e-6,
                 atol: float = 1e-9, random_effects: bool = True, weight_prior: float | None = None):
    """The IDR model with a neural drug effect: a universal differential equation, or DeepNLME.

    ``dR/dt = kin (1 + NN(C, eta_nn)) - kout R`` with ``NN`` an :class:`MLP` of the concentration
    ``C = Central / Vc`` (and, with ``n_eta_nn > 0``, of that many extra random effects: DeepNLME,
    the seeds' "random effects as network inputs"). PK as in :func:`idr_model`; log-normal IIV on
    ka and kout (``eta[..., 0:2]``, standard deviations ``omega``), ``eta[..., 2:]`` go to the
    network. The network's random effects are standard normal, as in DeepPumas: their scale is the
    network's first-layer weights on them (a standard deviation of its own would multiply those
    weights, and the likelihood would be flat along their product). The network's weights are
    the population site ``effect$params``; population parameters ``log_ka, log_cl, log_vc,
    log_kin, log_kout``, ``omega`` (2), ``sigma_conc``, ``sigma_resp``. With
    ``random_effects=False`` there are no random effects (and no ``omega``): one subject, or the
    seeds' single-subject training on many regimens given as pseudo-subjects (naive pooling).
    ``weight_prior``: the standard deviation of a Normal prior on every weight (the weights are then
    sample sites ``effect/...``; with ``map=True`` the ML backends add it as an L2 penalty,
    DeepPumas' ``MAP(FOCE())``).

    Returns the model function (a NumPyro program); ``model.net`` is the initial network.
    """
    net = MLP((1 + n_eta_nn, *hidden, 1), rngs=nnx.Rngs(seed))
    names = ("ka", "cl", "vc", "kin", "kout")
    centres = (0.0, 0.7, 3.0, 2.3, -0.7)

    def rhs_of(effect):
        def rhs(t, y, p):
            c = y[1] / p["vc"]
            h = effect(jnp.concatenate([c[None], p["eta_nn"]]))[0]
            return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["cl"] / p["vc"] * y[1],
                              p["kin"] * (1.0 + h) - p["kout"] * y[2]])
        return rhs

    def model(pop: Population) -> None:
        logs = {k: numpyro.sample(f"log_{k}", dist.Normal(c, 2.0)) for k, c in zip(names, centres, strict=True)}
        if random_effects:
            omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(2)).to_event(1))
        sigma_conc = numpyro.sample("sigma_conc", dist.HalfNormal(1.0))
        sigma_resp = numpyro.sample("sigma_resp", dist.HalfNormal(5.0))
        effect = nn("effect", net, prior=None if weight_prior is None else dist.Normal(0.0, weight_prior))
        with subjects(pop):
            shape = (pop.n_subjects,)
            if random_effects:
                scale = jnp.concatenate([omega, jnp.ones(n_eta_nn)])  # the network's: N(0, 1)
                eta = numpyro.sample("eta", dist.Normal(0.0, scale).to_event(1))
            else:
                eta = jnp.zeros((*shape, 2 + n_eta_nn))
            p = {k: jnp.broadcast_to(jnp.exp(logs[k]), shape) for k in names}
            p["ka"] = p["ka"] * jnp.exp(eta[..., 0])
            p["kout"] = p["kout"] * jnp.exp(eta[..., 1])
            p["eta_nn"] = eta[..., 2:]
            states = ode.solve(rhs_of(effect), pop, p, y0=_idr_y0, rtol=rtol, atol=atol)
            conc = states[..., 1] / p["vc"][:, None]
            observe("conc", proportional(conc, sigma_conc), pop, output="conc")
            observe("resp", additive(states[..., 2], sigma_resp), pop, output="resp")

    model.net = net
    return model


def idr_population(
    n_subjects: int,
    *,
    dose: float = 100.0,
    n_doses: int = 4,
    interval: float = 24.0,
    times: tuple[float, ...] = (0.5, 1, 2, 4, 8, 12, 24, 48, 72, 96, 120),
) -> pd.DataFrame:
    """A NONMEM-style design for the IDR model: oral doses into CMT 1 and both outputs at ``times``.

    DV is missing (NaN): read it with ``read_nonmem(..., allow_missing_dv=True)`` or fill it with
    :func:`simulate_idr`.
    """
    rows = []
    for i in range(1, n_subjects + 1):
        events = [(k * interval, "dose") for k in range(n_doses)]
        events += [(t, out) for t in times for out in ("conc", "resp")]
        for t, what in sorted(events, key=lambda e: (e[0], e[1] != "dose")):
            dose_row = what == "dose"
            rows.append({"ID": i, "TIME": float(t), "DV": np.nan, "AMT": dose if dose_row else 0.0,
                         "EVID": 1 if dose_row else 0, "CMT": 1 if dose_row else 2,
                         "DVID": "conc" if dose_row else what})
    return pd.DataFrame(rows)


def simulate_idr(n_subjects: int, *, key: jax.Array, params: dict | None = None, **design) -> pd.DataFrame:
    """Simulate a study from :func:`idr_model` with known parameters (default :data:`IDR_TRUTH`).

    Returns the design of :func:`idr_population` with DV filled in: a table ``read_nonmem`` reads.

    Examples
    --------
    >>> import jax, nlmegen
    >>> table = nlmegen.examples.simulate_idr(4, key=jax.random.key(0))
    >>> pop = nlmegen.read_nonmem(table)
    >>> pop.outputs
    ('conc', 'resp')
    """
    from ._simulate import simulate

    table = idr_population(n_subjects, **design)
    pop = read_nonmem(table, allow_missing_dv=True)
    sims = simulate(idr_model, params or IDR_TRUTH, pop, key=key)
    table = table.copy()
    obs = table["EVID"] == 0
    table.loc[obs, "DV"] = sims["value"].to_numpy()
    return table


def warfarin_rhs(t, y, p):
    """Warfarin PK/PD as one ODE system: depot (mg), central (mg), PCA (% of normal).

    ``dPCA/dt = kin (1 - C / (C + EC50)) - kout PCA`` with ``C = central / V`` (mg/L) and
    ``kin = E0 kout`` (turnover at baseline E0); full inhibition (Imax = 1). :func:`warfarin_model`
    solves the same system with the concentration in closed form; this full form is the check.
    """
    depot, central, pca = y[0], y[1], y[2]
    c = jnp.maximum(central / p["v"], 0.0)
    return jnp.stack([
        -p["ka"] * depot,
        p["ka"] * depot - p["cl"] / p["v"] * central,
        p["e0"] * p["kout"] * (1.0 - c / (c + p["ec50"])) - p["kout"] * pca,
    ])


def _oral_concentration(t, p):
    """One-compartment oral concentration at ``t`` by superposition of the subject's bolus doses."""
    k, ka = p["cl"] / p["v"], p["ka"]
    tau = t - p["dose_t"] - p["lag"]
    on = p["dose_on"] & (tau > 0)
    tau = jnp.where(on, tau, 0.0)
    diff = ka - k
    close = jnp.abs(diff) < 1e-6 * ka
    safe = jnp.where(close, 1.0, diff)
    bateman = jnp.where(close, ka * tau * jnp.exp(-k * tau), ka / safe * (jnp.exp(-k * tau) - jnp.exp(-ka * tau)))
    return jnp.sum(jnp.where(on, p["dose_amt"] * bateman, 0.0)) / p["v"]


def _warfarin_pd_rhs(t, y, p):
    c = _oral_concentration(t, p)
    return p["e0"] * p["kout"] * (1.0 - c / (c + p["ec50"])) - p["kout"] * y


#: Order of the random effects of :func:`warfarin_model` (``eta[..., k]``).
WARFARIN_ETAS = ("ka", "cl", "v", "ec50", "kout", "e0")


def warfarin_model(pop: Population) -> None:
    """Warfarin PK/PD (nlmixr2data ``warfarin``): one-compartment oral PK and a PCA turnover model.

    The classic joint model of the warfarin data (O'Reilly's study; the model of nlmixr2's and
    babelmixr2's warfarin vignettes, ``pk.turnover.emax3``, with first-order absorption after a lag
    time instead of a transit depot, and the maximal inhibition fixed at 1, where those fits
    estimate 0.998):

    - PK: oral bolus doses (mg) absorbed after a lag ``tlag`` (h, no IIV) with ``ka`` (1/h),
      ``CL`` (L/h), ``V`` (L); ``cp`` (mg/L) in closed form
      (:func:`nlmegen.pk.one_cmt`) with combined error ``sd^2 = add_cp^2 + (prop_cp cp)^2``.
    - PD: ``dPCA/dt = E0 kout (1 - cp / (cp + EC50)) - kout PCA``, ``PCA(0) = E0`` (% of normal),
      additive error ``add_pca``; one ODE state (:func:`nlmegen.ode.solve` with ``f=0``, so the
      doses only place segment boundaries at the end of their lag) driven by the closed-form concentration of the doses
      (superposition of oral boluses: no infusions or steady state). :func:`warfarin_rhs` is the
      same system with the PK as ODE states.
    - Log-normal IIV on ka, CL, V, EC50, kout, E0 (``omega``, in :data:`WARFARIN_ETAS` order).
    """
    tka = numpyro.sample("tka", dist.Normal(0.0, 2.0))  # ka ~ 1 /h
    tlag = numpyro.sample("tlag", dist.Normal(-0.7, 2.0))  # lag ~ 0.5 h
    tcl = numpyro.sample("tcl", dist.Normal(-2.3, 2.0))  # CL ~ 0.1 L/h
    tv = numpyro.sample("tv", dist.Normal(2.3, 2.0))  # V ~ 10 L
    tec50 = numpyro.sample("tec50", dist.Normal(-0.7, 2.0))  # EC50 ~ 0.5 mg/L
    tkout = numpyro.sample("tkout", dist.Normal(-3.0, 2.0))  # kout ~ 0.05 /h
    te0 = numpyro.sample("te0", dist.Normal(4.6, 2.0))  # E0 ~ 100 %
    omega = numpyro.sample("omega", dist.HalfNormal(0.5 * jnp.ones(6)).to_event(1))
    prop_cp = numpyro.sample("prop_cp", dist.HalfNormal(0.2))
    add_cp = numpyro.sample("add_cp", dist.HalfNormal(1.0))
    add_pca = numpyro.sample("add_pca", dist.HalfNormal(10.0))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        typical = (tka, tcl, tv, tec50, tkout, te0)
        p = {name: jnp.exp(t + eta[..., k]) for k, (name, t) in enumerate(zip(WARFARIN_ETAS, typical, strict=True))}
        p["lag"] = jnp.broadcast_to(jnp.exp(tlag), p["cl"].shape)
        cp = pk.one_cmt(pop, cl=p["cl"], v=p["v"], ka=p["ka"], lag=p["lag"])
        doses = {"dose_t": pop.dose_times, "dose_amt": pop.dose_amts, "dose_on": pop.dose_mask}
        pca = ode.solve(_warfarin_pd_rhs, pop, {**p, **doses}, y0=lambda q: q["e0"][None], f=0.0,
                        lag=p["lag"])[..., 0]
        observe("cp", combined(cp, add_cp, prop_cp), pop, output="cp")
        observe("pca", additive(pca, add_pca), pop, output="pca")


def warfarin_pk_covariate_model(relations):
    """Model factory: warfarin PK (``cp`` only) with the covariate relations in ``relations``.

    One-compartment oral PK with a lag time (as in :func:`warfarin_model`), log-normal IIV on ka,
    CL and V, combined error; ``CL = exp(tcl + eta) * f["cl"]`` and ``V = exp(tv + eta) * f["v"]``
    with ``f = relations.factors(pop)`` (see `nlmegen.covariates.Relations`), so
    ``nlmegen.scm(warfarin_pk_covariate_model, pop, candidates, parameters=["cl", "v"])`` searches
    covariates on CL and V. A module-level function, so process pools and Dask can pickle it.
    """

    def model(pop: Population) -> None:
        tka = numpyro.sample("tka", dist.Normal(0.0, 2.0))
        tlag = numpyro.sample("tlag", dist.Normal(-0.7, 2.0))
        tcl = numpyro.sample("tcl", dist.Normal(-2.3, 2.0))
        tv = numpyro.sample("tv", dist.Normal(2.3, 2.0))
        omega = numpyro.sample("omega", dist.HalfNormal(0.5 * jnp.ones(3)).to_event(1))
        prop_cp = numpyro.sample("prop_cp", dist.HalfNormal(0.2))
        add_cp = numpyro.sample("add_cp", dist.HalfNormal(1.0))
        f = relations.factors(pop)
        with subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
            cl = jnp.exp(tcl + eta[..., 1]) * f["cl"]
            v = jnp.exp(tv + eta[..., 2]) * f["v"]
            cp = pk.one_cmt(pop, cl=cl, v=v, ka=jnp.exp(tka + eta[..., 0]), lag=jnp.exp(tlag))
            observe("cp", combined(cp, add_cp, prop_cp), pop)

    return model


def theo_model_kacl(pop: Population) -> None:
    """:func:`theo_model` with random effects on ka and CL only (none on V).

    ``ka = exp(tka + eta[0])``, ``CL = exp(tcl + eta[1])``, ``V = exp(tv)``; ``eta`` is
    ``N(0, diag(omega^2))`` with two elements; additive error. The model of nlmixr2's full-Bayes
    variational reference on theo_sd (posterior medians ka 1.51, CL 2.72, V 30.35).
    """
    tka = numpyro.sample("tka", dist.Normal(0.5, 2.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 2.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(2)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        conc = pk.one_cmt(pop, ka=jnp.exp(tka + eta[..., 0]), cl=jnp.exp(tcl + eta[..., 1]), v=jnp.exp(tv))
        observe("conc", additive(conc, add_sd), pop)
