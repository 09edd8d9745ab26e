"""Time of `nlmegen.read_nonmem` on synthetic event tables of ~10,000 / ~55,000 / ~100,000 rows.

Usage: python benchmarks/read_data.py [--sizes 10000 55000 100000] [--label after]
                                      [--out benchmarks/results/read_data.json] [--repeats 3]

Each table is a CSV file with, per subject: a loading dose, a maintenance dose with ADDL/II
(expanded into 3 more doses on reading), a covariate-change record (EVID 2), PK samples (DVID 1,
CMT 2) and PD samples (DVID 2, CMT 3), constant covariates (WT, SEX as text) and a time-varying one
(CRCL). The figure is the median wall time of reading the CSV file into a `Population` (the CSV
parse included). Results are merged into the JSON file under ``--label`` ("before" for the code
before vectorisation, "after" for the current one), so both sets sit side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROWS_PER_SUBJECT = 14  # records in the file (the three ADDL doses are added on reading)


def synthetic_table(n_rows: int, seed: int = 0) -> pd.DataFrame:
    """A valid NONMEM-style table of about ``n_rows`` rows (doses, ADDL, covariates, DVID)."""
    rng = np.random.default_rng(seed)
    n_subjects = max(1, round(n_rows / ROWS_PER_SUBJECT))
    pk_times = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0, 48.0)
    pd_times = (2.0, 12.0, 36.0)
    frames = []
    for i in range(1, n_subjects + 1):
        wt, sex, crcl = rng.uniform(50, 100), rng.choice(["F", "M"]), rng.uniform(60, 120)
        rows = [dict(TIME=0.0, DV=".", AMT=200.0, EVID=1, CMT=1, II=0.0, ADDL=0, DVID=1, CRCL=crcl),
                dict(TIME=12.0, DV=".", AMT=100.0, EVID=1, CMT=1, II=12.0, ADDL=3, DVID=1, CRCL=crcl),
                dict(TIME=30.0, DV=".", AMT=0.0, EVID=2, CMT=0, II=0.0, ADDL=0, DVID=1, CRCL=0.8 * crcl)]
        rows += [dict(TIME=t, DV=round(rng.lognormal(1.0, 0.5), 4), AMT=0.0, EVID=0, CMT=2, II=0.0, ADDL=0,
                      DVID=1, CRCL=".") for t in pk_times]
        rows += [dict(TIME=t, DV=round(rng.normal(50, 5), 3), AMT=0.0, EVID=0, CMT=3, II=0.0, ADDL=0, DVID=2,
                      CRCL=".") for t in pd_times]
        frame = pd.DataFrame(rows).sort_values("TIME", kind="stable")
        frame.insert(0, "ID", i)
        frame["WT"], frame["SEX"] = round(wt, 1), sex
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def time_read(path: Path, repeats: int) -> dict:
    """Median wall time of ``read_nonmem(path)`` over ``repeats`` calls (after one warm-up call)."""
    import nlmegen

    nlmegen.read_nonmem(path)  # warm-up: imports, first JAX array transfers
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        pop = nlmegen.read_nonmem(path)
        runs.append(time.perf_counter() - start)
    return {"seconds": statistics.median(runs), "runs": runs, "subjects": pop.n_subjects}


def main(argv: list[str] | None = None) -> dict:
    """Time every size, print a table and merge the figures into the JSON file under the label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 55_000, 100_000])
    parser.add_argument("--label", default="after")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "read_data.json")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0],
                          "cpus": len(__import__("os").sched_getaffinity(0))}
    entry = results.setdefault(args.label, {})
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            table = synthetic_table(size)
            path = Path(tmp) / f"read_{size}.csv"
            table.to_csv(path, index=False)
            figures = time_read(path, args.repeats)
            entry[str(size)] = {"rows": len(table), **figures}
            print(f"{args.label:>8}  {len(table):>7} rows  {figures['subjects']:>6} subjects  "
                  f"{figures['seconds']:8.3f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
