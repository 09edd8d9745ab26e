"""Event tables for comparing the ODE path with the closed form on NONMEM dosing semantics.

The model is NONMEM's ADVAN2 (one compartment, first-order absorption): CMT 1 depot, CMT 2 central.
Records are written as dicts (`dose`, `obs`, `reset`), read by `nlmegen.read_nonmem` (so ADDL
expansion and record order are the reader's), and both paths get the same dose-level parameters,
per dose record where a scenario asks for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import nlmegen
from nlmegen.data._population import ALL_FEATURES
from nlmegen.dynamics import ode

TIGHT = dict(rtol=1e-10, atol=1e-12)
REL = 1e-6  # ODE vs closed form, relative to the subject's largest concentration


def dose(t, amt, cmt=1, rate=0.0, ii=0.0, addl=0, ss=0, evid=1) -> dict:
    return dict(TIME=float(t), AMT=float(amt), EVID=evid, CMT=cmt, RATE=float(rate), II=float(ii),
                ADDL=int(addl), SS=int(ss))


def obs(*ts) -> list[dict]:
    return [dict(TIME=float(t), EVID=0, CMT=2) for t in ts]


def reset(t) -> dict:
    return dict(TIME=float(t), EVID=3)


def table(subjects: list[list[dict]]) -> pd.DataFrame:
    """NONMEM event table, one subject per record list (records in table order)."""
    rows = []
    for sid, recs in enumerate(subjects, start=1):
        for r in recs:
            row = dict(ID=sid, TIME=0.0, DV=np.nan, AMT=0.0, EVID=0, CMT=2, RATE=0.0, II=0.0, ADDL=0, SS=0)
            row.update(r)
            if row["EVID"] == 0:
                row["DV"] = 1.0
            rows.append(row)
    return pd.DataFrame(rows)


def population(subjects: list[list[dict]]):
    return nlmegen.read_nonmem(table(subjects))


def pad(pop, n_obs: int, n_doses: int, n_resets: int, n_rec: int):
    """``pop`` widened to fixed sizes (extra entries masked) with every feature on: populations of
    different event tables then share one compiled solve (as a traced `jax.jit` argument)."""

    def widen(x, n, fill=None):
        x = jnp.asarray(x)
        if x.shape[1] > n:
            raise ValueError(f"cannot pad {x.shape} to {n}")
        if x.shape[1] == 0:
            extra = jnp.zeros((x.shape[0], n), x.dtype) if fill is None else jnp.full((x.shape[0], n), fill, x.dtype)
        else:
            last = x[:, -1:] if fill is None else jnp.full((x.shape[0], 1), fill, x.dtype)
            extra = jnp.broadcast_to(last, (x.shape[0], n - x.shape[1]))
        return jnp.concatenate([x, extra], axis=1)

    obs_f = ("times", "dv", "dvid", "obs_cmt", "cens", "limit", "obs_index")
    dose_f = ("dose_times", "dose_amts", "dose_cmts", "dose_rates", "dose_ii", "dose_ss", "dose_index")
    new = {k: widen(getattr(pop, k), n_obs) for k in obs_f}
    new["mask"] = widen(pop.mask, n_obs, False)
    new.update({k: widen(getattr(pop, k), n_doses) for k in dose_f})
    new["dose_mask"] = widen(pop.dose_mask, n_doses, False)
    new["dose_amts"] = jnp.where(new["dose_mask"], new["dose_amts"], 0.0)
    new["reset_times"] = widen(pop.reset_times, n_resets)
    new["reset_index"] = widen(pop.reset_index, n_resets)
    new["reset_mask"] = widen(pop.reset_mask, n_resets, False)
    new["cov_times"] = widen(pop.cov_times, n_rec)
    new["cov_mask"] = widen(pop.cov_mask, n_rec, False)
    if pop.dv_missing is not None:
        new["dv_missing"] = widen(pop.dv_missing, n_obs, False)
    return dataclasses.replace(pop, features=ALL_FEATURES, **new)


# ------------------------------------------------------------------------------------ the two paths
Level = Callable[[float, int], float] | dict | float | None  # value of a dose-level parameter


def per_dose(pop, value: Level, default: float) -> jnp.ndarray:
    """``[n_subjects, n_doses]`` from a per-subject list of ``{cmt: v}`` / ``fn(time, cmt)`` / v."""
    times, cmts = np.asarray(pop.dose_times), np.asarray(pop.dose_cmts)
    out = np.full(times.shape, default, float)
    for s in range(times.shape[0]):
        v = value[s] if isinstance(value, list) else value
        for j in range(times.shape[1]):
            if v is None:
                continue
            if callable(v):
                out[s, j] = v(times[s, j], int(cmts[s, j]))
            elif isinstance(v, dict):
                out[s, j] = v.get(int(cmts[s, j]), default)
            else:
                out[s, j] = v
    return jnp.asarray(out)


def levels(pop, lag=None, f=None, duration=None, rate=None) -> dict:
    """Per-dose ``lag``, ``f``, ``duration``, ``rate`` arrays (defaults 0, 1, 1, 1)."""
    return {"lag": per_dose(pop, lag, 0.0), "f": per_dose(pop, f, 1.0),
            "duration": per_dose(pop, duration, 1.0), "rate": per_dose(pop, rate, 1.0)}


def rhs(t, y, p):
    """ADVAN2 amounts: depot, central."""
    return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["cl"] / p["v"] * y[1]])


def closed(pop, params: dict, lv: dict) -> np.ndarray:
    """Central concentration by `nlmegen.pk.one_cmt`."""
    return np.asarray(nlmegen.pk.one_cmt(pop, cl=params["cl"], v=params["v"], ka=params["ka"], **lv))


def _ode(pop, params, lv):
    states, status = ode.solve(rhs, pop, params, y0=jnp.zeros(2), return_status=True, **lv, **TIGHT)
    return states[..., 1] / params["v"][:, None], status


_ode_traced = jax.jit(_ode)


def ode_conc(pop, params: dict, lv: dict, traced: bool = False):
    """Central concentration and status by `nlmegen.ode.solve`; ``traced``: the population is a
    `jax.jit` argument (one compiled solve for all populations of its shapes and features)."""
    if traced:
        return _ode_traced(pop, params, lv)
    return jax.jit(lambda p, lv: _ode(pop, p, lv))(params, lv)


def assert_paths_agree(pop, params: dict, lv: dict, names=None, want_status=None, traced=False) -> tuple:
    """ODE and closed form agree to `REL` (relative to each subject's peak) at every observation."""
    got, status = ode_conc(pop, params, lv, traced)
    ref = closed(pop, params, lv)
    got, status, mask = np.asarray(got), np.asarray(status), np.asarray(pop.mask)
    want_status = np.zeros_like(status) if want_status is None else np.asarray(want_status)
    np.testing.assert_array_equal(status, want_status)
    for s in range(mask.shape[0]):
        if status[s]:
            assert np.all(np.isnan(got[s]))
            continue
        scale = max(np.abs(ref[s][mask[s]]).max(initial=0.0), 1e-12)
        err = np.abs(got[s][mask[s]] - ref[s][mask[s]]) / scale
        label = names[s] if names else s
        assert err.max(initial=0.0) < REL, (
            f"{label}: max rel err {err.max():.3g}\node {got[s][mask[s]]}\nclosed {ref[s][mask[s]]}")
    return got, ref


# ------------------------------------------------------------------------------ analytic reference
def iv_amount(members: list[tuple[float, float, float]], t: float, k: float) -> float:
    """Central amount at ``t`` of a one-compartment IV model from explicit doses ``(start, amount,
    duration)`` (duration 0: bolus), by superposition of the textbook single-dose solutions."""
    total = 0.0
    for start, amt, dur in members:
        s = t - start
        if s < 0:
            continue
        if dur <= 0:
            total += amt * np.exp(-k * s)
        else:
            r = amt / dur
            total += r / k * -np.expm1(-k * min(s, dur)) * np.exp(-k * max(s - dur, 0.0))
    return total


def train(last: float, ii: float, amt: float, dur: float = 0.0, n: int = 3000) -> list[tuple]:
    """The implied doses of a steady-state train whose last dose starts at ``last``."""
    return [(last - j * ii, amt, dur) for j in range(n)]
