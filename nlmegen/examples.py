"""Two example models written as plain NumPyro programs, and a simulated study of the second.

- :func:`theo_model`: theophylline, one-compartment oral, log-normal ka, CL, V, additive error
  (the classic nlmixr2/NONMEM theo_sd model).
- :func:`idr_model`: the seeds' indirect-response PK/PD model (Depot, Central, R; Hill drug effect
  on the production rate; oral doses), solved as an ODE. :func:`idr_population` builds a study
  design and :func:`simulate_idr` fills it with data simulated from known parameters.

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

from .data import Population, read_nonmem
from .dynamics import ode, pk
from .model import additive, observe, proportional, subjects

__all__ = ["IDR_TRUTH", "idr_model", "idr_population", "idr_rhs", "simulate_idr", "theo_model", "theo_model_full"]


def theo_model(pop: Population) -> None:
    """Theophylline one-compartment oral model (nlmixr2's theo_sd example).

    ``ka = exp(tka + eta_ka)``, ``CL = exp(tcl + eta_cl)``, ``V = exp(tv + eta_v)``; ``eta`` is
    ``N(0, diag(omega^2))``; ``DV ~ N(C, add_sd^2)`` with ``C`` the central concentration (mg/L,
    doses in mg, V in L). Dose into CMT 1 (depot), observations of CMT 2.
    """
    tka = numpyro.sample("tka", dist.Normal(0.5, 2.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 2.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        ka = jnp.exp(tka + eta[..., 0])
        cl = jnp.exp(tcl + eta[..., 1])
        v = jnp.exp(tv + eta[..., 2])
        conc = pk.one_cmt(pop, cl=cl, v=v, ka=ka)
        observe("conc", additive(conc, add_sd), pop)


def theo_model_full(pop: Population) -> None:
    """:func:`theo_model` with a full-block Omega: ``eta ~ N(0, diag(omega) C diag(omega))``.

    The correlation matrix is parameterised by its Cholesky factor (``LKJCholesky`` support), so
    the unconstrained parameters are log standard deviations and the corr-Cholesky coordinates.
    """
    tka = numpyro.sample("tka", dist.Normal(0.5, 2.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 2.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 2.0))
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
    c = jnp.maximum(central / p["vc"], 0.0)
    cn = c ** p["n"]
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
    from .simulate import simulate

    table = idr_population(n_subjects, **design)
    pop = read_nonmem(table, allow_missing_dv=True)
    sims = simulate(idr_model, params or IDR_TRUTH, pop, key=key)
    table = table.copy()
    obs = table["EVID"] == 0
    table.loc[obs, "DV"] = sims["value"].to_numpy()
    return table
