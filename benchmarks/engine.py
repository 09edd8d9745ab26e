"""The estimation engine on ODE and neural-network models (issue "ODE and neural-network models that fit
in minutes"): compile and warm times of the FOCEI objective + gradient, and whole fits.

Usage: python benchmarks/engine.py [--quick] [--cases a,b,...] [--out benchmarks/results/engine.json]

Cases (60 subjects of the seeds' IDR design, data simulated from the Hill model; 2 CPU cores):
- ``idr_fit``: the IDR (Hill) model fitted by FOCEI from the priors' medians on the data of
  `benchmarks/run.py`, with the reverse engine, twice (the first fit compiles, the second is the
  warm fit), and, with ``--forward``, with the forward engine (the scheme before the reverse engine);
- ``gradient``: one OFV + gradient (warm EBEs) for the Hill model, the 1-16-16-1 MLP drug effect
  with all ~330 parameters free, and the same with the network's weights fixed (9 free); with
  ``--forward`` also by the forward engine;
- ``deepnlme_fit``: DeepNLME (MLP of concentration and one extra random effect, ~40 free
  parameters) fitted by FOCEI to convergence;
- ``deepnlme_saem``: the same model by SAEM (Newton M-step for the parameters, Adam for the weights);
- ``ude_fit``: one subject on 36 dosing regimens (dose x interval x number of doses; no random
  effects, 36 pseudo-subjects), the UDE with a 1-8-8-1 MLP in place of the Hill term, fitted to
  convergence (the seeds' "neural ODE vs UDE" training problem).
Figures go to stdout and to the JSON file, with compile and run time apart. The process runs without
nlmegen's persistent compilation cache (``NLMEGEN_CACHE_DIR=0``, set here): compile times are those of
a first fit on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("NLMEGEN_CACHE_DIR", "0")  # before JAX is imported: every compilation counted

import jax  # noqa: E402
import numpy as np
from flax import nnx

import nlmegen
from nlmegen.examples import IDR_TRUTH, idr_model, idr_nn_model
from nlmegen.infer.laplace.backend import _Problem

RESULTS = Path(__file__).parent / "results"
NN_INIT = {"log_ka": 0.0, "log_cl": 0.7, "log_vc": 3.0, "log_kin": 2.3, "log_kout": -0.7, "sigma_conc": 0.1,
           "sigma_resp": 1.0}


def study(n_subjects: int):
    """The IDR study of `benchmarks/run.py` (same CSV file, same seed)."""
    from _design import idr_design

    return nlmegen.read_nonmem(idr_design(n_subjects))


def nn_init(model) -> dict:
    return {**NN_INIT, "omega": np.full(2, 0.3), "effect$params": nnx.to_pure_dict(nnx.state(model.net, nnx.Param))}


def fit_case(model, pop, init, engine: str, maxiter: int = 1000) -> dict:
    start = time.perf_counter()
    backend = nlmegen.FOCEI(engine=engine, covariance="none", progress=False, maxiter=maxiter)
    fit = nlmegen.fit(model, pop, method=backend, init=init)
    total = time.perf_counter() - start
    out = {"engine": engine, "status": fit.status, "message": fit.message, "ofv": float(fit.ofv),
           "compile_s": fit.timings["compile_s"], "run_s": fit.timings["run_s"],
           "n_evaluations": fit.timings["n_evaluations"], "end_to_end_s": total,
           "n_free": int(sum(np.size(v) for v in jax.tree.leaves(fit.estimates)))}
    print(f"  {engine:8s} {fit.status:14s} OFV {fit.ofv:.4f}  compile {out['compile_s']:.1f} s  "
          f"run {out['run_s']:.1f} s  ({out['n_evaluations']:.0f} evaluations)  end to end {total:.1f} s", flush=True)
    return out


def gradient_case(model, pop, init, fixed, engine: str, repeats: int) -> dict:
    problem = _Problem.build(nlmegen.FOCEI(engine=engine, progress=False), model, pop, init, fixed)
    start = time.perf_counter()
    problem.compile()
    compile_s = time.perf_counter() - start
    x = problem.theta0[problem.free]
    problem.evaluate(x)  # EBEs found once: the timed calls start from them (as in a fit)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        problem.evaluate(x)
        runs.append(time.perf_counter() - start)
    out = {"engine": problem.engine, "n_free": int(problem.free.sum()), "compile_s": compile_s,
           "run_s": statistics.median(runs)}
    print(f"  {problem.engine:8s} {out['n_free']:4d} free  compile {compile_s:.1f} s  "
          f"OFV+gradient {out['run_s']:.3f} s",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 subjects instead of 60")
    parser.add_argument("--forward", action="store_true", help="also fit the IDR model with the forward engine")
    parser.add_argument("--cases", default="idr_fit,gradient,deepnlme_fit,deepnlme_saem,ude_fit")
    parser.add_argument("--out", default=None)
    parser.add_argument("--maxiter", type=int, default=1000, help="BFGS iterations of the network fits")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    n = 12 if args.quick else 60
    cases = args.cases.split(",")
    out_path = Path(args.out) if args.out else RESULTS / ("engine-quick.json" if args.quick else "engine.json")
    machine = {"platform": platform.platform(), "jax_devices": jax.device_count(), "cpu_cores": os.cpu_count(),
               "jax": jax.__version__}
    results: dict = {"machine": machine, "n_subjects": n}
    pop = study(n)

    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    if previous.get("n_subjects") == n:  # cases not run this time keep their last figures
        results = {**previous, **results}

    def save():
        out_path.write_text(json.dumps(results, indent=2, default=float))

    if "idr_fit" in cases:
        print(f"IDR (Hill), {n} subjects, FOCEI fit from the priors' medians (as benchmarks/run.py)", flush=True)
        results["idr_fit"] = {"reverse": fit_case(idr_model, pop, None, "reverse")}
        print("  the same fit again in this process (compiled: the warm fit)", flush=True)
        results["idr_fit"]["reverse_warm"] = fit_case(idr_model, pop, None, "reverse")
        if args.forward:
            results["idr_fit"]["forward"] = fit_case(idr_model, pop, None, "forward")
        save()
    if "gradient" in cases:
        print(f"OFV + gradient, {n} subjects (warm EBEs)", flush=True)
        mlp = idr_nn_model((16, 16))
        init = nn_init(mlp)
        weights = {"effect$params": init["effect$params"]}
        results["gradient"] = {
            "hill": gradient_case(idr_model, pop, IDR_TRUTH, None, "reverse", 3),
            "mlp_all_free": gradient_case(mlp, pop, init, None, "reverse", 3),
            "mlp_weights_fixed": gradient_case(mlp, pop, init, weights, "reverse", 3),
        }
        if args.forward:  # the same with the forward engine (one tangent per parameter): the "before"
            results["gradient"]["forward"] = {
                "hill": gradient_case(idr_model, pop, IDR_TRUTH, None, "forward", 3),
                "mlp_weights_fixed": gradient_case(mlp, pop, init, weights, "forward", 3),
                "mlp_all_free": gradient_case(mlp, pop, init, None, "forward", 1),
            }
        g = results["gradient"]
        g["ratio_all_free_vs_fixed"] = g["mlp_all_free"]["run_s"] / g["mlp_weights_fixed"]["run_s"]
        g["ratio_mlp_vs_hill"] = g["mlp_all_free"]["run_s"] / g["hill"]["run_s"]
        print(f"  ratio all free / weights fixed {g['ratio_all_free_vs_fixed']:.2f}; "
              f"MLP / Hill {g['ratio_mlp_vs_hill']:.2f}", flush=True)
        save()
    if "deepnlme_fit" in cases:
        print(f"DeepNLME (MLP 2-7-1 of C and eta_nn), {n} subjects, FOCEI fit", flush=True)
        deep = idr_nn_model((7,), n_eta_nn=1)
        results["deepnlme_fit"] = fit_case(deep, pop, nn_init(deep), "reverse", maxiter=args.maxiter)
        save()
    if "deepnlme_saem" in cases:
        print(f"DeepNLME (MLP 2-7-1 of C and eta_nn), {n} subjects, SAEM", flush=True)
        deep = idr_nn_model((7,), n_eta_nn=1)
        start = time.perf_counter()
        fit = nlmegen.fit(deep, pop, method=nlmegen.SAEM(progress=False, covariance="none", focei=False, is_draws=0),
                          init=nn_init(deep), key=jax.random.key(0))
        total = time.perf_counter() - start
        focei_ofv = nlmegen.objective(deep, pop, fit.params)
        results["deepnlme_saem"] = {"status": fit.status, "message": fit.message, "end_to_end_s": total,
                                    "focei_ofv_at_estimate": float(focei_ofv), **fit.timings}
        print(f"  SAEM {fit.status}  FOCEI OFV at the estimate {focei_ofv:.4f}  end to end {total:.1f} s", flush=True)
        save()
    if "ude_fit" in cases:
        print("UDE (MLP 1-8-8-1 drug effect), one subject, 36 regimens, no random effects", flush=True)
        model, ude_pop, init = ude_problem()
        results["ude_fit"] = fit_case(model, ude_pop, init, "reverse", maxiter=args.maxiter)
        save()
    print(f"written {out_path}")


def ude_problem():
    """The seeds' one-subject training problem: 36 regimens, IDR data without random effects."""
    import pandas as pd

    from nlmegen.examples import idr_population

    tables = []
    for k, (dose, interval, n_doses) in enumerate(
            [(d, i, m) for d in (25.0, 50.0, 100.0, 200.0) for i in (8.0, 12.0, 24.0) for m in (1, 2, 3)]):
        t = idr_population(1, dose=dose, n_doses=n_doses, interval=interval, times=(1, 2, 4, 8, 12, 24, 36, 48, 72))
        tables.append(t.assign(ID=k + 1))
    table = pd.concat(tables, ignore_index=True)
    truth = {**IDR_TRUTH, "omega": np.full(4, 1e-8)}  # one subject: no between-regimen variability
    sims = nlmegen.simulate(idr_model, truth, nlmegen.read_nonmem(table, allow_missing_dv=True),
                            key=jax.random.key(0))
    table.loc[table["EVID"] == 0, "DV"] = sims["value"].to_numpy()
    ude = idr_nn_model((8, 8), random_effects=False)
    init = {**NN_INIT, "effect$params": nnx.to_pure_dict(nnx.state(ude.net, nnx.Param))}
    return ude, nlmegen.read_nonmem(table), init


if __name__ == "__main__":
    main()
