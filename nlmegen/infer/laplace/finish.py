"""After the optimisation: predictions, EBE tables, shrinkage, standard errors -> `FitResult`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd

from ...model import Density
from ..shared.covariance import delta_method
from ..shared.result import FitResult
from ..shared.start import theta_labels
from .objective import _unwrap

__all__ = ["build_result", "site_means"]


def site_means(density: Density, theta, eta, pop):
    """Mean of every observation's distribution (the prediction), placed by output, ``[subj, obs]``."""
    tr = density.trace(theta, eta, pop)
    out = jnp.zeros(pop.dv.shape)
    for site in density.sites.observed:
        base, _ = _unwrap(tr[site.name]["fn"])
        if isinstance(base, dist.Unit):  # a factor (a mixture's summed-out likelihood): no prediction
            continue
        mean = jnp.broadcast_to(base.mean, pop.dv.shape)
        covered = pop.mask if site.output is None else pop.mask & (pop.dvid == site.output)
        out = jnp.where(covered, mean, out)
    return out


def _flat_values(values: dict) -> np.ndarray:
    leaves = [np.ravel(np.asarray(x)) for v in values.values() for x in jax.tree_util.tree_leaves(v)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _per_site(values: dict, flat: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, value in values.items():
        size = sum(np.size(x) for x in jax.tree_util.tree_leaves(value))
        shape = np.shape(value) if not isinstance(value, dict) else (size,)
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


def _standard_errors(problem, x_hat: np.ndarray, covariance) -> tuple[dict, np.ndarray | None]:
    space = problem.density.theta_space
    values = {k: np.asarray(v) if not isinstance(v, dict) else v
              for k, v in space.constrain(jnp.asarray(problem.full(x_hat))).items()}
    if covariance is None:
        return {k: np.full(np.shape(v) if not isinstance(v, dict) else (len(_flat_values({k: v})),), np.nan)
                for k, v in values.items()}, None
    theta0, free = jnp.asarray(problem.theta0), np.flatnonzero(problem.free)

    def flat(x):  # site by site in the order of `values` (tree_leaves would sort the names)
        constrained = space.constrain(theta0.at[free].set(x))
        leaves = [leaf for name in values for leaf in jax.tree_util.tree_leaves(constrained[name])]
        return jnp.concatenate([jnp.ravel(v) for v in leaves]) if leaves else jnp.zeros(0)

    jac = np.asarray(jax.jacfwd(flat)(jnp.asarray(x_hat)))
    se_flat = np.sqrt(np.clip(np.diag(delta_method(jac, covariance)), 0.0, None))
    se = _per_site(values, se_flat)
    for name in problem.fixed_names:  # not estimated: no standard error (rather than a false 0)
        if name in se:  # single fixed elements ("omega[2]") are blanked by FitResult
            se[name] = np.full(np.shape(se[name]), np.nan)
    return se, np.sqrt(np.clip(np.diag(covariance), 0.0, None))


def _ebe_table(problem, eta) -> pd.DataFrame:
    values = problem.density.eta_space.constrain(jnp.asarray(eta))
    columns = {}
    for name, value in values.items():
        arr = np.asarray(value).reshape(value.shape[0], -1)
        if np.ndim(value) == 1:
            columns[name] = arr[:, 0]
        else:
            columns.update({f"{name}[{i}]": arr[:, i] for i in range(arr.shape[1])})
    frame = pd.DataFrame(columns, index=pd.Index(list(problem.pop.ids), name="ID"))
    return frame


def _shrinkage(pop, eta, precision, ipred, var) -> dict[str, np.ndarray]:
    """ETA shrinkage 1 - SD(EBE)/omega and EPS shrinkage 1 - SD(IWRES), in percent (NONMEM's)."""
    out = {}
    if eta.shape[1]:
        with np.errstate(invalid="ignore"):  # a flow's curvature at eta = 0 need not be positive (NaN then)
            omega = np.sqrt(np.mean(np.diagonal(np.linalg.inv(precision), axis1=1, axis2=2), axis=0))
        out["eta"] = 100.0 * (1.0 - np.std(eta, axis=0, ddof=1) / omega)
    if var is not None:
        mask, dv, dvid = np.asarray(pop.mask), np.asarray(pop.dv), np.asarray(pop.dvid)
        iwres = (dv - ipred) / np.sqrt(var)
        out["eps"] = np.array([100.0 * (1.0 - np.std(iwres[mask & (dvid == k)], ddof=1))
                               for k in range(len(pop.outputs))])
    return out


def build_result(problem, x_hat, ofv, ebe, status, message, cov, timings) -> FitResult:
    """Assemble the `FitResult` of a Laplace-family fit."""
    from .backend import information_criteria

    pop, density = problem.pop, problem.density
    theta = problem.full(np.asarray(x_hat))
    eta = np.asarray(problem.eta)
    pred, ipred, var, curvature, precision = (np.asarray(x) if x is not None else None for x in
                                              problem.fns["predict"](jnp.asarray(theta), jnp.asarray(eta), pop))
    se, se_u = _standard_errors(problem, np.asarray(x_hat), cov.covariance)
    params = {k: (np.asarray(v) if not isinstance(v, dict) else _flat_values({k: v}))
              for k, v in density.theta_space.constrain(jnp.asarray(theta)).items()}
    n_obs = problem.objective.n_observations(pop)
    n_params = int(problem.free.sum())
    loglik, aic, bic = information_criteria(ofv, n_obs, n_params)
    return FitResult(
        method=problem.backend.method, params=params, se=se, ofv=float(ofv), loglik=loglik, aic=aic, bic=bic,
        n_obs=n_obs, n_params=n_params, n_subjects=pop.n_subjects, status=status, message=message,
        ebes=_ebe_table(problem, eta), ebe_cov=np.linalg.inv(curvature) if eta.shape[1] else
        np.zeros((pop.n_subjects, 0, 0)), ebe_converged=np.asarray(ebe.converged), ids=tuple(pop.ids),
        times=np.asarray(pop.times), dv=np.asarray(pop.dv), mask=np.asarray(pop.mask), dvid=np.asarray(pop.dvid),
        outputs=tuple(pop.outputs), pred=pred, ipred=ipred, theta=np.asarray(theta),
        theta_names=tuple(theta_labels(density.theta_space)), free=problem.free.copy(),
        covariance=cov.covariance, covariance_kind=cov.kind, se_unconstrained=se_u,
        shrinkage=_shrinkage(pop, eta, precision, ipred, var) if status != "failed" else {},
        history=pd.DataFrame(problem.history),
        timings=timings, settings=_settings(problem.backend), warnings=tuple(problem.warnings), draws=None,
        fixed=tuple(problem.fixed_names), transforms=_transforms(density), model=problem.model, pop=pop,
    )


def _settings(backend) -> dict:
    from dataclasses import asdict

    return {"method": backend.method, **asdict(backend)}


def _transforms(density: Density) -> dict:
    from numpyro.distributions.transforms import biject_to

    sites = [s for s in density.sites.population if s.leaf_shapes is None] + list(density.sites.random_effects)
    return {s.name: biject_to(s.support) for s in sites}


