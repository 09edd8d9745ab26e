"""Neural-network terms in a model: one helper over `numpyro.contrib.module`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from numpyro.contrib.module import nnx_module, random_nnx_module

__all__ = ["nn"]


def nn(name: str, module: Any, *, prior: Any = None) -> Callable[..., Any]:
    """Register a flax NNX module in the model and return it as a plain function.

    Parameters
    ----------
    name
        Site name prefix of the weights (``"<name>$params"`` for point estimates).
    module
        An initialised ``flax.nnx.Module``.
    prior
        ``None``: the weights are population parameters estimated as points (a ``numpyro.param``
        site; maximum-likelihood backends optimise them, SVI fits them). A distribution, or a dict
        of distributions keyed by parameter path, makes the weights random (Bayesian NN: NUTS and
        SVI sample them).

    Returns
    -------
    callable
        ``f(*inputs)`` evaluating the network with the model's current weights; call it anywhere,
        e.g. inside an ODE right-hand side (the solver does not know it is neural).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro
    >>> from flax import nnx
    >>> import nlmegen
    >>> mlp = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> def model():
    ...     f = nlmegen.nn("effect", mlp)
    ...     return f(jnp.ones(2))
    >>> with numpyro.handlers.seed(rng_seed=0):
    ...     model().shape
    (1,)
    """
    if prior is None:
        return nnx_module(name, module)
    return random_nnx_module(name, module, prior)
