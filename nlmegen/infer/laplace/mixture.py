"""Mixture models (`nlmegen.mixture`) in FOCEI/FOCE/Laplace: NONMEM's ``$MIX`` objective.

For subject i and class k the model with ``z_i = k`` is an ordinary model; its Laplace (FOCEI, ...)
approximation at its own conditional mode ``eta_ik*`` gives ``OFV_ik = -2 log p(y_i, z_i = k)`` (the
class's prior probability ``p_ik`` is part of the joint density, so of ``OFV_ik``). The subject's
objective is the mixture

    OFV_i = -2 log sum_k exp(-OFV_ik / 2) = -2 log sum_k p_ik L_ik,

and its posterior class probabilities are ``softmax_k(-OFV_ik / 2)`` (NONMEM Users Guide VII,
"Mixture models"; NONMEM's MIXEST picks the most probable class).

The classes' random effects are stacked into one vector per subject, ``[eta_i0, eta_i1, ...]``: the
classes' EBE searches are independent (the stacked Hessian is block diagonal), the implicit-function
gradients go through each, and the backend's warm starts and BFGS need no change. The result
reports each subject at its most probable class (EBEs, IPRED, shrinkage) and the posterior class
probabilities in ``fit.classes``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import Array

from ..._errors import ModelError
from ...model import Density
from .backend import _predict, _Problem
from .objective import EBEState, Objective

__all__ = ["MixtureObjective", "MixtureProblem", "class_table"]


@dataclass(frozen=True)
class MixtureObjective:
    """The mixture OFV of one model and method: one `Objective` per class on stacked random effects."""

    density: Density
    method: str = "focei"
    max_iter: int = 100
    gtol: float = 1e-8

    @property
    def n_classes(self) -> int:
        return self.density.sites.mixtures[0].size

    @property
    def d(self) -> int:
        return self.density.sites.n_eta

    @property
    def n_eta(self) -> int:
        return self.n_classes * self.d

    def part(self, k) -> Objective:
        """The objective of class ``k`` (an int, or ``[subj]`` ints for each subject's own class)."""
        return Objective(dataclasses.replace(self.density, classes=k), self.method, self.max_iter, self.gtol)

    def _split(self, eta: Array) -> list[Array]:
        return [eta[:, k * self.d:(k + 1) * self.d] for k in range(self.n_classes)]

    @staticmethod
    def _combine(states: list[EBEState]) -> EBEState:
        return EBEState(jnp.concatenate([s.eta for s in states], axis=1),
                        functools.reduce(jnp.logical_and, [s.converged for s in states]),
                        functools.reduce(jnp.maximum, [s.grad_norm for s in states]),
                        functools.reduce(jnp.maximum, [s.iterations for s in states]))

    def ebe(self, theta: Array, eta0: Array, pop) -> EBEState:
        return self._combine([self.part(k).ebe(theta, e, pop) for k, e in enumerate(self._split(eta0))])

    def ebe_implicit(self, theta: Array, eta0: Array, pop) -> tuple[Array, EBEState]:
        pieces = [self.part(k).ebe_implicit(theta, e, pop) for k, e in enumerate(self._split(eta0))]
        return jnp.concatenate([p[0] for p in pieces], axis=1), self._combine([p[1] for p in pieces])

    def class_ofv(self, theta: Array, eta: Array, pop) -> Array:
        """``OFV_ik = -2 log p(y_i, z_i = k)`` (Laplace-approximated), ``[subj, K]``."""
        return jnp.stack([self.part(k).subject_ofv(theta, e, pop) for k, e in enumerate(self._split(eta))], axis=1)

    def subject_ofv(self, theta: Array, eta: Array, pop) -> Array:
        """``-2 log sum_k p_ik L_ik`` per subject, ``[subj]``."""
        return -2.0 * jax.nn.logsumexp(-0.5 * self.class_ofv(theta, eta, pop), axis=1)

    def posterior(self, theta: Array, eta: Array, pop) -> Array:
        """Each subject's posterior class probabilities, ``[subj, K]``."""
        return jax.nn.softmax(-0.5 * self.class_ofv(theta, eta, pop), axis=1)

    def n_observations(self, pop) -> int:
        return self.part(0).n_observations(pop)


class MixtureProblem(_Problem):
    """A Laplace-family fit of a mixture model: the backend's `_Problem` on the mixture objective."""

    ode_warm_start = False  # no joint mode (below): not by default for ODE models either

    def __init__(self, backend, model, pop, density, theta0, free, labels, fixed_names):
        if backend.method == "fo":
            raise ModelError("FO linearises one model at eta = 0; a mixture model (nlmegen.mixture) needs each "
                             "class's EBEs: use FOCEI, FOCE or Laplace")
        super().__init__(backend, model, pop, density, theta0, free, labels, fixed_names)
        self.objective = MixtureObjective(density, backend.method, backend.ebe_max_iter, backend.ebe_gtol)
        self.eta = jnp.zeros((pop.n_subjects, self.objective.n_eta))

    def resolve_engine(self) -> str:
        if self.backend.engine == "reverse":
            raise ModelError("mixture models (nlmegen.mixture) use the forward engine; leave engine='auto'")
        return "forward"

    def joint_start(self, x0: np.ndarray, steps: int, bar) -> np.ndarray:
        self.warnings.append("mixture model: no joint-mode warm start (each class has its own modes)")
        return x0

    def boundary_restart(self, fun, res, x_start: np.ndarray):
        return None  # its test reads one class's random effects; not defined for stacked classes

    def build_result(self, x_hat, ofv, ebe, status, message, cov, timings):
        """The result at each subject's most probable class, with ``classes`` (posterior probabilities)."""
        from .finish import build_result

        theta = jnp.asarray(self.full(np.asarray(x_hat)))
        probs = np.asarray(jax.jit(self.objective.posterior)(theta, self.eta, self.pop))
        best = np.argmax(probs, axis=1)
        stacked = np.asarray(self.eta).reshape(self.pop.n_subjects, self.objective.n_classes, -1)
        view = copy.copy(self)
        view.density = dataclasses.replace(self.density, classes=jnp.asarray(best))
        view.objective = Objective(view.density, self.backend.method, self.backend.ebe_max_iter,
                                   self.backend.ebe_gtol)
        view.eta = jnp.asarray(stacked[np.arange(self.pop.n_subjects), best])
        view.fns = {"predict": jax.jit(functools.partial(_predict, view.objective))}
        state = ebe._replace(eta=view.eta)
        result = build_result(view, x_hat, ofv, state, status, message, cov, timings)
        return dataclasses.replace(result, classes=class_table(self.density, self.pop, probs))


def class_table(density: Density, pop, probs: np.ndarray) -> pd.DataFrame:
    """Posterior probability of each class per subject (``p(<site>=k)``) and the most probable class."""
    name = density.sites.mixtures[0].name
    frame = pd.DataFrame({f"p({name}={k})": probs[:, k] for k in range(probs.shape[1])},
                         index=pd.Index(list(pop.ids), name="ID"))
    frame["class"] = np.argmax(probs, axis=1)
    return frame
