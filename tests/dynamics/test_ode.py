"""Tests of `nlmegen.dynamics.ode.solve` against an independent SciPy event-by-event reference."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from nlmegen.data._population import Population
from nlmegen.dynamics.ode import solve

TIGHT = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- helpers
def make_pop(subjects: list[list[dict]]) -> Population:
    """A Population from per-subject record lists (keys: time, evid, amt, cmt, rate, ii, ss).

    EVID 0 observation, 1 dose, 3 reset, 4 reset and dose. Padding as the reader pads.
    """
    obs = [[(i, r) for i, r in enumerate(s) if r.get("evid", 0) == 0] for s in subjects]
    doses = [[(i, r) for i, r in enumerate(s) if r.get("evid", 0) in (1, 4)] for s in subjects]
    resets = [[(i, r) for i, r in enumerate(s) if r.get("evid", 0) in (3, 4)] for s in subjects]
    n_s, n_o = len(subjects), max(len(o) for o in obs)
    n_d, n_r = max(1, max(len(d) for d in doses)), max(len(r) for r in resets)

    def pad(rows, n, fields, fill):
        out = {k: np.zeros((n_s, n), dtype=dt) for k, (_, dt) in fields.items()}
        for s, recs in enumerate(rows):
            for j in range(n):
                src = recs[j] if j < len(recs) else None
                for k, (getter, _) in fields.items():
                    out[k][s, j] = getter(*src) if src else fill(s, k)
            out["mask"][s, : len(recs)] = True
        return {k: jnp.asarray(v) for k, v in out.items()}

    last = [max(r["time"] for r in s) for s in subjects]
    last_obs = [max((r["time"] for _, r in o), default=0.0) for o in obs]
    o = pad(obs, n_o, {"t": (lambda i, r: r["time"], float), "idx": (lambda i, r: i, int),
                       "mask": (lambda i, r: True, bool)},
            lambda s, k: {"t": last_obs[s], "idx": len(subjects[s])}.get(k, 0))
    dfields = {"t": (lambda i, r: r["time"], float), "amt": (lambda i, r: r.get("amt", 0.0), float),
               "cmt": (lambda i, r: r.get("cmt", 1), int), "rate": (lambda i, r: r.get("rate", 0.0), float),
               "ii": (lambda i, r: r.get("ii", 0.0), float), "ss": (lambda i, r: r.get("ss", 0), int),
               "idx": (lambda i, r: i, int), "mask": (lambda i, r: True, bool)}
    d = pad(doses, n_d, dfields, lambda s, k: {"t": last[s], "cmt": 1, "idx": len(subjects[s])}.get(k, 0))
    r = pad(resets, n_r, {"t": (lambda i, r: r["time"], float), "idx": (lambda i, r: i, int),
                          "mask": (lambda i, r: True, bool)}, lambda s, k: 0)
    zeros_o = jnp.zeros((n_s, n_o))
    return Population(
        times=o["t"], dv=zeros_o, mask=o["mask"], dvid=jnp.zeros((n_s, n_o), int),
        obs_cmt=jnp.zeros((n_s, n_o), int), cens=jnp.zeros((n_s, n_o), int),
        limit=jnp.full((n_s, n_o), -jnp.inf), obs_index=o["idx"],
        dose_times=d["t"], dose_amts=d["amt"], dose_cmts=d["cmt"], dose_rates=d["rate"],
        dose_ii=d["ii"], dose_ss=d["ss"], dose_mask=d["mask"], dose_index=d["idx"],
        reset_times=r["t"], reset_mask=r["mask"], reset_index=r["idx"],
        covariates={}, cov_times=jnp.zeros((n_s, 1)), cov_mask=jnp.ones((n_s, 1), bool),
        cov_values={}, ids=tuple(range(1, n_s + 1)))


def reference(rhs, p, y0, actions, matrix=None):
    """Reference solution: ``actions`` are (time, kind, data), applied in list order at equal times.

    kinds: "obs"; "bolus" (cmt, amt); "inf" (cmt, rate, duration): the rate is added from ``time``
    for ``duration``; "reset" (state to ``y0``, running infusions stopped). Between actions the ODE
    is solved by `scipy.linalg.expm` when ``matrix`` (dy/dt = matrix @ y + rate) is given, else by
    `scipy.integrate.solve_ivp` (DOP853, rtol 1e-12). Returns the observed states in order.
    """
    acts = [(t, j, k, d) for j, (t, k, d) in enumerate(actions)]
    for t, j, k, d in list(acts):  # infusion ends as separate actions
        if k == "inf":
            acts.append((t + d[2], j + 0.5, "end", (d[0], d[1], j)))
    acts.sort(key=lambda a: (a[0], a[1]))
    f = jax.jit(lambda t, y: rhs(t, y, p))
    y, t_cur, running, out = np.array(y0, float), acts[0][0], {}, []
    for t, j, k, d in acts:
        if t > t_cur:
            rate = np.zeros_like(y)
            for cmt, r in running.values():
                rate[cmt - 1] += r
            y = _advance(f, matrix, y, rate, t_cur, t)
            t_cur = t
        if k == "obs":
            out.append(y.copy())
        elif k == "bolus":
            y[d[0] - 1] += d[1]
        elif k == "inf":
            running[j] = (d[0], d[1])
        elif k == "end":
            running.pop(d[2], None)
        elif k == "reset":
            y, running = np.array(y0, float), {}
    return np.array(out)


def _advance(f, matrix, y, rate, t0, t1):
    if matrix is None:
        sol = solve_ivp(lambda s, z: np.asarray(f(s, z)) + rate, (t0, t1), y, method="DOP853",
                        rtol=1e-12, atol=1e-13)
        return sol.y[:, -1]
    n = y.shape[0]
    aug = np.zeros((n + 1, n + 1))
    aug[:n, :n], aug[:n, n] = matrix, rate
    return (expm(aug * (t1 - t0)) @ np.append(y, 1.0))[:n]


def linear_rhs(t, y, p):
    """Depot -> central -> out: states [depot, central]."""
    return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["k"] * y[1]])


def assert_close(got, want, rel=1e-6):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.maximum(np.abs(want).reshape(-1, want.shape[-1]).max(axis=0), 1e-12)  # per state
    err = np.abs(got - want) / scale
    assert err.max() < rel, f"max rel err {err.max():.3g}\ngot\n{got}\nwant\n{want}"


def obs_rows(states, pop, s):
    return np.asarray(states[s])[np.asarray(pop.mask[s])]


# ---------------------------------------------------------------------------- population A
def _dose(t, amt, cmt=1, **kw):
    return dict(time=t, evid=1, amt=amt, cmt=cmt, **kw)


def _obs(*ts):
    return [dict(time=t, evid=0) for t in ts]


SUBJECTS_A = [
    # 0: oral multiple doses; obs at 12 before the dose at 12
    [_dose(0, 100), *_obs(1, 2, 4, 8, 12), _dose(12, 100), _dose(24, 100), *_obs(13, 30)],
    # 1: IV bolus
    [_dose(0, 50, 2), *_obs(0.5, 1, 3, 6, 24)],
    # 2: infusion RATE > 0 (1 -> 6), observed at its end
    [*_obs(0.5), _dose(1, 100, 2, rate=20), *_obs(2, 6, 7, 10)],
    # 3: RATE = -2, modelled duration 3
    [_dose(0, 100, 2, rate=-2), *_obs(1, 3, 5)],
    # 4: lag 0.5 and F 0.7 on CMT 1, F 0.5 on an infusion into CMT 2 (duration 1)
    [_dose(0, 100), *_obs(0.25, 0.5, 1), _dose(5, 60, 2, rate=30), *_obs(5.5, 6.5),
     _dose(12, 100), *_obs(12.25, 13, 20)],
    # 5: reset stops the running infusion and resets the state
    [_dose(0, 100, 2), *_obs(1), _dose(1.5, 100, 2, rate=10), *_obs(1.8),
     dict(time=2, evid=3), *_obs(3), _dose(4, 50, 2), *_obs(5, 8)],
    # 6: obs record before a dose at the same time
    [_dose(0, 10, 2), *_obs(2), _dose(2, 100, 2), *_obs(3)],
    # 7: dose record before the obs at the same time
    [_dose(0, 10, 2), _dose(2, 100, 2), *_obs(2, 3)],
]

THETA_A = {"ka": jnp.array([1.2, 1.0, 0.8, 1.5, 0.9, 1.1, 1.0, 1.0]), "k": jnp.asarray(0.15),
           "lag": jnp.asarray(0.5), "f": jnp.asarray(0.7), "dur": jnp.asarray(3.0)}


def _linear_matrix(ka, k):
    return np.array([[-ka, 0.0], [ka, -k]])


def reference_a(s, theta):
    """Expected actions of subject ``s`` of population A, written out by hand."""
    O = lambda *ts: [(t, "obs", None) for t in ts]  # noqa: E731, E741
    B = lambda t, cmt, amt: [(t, "bolus", (cmt, amt))]  # noqa: E731
    I = lambda t, cmt, rate, dur: [(t, "inf", (cmt, rate, dur))]  # noqa: E731, E741
    lag, f, dur = (float(theta[k]) for k in ("lag", "f", "dur"))
    acts = [
        B(0, 1, 100) + O(1, 2, 4, 8, 12) + B(12, 1, 100) + B(24, 1, 100) + O(13, 30),
        B(0, 2, 50) + O(0.5, 1, 3, 6, 24),
        O(0.5) + I(1, 2, 20, 5) + O(2, 6, 7, 10),
        I(0, 2, 100 / dur, dur) + O(1, 3, 5),
        B(lag, 1, 100 * f) + O(0.25, 0.5, 1) + I(5, 2, 30, 1) + O(5.5, 6.5) + B(12 + lag, 1, 100 * f)
        + O(12.25, 13, 20),
        B(0, 2, 100) + O(1) + I(1.5, 2, 10, 10) + O(1.8) + [(2, "reset", None)] + O(3) + B(4, 2, 50) + O(5, 8),
        B(0, 2, 10) + O(2) + B(2, 2, 100) + O(3),
        B(0, 2, 10) + B(2, 2, 100) + O(2, 3),
    ][s]
    acts.sort(key=lambda a: a[0])  # stable: same-time actions keep the record order
    ka, k = float(theta["ka"][s]), float(theta["k"])
    return reference(None, None, [0.0, 0.0], acts, matrix=_linear_matrix(ka, k))


def solve_a(pop, theta, **kw):
    """Population A: ``k`` shared and captured by closure, lag and F per compartment, RATE=-2."""
    k = theta["k"]
    rhs = lambda t, y, p: jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - k * y[1]])  # noqa: E731
    lag = {1: jnp.zeros(8).at[4].set(theta["lag"])}
    f = {1: jnp.ones(8).at[4].set(theta["f"]), 2: jnp.ones(8).at[4].set(0.5)}
    dur = jnp.ones(8).at[3].set(theta["dur"])
    return solve(rhs, pop, {"ka": theta["ka"]}, y0=jnp.zeros(2), lag=lag, f=f, duration=dur, **kw)


@pytest.fixture(scope="module")
def pop_a():
    return make_pop(SUBJECTS_A)


@pytest.fixture(scope="module")
def states_a(pop_a):
    return jax.jit(lambda theta: solve_a(pop_a, theta, **TIGHT))


def test_events_match_scipy(pop_a, states_a):
    states = states_a(THETA_A)
    assert states.shape == (8, pop_a.n_obs, 2)
    for s in range(8):
        assert_close(obs_rows(states, pop_a, s), reference_a(s, THETA_A))
    # same-time order: the obs before the dose does not see it, the obs after it does
    assert float(states[7, 0, 1] - states[6, 0, 1]) == pytest.approx(100.0, rel=1e-9)


def test_rate_minus_two_needs_duration(pop_a):
    with pytest.raises(ValueError, match="RATE=-2"):
        solve(linear_rhs, pop_a, THETA_A, y0=jnp.zeros(2))
    with pytest.raises(ValueError, match="compartments \\[2\\]"):
        solve(linear_rhs, pop_a, THETA_A, y0=jnp.zeros(2), duration={1: 1.0})


def test_input_errors(pop_a):
    with pytest.raises(ValueError, match="closure"):
        solve(linear_rhs, pop_a, {"ka": jnp.ones(3), "k": 0.1}, y0=jnp.zeros(2), duration=1.0)
    with pytest.raises(ValueError, match="model has 1 states"):
        solve(lambda t, y, p: -y, pop_a, {}, y0=jnp.zeros(1), duration=1.0)


def check_grad(states_fn, loss_of_states, theta, which, rel=1e-4, h=1e-5):
    """Reverse-mode gradient of ``loss_of_states(states_fn(theta))`` vs central differences."""
    grad = jax.jit(jax.grad(lambda th: loss_of_states(states_fn(th))))(theta)
    fun = lambda th: float(loss_of_states(states_fn(th)))  # noqa: E731
    for name, idxs in which.items():
        for i in idxs:
            x = theta[name]
            e = jnp.zeros_like(x).at[i].set(1.0) if i is not None else jnp.ones_like(x)
            step = h * max(1.0, float(jnp.max(jnp.abs(x))))
            fd = (fun({**theta, name: x + step * e}) - fun({**theta, name: x - step * e})) / (2 * step)
            g = float(grad[name][i] if i is not None else grad[name])
            assert g == pytest.approx(fd, rel=rel, abs=1e-8), (name, i, g, fd)
    return grad


def test_gradients_match_finite_differences(pop_a, states_a):
    """Per-subject, shared (closure over a traced value), lag, F and duration; and forward mode."""
    weights = jnp.linspace(0.5, 1.5, pop_a.n_obs)
    loss = lambda states: jnp.sum(jnp.where(pop_a.mask, states[..., 1] * weights, 0.0))  # noqa: E731
    theta = {**THETA_A, "lag": jnp.asarray(0.4), "dur": jnp.asarray(2.5)}  # kinks at obs times: avoid
    grad = check_grad(states_a, loss, theta, {"ka": [0, 4], "k": [None], "lag": [None], "f": [None],
                                              "dur": [None]})
    fwd_states = lambda th: solve_a(pop_a, th, adjoint=diffrax.ForwardMode(), **TIGHT)  # noqa: E731
    fwd = jax.jit(jax.jacfwd(lambda th: loss(fwd_states(th))))(theta)
    for name in ("ka", "k", "lag", "dur"):
        np.testing.assert_allclose(fwd[name], grad[name], rtol=1e-7)


def test_jit_status_and_no_recompile(pop_a):
    """A subject that exhausts max_steps is NaN and flagged; others are fine; no recompilation."""
    traces = []

    def rhs(t, y, p):
        traces.append(1)
        return linear_rhs(t, y, p)

    @jax.jit
    def run(params):
        return solve(rhs, pop_a, params, y0=jnp.zeros(2), duration=1.0, max_steps=200, return_status=True)

    params = {"ka": THETA_A["ka"], "k": THETA_A["k"]}
    ok_states, ok_status = run(params)
    n_traces = len(traces)
    stiff = {**params, "ka": params["ka"].at[0].set(1e6)}  # stiff for Tsit5 in 200 steps
    states, status = run(stiff)
    assert len(traces) == n_traces  # new parameter values: no retrace
    assert np.all(np.asarray(ok_status) == 0) and np.all(np.isfinite(ok_states))
    assert int(status[0]) == int(diffrax.RESULTS.max_steps_reached._value)
    assert np.all(np.isnan(states[0]))
    assert np.all(np.asarray(status[1:]) == 0)
    np.testing.assert_allclose(states[1:], ok_states[1:])


# ---------------------------------------------------------------------------- steady state
SUBJECTS_B = [
    # 0: SS=1 oral, II 12, then a regular dose at 12 (obs at 12 comes before it)
    [_dose(0, 100, ss=1, ii=12), *_obs(0, 1, 6, 12), _dose(12, 100), *_obs(13, 24)],
    # 1: SS=1 infusion (2 h) into CMT 2
    [_dose(0, 100, 2, rate=50, ss=1, ii=12), *_obs(0, 1, 2, 3, 11.9)],
    # 2: SS=1 constant infusion (II 0): at its steady state at 0, then stopped (NONMEM)
    [_dose(0, 0, 2, rate=5, ss=1, ii=0), *_obs(0, 5, 10)],
    # 3: SS=1 oral with a lag: obs at 0.5 lies in the cycle before the lagged dose
    [_dose(0, 100, ss=1, ii=12), *_obs(0, 0.5, 1.5, 12)],
    # 4: SS=1 infusion longer than II (16 h every 12 h): the previous one runs until 4
    [_dose(0, 160, 2, rate=10, ss=1, ii=12), *_obs(0, 2, 4, 5, 15, 17)],
    # 5: SS=2 added to a running regimen (linear: superposition is exact); obs at 6 before it
    [_dose(0, 100), *_obs(6), _dose(6, 50, ss=2, ii=24), *_obs(6, 10, 30)],
]
THETA_B = {"ka": jnp.array([1.0, 1.0, 1.0, 0.7, 1.0, 1.3]), "k": jnp.asarray(0.2), "lag": jnp.asarray(1.0)}


def reference_b(s, theta):
    """Steady state by brute force: 60 earlier doses of the train, given explicitly."""
    O = lambda *ts: [(t, "obs", None) for t in ts]  # noqa: E731, E741
    train = lambda t0, ii, act: [(t0 - k * ii, *act) for k in range(60, -1, -1)]  # noqa: E731
    lag = float(theta["lag"])
    acts = [
        train(0, 12, ("bolus", (1, 100))) + O(0, 1, 6, 12) + [(12, "bolus", (1, 100))] + O(13, 24),
        train(0, 12, ("inf", (2, 50, 2))) + O(0, 1, 2, 3, 11.9),
        [(-600, "inf", (2, 5, 600))] + O(0, 5, 10),
        train(lag, 12, ("bolus", (1, 100))) + O(0, 0.5, 1.5, 12),
        train(0, 12, ("inf", (2, 10, 16))) + O(0, 2, 4, 5, 15, 17),
        [(0, "bolus", (1, 100))] + O(6, 6, 10, 30),  # + the SS=2 train from the record on (below)
    ][s]
    acts.sort(key=lambda a: a[0])
    matrix = _linear_matrix(float(theta["ka"][s]), float(theta["k"]))
    out = reference(None, None, [0.0, 0.0], acts, matrix=matrix)
    if s == 5:  # superposition: the train of SS=2 doses counts from the record (not the obs before)
        extra = reference(None, None, [0.0, 0.0], train(6, 24, ("bolus", (1, 50))) + O(6, 10, 30), matrix)
        out[1:] += extra
    return out


@pytest.fixture(scope="module")
def pop_b():
    return make_pop(SUBJECTS_B)


@pytest.fixture(scope="module")
def states_b(pop_b):
    def run(theta):
        lag = {1: jnp.zeros(6).at[3].set(theta["lag"])}
        return solve(linear_rhs, pop_b, {"ka": theta["ka"], "k": theta["k"]}, y0=jnp.zeros(2), lag=lag,
                     return_status=True, **TIGHT)

    return jax.jit(run)


def test_steady_state_matches_dose_train(pop_b, states_b):
    states, status = states_b(THETA_B)
    assert np.all(np.asarray(status) == 0)
    for s in range(6):
        assert_close(obs_rows(states, pop_b, s), reference_b(s, THETA_B))


def test_steady_state_gradients(pop_b, states_b):
    weights = jnp.linspace(0.5, 1.5, pop_b.n_obs)
    loss = lambda out: jnp.sum(jnp.where(pop_b.mask, out[0].sum(-1) * weights, 0.0))  # noqa: E731
    check_grad(states_b, loss, THETA_B, {"ka": [0, 1, 3, 4, 5], "k": [None], "lag": [None]})


# ---------------------------------------------------------------------------- nonlinear models
def mm_rhs(t, y, p):
    conc = y[1] / p["v"]
    return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["vmax"] * conc / (p["km"] + conc)])


def test_michaelis_menten_with_callable_y0():
    pop = make_pop([[*_obs(0.5), _dose(1, 100), *_obs(2, 5, 10)],
                    [_dose(0, 200, 2), *_obs(1, 4), _dose(6, 100), *_obs(7, 12, 24)]])
    p = {"ka": jnp.array([1.0, 0.5]), "v": jnp.array([10.0, 20.0]), "vmax": 5.0, "km": jnp.array([2.0, 1.0]),
         "a0": jnp.array([30.0, 0.0])}
    y0 = lambda q: jnp.stack([0.0, q["a0"]])  # noqa: E731
    states = jax.jit(lambda q: solve(mm_rhs, pop, q, y0=y0, **TIGHT))(p)
    acts = [[(0.5, "obs", None), (1, "bolus", (1, 100)), (2, "obs", None), (5, "obs", None), (10, "obs", None)],
            [(0, "bolus", (2, 200)), (1, "obs", None), (4, "obs", None), (6, "bolus", (1, 100)),
             (7, "obs", None), (12, "obs", None), (24, "obs", None)]]
    for s in range(2):
        p_s = {k: float(jnp.broadcast_to(v, (2,))[s]) for k, v in p.items()}
        # the reference starts at the first record time from y0
        want = reference(mm_rhs, p_s, [0.0, p_s["a0"]], acts[s])
        assert_close(obs_rows(states, pop, s), want)


def idr_rhs(t, y, p):
    depot, central, r = y[0], y[1], y[2]
    c = jnp.maximum(central / p["vc"], 0.0)
    cn = c ** p["n"]
    effect = p["smax"] * cn / (p["sc50"] ** p["n"] + cn)
    return jnp.stack([-p["ka"] * depot, p["ka"] * depot - p["cl"] / p["vc"] * central,
                      p["kin"] * (1.0 + effect) - p["kout"] * r])


def idr_y0(p):
    return jnp.stack([0.0 * p["kin"], 0.0 * p["kin"], p["kin"] / p["kout"]])


IDR_PARAMS = {"ka": jnp.array([1.0, 1.5, 0.6]), "cl": jnp.array([2.0, 3.0, 1.5]), "vc": 20.0,
              "kin": jnp.array([10.0, 8.0, 12.0]), "kout": jnp.array([0.5, 0.3, 0.8]), "smax": 2.0,
              "sc50": 1.0, "n": jnp.array([1.5, 1.0, 2.0])}


def idr_pop(n_subj, n_doses=4, obs_times=(0.5, 1, 2, 4, 8, 12, 24, 36, 48, 60, 72, 84, 96, 100, 104,
                                          108, 120, 132, 144, 168)):
    recs = [(24.0 * k, 0, _dose(24.0 * k, 100)) for k in range(n_doses)]
    recs += [(t, 1, dict(time=t, evid=0)) for t in obs_times]
    subject = [r for _, _, r in sorted(recs, key=lambda x: (x[0], x[1]))]
    return make_pop([subject] * n_subj)


def test_idr_tsit5_scipy_and_kvaerno5():
    pop = idr_pop(3)
    tsit = jax.jit(lambda q: solve(idr_rhs, pop, q, y0=idr_y0, **TIGHT))(IDR_PARAMS)
    assert np.all(np.isfinite(tsit))
    acts = sorted([(24.0 * k, "bolus", (1, 100)) for k in range(4)]
                  + [(float(t), "obs", None) for t in np.asarray(pop.times[0])], key=lambda a: a[0])
    for s in range(3):
        p_s = {k: float(jnp.broadcast_to(v, (3,))[s]) for k, v in IDR_PARAMS.items()}
        assert_close(tsit[s], reference(idr_rhs, p_s, np.asarray(idr_y0(p_s)), acts))
    stiff = solve(idr_rhs, pop, IDR_PARAMS, y0=idr_y0, solver=diffrax.Kvaerno5(), rtol=1e-8, atol=1e-10)
    assert_close(stiff, tsit, rel=1e-5)


def test_traced_population_matches(pop_a, states_a):
    """A Population passed through `jax.jit` (tracers: the general event grid) gives the same states."""
    run = jax.jit(lambda pop, theta: solve_a(pop, theta, **TIGHT))
    np.testing.assert_allclose(run(pop_a, THETA_A), states_a(THETA_A), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_idr_steady_state_kvaerno5_matches_tsit5():
    """Implicit solvers get the steady-state Jacobian by forward mode through the solver."""
    pop = make_pop([[_dose(0, 100, ss=1, ii=24), *_obs(0, 1, 12, 24)]] * 2)
    p = {k: (v[:2] if jnp.ndim(v) else v) for k, v in IDR_PARAMS.items()}
    run = lambda solver: jax.jit(lambda q: solve(idr_rhs, pop, q, y0=idr_y0, solver=solver, rtol=1e-8,  # noqa: E731
                                                 atol=1e-10, return_status=True))(p)
    (tsit, s1), (kv, s2) = run(diffrax.Tsit5()), run(diffrax.Kvaerno5())
    assert np.all(np.asarray(s1) == 0) and np.all(np.asarray(s2) == 0)
    assert_close(kv, tsit, rel=1e-5)
    np.testing.assert_allclose(tsit[:, 0, 1:], tsit[:, 3, 1:], rtol=1e-6)  # periodic: trough = trough
