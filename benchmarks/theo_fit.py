"""theo_sd FOCEI fit: compile time, warm fit time, covariance step, estimates next to nlmixr2.

Usage: python benchmarks/theo_fit.py [--repeats N] [--out benchmarks/results/theo_fit.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import nlmegen

NLMIXR2 = {"ofv": 116.8044, "tka": 0.464, "tcl": 1.01, "tv": 3.46, "add_sd": 0.693,
           "omega2": [0.404, 0.0694, 0.0191]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/theo_fit.json")
    args = parser.parse_args()
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    start = time.perf_counter()
    first = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
    first_total = time.perf_counter() - start
    warm, warm_cov = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False, covariance="none")
        warm.append(time.perf_counter() - start)
        start = time.perf_counter()
        nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
        warm_cov.append(time.perf_counter() - start)
    result = {
        "first_fit_total_s": first_total, "first_fit_timings": first.timings,
        "warm_fit_no_covariance_s": statistics.median(warm), "warm_fit_with_covariance_s": statistics.median(warm_cov),
        "ofv": first.ofv, "estimates": {k: np.asarray(v).tolist() for k, v in first.params.items()},
        "omega2": (np.asarray(first.params["omega"]) ** 2).tolist(), "nlmixr2": NLMIXR2,
        "status": first.status, "n_evaluations": first.timings.get("n_evaluations"),
    }
    print(f"| OFV | {first.ofv:.4f} | nlmixr2 {NLMIXR2['ofv']} |")
    for name in ("tka", "tcl", "tv", "add_sd"):
        print(f"| {name} | {float(first.params[name]):.4f} | nlmixr2 {NLMIXR2[name]} |")
    print(f"| omega^2 | {np.round(result['omega2'], 4).tolist()} | nlmixr2 {NLMIXR2['omega2']} |")
    print(f"first fit: compile {first.timings['compile_s']:.2f} s, run {first.timings['run_s']:.3f} s, "
          f"covariance {first.timings['covariance_s']:.2f} s (incl. its compile), total {first_total:.2f} s")
    print(f"warm fit: {result['warm_fit_no_covariance_s']:.3f} s without, "
          f"{result['warm_fit_with_covariance_s']:.3f} s with the covariance step (median of {args.repeats})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
