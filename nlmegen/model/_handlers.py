"""nlmegen's own NumPyro effect handlers (few, small, NumPyro style)."""

from __future__ import annotations

from numpyro.primitives import Messenger

from ._observe import OBSERVE_TAG

__all__ = ["resample_observed"]


class resample_observed(Messenger):  # noqa: N801  (NumPyro's handler naming)
    """Treat the sites declared with :func:`nlmegen.observe` as unobserved, so they are sampled.

    This is the generative use of a fitted model: the same program that scores data simulates it.

    Examples
    --------
    >>> import jax, numpyro, numpyro.distributions as dist, jax.numpy as jnp, nlmegen
    >>> from nlmegen.model import resample_observed
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> def model(pop):
    ...     with nlmegen.subjects(pop):
    ...         nlmegen.observe("y", dist.Normal(jnp.zeros(pop.dv.shape), 1.0), pop)
    >>> with numpyro.handlers.seed(rng_seed=1), numpyro.handlers.trace() as tr:
    ...     resample_observed(model)(pop)
    >>> bool((tr["y"]["value"] == pop.dv).all())
    False
    """

    def process_message(self, msg):
        if msg["type"] == "sample" and (msg.get("infer") or {}).get(OBSERVE_TAG):
            msg["value"] = None
            msg["is_observed"] = False
