"""After the SAEM iterations: conditional moments, importance-sampling -2LL, FOCEI OFV and standard
errors at the estimate, convergence status, iteration history -> `FitResult`."""

from __future__ import annotations

import functools
import math
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.special import gammaln

from ..._errors import ModelError
from ...model._mixture import SOURCE_ATTR
from ..laplace.objective import LOG_2PI
from ..shared.checkpoint import interrupted_note
from ..shared.result import FitResult, element_labels

__all__ = ["finish", "importance_loglik"]


def importance_loglik(density, pop, theta, mean, cov, key, n_draws: int, df: float, batch: int = 100):
    """-2 log-likelihood (with every constant) by importance sampling, and its Monte-Carlo SE.

    Each subject's marginal ``p(y_i | theta) = E_q[p(y_i, eta | theta) / q(eta)]`` with ``q`` a
    multivariate Student t (``df`` degrees of freedom) centred at the conditional mean with the
    conditional covariance (Monolix's choice, Kuhn & Lavielle 2005). The SE is the delta-method
    one, ``Var(log L_i) ~ Var(w) / (M E[w]^2)``, summed over subjects, on the -2LL scale.

    Returns
    -------
    (minus2ll, se, per_subject_loglik)
    """
    n, d = mean.shape
    chol = jnp.asarray(np.linalg.cholesky(np.asarray(cov)))
    n_batches = max(1, math.ceil(n_draws / batch))
    leaves = jax.tree_util.tree_leaves(pop)
    cache_key = (density.model, n, d, n_batches, batch, float(df), jax.tree_util.tree_structure(pop),
                 tuple((x.shape, x.dtype) for x in leaves))
    if cache_key not in _IS_CACHE:
        if len(_IS_CACHE) >= 8:
            _IS_CACHE.pop(next(iter(_IS_CACHE)))
        _IS_CACHE[cache_key] = jax.jit(functools.partial(_is_run, density, batch, float(df)))
    m2ll, se, per_subject = _IS_CACHE[cache_key](jax.random.split(key, n_batches), theta, mean, chol, pop)
    return float(m2ll), float(se), np.asarray(per_subject)


_IS_CACHE: dict = {}


def _is_run(density, batch, df, keys, theta, mean, chol, pop):
    n, d = mean.shape
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)  # [subj]
    const = gammaln((df + d) / 2) - gammaln(df / 2) - 0.5 * d * jnp.log(df * jnp.pi)

    def one_batch(k):
        k1, k2 = jax.random.split(k)
        z = jax.random.normal(k1, (batch, n, d))
        w = 2.0 * jax.random.gamma(k2, df / 2, (batch, n))  # chi-square(df)
        x = mean + jnp.sqrt(df / w)[..., None] * jnp.einsum("sij,bsj->bsi", chol, z)
        q = jnp.sum(z**2, -1) * df / w
        logq = const - half_logdet - 0.5 * (df + d) * jnp.log1p(q / df)
        lp = jax.vmap(lambda e: density.subject_log_joint(theta, e, pop))(x)
        lw = lp - logq
        return jnp.where(jnp.isnan(lw), -jnp.inf, lw)

    lw = jax.lax.map(one_batch, keys).reshape(-1, n)
    lmax = jnp.max(lw, axis=0)
    r = jnp.exp(lw - lmax)
    m1 = jnp.mean(r, axis=0)
    m2 = jnp.mean(r**2, axis=0)
    loglik_i = lmax + jnp.log(m1)
    rel_var = (m2 / m1**2 - 1.0) / lw.shape[0]
    return -2.0 * jnp.sum(loglik_i), 2.0 * jnp.sqrt(jnp.sum(rel_var)), loglik_i


def _conditional_moments(carry) -> tuple[np.ndarray, np.ndarray]:
    count = float(carry["count"])
    if count == 0:  # interrupted before the conditional run: the moments of the chains' current states
        eta = np.asarray(carry["estate"].eta)  # [chain, subj, d]
        mean = eta.mean(axis=0)
        cov = np.einsum("csi,csj->sij", eta - mean, eta - mean) / eta.shape[0]
    else:
        mean = np.asarray(carry["sum1"]) / count
        cov = np.asarray(carry["sum2"]) / count - np.einsum("si,sj->sij", mean, mean)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    fixed = []
    for i, c in enumerate(cov):  # a subject whose chain never moved: fall back to a small variance
        vals, vecs = np.linalg.eigh(c)
        floor = max(1e-8, 1e-6 * float(np.max(np.abs(vals))))
        fixed.append((vecs * np.maximum(vals, floor)) @ vecs.T)
        del i
    return mean, np.stack(fixed)


def _history(problem, recs) -> pd.DataFrame:
    """One row per iteration: every parameter on the user's scale, gamma, phase, acceptance."""
    space = problem.density.theta_space
    traj = jnp.asarray(recs["theta"])
    values = jax.vmap(space.constrain)(traj)
    k = traj.shape[0]
    b = problem.backend
    columns = {"iteration": np.arange(1, k + 1), "phase": np.where(np.arange(k) < b.n_explore, 1, 2),
               "gamma": np.asarray(recs["gamma"])}
    for site in space.sites:
        value = values[site.name]
        leaves = jax.tree_util.tree_leaves(value)
        flat = np.concatenate([np.asarray(x).reshape(k, -1) for x in leaves], axis=1)
        shape = tuple(site.shape) if site.leaf_shapes is None else (flat.shape[1],)
        for j, label in enumerate(element_labels(site.name, shape)):
            columns[label] = flat[:, j]
    columns["accept"] = np.mean(np.asarray(recs["accept"]), axis=1)
    return pd.DataFrame(columns)


def _status(problem, recs, theta) -> tuple[str, str, dict]:
    b = problem.backend
    free = problem.free_idx
    traj = np.asarray(recs["theta"])[b.n_explore:, free]
    width = max(10, int(round(b.conv_window * b.n_smooth)))
    window = traj[-width:]
    half = width // 2
    scale = np.maximum(1.0, np.abs(theta[free]))
    drift = np.abs(window[half:].mean(0) - window[:half].mean(0)) / scale if free.size else np.zeros(0)
    info = {"max_drift": float(np.max(drift)) if drift.size else 0.0}
    if not np.all(np.isfinite(theta)):
        return "failed", "the estimate is not finite (the M-step diverged)", info
    if drift.size and info["max_drift"] > b.conv_tol:
        worst = problem.labels[free[int(np.argmax(drift))]]
        return "not_converged", (f"parameter trajectory not stable at the end of the smoothing phase: {worst} "
                                 f"drifts {info['max_drift']:.3g} (> conv_tol={b.conv_tol}, unconstrained "
                                 "scale); raise n_explore / n_smooth"), info
    return "converged", (f"parameter trajectories stable over the last {width} smoothing iterations (max drift "
                         f"{info['max_drift']:.2g} <= {b.conv_tol})"), info


def _nonfinite_subjects(problem, carry, status: str, message: str) -> tuple[str, str]:
    """Fail, naming them, when some subjects' log density is not finite at every chain state.

    Their chains never move (every proposal is rejected), so they add nothing but noise to the
    sufficient statistics and the estimates are distorted; FOCEI fails on the same data, naming
    the same subjects. The chains' log densities come from the last E-step (no new evaluation).
    """
    logp = np.asarray(carry["estate"].logp)  # [chain, subj], -inf where the log density was NaN
    stuck = np.flatnonzero(~np.isfinite(logp).any(axis=0))
    if not stuck.size:
        return status, message
    ids = [problem.pop.ids[i] for i in stuck]
    from ..shared.diagnose import explain_nonfinite

    theta = np.asarray(carry["theta"])
    cause = explain_nonfinite(problem.density, theta, jnp.asarray(carry["estate"].eta[0]), problem.pop)
    return "failed", ((f"{cause}; " if cause else "") +
                      f"the log density is not finite for subject(s) {ids[:10]} at every chain state (NaN or "
                      "infinite predictions or log-likelihood for these subjects: check their data and covariates, "
                      f"and the model at their values); {message}")


def _focei(problem, theta, eta_mean):
    """FOCEI (or Laplace, for non-Gaussian residuals) OFV and covariance step at the SAEM estimate."""
    from ..laplace.backend import FOCEI, Laplace, _Problem
    from ..laplace.finish import _standard_errors
    from ..shared.covariance import covariance_step
    from ..shared.start import split_values

    b = problem.backend
    values = {k: (np.asarray(v) if not isinstance(v, dict) else v)
              for k, v in problem.density.theta_space.constrain(jnp.asarray(theta)).items()}
    init, fixed = split_values(values, problem.fixed_names)  # single fixed elements ("omega[2]") too
    # a mixture model (SAEM fitted it with the class summed out): NONMEM's $MIX objective on the user's model
    source = getattr(problem.model, SOURCE_ATTR, None)
    fp = None
    for backend in (FOCEI(covariance=b.covariance, progress=False), Laplace(covariance=b.covariance, progress=False)):
        try:
            fp = _Problem.build(backend, source or problem.model, problem.pop, init, fixed)
            fp.compile()
            x_hat = (np.asarray(fp.density.theta_space.unconstrain(values)) if source else np.asarray(theta))[fp.free]
            ofv, grad_at, _ = fp.evaluate(x_hat)
            break
        except ModelError:  # FOCEI needs Gaussian residuals: Laplace otherwise
            fp = None
    if fp is None:
        return None
    start = time.perf_counter()
    cov = covariance_step(lambda x: fp.evaluate(x)[1], fp.subject_grads, x_hat, fp.free_labels, b.covariance)
    decrement = _newton_decrement(grad_at, cov.r)
    covariance_s = time.perf_counter() - start
    se, se_u = _standard_errors(fp, x_hat, cov.covariance)
    if source is not None:  # the predictions of each subject's most probable class come later (`fit_mixture`)
        pred = ipred = var = precision = None
    else:
        pred, ipred, var, _, precision = (np.asarray(x) if x is not None else None for x in
                                          fp.fns["predict"](jnp.asarray(theta), jnp.asarray(eta_mean), fp.pop))
    n_obs = fp.objective.n_observations(fp.pop)
    return {"method": fp.backend.method, "ofv": float(ofv), "n_obs": n_obs, "cov": cov, "se": se, "se_u": se_u,
            "decrement": decrement,
            "pred": pred, "ipred": ipred, "var": var, "precision": precision, "covariance_s": covariance_s}


#: FOCEI OFV decrease a Newton step predicts at the SAEM estimate above which SAEM is said to be short of the optimum
DECREMENT_WARN = 2.0


def _newton_decrement(grad: np.ndarray, r: np.ndarray | None) -> float:
    """The OFV decrease a Newton step on the FOCEI objective predicts, ``g' H^-1 g / 2`` with ``H = 2 R``
    (absolute eigenvalues where R is not positive definite); NaN without R."""
    if r is None or not np.all(np.isfinite(grad)) or not np.all(np.isfinite(r)):
        return math.nan
    vals, vecs = np.linalg.eigh(0.5 * (r + r.T))
    vals = np.maximum(np.abs(vals), 1e-10 * max(1.0, float(np.max(np.abs(vals)))))
    g = vecs.T @ np.asarray(grad)
    return float(0.25 * np.sum(g**2 / vals))


def _not_centred(problem) -> list[str]:
    free = problem.free & ~problem.centring.any(axis=0)
    return [problem.labels[j] for j in np.flatnonzero(free)]


def finish(problem, run) -> FitResult:
    """Assemble the `FitResult` of a SAEM fit."""
    from ..laplace.backend import information_criteria
    from ..laplace.finish import _ebe_table, _flat_values, _settings, _shrinkage, _transforms, site_means

    b, pop, density = problem.backend, problem.pop, problem.density
    carry, recs = run["carry"], run["records"]
    theta = np.asarray(carry["theta"])
    eta_mean, eta_cov = _conditional_moments(carry)
    if run.get("interrupted"):  # Ctrl-C: the estimate reached; no log-likelihood or standard errors
        status, message, conv = "interrupted", interrupted_note(run["interrupted"]), {"max_drift": math.nan}
    else:
        status, message, conv = _status(problem, recs, theta)
    status, message = _nonfinite_subjects(problem, carry, status, message)
    warnings = list(problem.warnings)
    n_obs = int((np.asarray(pop.mask) & (np.asarray(pop.cens) == 0)).sum())
    timings = {"setup_s": run.get("setup_s", 0.0), "compile_s": run["compile_s"], "run_s": run["run_s"]}
    if getattr(problem, "joint", None):  # the joint-mode warm start (part of setup_s)
        timings.update(joint_s=problem.joint["seconds"], joint_steps=float(problem.joint["steps"]))

    m2ll, m2ll_se = math.nan, math.nan
    if b.is_draws and status not in ("failed", "interrupted"):
        start = time.perf_counter()
        key = jax.random.fold_in(carry["key"], 1)
        m2ll, m2ll_se, _ = importance_loglik(density, pop, jnp.asarray(theta), jnp.asarray(eta_mean),
                                             jnp.asarray(eta_cov), key, b.is_draws, b.is_df)
        timings["is_s"] = time.perf_counter() - start
    ofv = m2ll - n_obs * LOG_2PI
    if status not in ("failed", "interrupted") and b.is_draws and not np.isfinite(m2ll):  # never "converged" with NaN
        from ..shared.diagnose import explain_nonfinite

        cause = explain_nonfinite(density, theta, eta_mean, pop)
        status, message = "failed", ((f"{cause}; " if cause else "") + "the log-likelihood (importance sampling) is "
                                     f"not finite at the estimate; {message}")

    focei = None
    if b.focei and status not in ("failed", "interrupted"):
        start = time.perf_counter()
        try:
            focei = _focei(problem, theta, eta_mean)
        except Exception as err:  # the comparison must not lose the SAEM result
            warnings.append(f"FOCEI objective / covariance step at the SAEM estimate failed: {err}")
        timings["focei_s"] = time.perf_counter() - start
        if focei is not None:
            timings["covariance_s"] = focei["covariance_s"]
            warnings.extend(focei["cov"].warnings)
            if focei["decrement"] > DECREMENT_WARN:  # e.g. a parameter SAEM cannot centre, still moving slowly
                warnings.append(
                    f"a Newton step on the {focei['method'].upper()} objective from the SAEM estimate predicts an "
                    f"OFV decrease of {focei['decrement']:.1f}: SAEM may have stopped short of the optimum (parameters "
                    f"that are not mu-referenced, {_not_centred(problem)}, converge slowly); run more iterations "
                    "(n_explore) or compare with method='focei'")

    params = {k: (np.asarray(v) if not isinstance(v, dict) else _flat_values({k: v}))
              for k, v in density.theta_space.constrain(jnp.asarray(theta)).items()}
    se, se_u, cov = (focei["se"], focei["se_u"], focei["cov"]) if focei is not None else ({}, None, None)
    shrinkage = {}
    if getattr(problem.model, SOURCE_ATTR, None) is not None:  # a mixture: `fit_mixture` predicts per class
        pred = ipred = np.full(np.shape(pop.dv), np.nan)
    elif focei is not None:
        pred, ipred = focei["pred"], focei["ipred"]
        shrinkage = _shrinkage(pop, eta_mean, focei["precision"], ipred, focei["var"])
    else:
        means = jax.jit(lambda t, e: site_means(density, t, e, pop))
        pred = np.asarray(means(jnp.asarray(theta), jnp.zeros_like(jnp.asarray(eta_mean))))
        ipred = np.asarray(means(jnp.asarray(theta), jnp.asarray(eta_mean)))

    accept = np.asarray(recs["accept"])  # [iteration, subj]
    # (an interrupted run may stop before the smoothing phase: then the exploration's acceptance)
    smooth_accept = (accept[b.n_explore:] if len(accept) > b.n_explore else accept).mean(0)
    cond_accept = np.asarray(run["cond_accept"]).mean(0) if len(run["cond_accept"]) else smooth_accept
    low = [pop.ids[i] for i in np.flatnonzero(cond_accept < 0.05)]
    if low:
        warnings.append(f"E-step acceptance below 5% for subject(s) {low[:10]}: their conditional moments (EBEs, "
                        "IS proposal) are unreliable")
    left_out = int(carry["left_out"])
    if left_out:
        warnings.append(f"{left_out} (chain, subject) contribution(s) to M-steps had a non-finite derivative and "
                        "were left out (check the model for 0 ** x or log(0) at some random-effect values)")
    bad = int(carry["bad_msteps"])
    if bad:
        warnings.append(f"{bad} M-step(s) gave a non-finite update and were skipped")
    notes = [message, f"{b.n_explore} + {b.n_smooth} iterations, {problem.n_chains} chain(s) per subject, "
             f"{b.kernel} kernel x {b.n_kernel_steps}",
             f"E-step acceptance {float(smooth_accept.mean()):.2f} (smoothing; min subject "
             f"{float(smooth_accept.min()):.2f}), {float(cond_accept.mean()):.2f} (conditional run)",
             f"-2LL (IS, with constant) {m2ll:.3f} +/- {m2ll_se:.3f}"]
    m2ll_focei = math.nan
    if focei is not None:
        m2ll_focei = focei["ofv"] + focei["n_obs"] * LOG_2PI
        notes.append(f"-2LL ({focei['method'].upper()} at the SAEM estimate, with constant) {m2ll_focei:.3f}")
    centred = problem.centres()
    n_params = int(problem.free.sum())
    loglik, aic, bic = information_criteria(ofv, n_obs, n_params)
    settings = {**_settings(b), "num_chains_used": problem.n_chains, "mu_referenced": centred,
                "annealed": [problem.labels[i] for i in np.flatnonzero(problem.variance_like)],
                "minus2ll_is": m2ll, "minus2ll_is_se": m2ll_se, "minus2ll_focei": m2ll_focei,
                "focei_ofv": focei["ofv"] if focei is not None else math.nan,
                "focei_decrement": focei["decrement"] if focei is not None else math.nan,
                "focei_method": focei["method"] if focei is not None else None,
                "standard_errors": "FOCEI covariance step at the SAEM estimate" if focei is not None else "none",
                "acceptance_smoothing": float(smooth_accept.mean()), "acceptance_conditional":
                float(cond_accept.mean()), "max_drift": conv["max_drift"]}
    holder = types.SimpleNamespace(density=density, pop=pop)
    return FitResult(
        method=b.method, params=params, se=se, ofv=ofv, loglik=loglik, aic=aic, bic=bic, n_obs=n_obs,
        n_params=n_params, n_subjects=pop.n_subjects, status=status, message="; ".join(notes),
        ebes=_ebe_table(holder, eta_mean), ebe_cov=eta_cov, ebe_converged=cond_accept > 0.0, ids=tuple(pop.ids),
        times=np.asarray(pop.times), dv=np.asarray(pop.dv), mask=np.asarray(pop.mask), dvid=np.asarray(pop.dvid),
        outputs=tuple(pop.outputs), pred=pred, ipred=ipred, theta=theta, theta_names=tuple(problem.labels),
        free=problem.free.copy(), covariance=None if cov is None else cov.covariance,
        covariance_kind="none" if cov is None else cov.kind, se_unconstrained=se_u, shrinkage=shrinkage,
        history=_history(problem, recs), timings=timings, settings=settings, warnings=tuple(warnings), draws=None,
        fixed=tuple(problem.fixed_names), transforms=_transforms(density), model=problem.model, pop=pop,
    )
