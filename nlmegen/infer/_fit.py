"""`fit` and `objective`: the one entry point to every estimation backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro

from .._errors import ModelError
from ..model import Density, discover
from .bayes.nuts import NUTS
from .bayes.svi import SVI
from .laplace.backend import FO, FOCE, FOCEI, Laplace, check_population
from .saem.backend import SAEM
from .shared.checkpoint import meta_for, session
from .shared.checks import check_fit

__all__ = ["BACKENDS", "fit", "objective"]

BACKENDS: dict[str, type] = {"focei": FOCEI, "foce": FOCE, "laplace": Laplace, "fo": FO, "saem": SAEM,
                             "nuts": NUTS, "svi": SVI}


def _backend(method: str | Any, settings: dict):
    if isinstance(method, str):
        key = method.strip().lower()
        if key not in BACKENDS:
            raise ValueError(f"unknown method {method!r}; available: {sorted(BACKENDS)}")
        return BACKENDS[key](**settings)
    if settings:
        raise TypeError(f"settings {sorted(settings)} go into the backend object, e.g. "
                        f"{type(method).__name__}({', '.join(f'{k}=...' for k in settings)})")
    if not hasattr(method, "fit"):
        raise TypeError(f"method must be a name or a backend object with .fit, not {type(method).__name__}")
    return method


def fit(model, pop, method: str | Any = "focei", *, init: Mapping | None = None, fixed: Mapping | None = None,
        key=None, checkpoint=None, checkpoint_every: int | None = None, **settings):
    """Fit ``model`` to the population ``pop``.

    Parameters
    ----------
    model
        A NumPyro model ``model(pop)`` following the nlmegen contract (`nlmegen.subjects`,
        `nlmegen.observe`).
    pop
        The data (`nlmegen.read_nonmem`).
    method
        ``"focei"`` (default), ``"foce"``, ``"laplace"``, ``"fo"``, ``"saem"`` (stochastic
        approximation EM, exact likelihood), ``"nuts"`` or ``"svi"`` (full Bayes with the model's
        priors: NUTS sampling, or variational inference with a chosen guide), or a backend object
        such as ``nlmegen.FOCEI(covariance="R")``, ``nlmegen.SAEM(kernel="hmc")``,
        ``nlmegen.NUTS(num_chains=4)`` or ``nlmegen.SVI(guide="iaf")`` carrying its settings.
    init
        Starting values ``{site: value}`` on the model's scale. Default: the median of each
        population site's prior (``numpyro.param`` sites: their own initial value).
    fixed
        ``{site: value}`` held fixed (not estimated).
    key
        PRNG key for stochastic backends (ignored by the deterministic ones).
    checkpoint, checkpoint_every
        A file to write the fit's state to every ``checkpoint_every`` iterations (atomically;
        default: every BFGS iteration, SAEM chunk, SVI chunk, NUTS chunk), from which
        `nlmegen.resume` continues an interrupted fit to the result it would have given.
        Ctrl-C during a fit returns the state reached, with status ``"interrupted"``.
    **settings
        Backend settings when ``method`` is a name (e.g. ``covariance="R"``, ``map=True``,
        ``progress=False``).

    Returns
    -------
    FitResult

    Examples
    --------
    >>> import nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> result = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
    >>> round(result.ofv, 1), result.status
    (116.8, 'converged')
    """
    backend = _backend(method, settings)
    if checkpoint is None and checkpoint_every is None:
        return backend.fit(model, pop, init=init, fixed=fixed, key=key)
    with session(checkpoint, checkpoint_every, meta_for(model, pop, backend, init, fixed, key)):
        return backend.fit(model, pop, init=init, fixed=fixed, key=key)


def objective(model, pop, params: Mapping, method: str = "focei", **settings) -> float:
    """The OFV (-2LL without the N_obs log(2 pi) constant) at given population parameters.

    The EBEs are found internally; nothing is estimated. ``params`` must give every population
    site on the model's scale.

    Examples
    --------
    >>> import jax.numpy as jnp, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> theta = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": [0.6, 0.3, 0.1], "add_sd": 0.7}
    >>> round(nlmegen.objective(nlmegen.examples.theo_model, pop, theta), 3) > 0
    True
    """
    backend = _backend(method, settings)
    check_population(pop)
    sites = discover(model, pop)
    check_fit(sites, pop)
    missing = [s.name for s in sites.population if s.name not in params]
    if missing:
        raise ModelError(f"objective: no value for population parameter(s) {missing}")
    density = Density(model, sites)
    obj = backend.objective_for(density)
    if sites.mixtures:  # nlmegen.mixture: NONMEM's $MIX objective (laplace.mixture)
        from .laplace.mixture import MixtureObjective

        obj = MixtureObjective(density, obj.method, obj.max_iter, obj.gtol)
    theta = density.theta_space.unconstrain({k: params[k] for k in density.theta_space.names})
    if not np.all(np.isfinite(np.asarray(theta))):
        raise ModelError("objective: a parameter value is outside its site's support")
    eta0 = jnp.zeros((pop.n_subjects, obj.n_eta))
    with numpyro.validation_enabled(False):
        state = obj.ebe(theta, eta0, pop)
        return float(jnp.sum(obj.subject_ofv(theta, state.eta, pop)))
