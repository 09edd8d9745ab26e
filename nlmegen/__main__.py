"""Command line: ``nlmegen demo`` (also ``python -m nlmegen demo``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]

DATASETS = ("theo_sd", "warfarin")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlmegen", description="nonlinear mixed-effects models in NumPyro")
    sub = parser.add_subparsers(dest="command", required=True)
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


def _theo(nlmegen, key, n_sim: int, paths) -> None:
    from nlmegen.diagnostics import plots

    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    print(f"theo_sd: {pop.n_subjects} subjects, {pop.n_observations} observations; "
          "one-compartment oral model, FOCEI")
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, method="focei", progress=False)
    print(fit)
    nlmegen.vpc(fit, n_sim=n_sim, key=key).plot().savefig(paths[0], dpi=130)
    plots.gof(fit, key=key).savefig(paths[1], dpi=130)
    plots.plot_individuals(fit).savefig(paths[2], dpi=130)


def _warfarin(nlmegen, key, n_sim: int, paths) -> None:
    import matplotlib.pyplot as plt

    from nlmegen.diagnostics import plots
    from nlmegen.diagnostics._gof import gof_table, prediction_curves

    pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin"))
    counts = {o: int(((pop.dvid == k) & pop.mask).sum()) for k, o in enumerate(pop.outputs)}
    print(f"warfarin: {pop.n_subjects} subjects, {pop.n_observations} observations "
          f"({', '.join(f'{n} {o}' for o, n in counts.items())}); one-compartment oral PK and PCA turnover "
          "(indirect response, inhibited synthesis), joint FOCEI fit")
    fit = nlmegen.fit(nlmegen.examples.warfarin_model, pop, method="focei", progress=False)
    print(fit)
    nlmegen.vpc(fit, n_sim=n_sim, key=key).plot().savefig(paths[0], dpi=130)
    # one GOF row pair per output: cp (mg/L) and pca (%) do not share axes
    table = gof_table(fit, n_sim=n_sim, key=key)
    outputs = list(fit.outputs)
    fig, axes = plt.subplots(2 * len(outputs), 3, figsize=(13.5, 8.6 * len(outputs)), layout="constrained",
                             squeeze=False)
    for k, output in enumerate(outputs):
        plots.gof(fit, table=table[table["output"] == output], axes=axes[2 * k:2 * k + 2].ravel())
        fig.text(0.005, 1.0 - k / len(outputs) - 0.004, output, fontsize=14, fontweight="bold", va="top")
    fig.savefig(paths[1], dpi=110)
    ids = list(pop.ids[:8])
    curves = prediction_curves(fit, ids)
    fig, axes = plt.subplots(2 * len(outputs), 4, figsize=(12.0, 2.6 * 2 * len(outputs)), layout="constrained",
                             squeeze=False)
    for k, output in enumerate(outputs):
        plots.plot_individuals(fit, ids, output=output, curves=curves, axes=axes[2 * k:2 * k + 2].ravel())
    fig.savefig(paths[2], dpi=110)


if __name__ == "__main__":
    sys.exit(main())
