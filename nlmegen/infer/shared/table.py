"""The natural-scale parameter table: what a pharmacometrician reads (`FitResult.table`).

Rows, in order:

- ``population``: every population site on its own (user) scale, except the sites that only
  parameterise the random-effect distribution (they are reported as OMEGA below). The 95%
  interval is the estimation-scale interval mapped through the site's transform,
  ``t(u +/- 1.96 se_u)`` (``exp`` for positive sites, the logistic for ``interval`` sites), so it
  never leaves the support.
- ``derived``: the model's ``numpyro.deterministic`` sites. Outside the subject plate: their
  value. Inside it: the typical value, i.e. the value at random effects 0, when it is the same for
  every subject (no covariate in it; otherwise the site is left out and named in
  ``table.attrs["notes"]``).
- ``omega``: the variance ``OMEGA(e)`` of every Gaussian random-effect component ``e``, with
  ``CV%`` = ``100 sqrt(exp(OMEGA) - 1)`` (exact for a log-normal parameter ``exp(mu + e)``) and
  the shrinkage of that component in percent; for a full block, one ``correlation`` row
  ``CORR(e1,e2)`` per pair (never the Cholesky entries the optimiser sees).

Standard errors use the delta method through the exact (autodiff) Jacobian of each quantity with
respect to the free unconstrained parameters: ``SE = sqrt(diag(J C J'))`` with ``C`` the
covariance of the estimates. Intervals of positive derived quantities and variances are built on
the log scale, ``est * exp(+/- 1.96 SE / est)`` (exact for ``exp`` of a normal estimate);
correlations on Fisher's z scale, ``tanh(atanh(r) +/- 1.96 SE / (1 - r^2))``; other derived
quantities ``est +/- 1.96 SE``. A quantity that no free parameter moves (it depends on fixed ones
only) is marked ``fixed``, with no SE.

Fits with posterior draws (NUTS, SVI) evaluate the same quantities at every draw: ``estimate`` is
the posterior median, ``SE`` the posterior SD, the interval the 2.5% and 97.5% quantiles.

``table.attrs`` holds ``condition_number`` (ratio of the largest to the smallest eigenvalue of the
correlation matrix of the estimates; NONMEM's, > 1000 flags ill-conditioning), ``omega`` (the
OMEGA matrix as a DataFrame: variances on the diagonal, correlations off it) and ``notes``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .marginal import unconstrained_ebes
from .result import Z95, element_labels

__all__ = ["COLUMNS", "condition_number", "natural_table", "omega_frame"]

COLUMNS = ["kind", "estimate", "SE", "RSE%", "CI95_lower", "CI95_upper", "CV%", "shrinkage%", "fixed"]
MAX_DRAWS = 1000  # posterior draws evaluated (thinned evenly above this)


def condition_number(correlation: np.ndarray | None) -> float:
    """Largest over smallest eigenvalue of a correlation matrix (NaN without one)."""
    if correlation is None or correlation.size == 0 or not np.all(np.isfinite(correlation)):
        return math.nan
    w = np.linalg.eigvalsh(0.5 * (correlation + correlation.T))
    return float(w[-1] / w[0]) if w[0] > 0 else math.inf


# ---------------------------------------------------------------------- what the model names
def _unwrap(fn: Any) -> Any:
    import numpyro.distributions as dist

    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _covariance(fn: Any, size: int) -> Any:
    """``[k, k]`` covariance of the first subject's random effect, or None if not Gaussian."""
    import jax.numpy as jnp
    import numpyro.distributions as dist

    base = _unwrap(fn)
    if isinstance(base, dist.Normal):
        var = jnp.broadcast_to(base.scale**2, jnp.broadcast_shapes(jnp.shape(base.scale), jnp.shape(base.loc)))
        var = jnp.reshape(var, (-1, size))[0] if var.size >= size else jnp.broadcast_to(jnp.ravel(var)[0], (size,))
        return jnp.diag(var)
    if isinstance(base, (dist.MultivariateNormal, dist.LowRankMultivariateNormal)):
        cov = base.covariance_matrix
        return jnp.reshape(cov, (-1, size, size))[0]
    return None


def _real_valued(support: Any) -> bool:
    """Whether a random effect lives on the whole real line (its OMEGA is then the variance of eta)."""
    from numpyro.distributions import constraints

    while isinstance(support, constraints._IndependentConstraint):
        support = support.base_constraint
    return isinstance(support, (constraints._Real, constraints._RealVector))


class _Quantities:
    """The model's natural-scale quantities as one function of the full unconstrained theta."""

    def __init__(self, fit: Any) -> None:
        import jax.numpy as jnp

        from ...model import Density, discover

        self.fit, self.pop = fit, fit.pop
        self.sites = discover(fit.model, fit.pop)
        self.density = Density(fit.model, self.sites)
        self.eta0 = jnp.zeros((fit.pop.n_subjects, self.sites.n_eta))
        self.eta_labels = list(fit.ebes.columns)
        self._plates: dict[str, bool] | None = None

    def trace(self, theta: Any, eta: Any) -> dict:
        return self.density.trace(theta, eta, self.pop)

    def values(self, theta: Any) -> dict:
        """``{"derived/<name>": value, "omega/<site>": [k, k]}`` at random effects 0."""
        tr = self.trace(theta, self.eta0)
        out = {}
        for name in self.sites.deterministic:
            out[f"derived/{name}"] = tr[name]["value"]
        for site in self.sites.random_effects:
            size = max(1, int(np.prod(site.shape)))
            cov = _covariance(tr[site.name]["fn"], size)
            if cov is not None and _real_valued(site.support):
                out[f"omega/{site.name}"] = cov
        return out

    def observation_dependence(self, theta: Any, eta: Any) -> Any:
        """Per-subject conditional log-likelihood (its Jacobian in theta is structurally 0 for
        parameters that only enter the random-effect distribution)."""
        loglik, _ = self.density.terms_of_trace(self.trace(theta, eta), eta, self.pop)
        return loglik

    def in_plate(self, name: str) -> bool:
        """Whether deterministic site ``name`` is inside the subject plate (one abstract trace, kept)."""
        if self._plates is None:
            import jax
            import jax.numpy as jnp

            from ...model import SUBJECT_PLATE

            plates: dict[str, bool] = {}

            def run(theta):
                tr = self.trace(theta, self.eta0)
                plates.update({n: SUBJECT_PLATE in [f.name for f in tr[n].get("cond_indep_stack", [])]
                               for n in self.sites.deterministic})
                return jnp.zeros(())

            jax.eval_shape(run, jnp.asarray(self.fit.theta))
            self._plates = plates
        return self._plates[name]


# ---------------------------------------------------------------------- rows
def _interval(est: float, se: float, how: str) -> tuple[float, float]:
    if not np.isfinite(se):
        return math.nan, math.nan
    if how == "log" and est > 0:
        half = Z95 * se / est
        return est * math.exp(-half), est * math.exp(half)
    if how == "fisher" and abs(est) < 1:
        z, half = math.atanh(est), Z95 * se / (1.0 - est**2)
        return math.tanh(z - half), math.tanh(z + half)
    return est - Z95 * se, est + Z95 * se


def _transformed_interval(transform: Any, est: float, se_u: float) -> tuple[float, float]:
    """``t(u -/+ 1.96 se_u)`` for an elementwise transform ``t`` (sorted: ``t`` may decrease)."""
    if transform is None or not np.isfinite(se_u):
        return math.nan, math.nan
    u = float(np.asarray(transform.inv(np.asarray(est))))
    ends = sorted(float(np.asarray(transform(np.asarray(u + s * Z95 * se_u)))) for s in (-1.0, 1.0))
    return ends[0], ends[1]


def _elementwise(transform: Any, shape: tuple) -> bool:
    try:
        return transform is not None and tuple(transform.inverse_shape(tuple(shape))) == tuple(shape)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return False


def _row(kind, est, se, lo, hi, fixed, cv=math.nan, shrink=math.nan) -> dict:
    rse = 100.0 * se / abs(est) if est != 0 and np.isfinite(se) else math.nan
    return dict(zip(COLUMNS, (kind, est, se, rse, lo, hi, cv, shrink, fixed), strict=True))


def _cv(variance: float) -> float:
    return 100.0 * math.sqrt(math.expm1(variance)) if np.isfinite(variance) and variance >= 0 else math.nan


# ---------------------------------------------------------------------- the table
def natural_table(fit: Any) -> pd.DataFrame:
    """The natural-scale parameter table of ``fit`` (see the module docstring).

    Needs the fit's model and data (a fit from a backend, or `nlmegen.load` of a file that stored
    them); a loaded fit without them returns the table stored in the file.
    """
    import jax
    import jax.numpy as jnp
    import numpyro

    if fit.model is None or fit.pop is None:
        stored = fit.tables.get("natural")
        if stored is None:
            raise ValueError("the natural-scale table needs the model and the data; this fit has neither (pass "
                             "model= and pop= to nlmegen.load), or use fit.table(scale='estimation')")
        return stored.copy()
    q = _Quantities(fit)
    free_idx = np.flatnonzero(fit.free)
    theta_hat = jnp.asarray(fit.theta)

    def full(x):
        return theta_hat.at[free_idx].set(x)

    def flat(x):
        values = q.values(full(x))
        return jnp.concatenate([jnp.ravel(v) for v in values.values()]) if values else jnp.zeros(0), values

    from ...dynamics.ode import forward_mode

    # forward mode (jacfwd) through the model: its ODE solves must use diffrax.ForwardMode
    with numpyro.validation_enabled(False), forward_mode():
        x_hat = jnp.asarray(fit.theta[free_idx])
        _, values = flat(x_hat)
        values = {k: np.asarray(v, dtype=float) for k, v in values.items()}
        jac = np.asarray(jax.jit(jax.jacfwd(lambda x: flat(x)[0]))(x_hat)) if free_idx.size else None
        eta_hat = jnp.asarray(unconstrained_ebes(fit, q.sites))
        dep = np.asarray(jax.jit(jax.jacfwd(lambda x: q.observation_dependence(full(x), eta_hat)))(x_hat)) \
            if free_idx.size else np.zeros((fit.n_subjects, 0))
        draws = _draw_values(fit, q) if fit.draws is not None else None
    return _assemble(fit, q, values, jac, dep, draws)


def _draw_values(fit: Any, q: _Quantities) -> dict[str, np.ndarray]:
    """The quantities at (at most `MAX_DRAWS`) posterior draws, each ``[draw, ...]``."""
    import jax
    import jax.numpy as jnp

    space = q.density.theta_space
    chains, n = next(iter(fit.draws.values())).shape[:2]
    take = np.unique(np.linspace(0, chains * n - 1, min(chains * n, MAX_DRAWS)).astype(int))
    per_site = {}
    for name, value in fit.params.items():
        if name in fit.draws:
            x = np.asarray(fit.draws[name], dtype=float)
            per_site[name] = jnp.asarray(x.reshape((chains * n, *x.shape[2:]))[take])
        else:
            per_site[name] = jnp.broadcast_to(jnp.asarray(value, dtype=float), (take.size, *np.shape(value)))
    theta = jax.vmap(lambda v: space.unconstrain(v))(per_site)
    out = jax.jit(jax.vmap(q.values))(theta)
    return {**{k: np.asarray(v, dtype=float) for k, v in out.items()},
            **{f"population/{k}": np.asarray(v, dtype=float) for k, v in per_site.items()}}


class _Delta:
    """Delta-method standard errors from the Jacobian rows of the quantities."""

    def __init__(self, jac, offsets, cov) -> None:
        self.jac, self.offsets, self.cov = jac, offsets, cov

    def row(self, key: str, idx: int) -> np.ndarray | None:
        return None if self.jac is None else self.jac[self.offsets[key][0] + idx]

    def se_of(self, g: np.ndarray) -> float:
        if self.cov is None or not np.any(g != 0):
            return math.nan
        return float(np.sqrt(max(float(g @ self.cov @ g), 0.0)))

    def __call__(self, key: str, idx: int) -> tuple[float, bool]:
        """SE of element ``idx`` (flat) of quantity ``key``, and whether free parameters move it."""
        g = self.row(key, idx)
        if g is None:
            return math.nan, False
        return self.se_of(g), bool(np.any(g != 0))


def _assemble(fit, q, values, jac, dep, draws) -> pd.DataFrame:
    """Rows from the values at the estimate and their Jacobian (or their draws)."""
    rows, notes = {}, []
    offsets, start = {}, 0
    for key, value in values.items():
        offsets[key] = (start, start + value.size)
        start += value.size
    delta = _Delta(jac, offsets, fit.covariance)

    def summarise(draws_key, sel, est):
        x = draws[draws_key].reshape(draws[draws_key].shape[0], -1)[:, sel]
        lo, med, hi = np.quantile(x, [0.025, 0.5, 0.975])
        return float(med), float(np.std(x, ddof=1)), float(lo), float(hi)

    # which population sites only parameterise the random effects (reported as OMEGA instead)
    omega_only = set()
    if jac is not None:
        omega_cols = np.zeros(jac.shape[1], bool)
        for key in values:
            if key.startswith("omega/"):
                a, b = offsets[key]
                omega_cols |= np.any(jac[a:b] != 0, axis=0)
        obs_cols = np.any(dep != 0, axis=0)
        free_labels = [lab for lab, f in zip(fit.theta_names, fit.free, strict=True) if f]
        by_site: dict[str, list[bool]] = {}
        for lab, om, ob in zip(free_labels, omega_cols, obs_cols, strict=True):
            by_site.setdefault(lab.split("[", 1)[0], []).append(om and not ob)
        omega_only = {site for site, flags in by_site.items() if all(flags)}
    _population_rows(fit, q, rows, notes, omega_only, draws, summarise)
    _derived_rows(fit, q, values, rows, notes, delta, draws, summarise)
    omega = _omega_rows(fit, q, values, rows, notes, delta, draws, summarise)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    table.index.name = "parameter"
    table["fixed"] = table["fixed"].astype(bool)
    table.attrs.update(condition_number=condition_number(fit.correlation) if fit.draws is None else math.nan,
                       omega=omega, notes=notes)
    return table


def _population_rows(fit, q, rows, notes, omega_only, draws, summarise) -> None:
    names = list(fit.theta_names)
    free_pos = {lab: k for k, lab in enumerate(lab for lab, f in zip(names, fit.free, strict=True) if f)}
    network = {s.name for s in q.sites.population if s.leaf_shapes is not None}
    for name, value in fit.params.items():
        if name in network:
            notes.append(f"network weights {name!r} ({np.size(value)} values) are not in the table (fit.params)")
            continue
        if name in omega_only:
            continue
        t = fit.transforms.get(name)
        elementwise = _elementwise(t, np.shape(value))
        labels = element_labels(name, np.shape(value))
        for i, (label, est) in enumerate(zip(labels, np.ravel(np.asarray(value, dtype=float)), strict=True)):
            fixed = name in fit.fixed or label in fit.fixed
            if draws is not None and not fixed and f"population/{name}" in draws and name in fit.draws:
                med, sd, lo, hi = summarise(f"population/{name}", i, est)
                rows[label] = _row("population", med, sd, lo, hi, False)
                continue
            k = free_pos.get(label)
            se = float(np.ravel(fit.se.get(name, np.full(np.shape(value), np.nan)))[i]) if not fixed else math.nan
            se_u = math.nan if (k is None or fit.se_unconstrained is None) else float(fit.se_unconstrained[k])
            if elementwise and np.isfinite(se_u):
                lo, hi = _transformed_interval(t, float(est), se_u)
            else:
                lo, hi = _interval(float(est), se, "linear")
            rows[label] = _row("population", float(est), se, lo, hi, fixed)


def _derived_rows(fit, q, values, rows, notes, delta, draws, summarise) -> None:
    for name in q.sites.deterministic:
        key = f"derived/{name}"
        value = values[key]
        if q.in_plate(name):
            per_subject = value.reshape(value.shape[0], -1)
            if not np.allclose(per_subject, per_subject[:1], rtol=1e-10, atol=0.0):
                notes.append(f"{name!r} differs between subjects at random effects 0 (covariates): no typical value "
                             "in the table")
                continue
            shape = value.shape[1:]  # subject 0's elements come first in the flat order
        else:
            shape = value.shape
        flat_value = np.ravel(value)
        for i, label in enumerate(element_labels(name, shape)):
            est = float(flat_value[i])
            if draws is not None:
                med, sd, lo, hi = summarise(key, i, est)
                rows[label] = _row("derived", med, sd, lo, hi, False)
                continue
            se, moved = delta(key, i)
            rows[label] = _row("derived", est, se, *_interval(est, se, "log" if est > 0 else "linear"), not moved)


def _omega_rows(fit, q, values, rows, notes, delta, draws, summarise) -> pd.DataFrame:
    shrink = np.ravel(fit.shrinkage.get("eta", np.full(len(q.eta_labels), np.nan)))
    position = {lab: k for k, lab in enumerate(q.eta_labels)}
    names = _eta_names(fit, q)
    blocks = []
    for site in q.sites.random_effects:
        key = f"omega/{site.name}"
        if key not in values:
            notes.append(f"random effect {site.name!r} is not Gaussian: no OMEGA rows")
            continue
        cov = values[key]
        k = cov.shape[0]
        labels = element_labels(site.name, site.shape)
        shown = [names.get(lab, lab) for lab in labels]
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cov / np.outer(sd, sd)
        matrix = np.where(np.eye(k, dtype=bool), cov, corr)
        blocks.append(pd.DataFrame(matrix, index=shown, columns=shown))
        if draws is not None:
            dv = draws[key].reshape(-1, k, k)
            dsd = np.sqrt(np.clip(np.diagonal(dv, axis1=1, axis2=2), 0.0, None))
            with np.errstate(divide="ignore", invalid="ignore"):
                dcorr = dv / (dsd[:, :, None] * dsd[:, None, :])
        for i in range(k):
            label = f"OMEGA({shown[i]})"
            s = float(shrink[position[labels[i]]]) if labels[i] in position and position[labels[i]] < shrink.size \
                else math.nan
            if draws is not None:
                med, sdev, lo, hi = summarise(key, i * k + i, 0.0)
                rows[label] = _row("omega", med, sdev, lo, hi, False, _cv(med), s)
                continue
            se, moved = delta(key, i * k + i)
            var = float(cov[i, i])
            rows[label] = _row("omega", var, se, *_interval(var, se, "log"), not moved, _cv(var), s)
        for i in range(k):
            for j in range(i + 1, k):
                label = f"CORR({shown[i]},{shown[j]})"
                if draws is not None:
                    x = dcorr[:, i, j]
                    if np.allclose(x, 0.0):
                        continue
                    lo, med, hi = np.quantile(x, [0.025, 0.5, 0.975])
                    rows[label] = _row("correlation", float(med), float(np.std(x, ddof=1)), float(lo), float(hi),
                                       False)
                    continue
                se_r, moved = _correlation_se(delta, key, cov, i, j, k)
                if not moved and corr[i, j] == 0:
                    continue  # a diagonal block: no correlation parameter
                r = float(corr[i, j])
                rows[label] = _row("correlation", r, se_r, *_interval(r, se_r, "fisher"), not moved)
    if not blocks:
        return pd.DataFrame()
    return blocks[0] if len(blocks) == 1 else _block_diagonal(blocks)


def _correlation_se(delta, key, cov, i, j, k) -> tuple[float, bool]:
    """SE of ``r = c_ij / sqrt(c_ii c_jj)``: its gradient is
    ``g_ij / sqrt(c_ii c_jj) - r/2 (g_ii / c_ii + g_jj / c_jj)`` (chain rule on the rows of J)."""
    g_ij, g_ii, g_jj = (delta.row(key, a * k + b) for a, b in ((i, j), (i, i), (j, j)))
    if g_ij is None or not (np.any(g_ij != 0) or np.any(g_ii != 0) or np.any(g_jj != 0)):
        return math.nan, False
    c_ii, c_jj = float(cov[i, i]), float(cov[j, j])
    r = float(cov[i, j]) / math.sqrt(c_ii * c_jj)
    g = g_ij / math.sqrt(c_ii * c_jj) - 0.5 * r * (g_ii / c_ii + g_jj / c_jj)
    return delta.se_of(g), bool(np.any(g != 0))


def _block_diagonal(blocks: list[pd.DataFrame]) -> pd.DataFrame:
    names = [n for b in blocks for n in b.index]
    out = pd.DataFrame(0.0, index=names, columns=names)
    for b in blocks:
        out.loc[b.index, b.columns] = b.to_numpy()
    return out


def _eta_names(fit, q) -> dict[str, str]:
    """Random-effect element -> the per-subject ``numpyro.deterministic`` it alone drives (``eta[1]`` ->
    ``cl``), found from the Jacobian at random effects 0; elements without one keep their label."""
    import jax
    import jax.numpy as jnp
    import numpyro

    dets = [n for n in q.sites.deterministic if q.in_plate(n)]
    if not dets or not q.eta_labels:
        return {}
    theta = jnp.asarray(fit.theta)

    def subject0(e):
        eta = q.eta0.at[0].set(e)
        tr = q.trace(theta, eta)
        return {n: jnp.reshape(tr[n]["value"], (fit.n_subjects, -1))[0] for n in dets}

    from ...dynamics.ode import forward_mode

    with numpyro.validation_enabled(False), forward_mode():
        jac = jax.jacfwd(subject0)(q.eta0[0])
    drivers: dict[int, list[str]] = {}
    for name, j in jac.items():
        j = np.asarray(j)
        if j.shape[0] != 1:
            continue
        hit = np.flatnonzero(j[0] != 0)
        if hit.size == 1:
            drivers.setdefault(int(hit[0]), []).append(name)
    return {q.eta_labels[e]: f"{q.eta_labels[e]}:{names[0]}" for e, names in drivers.items()
            if len(names) == 1 and e < len(q.eta_labels)}


def omega_frame(fit: Any) -> pd.DataFrame:
    """The OMEGA matrix: variances on the diagonal, correlations off it (``natural_table(fit).attrs``)."""
    return natural_table(fit).attrs["omega"]
