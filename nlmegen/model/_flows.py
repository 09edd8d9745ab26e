"""Data-driven random-effect distributions: normalizing flows and covariate-dependent Gaussians.

A random-effect distribution is one line inside the subject plate::

    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", nlmegen.flow("eta_dist", flow, condition=x))

``flow`` is any `flowjax` distribution (an equinox module): an unconditional or conditional
normalizing flow from ``flowjax.flows``, the helper :func:`spline_flow`, or
:class:`CovariateGaussian` (``N(mu(x), L(x) L(x)')`` with ``mu`` and ``L`` one network of the
covariates ``x``). Its trainable arrays become one population site of the model:

- ``prior=None``: a ``numpyro.param`` site ``"<name>$params"`` (a dict of arrays keyed by their
  path in the module), estimated as points by the maximum-likelihood backends exactly like the
  weights of `nlmegen.nn` (the reverse-mode engine of FOCEI/Laplace, Adam steps in SAEM).
- ``prior=s`` (a positive scale): a sample site ``"<name>$weights"`` with the flat weight vector
  ``w ~ Normal(w0, s)`` centred at the module's initial weights ``w0`` (a Bayesian flow for NUTS
  and SVI; centring at a random initialisation, not at zero, keeps the networks' symmetry broken).

flowjax is used, not NumPyro's own flow transforms, because its flows take a conditioning input
(``cond_dim``) and are plain equinox pytrees whose arrays can be swapped in and out (Ward D.,
FlowJAX, https://github.com/danielward27/flowjax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import paramax
from flowjax.distributions import AbstractDistribution
from flowjax.distributions import Normal as _FlowNormal
from jax import Array
from numpyro.distributions import constraints

from .._errors import ModelError

__all__ = ["CovariateGaussian", "FlowDistribution", "flow", "flow_values", "spline_flow"]


class FlowDistribution(dist.Distribution):
    """A flowjax distribution as a NumPyro distribution over real vectors.

    Parameters
    ----------
    flow
        A ``flowjax.distributions.AbstractDistribution`` with a one-dimensional ``shape`` ``(d,)``.
    condition
        ``[..., c]`` conditioning inputs for a conditional flow (``flow.cond_shape == (c,)``); its
        leading axes are the batch shape (one subject per row inside the subject plate).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    pytree_data_fields = ("flow", "condition")

    def __init__(self, flow: AbstractDistribution, condition: Array | None = None, *, validate_args=None):
        if len(flow.shape) != 1:
            raise ModelError(f"a random-effect flow must be over vectors (shape (d,)), not shape {flow.shape}")
        batch_shape: tuple = ()
        if flow.cond_shape is not None:
            if condition is None:
                raise ModelError(f"this flow is conditional (condition of shape {flow.cond_shape}); pass "
                                 "condition=<[subj, c] covariates>")
            condition = jnp.asarray(condition, dtype=float)
            if condition.ndim == 1 and flow.cond_shape == (1,):
                condition = condition[:, None]
            if tuple(condition.shape[-1:]) != tuple(flow.cond_shape):
                raise ModelError(f"condition has shape {condition.shape}; the flow expects [..., "
                                 f"{flow.cond_shape[0]}] (cond_dim)")
            batch_shape = tuple(condition.shape[:-1])
        elif condition is not None:
            raise ModelError("condition given, but the flow is unconditional (build it with cond_dim=...)")
        self.flow = flow
        self.condition = condition
        super().__init__(batch_shape=batch_shape, event_shape=tuple(flow.shape), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        if self.condition is None:
            return self.flow.sample(key, tuple(sample_shape) + self.batch_shape)
        return self.flow.sample(key, tuple(sample_shape), condition=self.condition)

    def log_prob(self, value):
        return self.flow.log_prob(value, self.condition)


class CovariateGaussian(AbstractDistribution):
    """``N(mu(x), L(x) L(x)')``: a Gaussian whose mean and Cholesky factor are one network of ``x``.

    A flowjax distribution (so :func:`flow` and :func:`nlmegen.fit_flow` take it like a flow).
    ``cov="full"`` gives a full ``L(x)`` (positive diagonal by ``softplus``), ``"diag"`` a diagonal
    one, ``"fixed"`` a covariance that does not depend on ``x``.

    Parameters
    ----------
    dim, cond_dim
        Dimensions of the random effects and of the covariates.
    key
        PRNG key of the network's initial weights.
    hidden
        Widths of the hidden layers (``tanh``).
    cov
        ``"full"``, ``"diag"`` or ``"fixed"``.
    init_scale
        Initial standard deviation of each random effect (the network starts near ``N(0, s^2 I)``).
    """

    shape: tuple[int, ...]
    cond_shape: tuple[int, ...] | None
    net: eqx.nn.MLP
    tril: Array  # [d, d] the x-independent Cholesky factor's raw values (``cov="fixed"``)
    cov: str = eqx.field(static=True)

    def __init__(self, dim: int, cond_dim: int, *, key, hidden: Sequence[int] = (16,), cov: str = "full",
                 init_scale: float = 1.0):
        if cov not in ("full", "diag", "fixed"):
            raise ValueError(f"cov must be 'full', 'diag' or 'fixed', not {cov!r}")
        if dim < 1 or cond_dim < 1:
            raise ValueError(f"dim and cond_dim must be positive, not {dim} and {cond_dim}")
        n_out = dim + {"full": dim * (dim + 1) // 2, "diag": dim, "fixed": 0}[cov]
        hidden = tuple(int(h) for h in hidden)
        net = eqx.nn.MLP(cond_dim, n_out, width_size=hidden[0] if hidden else 1, depth=len(hidden),
                         activation=jnp.tanh, key=key)
        # a small last layer: the network starts near mu = 0 and L = init_scale * I for every x
        last = net.layers[-1]
        raw_diag = float(np.log(np.expm1(init_scale)))
        bias = jnp.zeros(n_out).at[dim:].set(0.0)
        if cov != "fixed":
            diag_idx = _diag_positions(dim, cov)
            bias = bias.at[dim + diag_idx].set(raw_diag)
        net = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), net, (0.01 * last.weight, bias))
        self.net = net
        self.tril = jnp.eye(dim) * raw_diag
        self.shape = (int(dim),)
        self.cond_shape = (int(cond_dim),)
        self.cov = cov

    def mean_and_tril(self, condition: Array) -> tuple[Array, Array]:
        """``mu(x)`` and ``L(x)`` for one covariate vector ``x``."""
        d = self.shape[0]
        out = self.net(condition)
        mu = out[:d]
        if self.cov == "fixed":
            raw = self.tril
        elif self.cov == "diag":
            raw = jnp.diag(out[d:])
        else:
            rows, cols = np.tril_indices(d)
            raw = jnp.zeros((d, d)).at[rows, cols].set(out[d:])
        tril = jnp.tril(raw, -1) + jnp.diag(jax.nn.softplus(jnp.diag(raw)) + 1e-6)
        return mu, tril

    def _log_prob(self, x, condition=None):
        mu, tril = self.mean_and_tril(condition)
        z = jax.scipy.linalg.solve_triangular(tril, x - mu, lower=True)
        d = self.shape[0]
        return -0.5 * jnp.sum(z**2) - jnp.sum(jnp.log(jnp.diag(tril))) - 0.5 * d * math.log(2 * math.pi)

    def _sample(self, key, condition=None):
        mu, tril = self.mean_and_tril(condition)
        return mu + tril @ jax.random.normal(key, self.shape)


def _diag_positions(dim: int, cov: str) -> np.ndarray:
    if cov == "diag":
        return np.arange(dim)
    rows, cols = np.tril_indices(dim)
    return np.flatnonzero(rows == cols)


def spline_flow(dim: int, *, key, cond_dim: int | None = None, layers: int = 2, knots: int = 8,
                interval: float = 4.0, width: int = 16, depth: int = 1) -> AbstractDistribution:
    """A masked autoregressive rational-quadratic spline flow over ``R^dim`` (flowjax).

    The base is ``N(0, I)``; inside ``[-interval, interval]`` each layer is a monotone spline
    whose knots are a network of the preceding coordinates (and of the condition), outside it the
    identity (Gaussian tails). Good for bimodal and curved random-effect densities.

    Parameters
    ----------
    dim
        Number of random effects.
    key
        PRNG key of the initial weights.
    cond_dim
        Number of conditioning covariates (None: unconditional).
    layers, knots, interval, width, depth
        Flow layers, spline knots, spline interval, conditioner width and depth.

    Examples
    --------
    >>> import jax, nlmegen
    >>> f = nlmegen.spline_flow(2, key=jax.random.key(0))
    >>> f.sample(jax.random.key(1), (3,)).shape
    (3, 2)
    """
    from flowjax.bijections import RationalQuadraticSpline
    from flowjax.flows import masked_autoregressive_flow

    return masked_autoregressive_flow(key, base_dist=_FlowNormal(jnp.zeros(int(dim))),
                                      transformer=RationalQuadraticSpline(knots=int(knots), interval=float(interval)),
                                      cond_dim=cond_dim, flow_layers=int(layers), nn_width=int(width),
                                      nn_depth=int(depth))


# --------------------------------------------------------------------------- weights as sites
def _partition(module) -> tuple[Any, Any]:
    """Trainable arrays and the rest of a flowjax module (flowjax's own `fit_to_data` split)."""
    return eqx.partition(module, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable))


def _paths(params) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def flow_values(name: str, module) -> dict[str, Any]:
    """``{"<name>$params": weights}``: a flow's weights as the population value :func:`flow` takes.

    Use it to plug a trained flow (e.g. from :func:`nlmegen.fit_flow`) into a model as the value of
    its flow site: in ``fit(..., fixed=...)``, ``init=...`` or the parameter dict of `simulate`.
    """
    params, _ = _partition(module)
    leaves = jax.tree_util.tree_leaves(params)
    return {f"{name}$params": dict(zip(_paths(params), leaves, strict=True))}


def flow(name: str, module: AbstractDistribution, *, condition: Array | None = None,
         prior: float | None = None) -> FlowDistribution:
    """Register a flowjax distribution's weights in the model and return it as a NumPyro distribution.

    Call it inside the model, before the subject plate, and give the result to the random-effect
    site: ``numpyro.sample("eta", d)`` inside ``nlmegen.subjects(pop)`` (weights without a prior may
    also be registered inside the plate).

    Parameters
    ----------
    name
        Prefix of the weight site: ``"<name>$params"`` (point estimates) or ``"<name>$weights"``
        (``prior`` given).
    module
        A flowjax distribution over ``R^d``: :func:`spline_flow`, any ``flowjax.flows`` flow, or
        :class:`CovariateGaussian`. Its weights at the call are the starting values.
    condition
        ``[subj, c]`` covariates of a conditional flow (e.g. ``pop.covariates`` columns).
    prior
        None: the weights are population parameters estimated as points (maximum-likelihood
        backends; SVI and NUTS need them fixed). A positive scale ``s``: Bayesian weights
        ``Normal(w0, s)`` around the initial weights ``w0`` (NUTS and SVI sample them).

    Returns
    -------
    FlowDistribution
        ``log_prob`` and ``sample`` for NumPyro (so `simulate`, VPCs and posterior predictive
        checks draw new subjects from it).

    Examples
    --------
    >>> import jax, numpyro, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> f = nlmegen.spline_flow(2, key=jax.random.key(0))
    >>> def model(pop):
    ...     with nlmegen.subjects(pop):
    ...         return numpyro.sample("eta", nlmegen.flow("eta_dist", f))
    >>> with numpyro.handlers.seed(rng_seed=0):
    ...     model(pop).shape
    (12, 2)
    """
    if not isinstance(module, AbstractDistribution):
        raise ModelError(f"nlmegen.flow({name!r}): expected a flowjax distribution (e.g. nlmegen.spline_flow(...) "
                         f"or nlmegen.CovariateGaussian(...)), not {type(module).__name__}")
    params, static = _partition(module)
    leaves, tree = jax.tree_util.tree_flatten(params)
    if prior is None:
        value = numpyro.param(f"{name}$params", dict(zip(_paths(params), leaves, strict=True)))
        leaves = [value[p] for p in _paths(params)]
    else:
        if not (np.ndim(prior) == 0 and float(prior) > 0):
            raise ModelError(f"nlmegen.flow({name!r}): prior must be a positive scale, not {prior!r}")
        if _inside_plate():
            raise ModelError(f"nlmegen.flow({name!r}, prior=...): call it outside the subject plate (its weights are "
                             "population parameters; use the returned distribution inside the plate)")
        flat0 = jnp.concatenate([jnp.ravel(x) for x in leaves])
        flat = numpyro.sample(f"{name}$weights", dist.Normal(flat0, float(prior)).to_event(1))
        leaves = _split(flat, [x.shape for x in leaves])
    module = eqx.combine(jax.tree_util.tree_unflatten(tree, leaves), static)
    return FlowDistribution(module, condition)


def _inside_plate() -> bool:
    from numpyro.primitives import _PYRO_STACK

    return any(isinstance(h, numpyro.plate) for h in _PYRO_STACK)


def _split(flat: Array, shapes) -> list[Array]:
    out, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[..., start:start + n].reshape(flat.shape[:-1] + tuple(shape)))
        start += n
    return out
