"""The subject plate: the one place a model says "this is per subject"."""

from __future__ import annotations

import numpyro

__all__ = ["SUBJECT_PLATE", "subjects"]

SUBJECT_PLATE = "subjects"


def subjects(pop) -> numpyro.plate:
    """The subject plate of ``pop`` (name ``"subjects"``, the rightmost batch dimension).

    Latent sample sites inside it are random effects (one value per subject); latent sites and
    ``numpyro.param`` sites outside it are population parameters; observed sites (see
    :func:`nlmegen.observe`) belong inside it.

    Examples
    --------
    >>> import numpyro, numpyro.distributions as dist, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> def model(pop):
    ...     with nlmegen.subjects(pop):
    ...         eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
    >>> with numpyro.handlers.seed(rng_seed=0):
    ...     with numpyro.handlers.trace() as tr:
    ...         model(pop)
    >>> tr["eta"]["value"].shape
    (12,)
    """
    return numpyro.plate(SUBJECT_PLATE, pop.n_subjects, dim=-1)
