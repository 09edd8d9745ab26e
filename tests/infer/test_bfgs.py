"""The outer optimiser of the conditional methods (`nlmegen.infer.laplace.bfgs`)."""

from __future__ import annotations

import numpy as np

from nlmegen.infer.laplace.bfgs import bfgs, bhhh_inverse


def _quadratic(a: np.ndarray, b: np.ndarray):
    def fun(x):
        return 0.5 * x @ a @ x - b @ x, a @ x - b, None

    return fun


def test_exact_starting_inverse_hessian_converges_in_one_step():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5))
    a, b = m @ m.T + np.eye(5), rng.normal(size=5) * 0.1
    fun, x0 = _quadratic(a, b), np.zeros(5)
    res = bfgs(fun, x0, fun(x0), np.linalg.inv(a), ftol=1e-12)
    assert res.success and res.nit == 1
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-10)


def test_rosenbrock_from_the_identity():
    def fun(x):
        f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])
        return f, g, None

    x0 = np.array([-1.2, 1.0])
    res = bfgs(fun, x0, fun(x0), np.eye(2), gtol=1e-8, ftol=1e-14)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-5)


def test_non_finite_trial_points_are_stepped_back_from():
    """A trial where the objective is not finite (e.g. an ODE that fails) shortens the step."""

    def fun(x):
        if x[0] > 0.5:
            return np.inf, np.full(1, np.nan), None
        return float((x[0] - 0.4) ** 2), np.array([2 * (x[0] - 0.4)]), "aux"

    x0 = np.array([-2.0])
    res = bfgs(fun, x0, fun(x0), np.eye(1) * 10.0, max_step=5.0)
    assert res.success and abs(res.x[0] - 0.4) < 1e-3 and res.aux == "aux"


def test_failure_is_reported_not_hidden():
    """A gradient that points the wrong way: no decrease is found and the result says so."""

    def fun(x):
        return float(x @ x), -2 * x, None

    x0 = np.array([1.0, 2.0])
    res = bfgs(fun, x0, fun(x0), np.eye(2))
    assert not res.success and "line search failed" in res.message


def test_bhhh_inverse_is_symmetric_positive_definite_even_when_rank_deficient():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(2, 4))  # fewer subjects than parameters
    h = bhhh_inverse(g)
    np.testing.assert_array_equal(h, h.T)
    assert np.all(np.linalg.eigvalsh(h) > 0)
    full = rng.normal(size=(50, 3))
    np.testing.assert_allclose(bhhh_inverse(full), np.linalg.inv(0.5 * full.T @ full), rtol=1e-10)
    np.testing.assert_array_equal(bhhh_inverse(np.full((3, 2), np.nan)), np.eye(2))


def test_wolfe_line_search_minimises_rosenbrock_from_an_identity_start():
    def fun(x):
        f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])
        return f, g, None

    x0 = np.array([-1.2, 1.0])
    res = bfgs(fun, x0, fun(x0), np.eye(2) * 1e-3, gtol=1e-8, ftol=1e-14, rescale_first=True, line_search="wolfe")
    assert res.success, res.message
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-5)
    assert res.nit < 60


def test_each_failed_line_search_gets_its_own_steepest_descent_restart():
    """The restart along steepest descent is one per failure, not one per run: a long fit (network
    weights) whose line search fails twice, hundreds of iterations apart, must not stop at the second
    failure when a step was taken since the first (the 60-subject DeepNLME fit did)."""
    rng = np.random.default_rng(1)
    m = rng.normal(size=(4, 4))
    a, b = m @ m.T + np.eye(4), rng.normal(size=4)
    quadratic = _quadratic(a, b)
    blocked = {"left": 0}

    def fun(x):  # a whole line search of non-finite values after iterations 2 and 4
        if blocked["left"] > 0:
            blocked["left"] -= 1
            return np.nan, np.full(4, np.nan), None
        return quadratic(x)

    def callback(it, x, f, g):
        if it in (2, 4):
            blocked["left"] = 40  # = max_backtracks: the quasi-Newton direction's search fails

    x0 = np.zeros(4)
    res = bfgs(fun, x0, quadratic(x0), np.eye(4), ftol=1e-12, callback=callback)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-4)


def test_after_a_cut_step_the_next_line_search_starts_from_twice_the_step_taken():
    """Where the unit step overshoots (an inverse Hessian 50x too large), a line search that had to
    cut its first trial makes the next one start from twice the step it took, not from 1 (on network
    weights every unit step overshot: half of all evaluations were rejected trials); once steps are
    accepted whole the first trial doubles back to 1."""
    a, b = np.diag([1.0, 3.0]), np.array([1.0, -2.0])
    fun = _quadratic(a, b)
    trials, states = [], []

    def recorded(x):
        trials.append(np.array(x))
        return fun(x)

    x0 = np.zeros(2)
    res = bfgs(recorded, x0, fun(x0), 50.0 * np.eye(2), max_step=1e3, ftol=1e-14, on_state=states.append)
    assert res.success
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), atol=1e-6)
    first = states[0]
    assert 0 < first.short_step < 0.5  # the unit step was cut
    # the second line search's first trial: x1 + 2 * short_step * (-H1 g1)
    expected = first.x - 2.0 * first.short_step * (first.h @ first.g)
    n_first = next(i for i, t in enumerate(trials) if np.allclose(t, first.x)) + 1
    np.testing.assert_allclose(trials[n_first], expected, rtol=1e-12)
    assert states[-1].short_step == 0.0  # back to the unit step at the end
