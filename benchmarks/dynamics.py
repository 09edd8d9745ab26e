"""Compile and warm-run times of the dynamics: the IDR ODE (diffrax) and closed-form one-compartment PK.

Usage: python benchmarks/dynamics.py [--quick] [--out benchmarks/results/dynamics.json]

Figures: compile time (``jit(...).lower(...).compile()``) and the median warm time of several calls,
for a batched forward solve and the gradient of a scalar loss w.r.t. 8 population parameters
(reverse mode), at 60 and 1,000 subjects (4 oral doses, 22 observations each); and the same for
closed-form ``pk.one_cmt`` (Theoph design, 1,000 subjects).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import nlmegen
from nlmegen.examples import idr_population, idr_rhs

NAMES = ("ka", "cl", "vc", "kin", "kout", "smax", "sc50", "n")
LOG_TRUTH = jnp.log(jnp.array([1.0, 2.0, 20.0, 10.0, 0.5, 2.0, 1.0, 1.5]))


def timed(fn, *args, repeats: int) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "run_s": statistics.median(runs), "repeats": repeats}


def idr_case(n_subjects: int, repeats: int) -> dict:
    pop = nlmegen.read_nonmem(idr_population(n_subjects), allow_missing_dv=True)

    def outputs(log_theta, pop):
        p = {k: jnp.full(pop.n_subjects, jnp.exp(v)) for k, v in zip(NAMES, log_theta, strict=True)}
        y0 = lambda p: jnp.stack([0.0 * p["kin"], 0.0 * p["kin"], p["kin"] / p["kout"]])  # noqa: E731
        return nlmegen.ode.solve(idr_rhs, pop, p, y0=y0)

    def loss(log_theta, pop):
        states = outputs(log_theta, pop)
        return jnp.sum(jnp.where(pop.mask[..., None], states, 0.0) ** 2)

    # pop as a jit argument: one executable serves any data of this shape, but the event grid must
    # then cover every event kind (steady state included); pop closed over: the grid is pruned to
    # the events present, which compiles faster.
    return {"forward": timed(lambda t: outputs(t, pop), LOG_TRUTH, repeats=repeats),
            "gradient": timed(jax.grad(lambda t: loss(t, pop)), LOG_TRUTH, repeats=repeats),
            "forward_pop_traced": timed(outputs, LOG_TRUTH, pop, repeats=repeats),
            "gradient_pop_traced": timed(jax.grad(loss), LOG_TRUTH, pop, repeats=repeats),
            "n_subjects": n_subjects, "n_obs": pop.n_obs, "n_doses": pop.n_doses}


def closed_form_case(n_subjects: int, repeats: int) -> dict:
    times = [0.25, 0.5, 1, 2, 3.5, 5, 7, 9, 12, 24]
    rows = []
    for i in range(1, n_subjects + 1):
        rows.append({"ID": i, "TIME": 0.0, "DV": 0.0, "AMT": 320.0, "EVID": 1})
        rows += [{"ID": i, "TIME": float(t), "DV": 1.0, "AMT": 0.0, "EVID": 0} for t in [0.0, *times]]
    import pandas as pd

    pop = nlmegen.read_nonmem(pd.DataFrame(rows))
    key = jax.random.key(0)
    eta = 0.3 * jax.random.normal(key, (n_subjects, 3))

    def conc(eta, pop):
        return nlmegen.pk.one_cmt(pop, ka=jnp.exp(0.45 + eta[:, 0]), cl=jnp.exp(1.0 + eta[:, 1]),
                                  v=jnp.exp(3.45 + eta[:, 2]))

    def loss(eta, pop):
        return jnp.sum(jnp.where(pop.mask, conc(eta, pop), 0.0) ** 2)

    return {"forward": timed(conc, eta, pop, repeats=repeats), "gradient": timed(jax.grad(loss), eta, pop,
                                                                                 repeats=repeats),
            "n_subjects": n_subjects, "n_obs": pop.n_obs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 60 subjects only for the ODE")
    parser.add_argument("--out", default="benchmarks/results/dynamics.json")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    sizes = (60,) if args.quick else (60, 1000)
    result = {"machine": {"platform": platform.platform(), "cpus": jax.device_count(),
                          "device": str(jax.devices()[0]), "python": platform.python_version()},
              "versions": {"jax": jax.__version__, "nlmegen": nlmegen.__version__,
                           "diffrax": __import__("diffrax").__version__},
              "idr_ode": {str(n): idr_case(n, repeats) for n in sizes},
              "one_cmt_closed_form": {"1000": closed_form_case(1000, repeats)}}
    print("| case | subjects | compile forward (s) | warm forward (ms) | compile gradient (s) | warm gradient (ms) |")
    print("|---|---|---|---|---|---|")
    for case in ("idr_ode", "one_cmt_closed_form"):
        for n, r in result[case].items():
            for suffix in ("", "_pop_traced"):
                if "forward" + suffix not in r:
                    continue
                fwd, grad = r["forward" + suffix], r["gradient" + suffix]
                print(f"| {case}{suffix.replace('_', ' ')} | {n} | {fwd['compile_s']:.2f} | {1e3 * fwd['run_s']:.1f} | "
                      f"{grad['compile_s']:.2f} | {1e3 * grad['run_s']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
