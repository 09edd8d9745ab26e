"""Closed-form compartment PK (`nlmegen.dynamics.pk`) against an independent event-driven reference.

The reference integrates the linear ODE exactly between events with the matrix exponential
(`scipy.linalg.expm` of the system augmented with the constant infusion input), processing NONMEM
records in order: lagged boluses and infusion starts/stops are breakpoints, EVID 3/4 and SS=1 clear
the state and pending inputs, and steady state is reached by brute force, simulating enough implied
doses for the history to decay below 1e-17.

Scenarios are grouped into a few populations (one subject per scenario, each padded differently),
so each model is compiled once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from nlmegen.data._population import Population
from nlmegen.dynamics.pk import one_cmt, three_cmt, two_cmt

RTOL = 1e-8


# ----------------------------------------------------------------------------------- helpers
def obs(t):
    return {"time": t, "evid": 0}


def dose(t, amt, cmt=1, rate=0.0, ii=0.0, ss=0, evid=1):
    return {"time": t, "evid": evid, "amt": amt, "cmt": cmt, "rate": rate, "ii": ii, "ss": ss}


def reset(t):
    return {"time": t, "evid": 3}


def make_pop(subjects: list[list[dict]]) -> Population:
    """A Population from per-subject record lists (record order = list order), padded as the reader
    pads (padded doses at the last event time with amount 0, padded obs repeating the last time)."""
    n = len(subjects)
    per = []
    for recs in subjects:
        o, d, r = [], [], []
        for i, rec in enumerate(recs):
            ev = rec["evid"]
            if ev == 0:
                o.append((rec["time"], i))
            if ev in (3, 4):
                r.append((rec["time"], i))
            if ev in (1, 4):
                keys = ("time", "amt", "cmt", "rate", "ii", "ss")
                d.append((*(rec[k] for k in keys), i))
        per.append((o, d, r, max(rec["time"] for rec in recs), len(recs)))
    n_o = max(len(p[0]) for p in per)
    n_d = max(max(len(p[1]) for p in per), 1)
    n_r = max(max(len(p[2]) for p in per), 1)
    times, oidx, omask = np.zeros((n, n_o)), np.zeros((n, n_o), int), np.zeros((n, n_o), bool)
    dt, da, dc, dr, dii = (np.zeros((n, n_d)) for _ in range(5))
    dss, didx, dmask = np.zeros((n, n_d), int), np.zeros((n, n_d), int), np.zeros((n, n_d), bool)
    rt, ridx, rmask = np.zeros((n, n_r)), np.zeros((n, n_r), int), np.zeros((n, n_r), bool)
    for s, (o, d, r, t_last, n_rec) in enumerate(per):
        for j in range(n_o):
            t, i = o[j] if j < len(o) else (o[-1][0], n_rec)
            times[s, j], oidx[s, j], omask[s, j] = t, i, j < len(o)
        for j in range(n_d):
            row = d[j] if j < len(d) else (t_last, 0.0, 1, 0.0, 0.0, 0, n_rec)
            dt[s, j], da[s, j], dc[s, j], dr[s, j], dii[s, j], dss[s, j], didx[s, j] = row
            dmask[s, j] = j < len(d)
        for j, (t, i) in enumerate(r):
            rt[s, j], ridx[s, j], rmask[s, j] = t, i, True
    zeros = jnp.zeros((n, n_o))
    return Population(
        times=jnp.asarray(times), dv=zeros, mask=jnp.asarray(omask),
        dvid=jnp.zeros((n, n_o), int), obs_cmt=jnp.zeros((n, n_o), int),
        cens=jnp.zeros((n, n_o), int), limit=jnp.full((n, n_o), -jnp.inf),
        obs_index=jnp.asarray(oidx),
        dose_times=jnp.asarray(dt), dose_amts=jnp.asarray(da), dose_cmts=jnp.asarray(dc, int),
        dose_rates=jnp.asarray(dr), dose_ii=jnp.asarray(dii), dose_ss=jnp.asarray(dss),
        dose_mask=jnp.asarray(dmask), dose_index=jnp.asarray(didx),
        reset_times=jnp.asarray(rt), reset_mask=jnp.asarray(rmask), reset_index=jnp.asarray(ridx),
        covariates={}, cov_times=jnp.zeros((n, 1)), cov_mask=jnp.ones((n, 1), bool),
        cov_values={}, ids=tuple(range(1, n + 1)),
    )  # fmt: skip


# ----------------------------------------------------------------------------------- reference
def system_matrix(p: dict, oral: bool) -> tuple[np.ndarray, int, float]:
    """Rate matrix of the amounts (NONMEM compartment order), central index and central volume."""
    periph = [(p[q], p[v]) for q, v in (("q", "v2"), ("q2", "v2"), ("q3", "v3")) if q in p]
    v1 = p.get("v", p.get("v1"))
    off = int(oral)
    n = 1 + len(periph) + off
    k = np.zeros((n, n))
    c = off
    k[c, c] -= p["cl"] / v1
    for j, (q, vp) in enumerate(periph):
        i = off + 1 + j
        k[c, c] -= q / v1
        k[i, c] += q / v1
        k[i, i] -= q / vp
        k[c, i] += q / vp
    if oral:
        k[0, 0] = -p["ka"]
        k[c, 0] = p["ka"]
    return k, c, v1


_EXPM: dict = {}


def _expm(m: np.ndarray, dt: float) -> np.ndarray:
    """expm(m dt), cached: steady-state histories repeat the same few steps many times."""
    key = (m.tobytes(), round(dt, 10))
    if key not in _EXPM:
        _EXPM[key] = scipy.linalg.expm(m * dt)
    return _EXPM[key]


class RefSim:
    """Exact piecewise integration of dx/dt = K x + u(t) with bolus and zero-order inputs."""

    def __init__(self, k: np.ndarray, t0: float):
        self.k, self.t = k, t0
        self.x = np.zeros(len(k))
        self.bolus: list[tuple[float, int, float]] = []  # (time, state, amount)
        self.infusion: list[tuple[float, float, int, float]] = []  # (start, end, state, rate)

    def clear(self):
        self.x[:] = 0.0
        self.bolus, self.infusion = [], []

    def advance(self, t_end: float):
        while True:
            cand = [b[0] for b in self.bolus] + [x for a, b, _, _ in self.infusion for x in (a, b)]
            nxt = min([c for c in cand if self.t < c < t_end] + [t_end])
            if nxt > self.t:
                n = len(self.k)
                m = np.zeros((n + 1, n + 1))
                m[:n, :n] = self.k
                for a, b, s, r in self.infusion:
                    if a <= self.t < b:
                        m[s, n] += r
                e = _expm(m, nxt - self.t)
                self.x = e[:n, :n] @ self.x + e[:n, n]
                self.t = nxt
                self.infusion = [p for p in self.infusion if p[1] > self.t]
            for b in [b for b in self.bolus if b[0] <= self.t]:
                self.x[b[1]] += b[2]
                self.bolus.remove(b)
            if self.t >= t_end:
                return

    def add(self, start: float, state: int, amt: float, rate: float, dur: float):
        if rate == 0.0:
            self.bolus.append((start, state, amt))
        else:
            self.infusion.append((start, start + dur, state, rate))
        self.advance(self.t)  # apply a bolus due now


def reference(recs: list[dict], p: dict, oral: bool, lag=None, f=None, dur=None, rate=None):
    """Central concentration at the observation records of one subject."""
    lag, f, dur, rate = lag or {}, f or {}, dur or {}, rate or {}
    k, c, vc = system_matrix(p, oral)
    sim = RefSim(k, recs[0]["time"])
    out = []

    def pulse(target, rec, start):
        cmt = rec["cmt"]
        amt = f.get(cmt, 1.0) * rec["amt"]
        r = rec["rate"]
        if r > 0:
            target.add(start, cmt - 1, amt, r, amt / r)
        elif r == -1:
            target.add(start, cmt - 1, amt, rate[cmt], amt / rate[cmt])
        elif r == -2:
            target.add(start, cmt - 1, amt, amt / dur[cmt], dur[cmt])
        else:
            target.add(start, cmt - 1, amt, 0.0, 0.0)

    for rec in recs:
        t, ev = rec["time"], rec["evid"]
        sim.advance(t)
        if ev == 0:
            out.append(sim.x[c] / vc)
        if ev in (3, 4):
            sim.clear()
        if ev not in (1, 4):
            continue
        cmt, ss, ii = rec["cmt"], rec["ss"], rec["ii"]
        start = t + lag.get(cmt, 0.0)
        if ss and ii == 0:  # constant infusion at steady state; F does not apply
            r = rec["rate"] if rec["rate"] > 0 else rate[cmt]
            if ss == 1:
                sim.clear()
            b = np.zeros(len(k))
            b[cmt - 1] = r
            sim.x += np.linalg.solve(k, -b)  # it then stops at the record time (NONMEM)
            continue
        if ss:  # brute-force steady state: N implied doses before this one
            lam_min = np.min(-np.linalg.eigvals(k).real)
            n = int(40.0 / (lam_min * ii)) + 2
            sub = RefSim(k, start - n * ii - 1.0)
            for j in range(n, 0, -1):
                pulse(sub, rec, start - j * ii)
            sub.advance(t)
            if ss == 1:
                sim.clear()
            sim.x = sim.x + sub.x
            sim.bolus += sub.bolus
            sim.infusion += sub.infusion
        pulse(sim, rec, start)
    return np.array(out)


# ----------------------------------------------------------------------------------- scenarios
# Each scenario: (name, records, model-parameter overrides, lag, f, duration, rate) where lag, f,
# duration and rate are {cmt: value} maps. IV scenarios dose CMT 1 (central) without ka; oral
# scenarios dose CMT 1 (depot) and CMT 2 (central) with ka.
IV = [
    ("bolus, same-time records both orders", [obs(0.0), dose(0.0, 100), obs(0.0), obs(0.5), obs(2),
        obs(12), dose(12, 50), obs(12), obs(18), obs(30)], {}, {}, {}, {}, {}),
    ("obs before first dose", [obs(0.0), obs(1.0), dose(2.0, 100), obs(2.0), obs(3.5)],
        {}, {}, {}, {}, {}),
    ("infusion rate>0 with F", [dose(0, 100, rate=40), obs(0.5), obs(2), obs(2.5), obs(4), obs(9)],
        {}, {}, {1: 0.8}, {}, {}),
    ("infusion RATE=-2 with D, lag, F", [dose(0, 100, rate=-2), obs(0.3), obs(1), obs(2.2),
        obs(6)], {}, {1: 0.5}, {1: 0.7}, {1: 1.5}, {}),
    ("infusion RATE=-1", [dose(1, 100, rate=-1), obs(1.5), obs(3), obs(8)], {}, {}, {}, {},
        {1: 40.0}),
    ("lagged bolus, obs at lag time", [dose(0, 100), obs(0.5), obs(1.0), obs(1.5), obs(3)],
        {}, {1: 1.0}, {}, {}, {}),
    ("SS=1 bolus resets earlier dose", [dose(0, 300), obs(5), dose(10, 100, ii=12, ss=1), obs(10),
        obs(11), obs(21.9), dose(22, 100), obs(23), obs(40)], {}, {}, {}, {}, {}),
    ("SS=1 long infusion with lag", [dose(0, 100, rate=10, ii=8, ss=1), obs(0), obs(0.5),
        obs(1.5), obs(7), obs(9.5), obs(15)], {}, {1: 1.0}, {1: 0.9}, {}, {}),
    ("SS=1 short infusion", [obs(0), dose(0, 100, rate=50, ii=12, ss=1), obs(0), obs(1), obs(2.5),
        obs(11), obs(13)], {}, {}, {}, {}, {}),
    ("SS=2 on SS=1", [dose(0, 80, ii=24, ss=1), obs(3), dose(8, 40, ii=24, ss=2), obs(8), obs(9),
        obs(20), obs(30)], {}, {}, {}, {}, {}),
    ("constant infusion at SS then reset", [dose(0, 0, rate=5, ss=1), obs(0), obs(3),
        dose(4, 20), obs(5), reset(10), obs(10), obs(12)], {}, {}, {1: 0.5}, {}, {}),
    ("EVID 3 and EVID 4", [dose(0, 100), obs(1), reset(2), obs(3), dose(4, 100), obs(5),
        dose(6, 70, evid=4), obs(6), obs(8)], {}, {}, {}, {}, {}),
]
ORAL = [
    ("oral single dose, obs before", [obs(0.0), dose(1.0, 100), obs(1.0), obs(1.5), obs(3),
        obs(8), obs(24)], {}, {}, {}, {}, {}),
    ("oral multiple + IV bolus", [dose(0, 100), obs(1), dose(6, 100), obs(6), dose(8, 30, cmt=2),
        obs(8), obs(12), obs(24)], {}, {}, {}, {}, {}),
    ("oral lag and F per cmt", [dose(0, 100), obs(0.2), obs(0.9), obs(3), dose(4, 20, cmt=2),
        obs(4.1), obs(10)], {}, {1: 0.7, 2: 0.3}, {1: 0.6, 2: 0.9}, {}, {}),
    ("SS=1 oral with lag", [dose(0, 200), obs(1), dose(5, 100, ii=12, ss=1), obs(5), obs(6),
        obs(6.5), obs(10), obs(20)], {}, {1: 1.5}, {1: 0.8}, {}, {}),
    ("SS=2 oral", [dose(0, 100, ii=12, ss=1), obs(2), dose(6, 50, ii=12, ss=2), obs(7), obs(15)],
        {}, {}, {}, {}, {}),
    ("infusion into depot, RATE=-2 central", [dose(0, 100, rate=25), obs(1), obs(5),
        dose(6, 50, cmt=2, rate=-2), obs(6.5), obs(9)], {}, {}, {}, {2: 2.0}, {}),
    ("SS=1 infusion into central, lag", [dose(0, 60, cmt=2, rate=30, ii=6, ss=1), obs(0),
        obs(0.5), obs(2), obs(5)], {}, {2: 0.7}, {}, {}, {}),
    ("constant SS infusion into depot", [dose(0, 0, rate=3, ss=1), obs(0), obs(5),
        dose(6, 50), obs(7)], {}, {}, {}, {}, {}),
    ("oral EVID 3/4", [dose(0, 100), obs(1), reset(2), obs(2), dose(3, 100, evid=4), obs(3.5),
        dose(5, 40, ss=1, ii=8), obs(5.5)], {}, {}, {}, {}, {}),
]  # fmt: skip

MODELS = {
    "one": (one_cmt, {"cl": 2.0, "v": 15.0}),
    "two": (two_cmt, {"cl": 2.0, "v1": 15.0, "q": 3.0, "v2": 40.0}),
    "three": (three_cmt, {"cl": 2.0, "v1": 15.0, "q2": 3.0, "v2": 40.0, "q3": 1.0, "v3": 40.0}),
}
KA = 1.3


def group_inputs(scenarios, model, oral):
    """Population, per-subject parameter arrays and per-subject reference inputs."""
    base = dict(MODELS[model][1], **({"ka": KA} if oral else {}))
    cmts = (1, 2) if oral else (1,)
    pop = make_pop([s[1] for s in scenarios])
    params = {k: np.array([dict(base, **s[2])[k] for s in scenarios]) for k in base}
    defaults = (("lag", 3, 0.0), ("f", 4, 1.0), ("duration", 5, 1.0), ("rate", 6, 1.0))
    for key, pos, default in defaults:
        params[key] = {c: np.array([s[pos].get(c, default) for s in scenarios]) for c in cmts}
    return pop, params, base


def run_model(model: str, pop: Population, params: dict) -> np.ndarray:
    fn = MODELS[model][0]
    return np.asarray(_jitted(fn)(pop, params))


_JIT_CACHE: dict = {}


def _jitted(fn):
    if fn not in _JIT_CACHE:
        _JIT_CACHE[fn] = jax.jit(lambda pop, params: fn(pop, **params))
    return _JIT_CACHE[fn]


def assert_close_to_reference(scenarios, model, oral):
    pop, params, base = group_inputs(scenarios, model, oral)
    got = run_model(model, pop, params)
    assert np.all(np.isfinite(got))  # padded entries too
    for s, (name, recs, over, lag, f, dur, rate) in enumerate(scenarios):
        want = reference(recs, dict(base, **over), oral, lag, f, dur, rate)
        np.testing.assert_allclose(got[s, : len(want)], want, rtol=RTOL, atol=1e-12, err_msg=name)


# ----------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("model", list(MODELS))
def test_iv_regimens_match_reference(model):
    assert_close_to_reference(IV, model, oral=False)


@pytest.mark.parametrize("model", list(MODELS))
def test_oral_regimens_match_reference(model):
    assert_close_to_reference(ORAL, model, oral=True)


def test_ka_equal_to_an_eigenvalue():
    """ka == k (and near it) gives the limiting t exp(-kt) form, smoothly; no NaN."""
    k = 2.0 / 15.0
    recs = [dose(0, 100), obs(0.5), obs(2), obs(8), dose(10, 50, ii=12, ss=1), obs(11), obs(30)]
    kas = k * np.array([1.0, 1 + 1e-12, 1 + 1e-9, 1 + 1e-6, 1 + 1e-4, 1 + 3e-3, 1 + 1e-2, 0.9])
    pop = make_pop([recs] * len(kas))
    got = np.asarray(_jitted(one_cmt)(pop, {"cl": 2.0, "v": 15.0, "ka": jnp.asarray(kas)}))
    for s, ka in enumerate(kas):
        want = reference(recs, {"cl": 2.0, "v": 15.0, "ka": ka}, oral=True)
        np.testing.assert_allclose(got[s], want, rtol=RTOL, err_msg=f"ka/k={ka / k}")
    t = np.array([0.5, 2, 8])
    np.testing.assert_allclose(got[0, :3], 100 / 15 * k * t * np.exp(-k * t), rtol=1e-12)


def random_regimen(rng: np.random.Generator) -> list[dict]:
    """10 records on a 0.5 h grid (same-time records in random order): 5 observations, 4 doses of
    random kind (bolus / RATE>0 / RATE=-2 / constant SS infusion; depot or central; SS 0/1/2;
    EVID 1/4) and an EVID 3 reset."""
    times = np.sort(rng.choice(np.arange(0.0, 30.0, 0.5), size=10))
    kinds = rng.permutation(["obs"] * 5 + ["dose"] * 4 + ["reset"])
    recs = []
    for t, kind in zip(times, kinds, strict=True):
        if kind != "dose":
            recs.append(obs(t) if kind == "obs" else reset(t))
            continue
        cmt, form = int(rng.integers(1, 3)), rng.choice(["bolus", "rate", "duration", "const"])
        ss = int(rng.choice([0, 0, 1, 2]))
        ii = float(rng.choice([6.0, 12.0])) if ss else 0.0
        amt, evid = float(rng.uniform(10, 100)), int(rng.choice([1, 1, 4]))
        if form == "bolus":
            recs.append(dose(t, amt, cmt, 0.0, ii, ss, evid))
        elif form == "rate":
            recs.append(dose(t, amt, cmt, float(rng.uniform(5, 50)), ii, ss, evid))
        elif form == "duration":
            recs.append(dose(t, amt, cmt, -2.0, ii, ss, evid))
        else:
            ss = int(rng.integers(1, 3))
            recs.append(dose(t, 0.0, cmt, float(rng.uniform(1, 5)), 0.0, ss, evid))
    return recs


def test_random_regimens_match_reference():
    rng = np.random.default_rng(20240611)
    n = 24
    subjects = [random_regimen(rng) for _ in range(n)]
    lag = {c: rng.choice([0.0, 0.3, 0.8], n) for c in (1, 2)}
    f = {c: rng.uniform(0.5, 1.0, n) for c in (1, 2)}
    dur = {c: rng.uniform(0.5, 8.0, n) for c in (1, 2)}  # > II sometimes: overlapping SS infusions
    cl, ka = rng.uniform(1, 4, n), rng.uniform(0.1, 2, n)
    base = {"v1": 15.0, "q": 3.0, "v2": 40.0}
    pop = make_pop(subjects)
    got = np.asarray(two_cmt(pop, cl=cl, ka=ka, lag=lag, f=f, duration=dur, **base))
    assert np.all(np.isfinite(got))
    for s, recs in enumerate(subjects):
        pick = {c: 0 for c in (1, 2)}
        args = [{c: float(x[c][s]) for c in pick} for x in (lag, f, dur)]
        want = reference(recs, dict(base, cl=cl[s], ka=ka[s]), True, *args)
        np.testing.assert_allclose(
            got[s, : len(want)], want, rtol=RTOL, atol=1e-10, err_msg=str(recs)
        )


# ----------------------------------------------------------------------------------- gradients
def _check_gradient(fn, pop, params, names):
    loss = jax.jit(lambda p: jnp.sum(jnp.where(pop.mask, fn(pop, **p), 0.0)))
    grad = jax.jit(jax.grad(loss))(params)
    for name in names:
        g = grad[name] if not isinstance(grad[name], dict) else grad[name][1]
        assert np.isfinite(g), name
        h = 1e-5 * abs(_get(params, name))

        def at(delta, name=name):
            p = dict(params)
            if isinstance(p[name], dict):
                p[name] = {**p[name], 1: p[name][1] + delta}
            else:
                p[name] = p[name] + delta
            return float(loss(p))

        fd = (at(h) - at(-h)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9, err_msg=name)


def _get(params, name):
    return params[name][1] if isinstance(params[name], dict) else params[name]


GRAD_RECS = [
    [dose(0, 100), obs(0.5), obs(2), dose(6, 100, rate=40), obs(7), obs(12)],
    [dose(0, 100, ii=12, ss=1), obs(1), obs(3), dose(12, 50, rate=-2), obs(13), obs(20)],
    [dose(0, 100, rate=-1), obs(1), obs(6), dose(8, 10, cmt=2), obs(9)],
]


@pytest.mark.parametrize("model", ["two", "three"])
def test_gradients_match_finite_differences(model):
    fn, base = MODELS[model]
    pop = make_pop(GRAD_RECS)
    params = dict(base, ka=KA, lag={1: 0.4}, f={1: 0.8}, duration={1: 1.5, 2: 2.0}, rate={1: 30.0})
    names = [*base, "ka", "lag", "f", "duration", "rate"]
    _check_gradient(fn, pop, params, names)


def test_gradient_at_ka_equal_k():
    pop = make_pop([GRAD_RECS[1]])
    params = {"cl": 2.0, "v": 15.0, "ka": 2.0 / 15.0, "duration": {1: 1.5}}
    _check_gradient(one_cmt, pop, params, ["cl", "v", "ka"])


@pytest.mark.parametrize("model", list(MODELS))
def test_bolus_only_fast_path_equals_general_path(model):
    """A population without infusions or steady state takes the two-exponential bolus path; its values
    and gradients equal the general dose-operator path, at, near and far from ka == an eigenvalue."""
    import dataclasses

    fn, base = MODELS[model]
    recs = [dose(0, 100), obs(0.0), obs(0.5), obs(2), dose(6, 50), obs(6), obs(7), obs(30)]
    k = 2.0 / 15.0  # the one-compartment eigenvalue
    kas = np.array([1.0, 1 + 1e-10, 1 + 1e-4, 1 + 3e-3, 1.5, 0.2, 12.0]) * k
    general = make_pop([recs] * len(kas))
    bolus = dataclasses.replace(general, features=frozenset())
    def conc(pop, ka):
        return jnp.where(pop.mask, fn(pop, ka=ka, lag={1: 0.25}, f={1: 0.8}, **base), 0.0)

    got, want = conc(bolus, jnp.asarray(kas)), conc(general, jnp.asarray(kas))
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
    grad = jax.grad(lambda pop, ka: jnp.sum(conc(pop, ka)), argnums=1)
    g_fast, g_general = grad(bolus, jnp.asarray(kas)), grad(general, jnp.asarray(kas))
    assert np.all(np.isfinite(g_fast))
    np.testing.assert_allclose(g_fast, g_general, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------------- transforms
def test_jit_vmap_and_padding():
    recs = [ORAL[0][1], ORAL[1][1], ORAL[3][1][:4]]
    pop = make_pop(recs)
    fn = jax.jit(lambda pop, cl: one_cmt(pop, cl=cl, v=15.0, ka=KA, lag={1: 1.5}))
    cls = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.7, 0.9]])
    batched = jax.vmap(fn, in_axes=(None, 0))(pop, cls)
    assert batched.shape == (2, 3, pop.n_obs)
    for b in range(2):
        np.testing.assert_allclose(batched[b], fn(pop, cls[b]), rtol=1e-13)
        for s, r in enumerate(recs):
            want = reference(r, {"cl": float(cls[b, s]), "v": 15.0, "ka": KA}, True, {1: 1.5})
            np.testing.assert_allclose(batched[b, s, : len(want)], want, rtol=RTOL)
    # vmap over subjects: each call sees one subject without the subject axis
    def one_subject(p, cl):
        return one_cmt(p, cl=cl, v=15.0, ka=KA, lag={1: 1.5})

    per_subject = jax.vmap(one_subject)(pop, cls[0])
    np.testing.assert_allclose(per_subject, batched[0], rtol=1e-13)
    # eager (no jit) gives the same
    np.testing.assert_allclose(one_cmt(pop, cl=cls[0], v=15.0, ka=KA, lag={1: 1.5}), batched[0])


# ----------------------------------------------------------------------------------- errors
def test_dose_into_unsupported_compartment_raises():
    pop = make_pop([[dose(0, 100, cmt=3), obs(1)]])
    with pytest.raises(ValueError, match=r"one_cmt.*compartment 3"):
        one_cmt(pop, cl=1.0, v=10.0, ka=1.0)
    pop = make_pop([[dose(0, 100, cmt=2), obs(1)]])
    with pytest.raises(ValueError, match=r"two_cmt.*compartment 2"):
        two_cmt(pop, cl=1.0, v1=10.0, q=1.0, v2=10.0)
    two_cmt(pop, cl=1.0, v1=10.0, q=1.0, v2=10.0, ka=1.0)  # CMT 2 is central with ka


def test_modelled_rate_or_duration_required():
    pop = make_pop([[dose(0, 100, rate=-2), obs(1)]])
    with pytest.raises(ValueError, match=r"one_cmt.*RATE=-2.*duration"):
        one_cmt(pop, cl=1.0, v=10.0)
    with pytest.raises(ValueError, match=r"compartment\(s\) \[1\].*duration"):
        one_cmt(pop, cl=1.0, v=10.0, duration={2: 1.0})
    pop = make_pop([[dose(0, 100, rate=-1), obs(1)]])
    with pytest.raises(ValueError, match=r"RATE=-1.*rate"):
        three_cmt(pop, cl=1.0, v1=10.0, q2=1.0, v2=10.0, q3=1.0, v3=10.0)


def test_bad_parameter_shape_raises():
    pop = make_pop([[dose(0, 100), obs(1)]])
    with pytest.raises(ValueError, match="cl must be a scalar"):
        one_cmt(pop, cl=jnp.ones((1, 1, 1)), v=10.0)
    with pytest.raises(ValueError, match=r"per-observation value must be \[n_subjects, n_obs\]"):
        one_cmt(pop, cl=jnp.ones((1, 2)), v=10.0)
    assert one_cmt(pop, cl=jnp.ones((1, 1)), v=10.0).shape == (1, 1)  # one value per observation


def test_bolus_seen_by_observation_after_it_at_the_same_time():
    assert math.isclose(float(one_cmt(make_pop([[dose(0, 10), obs(0)]]), cl=1.0, v=5.0)[0, 0]), 2.0)


# ----------------------------------------------------------------------------------- read_nonmem
def test_through_read_nonmem():
    """A NONMEM table (ADDL, SS=1, EVID 4, infusion) via the reader gives the reference values."""
    pd = pytest.importorskip("pandas")
    from nlmegen import read_nonmem

    nan = np.nan
    cols = ["ID", "TIME", "DV", "AMT", "EVID", "CMT", "RATE", "II", "ADDL", "SS"]
    rows = [
        (1, 0.0, nan, 100, 1, 1, 0, 12, 2, 0),
        (1, 0.5, 1.0, nan, 0, 2, 0, 0, 0, 0),
        (1, 12.0, 1.0, nan, 0, 2, 0, 0, 0, 0),  # trough: the ADDL dose at 12 comes after it
        (1, 13.0, 1.0, nan, 0, 2, 0, 0, 0, 0),
        (1, 30.0, 1.0, nan, 0, 2, 0, 0, 0, 0),
        (2, 0.0, nan, 50, 1, 1, 0, 24, 0, 1),
        (2, 2.0, 1.0, nan, 0, 2, 0, 0, 0, 0),
        (2, 5.0, nan, 80, 4, 2, 40, 0, 0, 0),
        (2, 5.0, 1.0, nan, 0, 2, 0, 0, 0, 0),
        (2, 6.5, 1.0, nan, 0, 2, 0, 0, 0, 0),
    ]
    pop = read_nonmem(pd.DataFrame(rows, columns=cols))
    got = np.asarray(two_cmt(pop, cl=2.0, v1=15.0, q=3.0, v2=40.0, ka=KA))
    refs = [
        [dose(0, 100), obs(0.5), obs(12), dose(12, 100), obs(13), dose(24, 100), obs(30)],
        [dose(0, 50, ii=24, ss=1), obs(2), dose(5, 80, cmt=2, rate=40, evid=4), obs(5), obs(6.5)],
    ]
    for s, recs in enumerate(refs):
        want = reference(recs, dict(MODELS["two"][1], ka=KA), oral=True)
        np.testing.assert_allclose(got[s, : len(want)], want, rtol=RTOL)
    with pytest.raises(ValueError, match="compartment 2"):
        two_cmt(pop, cl=2.0, v1=15.0, q=3.0, v2=40.0)
