"""Benchmark data sets, written once as NONMEM-style CSV files that every tool reads.

- ``theo_design(n)``: one-compartment oral populations with the Theoph design (one 320 mg oral dose,
  11 samples 0.25-24 h), 30% IIV on ka, CL and V, additive error; simulated from
  `nlmegen.examples.theo_model` with :data:`THEO_TRUTH`.
- ``idr_design(n)``: the seeds' indirect-response PK/PD study (`nlmegen.examples.simulate_idr`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parent / "data"
THEO_TIMES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0)
THEO_DOSE = 320.0
#: Truth of the simulated Theoph-design populations (log scale; IIV SD 0.3 = 30%).
THEO_TRUTH = {"tka": float(np.log(1.5)), "tcl": float(np.log(2.75)), "tv": float(np.log(32.0)),
              "omega": [0.3, 0.3, 0.3], "add_sd": 0.7}
#: Starting values every tool gets (theta on the log scale, as nlmegen's prior medians).
THEO_START = {"tka": 0.5, "tcl": 1.0, "tv": 3.5}


def theo_design(n: int, seed: int = 2026) -> Path:
    """CSV of ``n`` simulated subjects with the Theoph design (created once, then reused)."""
    path = DATA / f"theo_{n}.csv"
    if path.exists():
        return path
    import jax

    import nlmegen

    rows = []
    for i in range(1, n + 1):
        rows.append({"ID": i, "TIME": 0.0, "DV": np.nan, "AMT": THEO_DOSE, "EVID": 1, "CMT": 1})
        rows.extend({"ID": i, "TIME": t, "DV": np.nan, "AMT": 0.0, "EVID": 0, "CMT": 2} for t in THEO_TIMES)
    table = pd.DataFrame(rows)
    pop = nlmegen.read_nonmem(table, allow_missing_dv=True)
    sims = nlmegen.simulate(nlmegen.examples.theo_model, THEO_TRUTH, pop, key=jax.random.key(seed))
    obs = table["EVID"] == 0
    table.loc[obs, "DV"] = np.round(sims["value"].to_numpy(), 4)
    table["DOSE"] = THEO_DOSE
    DATA.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def idr_design(n: int, seed: int = 2026) -> Path:
    """CSV of ``n`` subjects simulated from the IDR model (created once, then reused)."""
    path = DATA / f"idr_{n}.csv"
    if path.exists():
        return path
    import jax

    import nlmegen

    table = nlmegen.examples.simulate_idr(n, key=jax.random.key(seed))
    DATA.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def theo_sd() -> Path:
    """The bundled theo_sd data with a per-subject ``DOSE`` column (what R's model function reads)."""
    path = DATA / "theo_sd.csv"
    if path.exists():
        return path
    import nlmegen

    table = nlmegen.datasets.load("theo_sd").copy()
    table["DOSE"] = table.groupby("ID")["AMT"].transform("max")
    DATA.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path
