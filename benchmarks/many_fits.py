"""Bootstrap, SIR and multistart of the theo_sd FOCEI fit: wall times, locally and on Dask workers.

Usage: NLMEGEN_CACHE_DIR=0 python benchmarks/many_fits.py [--boot 200] [--sir 1000 200] [--starts 10]
                                                            [--workers 2] [--out benchmarks/results/many_fits.json]

Runs in one process: the fit, then each method with the local executor (in this process, one task
after another), then the bootstrap again on a Dask `LocalCluster` of ``--workers`` worker processes
(each with its own compilation cache, empty: the time includes every worker's compilation). Writes
the times and the intervals next to the sandwich intervals to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

import nlmegen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--sir", type=int, nargs=2, default=(1000, 200))
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/many_fits.json")
    args = ap.parse_args()
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    t = time.perf_counter()
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
    out["fit_s"] = time.perf_counter() - t
    sandwich = fit.summary()[["estimate", "SE", "CI95_lower", "CI95_upper"]]
    out["sandwich"] = sandwich.to_dict(orient="index")

    t = time.perf_counter()
    boot = nlmegen.bootstrap(fit, n=args.boot, key=jax.random.key(1))
    out["bootstrap"] = {"n": args.boot, "seconds_local": time.perf_counter() - t, "counts": boot.counts,
                        "median_replicate_s": float(boot.seconds.median()),
                        "summary": boot.summary().to_dict(orient="index")}
    print(boot, flush=True)

    t = time.perf_counter()
    res = nlmegen.sir(fit, samples=args.sir[0], resamples=args.sir[1], key=jax.random.key(2))
    d = res.diagnostics.iloc[-1]
    out["sir"] = {"samples": args.sir[0], "resamples": args.sir[1], "seconds_local": time.perf_counter() - t,
                  "ess": float(d["ess"]), "max_weight": float(d["max_weight"]), "failed": int(d["failed"]),
                  "dofv_quantiles": res.dofv_quantiles().to_dict(orient="index"),
                  "summary": res.summary().to_dict(orient="index")}
    print(res, flush=True)

    t = time.perf_counter()
    ms = nlmegen.multistart(fit, n=args.starts, key=jax.random.key(3))
    out["multistart"] = {"n": args.starts, "seconds_local": time.perf_counter() - t,
                         "best_ofv": ms.best_ofv, "original_ofv": fit.ofv,
                         "spread": {k: float(v) for k, v in ms.spread.items()},
                         "statuses": ms.table["status"].value_counts().to_dict()}
    print(ms, flush=True)

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        client = nlmegen.parallel.dask_client(n_workers=args.workers, cache=cache)
        started = time.perf_counter() - t
        try:
            t = time.perf_counter()
            remote = nlmegen.bootstrap(fit, n=args.boot, key=jax.random.key(1), executor=client)
            first = time.perf_counter() - t
            t = time.perf_counter()
            nlmegen.bootstrap(fit, n=args.boot, key=jax.random.key(1), executor=client)
            second = time.perf_counter() - t
        finally:
            client.close()
            client.cluster.close()
    same = float(np.nanmax(np.abs(remote.estimates.to_numpy() - boot.estimates.to_numpy())))
    out["bootstrap_dask"] = {"workers": args.workers, "cluster_start_s": started, "seconds_first": first,
                             "seconds_warm_workers": second, "max_abs_difference_to_local": same}
    print(json.dumps(out["bootstrap_dask"], indent=1))
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
