"""A random-effect SD driven to ~0 sits at a spurious stationary point on the log scale; the fit
restarts it from its start value when that lowers the OFV (`_Problem.boundary_restart`)."""

import numpy as np
import pytest

import nlmegen
from nlmegen.examples import theo_model
from nlmegen.infer.laplace.backend import _Problem
from nlmegen.infer.laplace.bfgs import BFGSResult


@pytest.fixture(scope="module")
def problem():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    init = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": np.array([0.6, 0.26, 0.14]), "add_sd": 0.7}
    prob = _Problem.build(nlmegen.FOCEI(progress=False), theo_model, pop, init, None)
    prob.compile()
    return prob


def _at(problem, x):
    ofv, grad, ebe = problem.evaluate(x)
    return BFGSResult(x, ofv, grad, np.eye(x.size), True, "converged", 10, (ebe, problem.eta))


def test_a_collapsed_omega_is_restarted_where_that_lowers_the_ofv(problem):
    start = problem.theta0[problem.free].copy()
    labels = problem.free_labels
    collapsed = start.copy()
    k = labels.index("omega[0]")
    collapsed[k] = np.log(1e-5)  # the SD of eta_ka at ~0: the OFV is much worse than at 0.6
    res = _at(problem, collapsed)
    out = problem.boundary_restart(lambda x: problem.evaluate(x)[:2] + (None,), res, start)
    assert out is not None
    x1, first, note, grads = out
    assert grads.shape == (problem.pop.n_subjects, start.size)
    assert start[k] - np.log(100.0) <= x1[k] <= start[k] and np.all(np.delete(x1, k) == np.delete(collapsed, k))
    assert first[0] < res.fun and "omega[0]" in note


def test_structural_parameters_and_sds_not_collapsed_are_left_alone(problem):
    start = problem.theta0[problem.free].copy()
    labels = problem.free_labels
    low = start.copy()
    low[labels.index("tka")] = -8.0  # a structural parameter far below its start: not a variance
    low[labels.index("omega[1]")] = start[labels.index("omega[1]")] - 1.0  # an SD 3x lower: not at 0
    res = _at(problem, low)
    assert problem.boundary_restart(lambda x: problem.evaluate(x)[:2] + (None,), res, start) is None
