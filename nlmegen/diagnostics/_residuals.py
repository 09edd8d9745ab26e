"""Residuals of a fit: PRED, IPRED, RES, IWRES, CWRES and NPDE, as a tidy table.

- RES = DV - PRED; IWRES = (DV - IPRED) / sqrt(V(eta*)) with V the residual variance at the EBEs.
- CWRES (Hooker, Staatz & Karlsson, Pharm Res 2007;24:2187-2197): the model linearised at the EBEs,
  ``E[y_i] = f(eta*) - G eta*`` and ``Cov[y_i] = G Omega G' + diag V(eta*)`` with ``G = df/d eta``;
  ``CWRES_i = Cov^-1/2 (y_i - E[y_i])`` with the symmetric square root (as NONMEM's WRES).
- NPDE (Brendel, Comets, Laffont, Laveille & Mentre, Pharm Res 2006;23:2036-2049): ``K`` simulated
  replicates of every subject give its predictive mean ``E_i`` and covariance ``V_i``; observed and
  simulated vectors are decorrelated by ``V_i^-1/2``; ``pde`` is the fraction of decorrelated
  simulations below the decorrelated observation (``1/2K`` and ``1 - 1/2K`` at the ends);
  ``NPDE = Phi^-1(pde)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.special import ndtri

from .._errors import ModelError
from ..model import Density, discover

__all__ = ["residuals"]


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
    vals = np.maximum(vals, 1e-12 * max(vals.max(initial=0.0), 1e-300))
    return (vecs / np.sqrt(vals)) @ vecs.T


def _linearisation(fit, pop):
    """f, V and G = df/d eta at the EBEs, and Omega, from the fit's model (Gaussian residuals)."""
    from .._simulate import ebe_values
    from ..infer.laplace.objective import Objective, _value_and_columns

    density = Density(fit.model, discover(fit.model, pop))
    if getattr(fit, "classes", None) is not None and tuple(fit.ids) == tuple(pop.ids):  # mixture: EBEs' classes
        density = dataclasses.replace(density, classes=jnp.asarray(fit.classes["class"].to_numpy()))
    objective = Objective(density, "focei")
    theta = jnp.asarray(fit.theta)
    eta = density.eta_space.unconstrain(ebe_values(fit, pop, density.sites.random_effects))

    @jax.jit
    def pieces(theta, eta, pop):
        def obs(e):
            parts = objective._trace_parts(theta, e, pop)
            return parts["f"], parts["var"]

        (f, var), (g, _) = _value_and_columns(obs, eta)
        mask = objective._trace_parts(theta, eta, pop)["mask"]
        return f, var, g, mask, objective.prior_precision(theta, pop)

    try:
        f, var, g, mask, precision = (np.asarray(x) for x in pieces(theta, eta, pop))
    except ModelError as err:
        raise ModelError(f"CWRES and IWRES need Gaussian residuals: {err}") from None
    # several observed sites (outputs) come as [subj, obs] blocks side by side: the columns of
    # ``mask`` pick each real observation once; ``slot`` maps a column back to its observation
    slot = np.tile(np.arange(np.asarray(pop.dv).shape[1]), f.shape[1] // np.asarray(pop.dv).shape[1])
    return f, var, g, mask & np.asarray(pop.mask)[:, slot], slot, np.linalg.inv(precision), np.asarray(eta)


def _cwres(dv, f, var, g, omega, eta, mask, slot) -> np.ndarray:
    """CWRES ``[subj, obs]``; ``f``, ``var``, ``g``, ``mask`` over the sites' columns (see ``slot``)."""
    out = np.full(dv.shape, np.nan)
    for i in range(dv.shape[0]):
        m = mask[i]
        gi = g[i][m]
        cov = gi @ omega[i] @ gi.T + np.diag(var[i][m])
        mean = f[i][m] - gi @ eta[i]
        out[i, slot[m]] = _inverse_sqrt(cov) @ (dv[i][slot[m]] - mean)
    return out


def _iwres(dv, f, var, mask, slot) -> np.ndarray:
    out = np.full(dv.shape, np.nan)
    subj, col = np.nonzero(mask)
    out[subj, slot[col]] = (dv[subj, slot[col]] - f[subj, col]) / np.sqrt(var[subj, col])
    return out


def _npde(dv, sims, mask) -> np.ndarray:
    """``sims``: ``[K, subj, obs]`` simulated observations with residual noise."""
    k = sims.shape[0]
    out = np.full(dv.shape, np.nan)
    for i in range(dv.shape[0]):
        m = mask[i]
        y_sim = sims[:, i][:, m]  # [K, n_i]
        mean = y_sim.mean(axis=0)
        root = _inverse_sqrt(np.atleast_2d(np.cov(y_sim, rowvar=False)))
        obs = root @ (dv[i][m] - mean)
        sim = (y_sim - mean) @ root.T
        pde = np.mean(sim < obs, axis=0)
        pde = np.clip(pde, 1.0 / (2 * k), 1.0 - 1.0 / (2 * k))
        out[i, m] = ndtri(pde)
    return out


def residuals(fit, *, n_sim: int = 1000, key: jax.Array | None = None) -> pd.DataFrame:
    """PRED, IPRED, RES, IWRES, CWRES and NPDE of every observation of a fit.

    Parameters
    ----------
    fit
        A `FitResult` that still holds its model and population (a fit made in this session, or
        a loaded one with ``model`` and ``pop`` set).
    n_sim
        Simulated replicates for NPDE (Brendel et al. recommend at least 1000).
    key
        PRNG key of the NPDE simulations (default ``jax.random.key(0)``: reproducible).

    Returns
    -------
    pandas.DataFrame
        One row per observation: ``ID, TIME, output, DV, PRED, IPRED, RES, IWRES, CWRES, NPDE``
        (CWRES and IWRES need Gaussian residual errors; NaN otherwise).
    """
    from .._simulate import model_values, simulate_arrays

    fit.require_model("residuals")
    pop = fit.pop
    mask, dv = np.asarray(pop.mask), np.asarray(pop.dv)
    try:
        f, var, g, site_mask, slot, omega, eta = _linearisation(fit, pop)
        iwres = _iwres(dv, f, var, site_mask, slot)
        cwres = _cwres(dv, f, var, g, omega, eta, site_mask, slot)
    except ModelError:
        iwres = cwres = np.full(dv.shape, np.nan)
    sims = simulate_arrays(fit.model, model_values(fit), pop, key=jax.random.key(0) if key is None else key, n=n_sim)
    npde = _npde(dv, sims, mask)
    subj, obs = np.nonzero(mask)
    return pd.DataFrame({
        "ID": np.asarray(pop.ids, dtype=object)[subj], "TIME": np.asarray(pop.times)[subj, obs],
        "output": np.asarray(pop.outputs, dtype=object)[np.asarray(pop.dvid)[subj, obs]],
        "DV": dv[subj, obs], "PRED": fit.pred[subj, obs], "IPRED": fit.ipred[subj, obs],
        "RES": (dv - fit.pred)[subj, obs], "IWRES": iwres[subj, obs], "CWRES": cwres[subj, obs],
        "NPDE": npde[subj, obs],
    })
