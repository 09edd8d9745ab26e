"""The Dask engine: a local cluster of 2 worker processes gives the local executor's results."""

import os

import jax
import numpy as np
import pandas as pd
import pytest

import nlmegen

distributed = pytest.importorskip("distributed")


def test_bootstrap_on_two_dask_workers_matches_local(tmp_path):
    import numpyro
    import numpyro.distributions as dist

    def model(pop):  # defined here, so it travels to the workers by value (cloudpickle); small to compile
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        omega = numpyro.sample("omega", dist.HalfNormal(1.0))
        sd = numpyro.sample("sd", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            nlmegen.observe("y", nlmegen.additive(mu + eta[:, None] + 0.0 * pop.times, sd), pop)

    rng = np.random.default_rng(1)
    eta = np.repeat(rng.normal(0, 0.5, 10), 3)
    table = pd.DataFrame({"ID": np.repeat(np.arange(1, 11), 3), "TIME": np.tile([1.0, 2.0, 3.0], 10),
                          "DV": 2.0 + eta + rng.normal(0, 0.3, 30)})
    fit = nlmegen.fit(model, nlmegen.read_nonmem(table), progress=False)
    local = nlmegen.bootstrap(fit, n=4, key=jax.random.key(7))
    cache = tmp_path / "jax-cache"
    client = nlmegen.parallel.dask_client(n_workers=2, cache=cache)
    try:
        remote = nlmegen.bootstrap(fit, n=4, key=jax.random.key(7), executor=client)
        where = client.run(lambda: (os.getpid(), jax.config.jax_compilation_cache_dir))
    finally:
        client.close()
        client.cluster.close()
    assert local.counts == remote.counts == {"converged": 4}
    np.testing.assert_allclose(remote.estimates.to_numpy(), local.estimates.to_numpy(), rtol=1e-7)
    np.testing.assert_array_equal(remote.indices, local.indices)
    # two worker processes, each compiling into its own cache directory, never a shared one
    dirs = {d for _, d in where.values()}
    assert len({pid for pid, _ in where.values()}) == 2 and len(dirs) == 2
    assert all(os.path.dirname(d) == str(cache) for d in dirs)
    assert all(len(os.listdir(d)) > 0 for d in dirs)  # and both did compile (into their own)
