"""nlmegen's NUTS against the hand-written NumPyro model, side by side in one process (issue 16).

Usage: python benchmarks/nuts_overhead.py [--warmup 500] [--samples 500] [--chains 4] [--seeds 3]
       [--label after]

Measures, on theo_sd (12 subjects) with the same data and priors:

1. one gradient of the potential energy (unconstrained, non-centred random effects), both models
   through `numpyro.infer.util.initialize_model`: compile time and the best of 5 x 2,000 calls;
2. full runs, alternating the two samplers seed by seed (same warm-up, draws, chains, chain
   method "vectorized"; nlmegen through ``nlmegen.NUTS``, the hand-written model through
   ``numpyro.infer.MCMC``): compile + run time as each reports it, leapfrog steps per draw, min
   bulk ESS over the population parameters (ArviZ), ESS per second and the ratio nlmegen / hand.

Writes ``benchmarks/results/nuts_overhead.json`` (runs under ``--label`` kept side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

POP_SITES = ("tka", "tcl", "tv", "omega", "add_sd")


def _min_ess(draws: dict, chains: int, samples: int) -> float:
    import arviz as az
    import numpy as np

    ess = []
    for name in POP_SITES:
        x = np.asarray(draws[name]).reshape(chains, samples, -1)
        ess.extend(np.atleast_1d(az.ess(x, chain_axis=0, draw_axis=1)).tolist())
    return float(min(ess))


def gradient_cost(pop, data) -> dict:
    import jax
    import numpyro_nuts as hand
    from numpyro import handlers
    from numpyro.infer.reparam import LocScaleReparam
    from numpyro.infer.util import initialize_model

    import nlmegen

    ours = handlers.reparam(nlmegen.examples.theo_model, config={"eta": LocScaleReparam(centered=0)})
    out = {}
    for name, model, args in (("nlmegen", ours, (pop,)), ("hand", hand.model, data)):
        info = initialize_model(jax.random.key(0), model, model_args=args)
        z = info.param_info.z
        start = time.perf_counter()
        f = jax.jit(jax.value_and_grad(info.potential_fn)).lower(z).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(f(z))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(2000):
                r = f(z)
            jax.block_until_ready(r)
            best = min(best, (time.perf_counter() - start) / 2000)
        out[name] = {"compile_s": compile_s, "value_and_grad_us": best * 1e6, "potential": float(f(z)[0])}
    return out


def run_ours(pop, warmup, samples, chains, seed) -> dict:
    import jax
    import numpy as np

    import nlmegen

    start = time.perf_counter()
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, nlmegen.NUTS(
        num_warmup=warmup, num_samples=samples, num_chains=chains, chain_method="vectorized", progress=False),
        key=jax.random.key(seed))
    wall = time.perf_counter() - start
    t = fit.timings
    ess = _min_ess(fit.draws, chains, samples)
    return {"seed": seed, "run_s": t["run_s"], "compile_s": t["compile_s"], "fit_wall_s": wall,
            "ess_bulk_min": ess, "ess_per_s": ess / t["run_s"],
            "steps_per_draw": float(np.mean(fit.draws["n_steps"])),
            "divergences": int(np.sum(fit.draws["diverging"]))}


def run_hand(data, warmup, samples, chains, seed) -> dict:
    import jax
    import numpy as np
    import numpyro_nuts as hand
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(hand.model), num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method="vectorized", progress_bar=False)
    start = time.perf_counter()
    mcmc.run(jax.random.key(seed), *data, extra_fields=("num_steps",))
    run_s = time.perf_counter() - start
    ess = _min_ess(mcmc.get_samples(group_by_chain=True), chains, samples)
    extra = mcmc.get_extra_fields()
    return {"seed": seed, "run_s": run_s, "ess_bulk_min": ess, "ess_per_s": ess / run_s,
            "steps_per_draw": float(np.mean(np.asarray(extra["num_steps"]))),
            "divergences": int(np.sum(np.asarray(extra["diverging"])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label", default="after")
    args = parser.parse_args()

    import _design
    import jax
    import numpyro_nuts as hand
    import pandas as pd

    import nlmegen

    csv = _design.theo_sd()
    table = pd.read_csv(csv)
    pop = nlmegen.read_nonmem(table.drop(columns=[c for c in ("DOSE",) if c in table]))
    data = hand.padded(str(csv))
    grads = gradient_cost(pop, data)
    print(json.dumps(grads), flush=True)
    ours, ref = [], []
    for seed in range(args.seeds):  # alternate, so that machine load affects both alike
        ours.append(run_ours(pop, args.warmup, args.samples, args.chains, seed))
        ref.append(run_hand(data, args.warmup, args.samples, args.chains, seed))
        print(json.dumps({"nlmegen": ours[-1], "hand": ref[-1]}), flush=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    summary = {"ess_per_s": {"nlmegen": med(ours, "ess_per_s"), "hand": med(ref, "ess_per_s")},
               "run_s": {"nlmegen": med(ours, "run_s"), "hand": med(ref, "run_s")},
               "ess_bulk_min": {"nlmegen": med(ours, "ess_bulk_min"), "hand": med(ref, "ess_bulk_min")},
               "steps_per_draw": {"nlmegen": med(ours, "steps_per_draw"), "hand": med(ref, "steps_per_draw")}}
    # the ratio of the medians over seeds, and the median of the per-seed ratios
    summary["ratio_of_medians"] = summary["ess_per_s"]["nlmegen"] / summary["ess_per_s"]["hand"]
    summary["median_ratio"] = statistics.median(a["ess_per_s"] / b["ess_per_s"] for a, b in zip(ours, ref, strict=True))
    record = {"settings": vars(args), "gradient": grads, "nlmegen": ours, "hand": ref, "summary": summary,
              "machine": {"cpus": __import__("os").cpu_count(), "jax": jax.__version__,
                          "nlmegen": nlmegen.__version__},
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = HERE / "results" / "nuts_overhead.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[args.label] = record
    path.write_text(json.dumps(stored, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
