"""Small fits of every iterative backend, shared by the interruption tests and the cross-process
determinism check (run as a script it prints one digest per backend)."""

import hashlib
import sys

import jax
import numpy as np

import nlmegen

MODEL = nlmegen.examples.theo_model


def population(n: int = 6):
    theo = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    return theo.subset(theo.ids[:n])


def backends() -> dict:
    """Backend objects small enough for the default test run (a few seconds each once compiled)."""
    return {
        "focei": nlmegen.FOCEI(progress=False, covariance="none"),
        "saem": nlmegen.SAEM(n_explore=30, n_smooth=20, n_conditional=10, is_draws=200, focei=False,
                             covariance="none", progress=False, chunk=10),
        "nuts": nlmegen.NUTS(num_warmup=40, num_samples=40, num_chains=2, progress=False),
        "svi": nlmegen.SVI(num_steps=200, num_draws=40, progress=False, chunk_size=40),
    }


def digest(fit) -> str:
    """A hash of everything estimated: unconstrained estimate, OFV, draws (bit for bit)."""
    h = hashlib.sha256()
    h.update(np.asarray(fit.theta, dtype=np.float64).tobytes())
    h.update(np.float64(fit.ofv).tobytes())
    for name in sorted(fit.draws or {}):
        h.update(name.encode())
        h.update(np.ascontiguousarray(fit.draws[name]).tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    pop = population(4)
    for name in sys.argv[1:]:
        fit = nlmegen.fit(MODEL, pop, backends()[name], key=jax.random.key(11))
        print(name, digest(fit), flush=True)
