"""Early stopping on a validation split of subjects: a regulariser for flexible random-effect distributions.

Maximum likelihood of a flexible random-effect distribution (a normalizing flow, a Gaussian whose
mean and covariance are networks of covariates) can concentrate its mass near the training
subjects' random effects: the training OFV keeps falling while the fit to new subjects gets worse
(the nonparametric maximum-likelihood estimate of a mixing distribution is discrete; Lindsay B,
Ann Stat 1983;11:86-94). Early stopping (Prechelt L, "Early stopping - but when?", Neural
Networks: Tricks of the Trade, 1998) holds out a share of the subjects, fits the others, and keeps
the iterate with the lowest OFV of the held-out subjects (the same method's approximation of
``-2 log p(y_i | theta)``, EBEs searched from 0 as in `nlmegen.objective`).

The optimiser runs once, to ``maxiter``, and the held-out OFV is evaluated afterwards along its
recorded path (every ``every`` accepted iterations and at the end): restarting the optimiser in
chunks would lose the EBE warm starts, which for multimodal random-effect densities changes which
mode each subject's search finds and makes consecutive chunks inconsistent.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pandas as pd

__all__ = ["EarlyStopping", "fit_early_stopping"]


@dataclass
class EarlyStopping:
    """The result of `fit_early_stopping`.

    Attributes
    ----------
    fit
        A `FitResult` on the training subjects at the kept parameters (all held fixed: its status
        is that of an objective evaluation; ``fit.params`` and ``fit.ebes`` are the kept estimates).
    values
        The kept population parameters, as `nlmegen.fit`'s ``init``/``fixed`` take them.
    full_fit
        The fit run to ``maxiter`` on the training subjects.
    curve
        One row per evaluated iterate: ``step`` (accepted optimiser steps), ``train_ofv``,
        ``validation_ofv``.
    best_step
        The accepted steps of the kept iterate.
    train_ids, validation_ids
        The subjects of each part.
    seconds
        Wall time of the validation evaluations.
    """

    fit: Any
    values: dict
    full_fit: Any
    curve: pd.DataFrame
    best_step: int
    train_ids: list
    validation_ids: list
    seconds: float


def fit_early_stopping(model, pop, method, *, key, validation: float = 0.2, every: int = 5,
                       init: Mapping | None = None, fixed: Mapping | None = None) -> EarlyStopping:
    """Fit on a random share of the subjects; keep the iterate where the others' OFV is lowest.

    Parameters
    ----------
    model, pop
        As for `nlmegen.fit`.
    method
        A conditional-estimation backend object (`nlmegen.FOCEI`, `nlmegen.FOCE`,
        `nlmegen.Laplace`); its ``maxiter`` bounds the path. No covariance step is run.
    key
        PRNG key of the split.
    validation
        Share of the subjects held out (at least one subject is held out, at least one kept).
    every
        Evaluate the held-out OFV every this many accepted steps (Adam and BFGS steps alike).
    init, fixed
        Starting and fixed values, as for `nlmegen.fit`.

    Returns
    -------
    EarlyStopping
        The kept parameters and their fit, the whole fit, the validation curve and the split.
    """
    from ..model import discover
    from ._fit import fit as fit_model
    from .shared.start import starting_point

    if not 0.0 < validation < 1.0:
        raise ValueError(f"validation must be a share of the subjects in (0, 1), not {validation!r}")
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, not {every!r}")
    if not (dataclasses.is_dataclass(method) and hasattr(method, "maxiter") and hasattr(method, "objective_for")):
        raise TypeError(f"method must be a conditional-estimation backend object (nlmegen.FOCEI(...), FOCE, "
                        f"Laplace), not {method!r}")
    ids = list(pop.ids)
    if len(ids) < 2:
        raise ValueError("early stopping needs at least two subjects (one to fit, one to validate)")
    n_val = min(len(ids) - 1, max(1, math.floor(validation * len(ids) + 0.5)))
    held = set(np.asarray(jax.random.permutation(key, len(ids)))[:n_val].tolist())
    validation_ids = [sid for i, sid in enumerate(ids) if i in held]
    train_ids = [sid for i, sid in enumerate(ids) if i not in held]
    train, valid = pop.subset(train_ids), pop.subset(validation_ids)
    fixed = dict(fixed or {})

    full = fit_model(model, train, dataclasses.replace(method, covariance="none"), init=init, fixed=fixed)
    start = time.perf_counter()
    density, _, _, theta0, labels, free = starting_point(model, valid, discover(model, valid), init, fixed)
    free_labels = [lab for lab, f in zip(labels, free, strict=True) if f]
    objective = method.objective_for(density)
    eta0 = jnp.zeros((valid.n_subjects, objective.n_eta))

    @jax.jit
    def validation_ofv(theta):
        return jnp.sum(objective.subject_ofv(theta, objective.ebe(theta, eta0, valid).eta, valid))

    history = full.history
    steps = np.arange(1, len(history) + 1)
    keep = np.flatnonzero((steps % every == 0) | (steps == len(history)))
    rows, best = [], None
    with numpyro.validation_enabled(False):
        for i in keep:
            theta = np.array(theta0, dtype=float)
            theta[free] = history.iloc[i][free_labels].to_numpy(float)
            value = float(validation_ofv(jnp.asarray(theta)))
            rows.append({"step": int(steps[i]), "train_ofv": float(history.iloc[i]["ofv"]), "validation_ofv": value})
            if np.isfinite(value) and (best is None or value < best[0]):
                best = (value, theta, int(steps[i]))
    if best is None:
        raise FloatingPointError("early stopping: the validation OFV was not finite at any evaluated iterate")
    values = {name: v for name, v in density.theta_space.constrain(jnp.asarray(best[1])).items() if name not in fixed}
    seconds = time.perf_counter() - start
    kept = fit_model(model, train, dataclasses.replace(method, covariance="none"), fixed=values | fixed)
    return EarlyStopping(kept, values, full, pd.DataFrame(rows), best[2], train_ids, validation_ids, seconds)
