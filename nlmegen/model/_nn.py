"""Neural-network terms in a model: one helper over `numpyro.contrib.module`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from numpyro.contrib.module import nnx_module, random_nnx_module
from numpyro.primitives import Messenger

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
    with _fresh_containers(site=f"{name}$params"):
        return random_nnx_module(name, module, prior)


class _fresh_containers(Messenger):
    """Give the value of the param site ``site`` new dict containers (same arrays).

    NumPyro's ``random_nnx_module`` replaces the leaves of its param site's value in place with
    shape placeholders. Under ``substitute``/``condition`` that value is the caller's dict (weights
    held by ``fixed=``, a fit's start values), which would be left unusable after the first run of
    the model.
    """

    def __init__(self, fn=None, site: str = ""):
        self.site = site
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] == "param" and msg["name"] == self.site:
            msg["value"] = jax.tree_util.tree_map(lambda x: x, msg["value"])
