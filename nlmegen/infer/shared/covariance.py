"""Covariance step: R (observed information), S (outer product of subject scores), sandwich.

With LL the log-likelihood (OFV = -2 LL - const): ``R = -d^2 LL / d theta^2 = 1/2 d^2 OFV``,
``S = sum_i s_i s_i'`` with ``s_i = d LL_i / d theta = -1/2 d OFV_i / d theta``. The covariance of
the estimates is ``R^-1 S R^-1`` (sandwich, NONMEM's default $COV), ``R^-1`` or ``S^-1``
(NONMEM Users Guide Part II, $COVARIANCE; Kauermann & Carroll, JASA 2001). R is built by central
differences of the exact (implicit-function) gradient, as NONMEM does, so it reuses the compiled
objective; S from per-subject gradients by forward mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["CovarianceStep", "covariance_step", "delta_method", "unidentified"]

KINDS = ("sandwich", "R", "S", "none")


class CovarianceStep(NamedTuple):
    """Covariance of the free unconstrained parameters and how it was obtained."""

    covariance: np.ndarray | None
    kind: str
    r: np.ndarray | None
    s: np.ndarray | None
    warnings: tuple[str, ...]


def central_hessian(grad: Callable[[np.ndarray], np.ndarray], x: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """Hessian by central differences of an exact gradient, symmetrised."""
    n = x.size
    h = np.empty((n, n))
    for k in range(n):
        dx = step * max(1.0, abs(float(x[k])))
        e = np.zeros(n)
        e[k] = dx
        h[:, k] = (grad(x + e) - grad(x - e)) / (2 * dx)
    return 0.5 * (h + h.T)


def _weakest(matrix: np.ndarray, names: list[str]) -> str:
    vals, vecs = np.linalg.eigh(matrix)
    return f"{_involved(vecs[:, 0], names)} (smallest eigenvalue {vals[0]:.3g})"


def _involved(direction: np.ndarray, names: list[str]) -> str:
    """The parameters that make up a direction (weight at least a third of the largest)."""
    weight = np.abs(direction)
    picked = [names[k] for k in np.flatnonzero(weight >= weight.max() / 3)]
    return picked[0] if len(picked) == 1 else f"{picked} together"


def unidentified(subject_grads: np.ndarray, names: list[str], rtol: float = 1e-9) -> list[str] | None:
    """Parameters the data cannot tell apart, from the per-subject OFV gradients ``[subj, p]``.

    Along a direction the likelihood does not depend on (two parameters entering only through
    their sum, a parameter the model never uses) every subject's gradient is zero, so the outer
    product ``S = G'G`` is singular. Returns the parameters of its weakest direction when its
    eigenvalue is below ``rtol`` times the largest, else None; None also when there are not more
    subjects than parameters (S is then singular anyway) or the gradients are not finite.
    """
    g = np.asarray(subject_grads, dtype=float)
    if g.ndim != 2 or g.shape[1] == 0 or g.shape[0] <= g.shape[1] or not np.all(np.isfinite(g)):
        return None
    vals, vecs = np.linalg.eigh(g.T @ g)
    if vals[-1] <= 0 or vals[0] > rtol * vals[-1]:
        return None
    weight = np.abs(vecs[:, 0])
    return [names[k] for k in np.flatnonzero(weight >= weight.max() / 3)]


def _inverse(matrix: np.ndarray) -> np.ndarray | None:
    """The inverse of a positive definite ``matrix``; None when it is not (or is singular to working
    precision: a Cholesky factor can pass with a rounding-size pivot where the LU of `inv` meets an
    exact zero, e.g. S = G'G with two parameters whose subject gradients are identical)."""
    try:
        np.linalg.cholesky(matrix)
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        return None


def covariance_step(
    ofv_grad: Callable[[np.ndarray], np.ndarray],
    subject_ofv_grads: Callable[[np.ndarray], np.ndarray],
    theta: np.ndarray,
    names: list[str],
    kind: str = "sandwich",
) -> CovarianceStep:
    """R, S and the requested covariance at the estimate ``theta`` (free, unconstrained).

    ``ofv_grad(theta) -> [p]`` is the gradient of the total OFV; ``subject_ofv_grads(theta) ->
    [subj, p]`` the per-subject gradients. When R is not positive definite the parameter that
    dominates its weakest direction is named and S-based errors are reported instead.
    """
    if kind not in KINDS:
        raise ValueError(f"covariance must be one of {KINDS}, not {kind!r}")
    if kind == "none" or theta.size == 0:
        return CovarianceStep(None, "none", None, None, ())
    warnings: list[str] = []
    r = 0.5 * central_hessian(ofv_grad, theta)
    scores = -0.5 * np.asarray(subject_ofv_grads(theta))
    s = scores.T @ scores
    r_inv = _inverse(r)
    s_inv = _inverse(s)
    if r_inv is None:
        warnings.append("R matrix (Hessian of the objective) is not positive definite: check "
                        f"{_weakest(r, names)}; reporting S-based standard errors")
        kind = "S"
    if kind == "S" and s_inv is None:
        warnings.append(f"S matrix is singular: check {_weakest(s, names)}; no standard errors")
        return CovarianceStep(None, "none", r, s, tuple(warnings))
    cov = {"sandwich": lambda: r_inv @ s @ r_inv, "R": lambda: r_inv, "S": lambda: s_inv}[kind]()
    return CovarianceStep(0.5 * (cov + cov.T), kind, r, s, tuple(warnings))


def delta_method(jacobian: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """Covariance of ``g(theta)`` from that of ``theta``: ``J C J'``."""
    return jacobian @ covariance @ jacobian.T
