"""Flow guides that start where the other guides start.

NumPyro's ``AutoIAFNormal`` and ``AutoBNAFNormal`` push a standard normal through the flows and
ignore ``init_loc_fn``: every latent starts near 0 in the unconstrained space. For NLME models the
population parameters sit far from 0 (``log V`` about 3.5 for theophylline), and the flows then
spend thousands of steps, or get stuck in a poor local optimum, before they even find the
posterior's location. These subclasses add one elementwise affine layer after the flows,
``x = loc + scale * flow(z)``, with ``loc`` initialised at the init strategy's values (prior
medians or ``init=``) and ``scale`` at ``init_scale``: the same family of distributions (an affine
map of a flow is a flow), started where the Gaussian guides start.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import AffineTransform
from numpyro.infer import autoguide

__all__ = ["LocatedBNAF", "LocatedIAF"]


class _Located:
    """Mixin: append a learnable affine layer initialised at the initial latent values."""

    init_scale: float

    def _get_posterior(self):
        flow = super()._get_posterior()
        loc = numpyro.param(f"{self.prefix}_loc", self._init_latent)
        scale = numpyro.param(f"{self.prefix}_scale", jnp.full(self.latent_dim, self.init_scale),
                              constraint=constraints.softplus_positive)
        return dist.TransformedDistribution(flow.base_dist, [*flow.transforms, AffineTransform(loc, scale)])


class LocatedIAF(_Located, autoguide.AutoIAFNormal):
    """``AutoIAFNormal`` followed by an affine layer started at the initial values."""

    def __init__(self, model, *, init_scale: float = 0.1, **kwargs):
        self.init_scale = float(init_scale)
        super().__init__(model, **kwargs)


class LocatedBNAF(_Located, autoguide.AutoBNAFNormal):
    """``AutoBNAFNormal`` followed by an affine layer started at the initial values."""

    def __init__(self, model, *, init_scale: float = 0.1, **kwargs):
        self.init_scale = float(init_scale)
        super().__init__(model, **kwargs)
