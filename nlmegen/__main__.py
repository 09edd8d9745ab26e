"""Command line: ``nlmegen demo`` (also ``python -m nlmegen demo``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEMO_PARAMS = {  # typical values of the nlmixr2 theo_sd example (log ka, log CL, log V; IIV SDs; add. SD)
    "tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": [0.64, 0.26, 0.14], "add_sd": 0.69,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlmegen", description="nonlinear mixed-effects models in NumPyro")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load theo_sd, simulate the one-compartment model, summarise, plot")
    demo.add_argument("--out", default="nlmegen-demo", help="folder for the figures (default ./nlmegen-demo/)")
    demo.add_argument("--force", action="store_true", help="overwrite files of an existing output folder")
    demo.add_argument("--n-sim", type=int, default=200, help="simulated replicates of the study (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nlmegen`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2  # pragma: no cover (argparse rejects other commands)


def _prepare_out(out: Path, force: bool, names: list[str]) -> None:
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise SystemExit(f"nlmegen demo: {out}/ already holds {clash}; pass --force to overwrite or --out DIR")
    out.mkdir(parents=True, exist_ok=True)


def _demo(args) -> int:
    import jax
    import numpy as np

    import nlmegen

    out = Path(args.out)
    figure = "theo_sd_simulation.png"
    _prepare_out(out, args.force, [figure])
    start = time.perf_counter()
    table = nlmegen.datasets.load("theo_sd")
    pop = nlmegen.read_nonmem(table)
    print(f"theo_sd: {pop.n_subjects} subjects, {pop.n_observations} observations, doses {pop.dose_compartments}")
    sims = nlmegen.simulate(nlmegen.examples.theo_model, DEMO_PARAMS, pop, key=jax.random.key(args.seed),
                            n=args.n_sim)
    typical = nlmegen.pk.one_cmt(pop, ka=np.exp(DEMO_PARAMS["tka"]), cl=np.exp(DEMO_PARAMS["tcl"]),
                                 v=np.exp(DEMO_PARAMS["tv"]))
    summary = _summary(pop, sims, np.asarray(typical))
    print("observed vs simulated concentrations (mg/L) by nominal time, typical theo_sd parameters:")
    print(summary.to_string(index=False, float_format=lambda x: f"{x:7.2f}"))
    _plot(pop, summary, out / figure)
    print(f"wrote {out / figure}  ({time.perf_counter() - start:.1f} s)")
    return 0


_BINS = [0.0, 0.4, 0.8, 1.5, 2.5, 4.5, 6.0, 8.0, 10.0, 13.0, 30.0]


def _summary(pop, sims, typical):
    import numpy as np
    import pandas as pd

    mask = np.asarray(pop.mask)
    obs = pd.DataFrame({"TIME": np.asarray(pop.times)[mask], "DV": np.asarray(pop.dv)[mask],
                        "PRED": typical[mask]})
    obs["bin"] = pd.cut(obs["TIME"], _BINS, include_lowest=True)
    sims = sims.assign(bin=pd.cut(sims["TIME"], _BINS, include_lowest=True))
    rows = []
    for interval, group in obs.groupby("bin", observed=True):
        sim = sims[sims["bin"] == interval]
        per_rep = sim.groupby("replicate")["value"]
        rows.append({
            "time": group["TIME"].median(), "n": len(group),
            "obs_p05": group["DV"].quantile(0.05), "obs_p50": group["DV"].median(),
            "obs_p95": group["DV"].quantile(0.95), "sim_p05": per_rep.quantile(0.05).median(),
            "sim_p50": per_rep.median().median(), "sim_p95": per_rep.quantile(0.95).median(),
            "typical": group["PRED"].median(),
        })
    return pd.DataFrame(rows)


def _plot(pop, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mask = np.asarray(pop.mask)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.fill_between(summary["time"], summary["sim_p05"], summary["sim_p95"], color="tab:blue", alpha=0.2,
                    label="simulated 5-95th percentile")
    ax.plot(summary["time"], summary["sim_p50"], color="tab:blue", label="simulated median")
    ax.plot(np.asarray(pop.times)[mask], np.asarray(pop.dv)[mask], "o", color="0.3", ms=3, label="observed")
    ax.plot(summary["time"], summary["obs_p50"], "--", color="tab:red", label="observed median")
    ax.set(xlabel="time after dose (h)", ylabel="theophylline (mg/L)", title="theo_sd: data vs model simulation")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
