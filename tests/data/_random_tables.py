"""Random valid NONMEM-style event tables, for the build-equivalence and corruption property tests.

A table mixes every record kind the reader handles: observations (two outputs, censored ones),
boluses, infusions, ADDL/II, steady state, EVID 2 covariate changes, EVID 3 resets and EVID 4
reset-and-dose records, constant, time-varying (with gaps) and text covariates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _subject(rng: np.random.Generator, sid, text_dvid: bool) -> list[dict]:
    times = np.sort(rng.integers(0, 97, size=rng.integers(1, 9)) / 4.0)
    wt, sex = round(float(rng.uniform(40, 120)), 1), str(rng.choice(["F", "M", "X"]))
    rows = []
    for t in times:
        kind = rng.choice(["obs", "obs", "obs", "dose", "dose", "other", "reset", "resetdose"])
        row = {"ID": sid, "TIME": float(t), "DV": ".", "AMT": 0.0, "EVID": 0, "MDV": 1, "CMT": 2, "RATE": 0.0,
               "II": 0.0, "ADDL": 0, "SS": 0, "DVID": "cp" if text_dvid else 1, "BLQ": 0, "LLOQ": 0.05,
               "WT": wt, "SEX": sex, "CRCL": "." if rng.random() < 0.5 else round(float(rng.uniform(30, 120)), 1)}
        if kind == "obs":
            out = int(rng.integers(1, 3))
            row.update(EVID=0, MDV=0, DV=round(float(rng.normal(5, 3)), 3), CMT=out + 1,
                       DVID=("cp", "pca")[out - 1] if text_dvid else out, BLQ=int(rng.random() < 0.15))
        elif kind in ("dose", "resetdose"):
            row.update(EVID=1 if kind == "dose" else 4, AMT=round(float(rng.uniform(1, 500)), 2),
                       CMT=int(rng.integers(1, 3)))
            style = rng.choice(["bolus", "bolus", "infusion", "addl", "ss", "modelled"])
            if style == "infusion":
                row["RATE"] = round(float(rng.uniform(1, 50)), 2)
            elif style == "addl":
                row.update(ADDL=int(rng.integers(1, 4)), II=float(rng.choice([6.0, 12.0, 24.0])))
            elif style == "ss":
                row.update(SS=int(rng.integers(1, 3)), II=12.0)
            elif style == "modelled":
                row["RATE"] = float(rng.choice([-1.0, -2.0]))
        elif kind == "other":
            row.update(EVID=2)
        else:
            row.update(EVID=3)
        rows.append(row)
    if all(r["CRCL"] == "." for r in rows):
        rows[-1]["CRCL"] = 80.0
    return rows


def random_table(seed: int, max_subjects: int = 12) -> pd.DataFrame:
    """A random valid table of 1..``max_subjects`` subjects (numeric or text IDs and DVIDs)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_subjects + 1))
    text_ids, text_dvid = bool(rng.random() < 0.3), bool(rng.random() < 0.3)
    ids = rng.choice(np.arange(1, 10 * max_subjects), size=n, replace=False)
    rows = []
    for sid in ids:
        rows += _subject(rng, f"S{sid:03d}" if text_ids else int(sid), text_dvid)
    return pd.DataFrame(rows)
