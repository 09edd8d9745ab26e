"""NONMEM dosing semantics, scenario by scenario: the ODE path against the closed form (both on the
same event table read by `read_nonmem`), and against textbook superposition where NONMEM's help
pins the answer down.

Semantics, from NONMEM's help ("SS dose event record", "SS data item", "RATE data item",
"absorption lag", "bioavailability fraction", "EVID"):

- an SS dose is the last of an infinite train of implied doses every II, with the same ALAG, F, R and
  D; its infusions still running at the record time run on, and with ALAG >= II implied doses fall
  due after the record time and are given;
- SS = 1 and EVID 3/4 cancel "infusions in progress or pending additional doses": a lagged dose
  whose record precedes the reset is never given, even when it falls due after it;
- SS = 1 with AMT = 0, RATE > 0, II = 0: the system is at the infusion's steady state at the
  record time and the infusion "terminates at the event time of the SS dose record"; F and ALAG do
  not apply to it;
- F changes an infusion's duration (RATE > 0, -1) or its rate (RATE = -2);
- ALAG and F are computed at every dose record, so they may differ from one dose to the next.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _event_tables import (
    assert_paths_agree,
    closed,
    dose,
    iv_amount,
    levels,
    obs,
    ode_conc,
    population,
    reset,
    rhs,
    train,
)

from nlmegen.dynamics import ode


def by_time(values: dict[float, float], default: float):
    """A per-dose parameter given by the dose record's time."""
    return lambda t, cmt: values.get(round(float(t), 6), default)


# (name, records, {lag, f, duration, rate}); depot CMT 1, central CMT 2
SCENARIOS = [
    ("oral and IV bolus, same-time records",
     [*obs(0), dose(0, 100), *obs(0, 1, 3), *obs(6), dose(6, 50, cmt=2), *obs(6, 7, 12)], {}),
    ("infusion RATE>0, F changes the duration",
     [dose(0, 100, cmt=2, rate=20), *obs(1, 3, 4, 5, 8)], {"f": {2: 0.6}}),
    ("infusion RATE=-1, F changes the duration",
     [dose(0, 100, cmt=2, rate=-1), *obs(1, 3.2, 5, 8)], {"rate": {2: 25.0}, "f": {2: 0.8}}),
    ("depot infusion RATE=-2 with lag and F",
     [dose(1, 100, cmt=1, rate=-2), *obs(1.2, 1.5, 3, 4, 8)],
     {"duration": {1: 2.5}, "lag": {1: 0.5}, "f": {1: 0.7}}),
    ("ADDL oral with lag",
     [dose(0, 100, ii=12, addl=3), *obs(0.5, 1, 12, 12.5, 13, 40, 50)], {"lag": {1: 0.75}}),
    ("SS=1 oral, lag < II",
     [dose(0, 100, ii=12, ss=1), *obs(0, 1, 2.5, 11.9, 14)], {"lag": {1: 2.0}}),
    ("SS=1 oral, ALAG > II",
     [dose(0, 100, ii=12, ss=1), *obs(0, 2, 3.5, 10, 14, 15, 16, 30, 40)], {"lag": {1: 15.0}}),
    ("SS=1 IV bolus, ALAG = 2.5 II",
     [dose(0, 100, cmt=2, ii=8, ss=1), *obs(0, 1, 4.5, 12, 19, 21, 30)], {"lag": {2: 20.0}}),
    ("SS=1 IV infusion, duration 2.5 II",
     [dose(0, 200, cmt=2, rate=10, ii=8, ss=1), *obs(0, 2, 4, 5, 9, 13, 17, 21, 30)], {}),
    ("SS=1 depot infusion, ALAG > II, overlapping",
     [dose(0, 60, cmt=1, rate=15, ii=6, ss=1), *obs(0, 1, 3, 5, 9, 12, 15, 20)], {"lag": {1: 10.0}}),
    ("SS=1 RATE=-2 duration 2.5 II with lag",
     [dose(0, 100, cmt=2, rate=-2, ii=12, ss=1), *obs(0, 3, 6, 10, 20, 30, 40)],
     {"duration": {2: 30.0}, "lag": {2: 5.0}}),
    ("SS=1 train of 5 overlapping infusions, lag + D = 5 II",
     [dose(0, 100, cmt=2, rate=-2, ii=4, ss=1), *obs(0, 1, 2, 3.5, 5, 10, 19, 21, 25)],
     {"duration": {2: 17.0}, "lag": {2: 3.0}}),
    ("SS=2 long infusion on SS=1",
     [dose(0, 80, cmt=2, ii=12, ss=1), *obs(3), dose(4, 120, cmt=2, rate=6, ii=12, ss=2),
      *obs(4, 6, 10, 20, 30)], {}),
    ("SS=1 constant infusion stops at its record (F, ALAG not applied)",
     [dose(2, 0, cmt=2, rate=5, ss=1), *obs(2, 3, 6), dose(8, 30, cmt=2), *obs(9, 20)],
     {"lag": {2: 1.0}, "f": {2: 0.5}}),
    ("SS=1 constant infusion into the depot",
     [dose(0, 0, cmt=1, rate=3, ss=1), *obs(0, 1, 5), dose(6, 50), *obs(7, 10)], {}),
    ("pending lagged dose dropped by a later SS=1",
     [dose(0, 100), *obs(0.5), dose(1, 50, ii=12, ss=1), *obs(1, 2, 4, 8)],
     {"lag": by_time({0.0: 3.0}, 0.5)}),
    ("pending lagged dose dropped by EVID 3",
     [dose(0, 100), reset(1), *obs(1.5, 3), dose(4, 50), *obs(5, 7)], {"lag": {1: 2.0}}),
    ("pending lagged dose dropped by EVID 4",
     [dose(0, 100), dose(1, 40, evid=4), *obs(1.5, 2.5, 3.5, 6)], {"lag": {1: 2.0}}),
    ("pending lagged infusion dropped by EVID 3",
     [dose(0, 100, cmt=2, rate=20), reset(1), *obs(1.5, 3), dose(4, 10, cmt=2), *obs(6, 7)],
     {"lag": {2: 2.0}}),
    ("SS train due after its record cancelled by EVID 3",
     [dose(0, 100, cmt=2, ii=6, ss=1), *obs(1, 6.5), reset(7), *obs(8), dose(9, 30, cmt=2), *obs(10, 16)],
     {"lag": by_time({0.0: 14.0}, 0.0)}),
    ("SS=1 overlapping infusions cut by EVID 3",
     [dose(0, 200, cmt=2, rate=10, ii=8, ss=1), *obs(1, 3), reset(5), *obs(6), dose(6, 50, cmt=2), *obs(7)], {}),
    ("SS=1 train cut by a later SS=1",
     [dose(0, 50, cmt=2, ii=6, ss=1), *obs(1, 3), dose(4, 80, cmt=2, rate=20, ii=12, ss=1), *obs(4, 6, 9, 15)],
     {"lag": by_time({0.0: 8.0}, 0.0)}),
    ("per-dose ALAG and F",
     [dose(0, 100), *obs(0.4, 1, 3), dose(8, 100), *obs(9, 10.5), dose(20, 100), *obs(20, 21, 30)],
     {"lag": by_time({0.0: 0.5, 8.0: 2.0, 20.0: 0.0}, 0.0), "f": by_time({0.0: 0.6, 8.0: 1.0, 20.0: 0.8}, 1.0)}),
    ("per-dose D and R",
     [dose(0, 100, cmt=2, rate=-2), *obs(1, 3), dose(10, 100, cmt=2, rate=-2), *obs(12, 16),
      dose(20, 100, cmt=2, rate=-1), *obs(21, 24), dose(30, 60, cmt=2, rate=-1), *obs(33, 40)],
     {"duration": by_time({0.0: 2.0, 10.0: 5.0}, 1.0), "rate": by_time({20.0: 40.0, 30.0: 10.0}, 1.0)}),
    ("SS=1 with ADDL and lag",
     [dose(0, 100, ii=12, addl=2, ss=1), *obs(0, 1.5, 12, 13.5, 30, 40)], {"lag": {1: 1.0}}),
    ("per-dose SS: lagged SS=1 then another dose",
     [dose(0, 100, ii=12, ss=1), *obs(1), dose(6, 50), *obs(7, 13, 15, 20)],
     {"lag": by_time({0.0: 14.0}, 0.2), "f": by_time({0.0: 0.5}, 1.0)}),
    ("EVID 4 steady state with SS=2 on top",
     [dose(0, 100), *obs(1), dose(2, 60, ii=8, ss=1, evid=4), *obs(3), dose(5, 40, cmt=2, ii=8, ss=2),
      *obs(5, 9, 14)], {"lag": {1: 9.0}}),
]  # fmt: skip

NAMES = [name for name, _, _ in SCENARIOS]
N = len(SCENARIOS)
PARAMS = {"ka": 0.8 + 0.05 * jnp.arange(N), "cl": 2.5 + 0.1 * jnp.arange(N), "v": 20.0 + jnp.arange(N)}


def _levels(pop):
    return levels(pop, **{k: [sc[2].get(k) for sc in SCENARIOS] for k in ("lag", "f", "duration", "rate")})


@pytest.fixture(scope="module")
def scenarios():
    pop = population([recs for _, recs, _ in SCENARIOS])
    lv = _levels(pop)
    got, ref = assert_paths_agree(pop, PARAMS, lv, NAMES)
    return pop, lv, got, ref


def test_ode_matches_closed_form(scenarios):
    """Every scenario: ODE and closed form to 1e-6 (the fixture checks; this names the test)."""
    pop, _, got, ref = scenarios
    assert np.all(np.isfinite(got[np.asarray(pop.mask)]))


def test_traced_population_matches(scenarios):
    """The population as a `jax.jit` argument (the general event grid) gives the same states."""
    pop, lv, got, _ = scenarios
    traced, status = ode_conc(pop, PARAMS, lv, traced=True)
    assert np.all(np.asarray(status) == 0)
    mask = np.asarray(pop.mask)
    np.testing.assert_allclose(np.asarray(traced)[mask], got[mask], rtol=1e-8, atol=1e-12)


def _conc(scenarios, name):
    pop, _, got, ref = scenarios
    s = NAMES.index(name)
    mask = np.asarray(pop.mask[s])
    return np.asarray(pop.times[s])[mask], got[s][mask], ref[s][mask], s


def _check(scenarios, name, amount_at):
    """Both paths against an analytic central amount ``amount_at(t, k)`` (divided by V)."""
    times, got, ref, s = _conc(scenarios, name)
    k, v = float(PARAMS["cl"][s] / PARAMS["v"][s]), float(PARAMS["v"][s])
    want = np.array([amount_at(t, k) for t in times]) / v
    np.testing.assert_allclose(ref, want, rtol=1e-9, atol=1e-12, err_msg=f"closed form: {name}")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * want.max(), err_msg=f"ODE: {name}")


def test_constant_infusion_stops_at_record(scenarios):
    """Steady state R / k at the record, then decay; F and ALAG do not apply to it (bolus: both)."""
    def amount(t, k):
        return 5.0 / k * np.exp(-k * (t - 2.0)) + iv_amount([(9.0, 15.0, 0.0)], t, k)

    _check(scenarios, "SS=1 constant infusion stops at its record (F, ALAG not applied)", amount)


def test_steady_state_lag_beyond_interval(scenarios):
    """ALAG = 2.5 II: the implied doses due at 4 and 12 after the record are given."""
    _check(scenarios, "SS=1 IV bolus, ALAG = 2.5 II", lambda t, k: iv_amount(train(20.0, 8.0, 100.0), t, k))


def test_steady_state_long_infusions(scenarios):
    """Duration 20 every 8: three infusions run at the record time, all of them to their end."""
    _check(scenarios, "SS=1 IV infusion, duration 2.5 II",
           lambda t, k: iv_amount(train(0.0, 8.0, 200.0, dur=20.0), t, k))


def test_five_overlapping_infusions(scenarios):
    """ALAG 3 + D 17 = 5 II: the implied doses at -13 .. -1 still run at the record, one more follows."""
    _check(scenarios, "SS=1 train of 5 overlapping infusions, lag + D = 5 II",
           lambda t, k: iv_amount(train(3.0, 4.0, 100.0, dur=17.0), t, k))


def test_pending_dose_dropped_by_reset(scenarios):
    """The dose at 0 (due at 2) is cancelled by the reset at 1: only the dose at 4 (due at 6) counts."""
    times, got, ref, _ = _conc(scenarios, "pending lagged dose dropped by EVID 3")
    assert np.all(ref[times < 6] == 0.0) and np.all(np.abs(got[times < 6]) < 1e-12) and ref[-1] > 0


def test_pending_train_cancelled(scenarios):
    """ALAG 14, II 6: implied doses due at 2, 8 and 14; the reset at 7 cancels those at 8 and 14."""
    def amount(t, k):
        members = [m for m in train(14.0, 6.0, 100.0) if m[0] <= 7.0] if t < 7 else []
        return iv_amount(members, t, k) + iv_amount([(9.0, 30.0, 0.0)], t, k)

    _check(scenarios, "SS train due after its record cancelled by EVID 3", amount)


def test_overlapping_infusions_cut_by_reset(scenarios):
    def amount(t, k):
        before = iv_amount(train(0.0, 8.0, 200.0, dur=20.0), t, k) if t < 5 else 0.0
        return before + (iv_amount([(6.0, 50.0, 0.0)], t, k) if t > 6 else 0.0)  # obs at 6 comes first

    _check(scenarios, "SS=1 overlapping infusions cut by EVID 3", amount)


# ------------------------------------------------------------------------------ limits and errors
def test_train_too_long_fails_that_subject_only():
    """ALAG + D over 5 II: the ODE path returns SS_UNSUPPORTED for that subject, NaN states; the
    other subject is unaffected. Before the limit the two paths agree."""
    recs = [dose(0, 100, cmt=2, rate=-2, ii=4, ss=1), *obs(0, 5, 30)]
    pop = population([recs, recs, [dose(0, 100, ii=4, ss=1), *obs(1, 30)]])
    params = {k: v[:3] for k, v in PARAMS.items()}
    lv = levels(pop, duration=[{2: 19.0}, {2: 21.0}, None], lag=[None, None, {1: 20.0}])
    got, status = ode_conc(pop, params, lv)
    assert list(np.asarray(status)) == [0, ode.SS_UNSUPPORTED, ode.SS_UNSUPPORTED]
    assert np.all(np.isnan(np.asarray(got)[1:])) and np.all(np.isfinite(np.asarray(got)[0]))
    ref = closed(pop, params, lv)
    np.testing.assert_allclose(np.asarray(got)[0], ref[0], rtol=1e-6)


def test_per_dose_shape_errors():
    pop = population([[dose(0, 100), *obs(1, 2)], [dose(0, 100), dose(5, 100), *obs(6)]])
    params = {k: v[:2] for k, v in PARAMS.items()}
    with pytest.raises(ValueError, match="n_doses = 2"):
        ode.solve(lambda t, y, p: -y, pop, params, y0=jnp.zeros(2), lag=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="n_doses = 2"):
        closed(pop, params, {"lag": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="n_doses = 2"):
        closed(pop, params, {"f": {1: jnp.ones((2, 5))}})


def test_per_dose_values_under_vmap(scenarios):
    """A single subject (the population mapped with `jax.vmap`) takes per-dose values as ``[n_doses]``."""
    import jax

    import nlmegen

    pop, lv, _, ref = scenarios

    def one(pop_i, p_i, lv_i):
        return nlmegen.pk.one_cmt(pop_i, cl=p_i["cl"], v=p_i["v"], ka=p_i["ka"], **lv_i)

    mapped = jax.vmap(one)(pop, PARAMS, lv)
    np.testing.assert_allclose(np.asarray(mapped), ref, rtol=1e-12, atol=1e-14)


def test_gradients_match_closed_form():
    """Derivatives through the continued steady-state train (its dose times move with ALAG and D)
    and through cancelled doses: the ODE path's reverse-mode gradient equals the closed form's."""
    import jax

    import nlmegen

    subjects = [
        [dose(0, 100, cmt=2, ii=8, ss=1), *obs(0, 1, 4.5, 13, 21, 30)],
        [dose(0, 100, cmt=2, rate=-2, ii=8, ss=1), *obs(0.5, 2, 5, 9, 13, 17, 22, 30)],
        [dose(0, 100, ii=6, ss=1), *obs(1, 6.5), reset(7), *obs(8), dose(9, 30), *obs(10.5, 16)],
    ]
    pop = population(subjects)
    theta = {"ka": jnp.array([1.0, 1.2, 0.7]), "cl": jnp.array([2.5, 3.0, 2.0]), "v": jnp.array([20.0, 25.0, 15.0]),
             "lag": jnp.array([20.3, 3.1, 10.2]), "dur": jnp.array([1.0, 19.7, 1.0]), "f": jnp.array([0.9, 0.8, 0.7])}
    weights = jnp.linspace(0.5, 1.5, pop.n_obs)

    def dose_levels(th):
        return {"lag": {1: th["lag"], 2: th["lag"]}, "f": {1: th["f"], 2: th["f"]}, "duration": {2: th["dur"]}}

    def loss_ode(th):
        states = ode.solve(rhs, pop, {k: th[k] for k in ("ka", "cl", "v")}, y0=jnp.zeros(2),
                           rtol=1e-10, atol=1e-12, **dose_levels(th))
        return jnp.sum(jnp.where(pop.mask, states[..., 1] / th["v"][:, None] * weights, 0.0))

    def loss_closed(th):
        conc = nlmegen.pk.one_cmt(pop, cl=th["cl"], v=th["v"], ka=th["ka"], **dose_levels(th))
        return jnp.sum(jnp.where(pop.mask, conc * weights, 0.0))

    g_ode = jax.jit(jax.grad(loss_ode))(theta)
    g_closed = jax.jit(jax.grad(loss_closed))(theta)
    for name in theta:
        np.testing.assert_allclose(g_ode[name], g_closed[name], rtol=1e-5, atol=1e-8, err_msg=name)
