"""`FitResult` -> ArviZ `DataTree` (the file format is in :mod:`nlmegen.io._file`).

All ArviZ / xarray imports are inside the functions, so importing nlmegen does not load them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from ..infer.shared.result import label_site

if TYPE_CHECKING:
    from ..infer.shared.result import FitResult

__all__ = ["support_name", "to_arviz", "transform_from_name"]

SAMPLE_STATS = ("lp", "diverging", "acceptance_rate", "accept_prob", "step_size", "tree_depth", "n_steps", "num_steps",
                "energy", "potential_energy", "mean_tree_accept")
NAMED_SUPPORTS = ("real", "positive", "unit_interval", "corr_cholesky", "corr_matrix", "lower_cholesky",
                  "scaled_unit_lower_cholesky", "softplus_lower_cholesky", "softplus_positive", "simplex",
                  "ordered_vector", "positive_ordered_vector", "positive_definite", "real_vector", "real_matrix",
                  "l1_ball", "circular")
# ---------------------------------------------------------------------- support names
def _constraint_name(c: Any) -> str | None:
    from numpyro.distributions import constraints as C

    if isinstance(c, C._IndependentConstraint):
        inner = _constraint_name(c.base_constraint)
        return None if inner is None else f"independent({inner},{int(c.reinterpreted_batch_ndims)})"
    for name in NAMED_SUPPORTS:
        if getattr(C, name, None) is c:
            return name
    bounds = {C._GreaterThan: ("greater_than", "lower_bound"), C._LessThan: ("less_than", "upper_bound")}
    if type(c) in bounds and np.ndim(getattr(c, bounds[type(c)][1])) == 0:
        fn, attr = bounds[type(c)]
        return f"{fn}({float(getattr(c, attr))!r})"
    if type(c) is C._Interval and np.ndim(c.lower_bound) == 0 and np.ndim(c.upper_bound) == 0:
        return f"interval({float(c.lower_bound)!r},{float(c.upper_bound)!r})"
    return None


def _constraint(name: str) -> Any:
    from numpyro.distributions import constraints as C

    if m := re.fullmatch(r"independent\((.+),(\d+)\)", name):
        return C.independent(_constraint(m.group(1)), int(m.group(2)))
    if m := re.fullmatch(r"(greater_than|less_than)\(([^,]+)\)", name):
        return getattr(C, m.group(1))(float(m.group(2)))
    if m := re.fullmatch(r"interval\(([^,]+),([^,]+)\)", name):
        return C.interval(float(m.group(1)), float(m.group(2)))
    if name in NAMED_SUPPORTS:
        return getattr(C, name)
    raise ValueError(f"unknown support {name!r}")


def transform_from_name(name: str | None) -> Any:
    """``biject_to`` of the support called ``name`` (as written by `support_name`); None if unknown."""
    from numpyro.distributions.transforms import biject_to

    if not name:
        return None
    try:
        return biject_to(_constraint(name))
    except (ValueError, NotImplementedError, TypeError):
        return None


def support_name(transform: Any) -> str | None:
    """Name of the support whose ``biject_to`` is ``transform`` (``"positive"``, ``"interval(0.0,1.0)"``).

    None when no name rebuilds an equal transform (the site is then held at its estimate in
    `to_arviz` after `load`).
    """
    if transform is None:
        return None
    candidates = [_constraint_name(getattr(transform, "codomain", None)), *NAMED_SUPPORTS]
    for name in candidates:
        if name is None:
            continue
        rebuilt = transform_from_name(name)
        try:
            if rebuilt is not None and bool(np.all(rebuilt == transform)):
                return name
        except (TypeError, ValueError):
            continue
    return None


# ---------------------------------------------------------------------- draws
def _root(cov: np.ndarray) -> np.ndarray | None:
    """A square root ``R`` with ``R R' = cov`` (negative eigenvalues clipped); None if not finite."""
    cov = np.asarray(cov, dtype=float)
    if cov.size and not np.all(np.isfinite(cov)):
        return None
    w, v = np.linalg.eigh(0.5 * (cov + cov.T))
    return v * np.sqrt(np.clip(w, 0.0, None))


def _site_indices(labels: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        out.setdefault(label_site(label), []).append(i)
    return out


def _population_draws(fit: FitResult, n: int, rng: np.random.Generator) -> tuple[dict, np.ndarray | None]:
    """User-scale draws of the population sites from N(theta_hat, covariance); ``log q`` per draw.

    The unconstrained draws ``[n, p]`` are kept in the returned dict under ``"__theta__"``."""
    free = np.flatnonzero(fit.free)
    root = None if fit.covariance is None or n == 1 else _root(fit.covariance)
    theta, log_q = np.tile(fit.theta, (n, 1)), None
    if root is not None and free.size:
        z = rng.standard_normal((n, free.size))
        theta[:, free] += z @ root.T
        sign, logdet = np.linalg.slogdet(2 * np.pi * fit.covariance)
        log_q = -0.5 * np.sum(z**2, axis=1) - 0.5 * (logdet if sign > 0 else np.nan)
    index, out = _site_indices(fit.theta_names), {}
    for site, value in fit.params.items():
        idx, t = index.get(site, []), fit.transforms.get(site)
        inv = tuple(t.inverse_shape(value.shape)) if t is not None else None
        drawn = root is not None and t is not None and len(idx) == int(np.prod(inv)) and fit.free[idx].any()
        if drawn:
            u = theta[:, idx].reshape((n, *inv))
            out[site] = np.asarray(t(u), dtype=float)
        else:
            out[site] = np.broadcast_to(value, (n, *value.shape)).copy()
    out["__theta__"] = theta
    return out, log_q


def _eta_sites(fit: FitResult) -> dict[str, list[int]]:
    """Random-effect site -> its columns in ``ebes``."""
    return _site_indices(fit.ebes.columns)


def _ebe_values(fit: FitResult, draws: np.ndarray, sites: dict) -> dict[str, np.ndarray]:
    out = {}
    for site, cols in sites.items():
        scalar = [str(fit.ebes.columns[c]) for c in cols] == [site]
        value = draws[..., cols]
        out[site] = value[..., 0] if scalar else value
    return out


def _random_effect_draws(fit: FitResult, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draws of each subject's random effects from N(EBE, ebe_cov) (unconstrained, then transformed)."""
    ebe = fit.ebes.to_numpy(dtype=float)
    sites = _eta_sites(fit)
    point = np.broadcast_to(ebe, (n, *ebe.shape)).copy()
    if fit.covariance is None or n == 1 or ebe.shape[1] == 0:
        return _ebe_values(fit, point, sites)
    roots = [_root(c) for c in fit.ebe_cov]
    roots = np.stack([r if r is not None else np.zeros_like(c) for r, c in zip(roots, fit.ebe_cov, strict=True)])
    z = np.einsum("sij,nsj->nsi", roots, rng.standard_normal(point.shape))
    out = point.copy()
    for site, cols in sites.items():
        t = fit.transforms.get(site)
        if t is None:
            out[..., cols] = point[..., cols] + z[..., cols]
        elif tuple(t.inverse_shape((len(cols),))) == (len(cols),):
            u = np.asarray(t.inv(ebe[:, cols]), dtype=float)
            out[..., cols] = np.asarray(t(u + z[..., cols]), dtype=float)
    return _ebe_values(fit, out, sites)


def _dims(name: str, ndim: int, subject: bool) -> list[str]:
    lead = ["subject"] if subject else []
    return lead + [f"{name}_dim_{i}" for i in range(ndim - len(lead))]


def _ml_groups(fit: FitResult, n_draws: int, seed: int) -> tuple[dict, dict, dict, str]:
    rng = np.random.default_rng(seed)
    n = 1 if fit.covariance is None else int(n_draws)
    pop, log_q = _population_draws(fit, n, rng)
    theta = pop.pop("__theta__")
    eta = _random_effect_draws(fit, n, rng)
    posterior = {k: v[None] for k, v in {**pop, **eta}.items()}
    posterior["__theta__"] = theta
    dims = {k: _dims(k, v.ndim - 1, False) for k, v in pop.items()}
    dims.update({k: _dims(k, v.ndim - 1, True) for k, v in eta.items()})
    stats = {} if log_q is None else {"log_q": log_q[None]}
    kind = "asymptotic_normal" if n > 1 else "point_estimate"
    return posterior, stats, dims, kind


def _bayes_groups(fit: FitResult) -> tuple[dict, dict, dict, str]:
    sites = _eta_sites(fit)
    posterior = {k: v for k, v in fit.draws.items() if k not in SAMPLE_STATS}
    stats = {k: v for k, v in fit.draws.items() if k in SAMPLE_STATS}
    dims = {k: _dims(k, v.ndim - 2, k in sites and v.ndim >= 3 and v.shape[2] == fit.n_subjects)
            for k, v in posterior.items()}
    return posterior, stats, dims, "draws"


def _observations(fit: FitResult) -> dict[str, np.ndarray]:
    """The real observations, flattened subject by subject: ID, TIME, DVID, output, DV, PRED, IPRED."""
    subj, _ = np.nonzero(fit.mask)
    dvid = fit.dvid[fit.mask]
    return {"ID": np.asarray(list(fit.ids))[subj], "TIME": fit.times[fit.mask], "DVID": dvid,
            "output": np.asarray(list(fit.outputs))[dvid] if fit.outputs else dvid.astype(str),
            "DV": fit.dv[fit.mask], "PRED": fit.pred[fit.mask], "IPRED": fit.ipred[fit.mask]}


_DESCRIPTIONS = {
    "asymptotic_normal": "maximum-likelihood fit: draws from the asymptotic normal N(theta_hat, covariance) "
                         "of the free unconstrained population parameters mapped to the user's scale, and of "
                         "each subject's random effects from N(EBE, ebe_cov); not a Bayesian posterior",
    "point_estimate": "maximum-likelihood fit without a covariance: one draw at the estimates and EBEs",
    "draws": "posterior draws of a Bayesian backend",
}


def _log_likelihood(fit: FitResult, posterior: dict) -> np.ndarray:
    """``[chain, draw, obs]`` pointwise log-likelihood of the real observations at every draw,
    conditional on each draw's random effects."""
    from .._simulate import model_values
    from ..infer.shared.pointwise import pointwise_log_likelihood

    lead = next(iter(posterior.values())).shape[:2]
    held = model_values(fit)  # network weights as the pytree the model takes (constant over ML draws)
    network = {k for k, v in held.items() if isinstance(v, dict)}
    draws = {k: v for k, v in posterior.items() if k not in network}
    fixed = {k: v for k, v in held.items() if k not in draws}
    ll = pointwise_log_likelihood(fit.model, fit.pop, draws, fixed, lead)
    return ll[..., fit.mask]


def _subject_log_likelihood(fit: FitResult, posterior: dict, theta: np.ndarray | None) -> np.ndarray:
    """``[chain, draw, subject]`` marginal log-likelihood of each subject (random effects integrated
    out by the Laplace approximation) at every draw; see `nlmegen.infer.shared.marginal`."""
    from ..infer.shared.marginal import subject_log_likelihood, theta_of_draws, unconstrained_ebes
    from ..model import discover

    sites = discover(fit.model, fit.pop)
    lead = next(iter(posterior.values())).shape[:2]
    n = int(np.prod(lead))
    if theta is None:
        theta = theta_of_draws(fit, sites, posterior, n)
    ll = subject_log_likelihood(fit.model, fit.pop, theta, unconstrained_ebes(fit, sites))
    return ll.reshape(*lead, fit.n_subjects)


def to_arviz(fit: FitResult, n_draws: int = 1000, seed: int = 0, *, log_likelihood: bool = True,
             posterior_predictive: bool | None = None) -> Any:
    """Convert a `FitResult` to an ArviZ `xarray.DataTree`.

    Groups:

    - ``posterior``: for Bayesian fits (``fit.draws`` not None) the draws themselves. For
      maximum-likelihood fits, *not* a Bayesian posterior: ``n_draws`` draws (one chain) from
      the asymptotic normal ``N(theta, covariance)`` of the free unconstrained parameters,
      mapped to the user's scale through ``fit.transforms`` (fixed sites, and sites without a
      known transform, are constant at the estimate), and for every subject random effects from
      ``N(EBE, ebe_cov)`` in the unconstrained space (random-effect sites without a transform
      are taken as real). Without a covariance: a single draw at the estimates and EBEs.
      Population sites have dims ``(chain, draw, <site>_dim_0, ...)``, random-effect sites
      ``(chain, draw, subject[, <site>_dim_0])`` with ``subject`` the original IDs.
    - ``sample_stats``: maximum likelihood: ``log_q``, the log density of the normal approximation
      at each draw (for importance resampling, SIR, or ``arviz.loo_approximate_posterior``);
      Bayesian: the keys of ``fit.draws`` that are sampler statistics (``lp``, ``diverging``,
      ...). Absent when empty.
    - ``log_likelihood`` (every fit holding its model and data; ``log_likelihood=False`` skips it),
      two variables, so pass ``var_name`` to ``arviz.loo`` / ``arviz.compare``:

      - ``subject_marginal``, dims ``(chain, draw, subject)``: the *marginal* log-likelihood of each
        subject, ``log p(y_i | theta)``, random effects integrated out (Laplace approximation,
        FOCEI for Gaussian residuals, at each draw's own EBEs). ``arviz.loo(dt, var_name="subject_marginal")``
        is leave-one-subject-out cross-validation, the one that predicts new subjects; use it to
        compare maximum-likelihood and Bayesian fits (`FitResult.loo`).
      - ``DV``, dims ``(chain, draw, obs)``: each observation's log-likelihood *conditional* on the
        draw's random effects (M3 terms for censored records); for maximum-likelihood fits the
        random effects are drawn from ``N(EBE, ebe_cov)``. Leave-one-observation-out with
        subject-level random effects often gives high Pareto k (each subject's random effects are
        informed by few records).
    - ``posterior_predictive``: ``DV`` simulated from the model at every draw (its own random
      effects for each fitted subject, plus residual error), dims ``(chain, draw, obs)`` aligned
      with ``observed_data`` (`nlmegen.posterior_predictive`); for every fit holding its
      model and data unless ``posterior_predictive=False``.
    - ``observed_data``: ``DV`` over the real observations (dim ``obs``, subjects in order, padding
      dropped) with coordinates ``ID``, ``TIME`` and ``output``.
    - ``constant_data``: ``ID``, ``TIME``, ``DVID`` (output index) and ``output`` per observation.
    - ``point_estimate``: the estimates (no sample dims): population sites, EBEs, and ``PRED`` /
      ``IPRED`` per observation.

    Root attributes hold method, status, OFV, log-likelihood, AIC, BIC and ``posterior_kind``
    (``"asymptotic_normal"``, ``"point_estimate"`` or ``"draws"``).

    A fit read by `nlmegen.load` returns the tree stored in its file (whatever the arguments).

    Parameters
    ----------
    fit
        The result to convert.
    n_draws
        Number of draws for maximum-likelihood fits (ignored for Bayesian ones).
    seed
        Seed of those draws (NumPy generator).
    log_likelihood
        Compute the ``log_likelihood`` group.
    posterior_predictive
        Compute the ``posterior_predictive`` group (default: when the fit holds its model and data).

    Returns
    -------
    xarray.DataTree
    """
    from arviz_base import from_dict

    stored = fit.tables.get("arviz")
    if stored is not None:
        return stored.copy()
    posterior, stats, dims, kind = _bayes_groups(fit) if fit.draws is not None else _ml_groups(fit, n_draws, seed)
    theta = posterior.pop("__theta__", None)
    obs = _observations(fit)
    coords = {"subject": np.asarray(list(fit.ids)), "obs": np.arange(obs["DV"].size)}
    dims.update({k: ["obs"] for k in ("DV", "ID", "TIME", "DVID", "output", "PRED", "IPRED")})
    groups = {"posterior": posterior, "observed_data": {"DV": obs["DV"]},
              "constant_data": {k: obs[k] for k in ("ID", "TIME", "DVID", "output")}}
    if stats:
        groups["sample_stats"] = stats
    has_model = fit.model is not None and fit.pop is not None
    if log_likelihood and has_model and fit.status != "failed":
        groups["log_likelihood"] = {"subject_marginal": _subject_log_likelihood(fit, posterior, theta),
                                    "DV": _log_likelihood(fit, posterior)}
        dims["subject_marginal"] = ["subject"]
    root = {"nlmegen_method": fit.method, "nlmegen_status": fit.status, "ofv": fit.ofv, "loglik": fit.loglik,
            "aic": fit.aic, "bic": fit.bic, "posterior_kind": kind}
    attrs = {"/": root, "posterior": {"description": _DESCRIPTIONS[kind]}}
    if "log_likelihood" in groups:
        attrs["log_likelihood"] = {"description": _LL_DESCRIPTION}
    dt = from_dict(groups, coords=coords, dims=dims, attrs=attrs)
    obs_coords = {k: ("obs", obs[k]) for k in ("ID", "TIME", "output")}
    dt["observed_data"] = dt["observed_data"].to_dataset().assign_coords(obs_coords)
    dt["point_estimate"] = _point_dataset(fit, obs, coords).assign_coords(obs_coords)
    if posterior_predictive is None:
        posterior_predictive = fit.status != "failed"
    if posterior_predictive and has_model:
        import jax

        from .._simulate import posterior_predictive as _simulate_predictive

        network = [s for s in fit.params if s not in fit.transforms and s not in fit.fixed]  # flat weights
        drawn = {k: v for k, v in posterior.items() if k not in network or fit.draws is not None}
        dt["posterior_predictive"] = _simulate_predictive(fit, key=jax.random.key(seed), draws=drawn)
    return dt


_LL_DESCRIPTION = ("subject_marginal: marginal log p(y_i | theta) per subject (random effects integrated out, "
                   "Laplace/FOCEI approximation): leave-one-subject-out; DV: per observation, conditional on the "
                   "draw's random effects")


def _point_dataset(fit: FitResult, obs: dict, coords: dict) -> Any:
    """The ``point_estimate`` group: estimates, EBEs, PRED and IPRED without sample dims."""
    from arviz_base import dict_to_dataset

    sites = _eta_sites(fit)
    point = {**fit.params, **_ebe_values(fit, fit.ebes.to_numpy(dtype=float), sites),
             "PRED": obs["PRED"], "IPRED": obs["IPRED"]}
    dims = {k: _dims(k, np.ndim(v), k in sites) for k, v in point.items()} | {"PRED": ["obs"], "IPRED": ["obs"]}
    return dict_to_dataset(point, coords=coords, dims=dims, sample_dims=[],
                           attrs={"description": "point estimates (user scale), EBEs, PRED and IPRED"})
