"""The usual covariate relations as multiplicative factors on a typical value, each 1 at its centre.

``TV(P) = theta_P * factor(x)``: every form is centred so that the factor is 1 for a subject at the
reference (``x = ref``, or the reference category), so ``theta_P`` keeps its meaning, the typical
value of a reference subject, whichever relations a model includes. Centre continuous covariates on
a value inside the data (PsN's SCM uses the median; allometric weight models use 70 kg): centring
far outside the data makes ``theta_P`` an extrapolation and correlates it with the coefficient.

References: PsN SCM user guide (Lindbom, Karlsson, Jonsson; relations "linear", "exponential",
"power", categorical "linear"); Holford NHG, Clin Pharmacokinet 1996;30:329-332 (allometry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

__all__ = ["categorical", "exponential", "linear", "power"]


def power(x: ArrayLike, ref: float, exponent: ArrayLike) -> Array:
    """``(x / ref) ** exponent``: 1 at ``x = ref``. Allometric weight: ``power(WT, 70, 0.75)`` on CL,
    ``power(WT, 70, 1)`` on V (Holford 1996); ``x`` and ``ref`` must be positive.

    Examples
    --------
    >>> import nlmegen
    >>> float(nlmegen.covariates.power(140.0, 70.0, 0.75))  # twice the weight: 2^0.75 times the CL
    1.681792830507429
    """
    return (jnp.asarray(x) / ref) ** exponent


def exponential(x: ArrayLike, ref: float, theta: ArrayLike) -> Array:
    """``exp(theta (x - ref))``: 1 at ``x = ref``, positive for every ``theta`` (PsN "exponential").

    Examples
    --------
    >>> import nlmegen
    >>> round(float(nlmegen.covariates.exponential(50.0, 40.0, 0.01)), 4)  # +1% per year above 40
    1.1052
    """
    return jnp.exp(theta * (jnp.asarray(x) - ref))


def linear(x: ArrayLike, ref: float, theta: ArrayLike) -> Array:
    """``1 + theta (x - ref)``: 1 at ``x = ref`` (PsN "linear"). Negative for large ``|theta|``: bound
    ``theta`` to ``(-1 / (max x - ref), 1 / (ref - min x))`` (`Relation` does) so the typical value
    stays positive over the data.

    Examples
    --------
    >>> import nlmegen
    >>> float(nlmegen.covariates.linear(30.0, 40.0, 0.02))  # 20% lower 10 years below the centre
    0.8
    """
    return 1.0 + theta * (jnp.asarray(x) - ref)


def categorical(x: ArrayLike, theta: ArrayLike, levels: Sequence[Any], reference: Any) -> Array:
    """``exp(theta_k)`` for a subject in category ``levels[k]``; 1 in the ``reference`` category.

    ``theta`` has one element per level other than the reference, in the order of ``levels`` with
    the reference left out. ``exp(theta_k) = 1 + theta'_k``: PsN's categorical "linear" factor
    ``1 + theta'`` in a parameterisation that stays positive. ``x`` holds the level values as they
    are in the data (text covariates: their codes, see ``pop.categories``).

    Examples
    --------
    >>> import jax.numpy as jnp, nlmegen
    >>> f = nlmegen.covariates.categorical(jnp.array([0, 1, 1]), jnp.array([0.2]), levels=(0, 1), reference=0)
    >>> [round(float(v), 4) for v in f]
    [1.0, 1.2214, 1.2214]
    """
    x = jnp.asarray(x)
    others = [level for level in levels if level != reference]
    theta = jnp.atleast_1d(jnp.asarray(theta))
    if theta.shape[-1] != len(others):
        raise ValueError(f"categorical: {len(others)} non-reference levels {others} but theta has "
                         f"{theta.shape[-1]} elements")
    log_factor = jnp.zeros(x.shape)
    for k, level in enumerate(others):
        log_factor = log_factor + jnp.where(x == level, theta[..., k], 0.0)
    return jnp.exp(log_factor)
