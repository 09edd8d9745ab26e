"""What runs on a worker: a chunk of fits, or a chunk of objective evaluations.

Each task takes the model, the data and the backend object and returns plain NumPy records, so it
runs the same in this process (`LocalExecutor`), in a process pool or on a Dask worker. A task
handles a *chunk* of replicates: the compiled program is built once per chunk (and kept by the
backend's own cache for the next chunk on the same worker) instead of once per replicate.
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from ..infer.shared.result import element_labels

__all__ = ["fit_chunk", "flat_params", "ofv_chunk", "resample"]


def resample(pop, index: np.ndarray):
    """The population made of subjects ``index`` (repeats allowed), renumbered 1..n.

    The new IDs are the same tuple for every resample of one size, so every replicate reuses one
    compiled program (IDs are static fields of the population).
    """
    index = jnp.asarray(np.asarray(index, dtype=np.int64))
    arrays = jax.tree_util.tree_map(lambda a: a[index], pop)
    return dataclasses.replace(arrays, ids=tuple(range(1, int(index.shape[0]) + 1)))


def flat_params(params: dict) -> dict[str, float]:
    """``{label: value}`` of every array-valued site (network weight pytrees left out)."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            continue
        value = np.asarray(value, dtype=float)
        out.update(zip(element_labels(name, value.shape), np.ravel(value).tolist(), strict=True))
    return out


def _record(result, seconds: float) -> dict:
    return {"status": result.status, "message": result.message, "ofv": result.ofv,
            "theta": np.asarray(result.theta, dtype=float), "estimates": flat_params(result.params),
            "seconds": seconds}


def _failure(err: BaseException, seconds: float) -> dict:
    last = traceback.format_exception_only(type(err), err)[-1].strip()
    return {"status": "error", "message": last, "ofv": float("nan"), "theta": None, "estimates": {},
            "seconds": seconds}


_MODELS: dict = {}


def same_model(model):
    """One function object per model *content* in this process.

    A model defined in a script (``__main__``) or inside a function reaches a worker by value, a new
    function object with every task; the backends cache compiled programs by the model object, so
    each chunk would compile again. Models whose pickles are equal are the same model: the first one
    seen stands for them all.
    """
    try:
        import cloudpickle

        blob = cloudpickle.dumps(model)
    except Exception:  # noqa: BLE001 - unpicklable here: nothing to share, keep the object as it is
        return model
    if len(_MODELS) >= 32:
        _MODELS.pop(next(iter(_MODELS)))
    return _MODELS.setdefault(blob, model)


def fit_chunk(model, pop, backend, jobs: list[dict], keep_results: bool = False) -> list[dict]:
    """Fit ``model`` once per job: ``{"index": subjects or None, "init": ..., "fixed": ..., "key": ...}``.

    A fit that raises is recorded with status ``"error"`` and the exception's last line; the other
    jobs of the chunk go on. With ``keep_results`` the `FitResult` rides along (``"result"``).
    """
    from ..infer._fit import fit

    model = same_model(model)
    out = []
    for job in jobs:
        start = time.perf_counter()
        data = pop if job.get("index") is None else resample(pop, job["index"])
        key = None if job.get("key") is None else jax.random.wrap_key_data(jnp.asarray(job["key"]))
        try:
            result = fit(model, data, backend, init=job.get("init"), fixed=job.get("fixed"), key=key)
        except Exception as err:  # noqa: BLE001 - a failed replicate is counted and reported, not fatal
            out.append(_failure(err, time.perf_counter() - start))
            continue
        record = _record(result, time.perf_counter() - start)
        if keep_results:
            record["result"] = result
        out.append(record)
    return out


_OFV_CACHE: dict = {}


def _ofv_function(model, pop, backend):
    """``(theta, eta0, pop) -> (OFV, all EBE searches converged)``, compiled once per problem."""
    from ..infer.shared.checks import check_fit
    from ..model import Density, discover

    key = (model, backend.method, backend.ebe_max_iter, backend.ebe_gtol, backend.map,
           jax.tree_util.tree_structure(pop), tuple(x.shape for x in jax.tree_util.tree_leaves(pop)))
    if key in _OFV_CACHE:
        return _OFV_CACHE[key]
    sites = discover(model, pop)
    check_fit(sites, pop)
    density = Density(model, sites)
    objective = backend.objective_for(density)

    def ofv(theta, eta0, data):
        state = objective.ebe(theta, eta0, data)
        ofv_i = objective.subject_ofv(theta, state.eta, data)
        if backend.map:  # the same objective the fit minimised (see laplace.backend._compiled)
            ofv_i = ofv_i - 2.0 * density.log_prior(theta, data, jacobian=False) / data.n_subjects
        return jnp.sum(ofv_i), jnp.all(state.converged)

    with numpyro.validation_enabled(False):
        compiled = jax.jit(ofv).lower(jnp.zeros(density.theta_space.size),
                                      jnp.zeros((pop.n_subjects, sites.n_eta)), pop).compile()
    if len(_OFV_CACHE) >= 8:
        _OFV_CACHE.pop(next(iter(_OFV_CACHE)))
    _OFV_CACHE[key] = (compiled, sites.n_eta)
    return _OFV_CACHE[key]


def ofv_chunk(model, pop, backend, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The OFV at each row of ``thetas`` (full unconstrained vectors), EBEs searched from eta = 0.

    Returns ``(ofv, converged)``: a non-finite OFV (the model fails there) comes back as NaN.
    """
    compiled, n_eta = _ofv_function(same_model(model), pop, backend)
    eta0 = jnp.zeros((pop.n_subjects, n_eta))
    ofv = np.full(len(thetas), np.nan)
    converged = np.zeros(len(thetas), bool)
    for i, theta in enumerate(np.asarray(thetas, dtype=float)):
        value, ok = compiled(jnp.asarray(theta), eta0, pop)
        ofv[i] = float(value) if np.isfinite(float(value)) else np.nan
        converged[i] = bool(ok)
    return ofv, converged
