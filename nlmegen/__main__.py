"""Command line: ``nlmegen demo`` and ``nlmegen fit DATA MODEL`` (also ``python -m nlmegen ...``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]

DATASETS = ("theo_sd", "warfarin")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nlmegen", description="nonlinear mixed-effects models in NumPyro")
    parser.add_argument("--version", action="version", version=f"nlmegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a model from a Python file to a NONMEM-style CSV file; write the "
                                     "parameter tables, the result file and the standard figures")
    fit.add_argument("data", help="event table (CSV: ID, TIME, DV, AMT, EVID, ... as read by nlmegen.read_nonmem)")
    fit.add_argument("model", help="the model: path/to/model.py:function or package.module:function")
    fit.add_argument("--method", default="focei", help="focei (default), foce, laplace, fo, saem, nuts, svi")
    fit.add_argument("--out", default="nlmegen-fit", help="output folder (default ./nlmegen-fit/)")
    fit.add_argument("--force", action="store_true", help="overwrite files of an existing output folder")
    fit.add_argument("--n-sim", type=int, default=500, help="simulated replicates for the VPC (default 500)")
    fit.add_argument("--seed", type=int, default=0, help="PRNG seed (stochastic methods, VPC)")
    demo = sub.add_parser("demo", help="fit a bundled data set with FOCEI, print the estimates, write VPC/GOF/"
                                       "individual plots")
    demo.add_argument("--dataset", choices=DATASETS, default="theo_sd",
                      help="theo_sd (default: one-compartment oral PK) or warfarin (joint PK/PD: cp and pca, "
                           "turnover model)")
    demo.add_argument("--out", default="nlmegen-demo", help="folder for the figures (default ./nlmegen-demo/)")
    demo.add_argument("--force", action="store_true", help="overwrite files of an existing output folder")
    demo.add_argument("--n-sim", type=int, default=None,
                      help="simulated replicates for the VPC (default 500 for theo_sd, 200 for warfarin)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nlmegen`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "fit":
        return _fit(args)
    return 2  # pragma: no cover (argparse rejects other commands)


def figures(dataset: str = "theo_sd") -> tuple[str, str, str]:
    """File names the demo writes for ``dataset``: VPC, GOF, individual fits."""
    return (f"{dataset}_vpc.png", f"{dataset}_gof.png", f"{dataset}_individuals.png")


FIGURES = figures("theo_sd")


def _prepare_out(out: Path, force: bool, names: tuple[str, ...]) -> None:
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise SystemExit(f"nlmegen demo: {out}/ already holds {clash}; pass --force to overwrite or --out DIR")
    out.mkdir(parents=True, exist_ok=True)


def _demo(args) -> int:
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import nlmegen

    names = figures(args.dataset)
    out = Path(args.out)
    _prepare_out(out, args.force, names)
    start = time.perf_counter()
    key = jax.random.key(args.seed)
    paths = [out / n for n in names]
    if args.dataset == "warfarin":
        _warfarin(nlmegen, key, args.n_sim or 200, paths)
    else:
        _theo(nlmegen, key, args.n_sim or 500, paths)
    for path in paths:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


FIT_FILES = ("parameters.csv", "parameters_estimation.csv", "fit.nc", "vpc.png", "gof.png", "individuals.png")


def load_model(spec: str):
    """The model function named by ``path/to/model.py:function`` or ``package.module:function``."""
    import importlib
    import importlib.util

    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise SystemExit(f"nlmegen fit: give the model as path/to/model.py:function (got {spec!r})")
    if source.endswith(".py"):
        path = Path(source).resolve()
        if not path.is_file():
            raise SystemExit(f"nlmegen fit: model file {source} not found")
        from .io._file import USER_MODEL_PREFIX

        module_name = f"{USER_MODEL_PREFIX}{abs(hash(str(path)))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    model = module
    for part in name.split("."):
        model = getattr(model, part, None)
        if model is None:
            raise SystemExit(f"nlmegen fit: {source} defines no {name!r}")
    if not callable(model):
        raise SystemExit(f"nlmegen fit: {spec} is not a function")
    return model


def _fit(args) -> int:
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import nlmegen

    out = Path(args.out)
    _prepare_out(out, args.force, FIT_FILES)
    start = time.perf_counter()
    pop = nlmegen.read_nonmem(args.data)
    model = load_model(args.model)
    print(f"{args.data}: {pop.n_subjects} subjects, {pop.n_observations} observations; model {args.model}, "
          f"method {args.method}")
    key = jax.random.key(args.seed)
    stochastic = args.method.strip().lower() in ("saem", "nuts", "svi")
    fit = nlmegen.fit(model, pop, args.method, key=key if stochastic else None, progress=True)
    print(fit, flush=True)
    paths = [out / n for n in FIT_FILES]
    fit.table("natural").to_csv(paths[0])
    fit.table("estimation").to_csv(paths[1])
    with _stage("writing the result file", "result file written"):
        fit.save(paths[2], overwrite=True)
    with _stage(f"VPC: simulating {args.n_sim} replicates", f"VPC: {args.n_sim} replicates simulated and drawn"):
        nlmegen.vpc(fit, n_sim=args.n_sim, key=key).plot().savefig(paths[3], dpi=130)
    with _stage("GOF: residuals, NPDE (500 simulations), 9 panels", "GOF panels drawn"):
        nlmegen.gof(fit, key=key).savefig(paths[4], dpi=130)
    with _stage("individual fits: IPRED and PRED curves", "individual fits drawn"):
        nlmegen.plot_individuals(fit).savefig(paths[5], dpi=130)
    for path in paths:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if fit.status != "failed" else 1


def _stage(doing: str, done: str):
    """The demo's progress: ``doing ... 3 s`` on stderr from the start, then ``done in 4.2 s``."""
    from .infer.shared.progress import ticker

    return ticker(doing, done, delay=0.0)


def _theo(nlmegen, key, n_sim: int, paths) -> None:
    from nlmegen.diagnostics import plots

    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    print(f"theo_sd: {pop.n_subjects} subjects, {pop.n_observations} observations; "
          "one-compartment oral model, FOCEI", flush=True)
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, method="focei", progress=True)
    print(fit, flush=True)
    with _stage(f"VPC: simulating {n_sim} replicates", f"VPC: {n_sim} replicates simulated and drawn"):
        nlmegen.vpc(fit, n_sim=n_sim, key=key).plot().savefig(paths[0], dpi=130)
    with _stage("GOF: residuals, NPDE (500 simulations), 9 panels", "GOF panels drawn"):
        plots.gof(fit, key=key).savefig(paths[1], dpi=130)
    with _stage("individual fits: IPRED and PRED curves", "individual fits drawn"):
        plots.plot_individuals(fit).savefig(paths[2], dpi=130)


def _warfarin(nlmegen, key, n_sim: int, paths) -> None:
    import matplotlib.pyplot as plt

    from nlmegen.diagnostics import plots
    from nlmegen.diagnostics._gof import gof_table, prediction_curves

    pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin"))
    counts = {o: int(((pop.dvid == k) & pop.mask).sum()) for k, o in enumerate(pop.outputs)}
    print(f"warfarin: {pop.n_subjects} subjects, {pop.n_observations} observations "
          f"({', '.join(f'{n} {o}' for o, n in counts.items())}); one-compartment oral PK and PCA turnover "
          "(indirect response, inhibited synthesis), joint FOCEI fit", flush=True)
    fit = nlmegen.fit(nlmegen.examples.warfarin_model, pop, method="focei", progress=True)
    print(fit, flush=True)
    with _stage(f"VPC: simulating {n_sim} replicates", f"VPC: {n_sim} replicates simulated and drawn"):
        nlmegen.vpc(fit, n_sim=n_sim, key=key).plot().savefig(paths[0], dpi=130)
    # one block of three GOF rows per output: cp (mg/L) and pca (%) do not share axes
    with _stage(f"GOF: residuals and NPDE ({n_sim} simulations)", "GOF residuals computed"):
        table = gof_table(fit, n_sim=n_sim, key=key)
    outputs = list(fit.outputs)
    fig, axes = plt.subplots(3 * len(outputs), 3, figsize=(13.5, 12.6 * len(outputs)), layout="constrained",
                             squeeze=False)
    for k, output in enumerate(outputs):
        plots.gof(fit, table=table[table["output"] == output], axes=axes[3 * k:3 * k + 3].ravel())
        fig.text(0.005, 1.0 - k / len(outputs) - 0.004, output, fontsize=14, fontweight="bold", va="top")
    fig.savefig(paths[1], dpi=110)
    ids = list(pop.ids[:8])
    with _stage("individual fits: IPRED and PRED curves", "individual curves computed"):
        curves = prediction_curves(fit, ids)
    fig, axes = plt.subplots(2 * len(outputs), 4, figsize=(12.0, 2.6 * 2 * len(outputs)), layout="constrained",
                             squeeze=False)
    for k, output in enumerate(outputs):
        plots.plot_individuals(fit, ids, output=output, curves=curves, axes=axes[2 * k:2 * k + 2].ravel())
    fig.savefig(paths[2], dpi=110)


if __name__ == "__main__":
    sys.exit(main())
