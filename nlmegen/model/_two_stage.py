"""The two-stage route: a flow fitted to the random effects of a fitted (Gaussian) NLME model.

Stage 1 fits an ordinary model; stage 2 fits a flowjax distribution by maximum likelihood to
draws of each subject's random effects, ``eta_i^(k) ~ p(eta_i | y_i, theta_hat)``: the EBE plus
``chol(ebe_cov_i) z`` (the Laplace approximation of the conditional distribution) for
maximum-likelihood fits, the posterior draws for NUTS and SVI fits. Pooled over subjects these
draws follow the population distribution of eta when the stage-1 fit is good (the "aggregate
posterior"), whereas the EBEs alone are shrunk towards the mode. The trained flow then goes into
the model through :func:`nlmegen.flow` (with :func:`nlmegen.flow_values` as its weights) for
simulation, or as the start of a joint refit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import ModelError

__all__ = ["eta_draws", "fit_flow"]


def eta_draws(fit, *, key, n: int = 20, columns: Sequence[str] | None = None) -> np.ndarray:
    """Draws of every subject's random effects from a fit, ``[n, subj, n_eta]`` (unconstrained).

    Parameters
    ----------
    fit
        A `FitResult`. With posterior ``draws`` of the random-effect site (NUTS, SVI), ``n`` of
        those (evenly spaced); otherwise ``ebes + chol(ebe_cov) z``.
    key
        PRNG key.
    n
        Draws per subject.
    columns
        Columns of ``fit.ebes`` to keep (default all).

    Examples
    --------
    >>> import jax, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> fit = nlmegen.fit(nlmegen.examples.theo_model, pop, covariance="none", progress=False)
    >>> nlmegen.eta_draws(fit, key=jax.random.key(0), n=5).shape
    (5, 12, 3)
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    names = list(fit.ebes.columns)
    keep = list(range(len(names))) if columns is None else [_column(names, c) for c in columns]
    random = _random_site_draws(fit)
    if random is not None:
        flat = random.reshape(-1, *random.shape[2:])
        idx = np.linspace(0, flat.shape[0] - 1, n).round().astype(int)
        return np.asarray(flat[idx])[..., keep]
    mean = np.asarray(fit.ebes.to_numpy(), dtype=float)
    cov = np.asarray(fit.ebe_cov, dtype=float)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2)) + 1e-10 * np.eye(cov.shape[-1])
    chol = np.linalg.cholesky(cov)
    z = np.asarray(jax.random.normal(key, (n,) + mean.shape))
    draws = mean[None] + np.einsum("skl,nsl->nsk", chol, z)
    return draws[..., keep]


def _column(names: list[str], c: str) -> int:
    if c not in names:
        raise ModelError(f"no random-effect column {c!r}; the fit has {names}")
    return names.index(c)


def _random_site_draws(fit) -> np.ndarray | None:
    """``[chain, draw, subj, n_eta]`` posterior draws of the fit's random effects, or None."""
    if fit.draws is None:
        return None
    names = [c.split("[")[0] for c in fit.ebes.columns]
    sites = list(dict.fromkeys(names))
    parts = []
    for site in sites:
        if site not in fit.draws:
            return None
        x = np.asarray(fit.draws[site], dtype=float)
        parts.append(x.reshape(x.shape[:3] + (-1,)))
    return np.concatenate(parts, axis=-1)


def fit_flow(samples, module, *, key, condition=None, steps: int = 2000, learning_rate: float = 5e-3,
             batch_size: int | None = 256, weight_decay: float = 0.0):
    """Fit a flowjax distribution to samples by maximum likelihood (Adam); returns the trained module.

    Parameters
    ----------
    samples
        ``[..., d]`` random-effect draws (e.g. :func:`eta_draws`, ``[n, subj, d]``).
    module
        The flowjax distribution to train (its weights are the start): :func:`nlmegen.spline_flow`,
        :class:`nlmegen.CovariateGaussian`, any ``flowjax.flows`` flow.
    key
        PRNG key (mini-batches).
    condition
        ``[subj, c]`` covariates of a conditional flow, broadcast against ``samples``' leading axes.
    steps, learning_rate, batch_size, weight_decay
        Adam steps (full-batch when ``batch_size`` is None or larger than the data), its rate, the
        mini-batch size, and decoupled weight decay (AdamW) as a regulariser.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, nlmegen
    >>> x = jnp.concatenate([jnp.full((300, 1), -2.0), jnp.full((700, 1), 2.0)]) + 0.3 * jax.random.normal(
    ...     jax.random.key(0), (1000, 1))
    >>> f = nlmegen.fit_flow(x, nlmegen.spline_flow(1, key=jax.random.key(1)), key=jax.random.key(2), steps=500)
    >>> round(float(jnp.mean(f.sample(jax.random.key(3), (2000,)) < 0)), 1)
    0.3
    """
    import equinox as eqx
    import paramax

    x = jnp.asarray(samples, dtype=float)
    if x.ndim < 2 or x.shape[-1:] != tuple(module.shape):
        raise ModelError(f"samples have shape {x.shape}; the flow is over vectors of shape {module.shape}")
    if module.cond_shape is not None:
        if condition is None:
            raise ModelError("the flow is conditional: pass condition=<[subj, c] covariates>")
        c = jnp.asarray(condition, dtype=float)
        c = jnp.broadcast_to(c, x.shape[:-1] + c.shape[-1:]).reshape(-1, c.shape[-1])
    elif condition is not None:
        raise ModelError("condition given, but the flow is unconditional (build it with cond_dim=...)")
    else:
        c = None
    x = x.reshape(-1, x.shape[-1])
    ok = np.all(np.isfinite(np.asarray(x)), axis=1)
    x = x[ok]
    c = None if c is None else c[ok]
    n = x.shape[0]
    batch = n if batch_size is None or batch_size >= n else int(batch_size)
    params, static = eqx.partition(module, eqx.is_inexact_array,
                                   is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable))
    opt = optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)

    def loss(p, xb, cb):
        return -jnp.mean(eqx.combine(p, static).log_prob(xb, cb))

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, state = carry
            idx = jax.random.choice(k, n, (batch,), replace=False) if batch < n else jnp.arange(n)
            value, grad = jax.value_and_grad(loss)(p, x[idx], None if c is None else c[idx])
            updates, state = opt.update(grad, state, p)
            return (optax.apply_updates(p, updates), state), value

        (p, _), values = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        return p, values

    trained, losses = run(params, key)
    if not np.isfinite(np.asarray(losses[-1])):
        raise FloatingPointError(f"fit_flow: the loss is not finite after {steps} steps; lower learning_rate "
                                 f"(now {learning_rate:g})")
    return eqx.combine(trained, static)
