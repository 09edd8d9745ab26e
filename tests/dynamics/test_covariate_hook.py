"""`ode.solve(..., covariates=...)`: time-varying covariates in the right-hand side, NOCB and LOCF.

Reference: the exact piecewise-exponential solution of ``dA/dt = -CL(t)/V A`` with ``CL(t)`` the
covariate's step function (NOCB: a record's value holds on the interval that ends at it; LOCF: on
the one that starts at it), including an EVID 2 record and a dose record whose time is not a grid
point of the solve (its dose is lagged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import nlmegen
from nlmegen.dynamics import _sensitivity
from nlmegen.dynamics.ode import solve

TIMES = np.arange(1.0, 11.0)


def _table() -> pd.DataFrame:
    rows = [dict(ID=1, TIME=0.0, AMT=100.0, EVID=1, DV=0.0, CL=1.0)]
    rows += [dict(ID=1, TIME=t, AMT=0.0, EVID=0, DV=1.0, CL=1.0 if t <= 5 else 3.0) for t in TIMES]
    rows.insert(6, dict(ID=1, TIME=5.5, AMT=0.0, EVID=2, DV=0.0, CL=2.0))  # a covariate-only record
    second = [dict(r, ID=2) for r in rows]
    second[0] = dict(second[0], CL=4.0)  # subject 2: a different value on the dose record only
    return pd.DataFrame(rows + second)


def _exact(segments, lag: float = 0.0) -> np.ndarray:
    """Amount after a 100 bolus at ``lag`` for piecewise constant k: ``segments`` = (start, end, k)."""
    out = []
    for t in TIMES:
        log_a = 0.0
        for a, b, k in segments:
            log_a -= k * max(0.0, min(t, b) - max(a, lag))
        out.append(100 * np.exp(log_a) if t > lag else 0.0)
    return np.array(out)


@pytest.mark.parametrize("rule", ["nocb", "locf"])
def test_piecewise_covariate_matches_exact_solution(rule):
    pop = nlmegen.read_nonmem(_table(), interpolation=rule)

    def rhs(t, y, p, cov):
        return -cov["CL"] / p["v"] * y

    lag = 0.25  # the dose record at 0 (subject 2's covariate change) is no dose event of the grid
    y = solve(rhs, pop, {"v": 10.0}, y0=jnp.zeros(1), lag=lag, rtol=1e-10, atol=1e-12, covariates=["CL"])[..., 0]
    if rule == "nocb":  # (0, 5]: 1, (5, 5.5]: 2, (5.5, ...]: 3
        s1 = s2 = [(0, 5, 0.1), (5, 5.5, 0.2), (5.5, 99, 0.3)]
    else:  # [0, 5.5): 1 (subject 2: 4), [5.5, 6): 2, [6, ...): 3
        s1 = [(0, 5.5, 0.1), (5.5, 6, 0.2), (6, 99, 0.3)]
        s2 = [(0, 1, 0.4), (1, 5.5, 0.1), (5.5, 6, 0.2), (6, 99, 0.3)]
    np.testing.assert_allclose(np.asarray(y[0]), _exact(s1, lag), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(y[1]), _exact(s2, lag), rtol=1e-8)


def test_default_tolerance_is_met_at_the_changes():
    # without the inward ends the first stage of each NOCB segment used the previous value: 5e-5 at rtol 1e-6
    pop = nlmegen.read_nonmem(_table())
    y = solve(lambda t, y, p, cov: -cov["CL"] / p["v"] * y, pop, {"v": 10.0}, y0=jnp.zeros(1), covariates=["CL"])
    exact = _exact([(0, 5, 0.1), (5, 5.5, 0.2), (5.5, 99, 0.3)])
    assert np.max(np.abs(np.asarray(y[0, :, 0]) / exact - 1)) < 1e-6


def test_initial_state_function_gets_the_parameters_and_names_are_checked():
    pop = nlmegen.read_nonmem(_table())
    y = solve(lambda t, y, p, cov: -cov["CL"] / p["v"] * y, pop, {"v": 10.0, "a0": 5.0},
              y0=lambda p: p["a0"][None], covariates=["CL"])
    assert y.shape == (2, 10, 1)
    assert float(y[0, 0, 0]) == pytest.approx(105 * np.exp(-0.1), rel=1e-5)  # the dose added to a0 = 5
    with pytest.raises(KeyError, match="no covariate \\['crcl'\\].*'CL'"):
        solve(lambda t, y, p, cov: y, pop, {}, y0=jnp.zeros(1), covariates=["crcl"])


def test_sensitivities_through_the_hook_match_finite_differences():
    # the sensitivity-augmented solve (FOCEI's reverse engine) with a lag that depends on the input:
    # event-time terms evaluate the right-hand side at the segment ends, on the segment's own value
    pop = nlmegen.read_nonmem(_table())

    def states(u, sens: bool):
        p = {"v": jnp.exp(u[:, 0]), "lag": 0.2 * jnp.exp(u[:, 1])}

        def run():
            return solve(lambda t, y, q, cov: -cov["CL"] / q["v"] * y, pop, p, y0=jnp.zeros(1), lag=p["lag"],
                         rtol=1e-10, atol=1e-12, covariates=["CL"])[..., 0]

        if not sens:
            return run()
        with _sensitivity.sensitivities(u):
            return run()

    u0 = jnp.array([[2.3, 0.1], [2.0, -0.2]])
    for k in range(2):
        du = jnp.zeros_like(u0).at[:, k].set(1.0)
        _, tangent = jax.jvp(lambda u: states(u, True), (u0,), (du,))
        h = 1e-5
        fd = (states(u0 + h * du, False) - states(u0 - h * du, False)) / (2 * h)
        np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), rtol=1e-5, atol=1e-6)
