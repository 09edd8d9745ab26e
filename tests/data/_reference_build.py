"""Reference for the vectorised `_build`: the original per-subject pandas build (slow, obviously right).

Kept only for tests/data/test_build.py, which checks that the vectorised build gives the same
`Population`, field by field, on randomised tables.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd

from nlmegen.data._population import Population
from nlmegen.data._read import _features, _output_labels


def _pad(groups: list[np.ndarray], fill: list, dtype: Any, width: int) -> np.ndarray:
    out = np.empty((len(groups), width), dtype=dtype)
    for i, (g, f) in enumerate(zip(groups, fill, strict=True)):
        out[i, : len(g)] = g
        out[i, len(g):] = f
    return out


def reference_build(records: pd.DataFrame, roles, rules: dict, categories: tuple, columns: tuple) -> Population:
    subjects = [g for _, g in records.groupby("SUBJ", sort=True)]
    ids = tuple(g["ID"].iloc[0] for g in subjects)
    outputs = _output_labels(records)
    for g in subjects:  # order keys: 2 * position in subject; an EVID 4 reset comes just before its dose
        g["KEY"] = 2 * np.arange(len(g))
    obs = [g[g["EVID"] == 0] for g in subjects]
    dose = [g[g["EVID"].isin((1, 4))] for g in subjects]
    reset = [g[g["EVID"].isin((3, 4))] for g in subjects]
    last_time = [float(g["TIME"].iloc[-1]) for g in subjects]
    n_o = max(1, *(len(o) for o in obs))
    n_d = max(1, *(len(d) for d in dose))
    n_r = max(1, *(len(r) for r in reset))
    n_rec = max(len(g) for g in subjects)
    last_obs = [float(o["TIME"].iloc[-1]) if len(o) else t for o, t in zip(obs, last_time, strict=True)]
    last_key = [int(g["KEY"].iloc[-1]) for g in subjects]
    code = {label: i for i, label in enumerate(outputs)}
    f64, i64 = np.float64, np.int64

    def obs_pad(col, fill, dtype, fn=None):
        return _pad([fn(o) if fn else o[col].to_numpy(dtype) for o in obs], fill, dtype, n_o)

    def dose_pad(col, fill, dtype):
        return _pad([d[col].to_numpy(dtype) for d in dose], fill, dtype, n_d)

    dv = obs_pad(None, [0.0] * len(obs), f64, lambda o: np.nan_to_num(o["DV"].to_numpy(f64), nan=0.0))
    arrays = dict(
        times=obs_pad("TIME", last_obs, f64), dv=dv,
        mask=_pad([np.ones(len(o), bool) for o in obs], [False] * len(obs), bool, n_o),
        dvid=obs_pad(None, [0] * len(obs), i64, lambda o: np.array([code[v] for v in o["DVID"]], i64)),
        obs_cmt=obs_pad("CMT", [0] * len(obs), i64), cens=obs_pad("CENS", [0] * len(obs), i64),
        limit=obs_pad("LIMIT", [-np.inf] * len(obs), f64), obs_index=obs_pad("KEY", last_key, i64),
        dose_times=dose_pad("TIME", last_time, f64), dose_amts=dose_pad("AMT", [0.0] * len(dose), f64),
        dose_cmts=dose_pad("CMT", [1] * len(dose), i64), dose_rates=dose_pad("RATE", [0.0] * len(dose), f64),
        dose_ii=dose_pad("II", [0.0] * len(dose), f64), dose_ss=dose_pad("SS", [0] * len(dose), i64),
        dose_mask=_pad([np.ones(len(d), bool) for d in dose], [False] * len(dose), bool, n_d),
        dose_index=dose_pad("KEY", last_key, i64),
        reset_times=_pad([r["TIME"].to_numpy(f64) for r in reset], [0.0] * len(reset), f64, n_r),
        reset_mask=_pad([np.ones(len(r), bool) for r in reset], [False] * len(reset), bool, n_r),
        reset_index=_pad([r["KEY"].to_numpy(i64) - (r["EVID"].to_numpy() == 4) for r in reset],
                         [-1] * len(reset), i64, n_r),
        cov_times=_pad([g["TIME"].to_numpy(f64) for g in subjects], last_time, f64, n_rec),
        cov_mask=_pad([np.ones(len(g), bool) for g in subjects], [False] * len(subjects), bool, n_rec),
    )
    cov_values, covs = {}, {}
    for name in roles.covariates:
        per_rec = _pad([g[name].to_numpy(f64) for g in subjects], [g[name].iloc[-1] for g in subjects], f64, n_rec)
        constant = all(np.all(g[name].to_numpy() == g[name].iloc[0]) for g in subjects)
        if constant:
            cov_values[name] = per_rec[:, 0].copy()
            covs[name] = per_rec[:, 0].copy()
        else:
            cov_values[name] = per_rec
            covs[name] = obs_pad(name, [g[name].iloc[-1] for g in subjects], f64)
    to_jax = {k: jnp.asarray(v) for k, v in arrays.items()}
    return Population(
        **to_jax,
        covariates={k: jnp.asarray(v) for k, v in covs.items()},
        cov_values={k: jnp.asarray(v) for k, v in cov_values.items()},
        ids=ids, outputs=outputs, interpolation=tuple(rules.items()), categories=categories, columns=columns,
        features=_features(arrays),
    )


