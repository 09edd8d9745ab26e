"""Command line: ``nlmegen demo`` (also ``python -m nlmegen demo``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlmegen", description="nonlinear mixed-effects models in NumPyro")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit theo_sd with FOCEI, print the estimates, write VPC/GOF/individual plots")
    demo.add_argument("--out", default="nlmegen-demo", help="folder for the figures (default ./nlmegen-demo/)")
    demo.add_argument("--force", action="store_true", help="overwrite files of an existing output folder")
    demo.add_argument("--n-sim", type=int, default=500, help="simulated replicates for the VPC (default 500)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nlmegen`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2  # pragma: no cover (argparse rejects other commands)


FIGURES = ("theo_sd_vpc.png", "theo_sd_gof.png", "theo_sd_individuals.png")


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
    from nlmegen.diagnostics import plots

    out = Path(args.out)
    _prepare_out(out, args.force, FIGURES)
    start = time.perf_counter()
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    print(f"theo_sd: {pop.n_subjects} subjects, {pop.n_observations} observations; "
          "one-compartment oral model, FOCEI")
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, method="focei", progress=False)
    print(fit)
    key = jax.random.key(args.seed)
    nlmegen.vpc(fit, n_sim=args.n_sim, key=key).plot().savefig(out / FIGURES[0], dpi=130)
    plots.gof(fit, key=key).savefig(out / FIGURES[1], dpi=130)
    plots.plot_individuals(fit).savefig(out / FIGURES[2], dpi=130)
    for name in FIGURES:
        print(f"wrote {out / name}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
