"""The Dask engine: a local cluster of 2 worker processes gives the local executor's results."""

import os

import jax
import numpy as np
import pytest

import nlmegen

distributed = pytest.importorskip("distributed")


def test_bootstrap_on_two_dask_workers_matches_local(tmp_path):
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
    local = nlmegen.bootstrap(fit, n=4, key=jax.random.key(7))
    cache = tmp_path / "jax-cache"
    client = nlmegen.parallel.dask_client(n_workers=2, cache=cache)
    try:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and len({w["host"] + str(w.get("pid", w["id"])) for w in workers.values()}) == 2
        remote = nlmegen.bootstrap(fit, n=4, key=jax.random.key(7), executor=client)
        where = client.run(lambda: (os.getpid(), jax.config.jax_compilation_cache_dir))
    finally:
        client.close()
        client.cluster.close()
    assert remote.counts == {"converged": 4}
    np.testing.assert_allclose(remote.estimates.to_numpy(), local.estimates.to_numpy(), rtol=1e-7)
    np.testing.assert_array_equal(remote.indices, local.indices)
    # each worker process compiles into its own cache directory, never a shared one
    dirs = {d for _, d in where.values()}
    assert len({pid for pid, _ in where.values()}) == 2 and len(dirs) == 2
    assert all(os.path.dirname(d) == str(cache) for d in dirs)
    assert all(len(os.listdir(d)) > 0 for d in dirs)  # and both did compile (into their own)
