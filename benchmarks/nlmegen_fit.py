"""One nlmegen fit in a fresh process, for the benchmark runner (benchmarks/run.py).

Usage: python benchmarks/nlmegen_fit.py --model {theo,idr} --csv FILE --method {focei,saem,nuts}
       [--repeats N] [--covariance {sandwich,none}] [--warmup W --samples S --chains C]

Prints one JSON line: compile and warm run times (the first fit's compile, then the median of
``repeats`` further fits from the same starting values), estimates, -2LL (with the N log 2 pi
constant), peak resident memory, and the time from interpreter start to the estimates.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402

import numpy as np  # noqa: E402


def _estimates(fit) -> dict:
    out = {}
    for name, value in fit.params.items():
        value = np.asarray(value, dtype=float)
        out[name] = value.tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("theo", "idr"), required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--method", default="focei")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--covariance", default="sandwich")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--chains", type=int, default=4)
    args = parser.parse_args()

    import jax
    import pandas as pd

    import nlmegen

    t_import = time.perf_counter() - _T0
    table = pd.read_csv(args.csv)
    pop = nlmegen.read_nonmem(table.drop(columns=[c for c in ("DOSE",) if c in table]))
    model = {"theo": nlmegen.examples.theo_model, "idr": nlmegen.examples.idr_model}[args.model]
    if args.method in ("focei", "foce", "laplace"):
        settings = {"progress": False, "covariance": args.covariance}
    elif args.method == "nuts":
        settings = {"progress": False, "num_warmup": args.warmup, "num_samples": args.samples,
                    "num_chains": args.chains}
    else:  # SAEM: estimates and the importance-sampling -2LL, as pynlme's nlmefitsa(LogLikMethod="is")
        settings = {"progress": False, "covariance": "none", "focei": False}
        if args.model == "idr":  # 14 parameters through an ODE: Fisher-information M-step (no exact Hessian)
            settings["hessian"] = "fisher"
    key = jax.random.key(0)

    start = time.perf_counter()
    fit = nlmegen.fit(model, pop, args.method, key=key, **settings)
    first_s = time.perf_counter() - start
    to_estimates_s = time.perf_counter() - _T0
    runs = []
    for r in range(args.repeats):
        start = time.perf_counter()
        nlmegen.fit(model, pop, args.method, key=jax.random.key(r + 1) if args.method != "focei" else key, **settings)
        runs.append(time.perf_counter() - start)
    out = {
        "ok": True, "method": args.method, "status": fit.status, "n_subjects": pop.n_subjects,
        "n_obs": fit.n_obs, "estimates": _estimates(fit), "ofv": fit.ofv,
        "m2ll": -2.0 * fit.loglik if np.isfinite(fit.loglik) else None,
        "timings": {k: float(v) for k, v in fit.timings.items() if isinstance(v, (int, float))},
        "first_fit_s": first_s, "warm_fit_s": runs,
        # with --repeats 0: the first fit without its compile time (marked by warm_fit_from_first)
        "warm_fit_median_s": statistics.median(runs) if runs else first_s - fit.timings.get("compile_s", 0.0),
        "warm_fit_from_first": not runs,
        "import_s": t_import, "process_to_estimates_s": to_estimates_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "versions": {"nlmegen": nlmegen.__version__, "jax": jax.__version__},
        "message": fit.message[:300],
    }
    if fit.draws is not None:
        summary = fit.summary()
        out["ess_bulk_min"] = float(np.nanmin(summary["ess_bulk"].to_numpy(dtype=float)))
        out["r_hat_max"] = float(np.nanmax(summary["r_hat"].to_numpy(dtype=float)))
        out["divergences"] = int(np.sum(fit.draws.get("diverging", 0)))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
