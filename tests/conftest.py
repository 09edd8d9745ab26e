"""Test configuration: float64 everywhere (estimation needs it), CPU, a reproducible key fixture."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pytest-xdist (the default run has 2 workers, see pyproject.toml): one compilation cache directory per
# worker, since processes writing one cache directory at once are not safe
from nlmegen._jaxsetup import cache_dir  # noqa: E402  (does not import JAX)

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and cache_dir() is not None:
    os.environ["NLMEGEN_CACHE_DIR"] = f"{cache_dir()}-{_WORKER}"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop the compiled programs it left in memory (JAX's caches and the
    Laplace backend's): the whole suite in one process otherwise accumulates several hundred of them,
    and late compilations crashed inside XLA (segfault/abort) although each module passes alone."""
    yield
    import gc

    from nlmegen.infer.laplace import backend
    from nlmegen.infer.shared import joint
    from nlmegen.parallel import _tasks

    backend._CACHE.clear()
    joint._CACHE.clear()
    _tasks._OFV_CACHE.clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def key():
    """A fresh, fixed PRNG key for each test."""
    return jax.random.key(0)


@pytest.fixture(scope="session")
def simulated_theo():
    """Factory: ``copies`` x the theo_sd design (12 subjects each) with DV simulated from the theo model."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    import pandas as pd

    import nlmegen

    def make(copies: int, truth: dict, seed: int):
        table = nlmegen.datasets.load("theo_sd")
        pop = nlmegen.read_nonmem(pd.concat([table.assign(ID=table["ID"] + 100 * k) for k in range(copies)],
                                            ignore_index=True))
        dv = nlmegen.simulate_arrays(nlmegen.examples.theo_model, truth, pop, key=jax.random.key(seed))[0]
        return dataclasses.replace(pop, dv=jnp.asarray(np.nan_to_num(dv)))

    return make
