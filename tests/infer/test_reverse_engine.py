"""The reverse engine (sensitivity-augmented ODE solves, one reverse pass over theta) on an ODE model
with a neural-network term: its OFV gradient equals central finite differences and the forward
engine's, for FO, FOCE and FOCEI; Laplace (forward engine) against finite differences too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nlmegen
from nlmegen.examples import idr_nn_model, idr_population
from nlmegen.infer.laplace.backend import _Problem

# tight ODE tolerances: finite differences of the OFV need it smooth to ~1e-10
MODEL = idr_nn_model((3,), n_eta_nn=1, rtol=1e-10, atol=1e-12)
INIT = {"log_ka": 0.0, "log_cl": 0.7, "log_vc": 3.0, "log_kin": 2.3, "log_kout": -0.7,
        "omega": np.array([0.3, 0.5]), "sigma_conc": 0.1, "sigma_resp": 1.0,
        "effect$params": nnx.to_pure_dict(nnx.state(MODEL.net, nnx.Param))}
# parameters checked by finite differences: PK, Omega, residual error, network weights of both layers
CHECKED = ("log_cl", "log_kout", "omega[0]", "omega[1]", "sigma_resp", "effect$params[1]", "effect$params[5]",
           "effect$params[9]")


@pytest.fixture(scope="module")
def pop():
    table = idr_population(3, n_doses=2, times=(1, 2, 4, 8, 12, 24, 36))
    sims = nlmegen.simulate(MODEL, INIT, nlmegen.read_nonmem(table, allow_missing_dv=True), key=jax.random.key(3))
    table.loc[table["EVID"] == 0, "DV"] = sims["value"].to_numpy()
    return nlmegen.read_nonmem(table)


def _problem(backend, pop):
    problem = _Problem.build(backend, MODEL, pop, INIT, None)
    problem.compile()
    x = problem.theta0[problem.free] + 0.05 * np.sin(np.arange(int(problem.free.sum())))
    return problem, x


def _ofv(problem, x):
    problem.eta = jnp.zeros_like(problem.eta)  # every evaluation finds its EBEs from scratch
    ofv, _, ebe = problem.evaluate(x)
    assert np.all(np.asarray(ebe.converged))
    return ofv


def _finite_differences(problem, x, labels, h=1e-3):
    """Five-point central differences (error O(h^4)) along the named coordinates."""
    out = []
    for label in labels:
        e = np.zeros_like(x)
        e[problem.free_labels.index(label)] = h
        f = [_ofv(problem, x + k * e) for k in (2, 1, -1, -2)]
        out.append((-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h))
    return np.array(out)


def _gradient(problem, x):
    problem.eta = jnp.zeros_like(problem.eta)
    _, grad, ebe = problem.evaluate(x)
    assert np.all(np.asarray(ebe.converged))
    return grad


def _relative(a, b):
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3 * np.max(np.abs(b))))


@pytest.mark.parametrize("backend", [nlmegen.FOCEI, pytest.param(nlmegen.FOCE, marks=pytest.mark.slow),
                                     pytest.param(nlmegen.FO, marks=pytest.mark.slow)])
def test_reverse_gradient_equals_finite_differences(pop, backend):
    problem, x = _problem(backend(engine="reverse", progress=False), pop)
    assert problem.engine == "reverse"
    grad = _gradient(problem, x)
    assert np.all(np.isfinite(grad)) and grad.size == 9 + (2 * 3 + 3) + (3 + 1)  # PK, 2 omegas, sigmas; 2-3-1 network
    idx = [problem.free_labels.index(lab) for lab in CHECKED]
    fd = _finite_differences(problem, x, CHECKED)
    assert _relative(grad[idx], fd) < 1e-5, np.c_[grad[idx], fd]


def test_reverse_gradient_equals_forward_engine(pop):
    reverse, x = _problem(nlmegen.FOCEI(engine="reverse", progress=False), pop)
    forward, _ = _problem(nlmegen.FOCEI(engine="forward", progress=False), pop)
    g_rev, g_fwd = _gradient(reverse, x), _gradient(forward, x)
    assert _relative(g_rev, g_fwd) < 1e-7
    assert _ofv(reverse, x) == pytest.approx(_ofv(forward, x), abs=1e-7)


@pytest.mark.slow  # about a minute (second-order sensitivities of the ODE with a network); FOCEI's check is default
def test_laplace_gradient_equals_finite_differences(pop):
    problem, x = _problem(nlmegen.Laplace(progress=False), pop)
    assert problem.engine == "forward"  # exact Hessians need second-order sensitivities
    grad = _gradient(problem, x)
    idx = [problem.free_labels.index(lab) for lab in CHECKED]
    fd = _finite_differences(problem, x, CHECKED)
    assert _relative(grad[idx], fd) < 1e-5, np.c_[grad[idx], fd]


def test_auto_engine_choice(pop):
    network = _Problem.build(nlmegen.FOCEI(progress=False), MODEL, pop, INIT, None)
    assert network.resolve_engine() == "reverse"
    hill = _Problem.build(nlmegen.FOCEI(progress=False), nlmegen.examples.idr_model, pop, None, None)
    assert hill.resolve_engine() == "reverse"  # an ODE model: reverse even with 14 parameters
    # ... but steady-state doses, which the sensitivity solve does not cover, keep the forward engine
    table = idr_population(3, n_doses=2, times=(1, 2, 4, 8, 12, 24, 36))
    doses = table["EVID"] == 1
    table.loc[doses, "SS"], table.loc[doses, "II"] = 1, 24.0
    table.loc[~doses, "DV"] = 1.0
    steady = _Problem.build(nlmegen.FOCEI(progress=False), nlmegen.examples.idr_model, nlmegen.read_nonmem(table),
                            None, None)
    assert steady.resolve_engine() == "forward"
    theo = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    closed = _Problem.build(nlmegen.FOCEI(progress=False), nlmegen.examples.theo_model, theo, None, None)
    assert closed.resolve_engine() == "forward"
    with pytest.raises(nlmegen.ModelError, match="Laplace"):
        _Problem.build(nlmegen.Laplace(engine="reverse"), MODEL, pop, INIT, None).resolve_engine()


UDE = idr_nn_model((3,), random_effects=False, seed=1, rtol=1e-10, atol=1e-12)


def test_models_without_random_effects(pop):
    init = {k: v for k, v in INIT.items() if k != "omega"}
    init["effect$params"] = nnx.to_pure_dict(nnx.state(UDE.net, nnx.Param))
    problem = _Problem.build(nlmegen.FOCEI(progress=False), UDE, pop, init, None)
    problem.compile()
    assert problem.engine == "reverse"
    x = problem.theta0[problem.free] + 0.05 * np.sin(np.arange(int(problem.free.sum())))
    ofv, grad, _ = problem.evaluate(x)
    labels = ("log_kout", "sigma_resp", "effect$params[2]", "effect$params[6]")
    idx = [problem.free_labels.index(lab) for lab in labels]
    assert _relative(grad[idx], _finite_differences(problem, x, labels)) < 1e-5
    # the OFV is -2 log p(y | theta) without NONMEM's constant
    fit = nlmegen.fit(UDE, pop, method=nlmegen.FOCEI(progress=False, covariance="none", maxiter=30), init=init)
    assert np.isfinite(fit.ofv) and fit.ofv < ofv


def test_reverse_ofv_slope_at_stale_ebes_is_the_total_derivative(pop):
    """Where the EBE search takes no step (a subject at the ODE's noise floor), the OFV at a nearby
    theta is evaluated at the old EBEs. Its slope must still be the total derivative the reverse pass
    returns (the value carries ``lambda' dl/deta``, see `reverse`); the plain ``F_i`` at stale EBEs has
    the partial derivative's slope instead, and BFGS' line searches failed on that mismatch."""
    from nlmegen.infer.laplace.objective import Objective
    from nlmegen.infer.laplace.reverse import reverse_value_and_grad

    problem, x = _problem(nlmegen.FOCEI(engine="reverse", progress=False), pop)
    grad = _gradient(problem, x)
    eta_star = problem.eta
    # no EBE iteration: the OFV at the EBEs it is given, which the search accepts as converged (as it
    # does at the noise floor; the value carries the term only for converged subjects)
    stale = jax.jit(reverse_value_and_grad(Objective(problem.density, "focei", 0, 1e-2), False,
                                           np.flatnonzero(problem.free)))
    direction = np.cos(np.arange(x.size))
    h = 1e-6  # the EBEs' gradient moves by about 1e4 h: stays within the search's convergence test
    values = []
    for k in (1, -1):
        out = stale(jnp.asarray(x + k * h * direction), jnp.asarray(problem.theta0), eta_star, pop)
        assert bool(np.all(out[3].converged))
        values.append(float(out[0]))
    slope = (values[0] - values[1]) / (2 * h)
    assert slope == pytest.approx(float(grad @ direction), rel=1e-5)
