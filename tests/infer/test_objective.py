"""NONMEM's objective: the Wang (2007) exact references, and exact gradients through the EBEs."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen
from nlmegen.infer.laplace.objective import Objective
from nlmegen.model import Density, discover

# Wang Y. J Pharmacokinet Pharmacodyn 2007;34:575-593, Table 1 data; NONMEM OFVs at the fixed values
# ke = 0.5, omega^2 = 0.04, sigma^2 = 0.1 (shared/data/README.md).
WANG_REFERENCE = {
    ("proportional", "focei"): 39.458, ("proportional", "foce"): 39.207, ("proportional", "fo"): 39.213,
    ("additive", "focei"): -2.059, ("additive", "foce"): -2.059, ("additive", "fo"): 0.026,
}
WANG_PARAMS = {"ke": 0.5, "omega": 0.2, "sigma": float(np.sqrt(0.1))}


def wang_model(error: str):
    def model(pop):
        ke = numpyro.sample("ke", dist.LogNormal(0.0, 1.0))
        omega = numpyro.sample("omega", dist.HalfNormal(1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            ipre = 10.0 * jnp.exp(-ke * jnp.exp(eta)[:, None] * pop.times)
            if error == "proportional":
                nlmegen.observe("y", nlmegen.proportional(ipre, sigma), pop)
            else:
                nlmegen.observe("y", nlmegen.additive(ipre, sigma), pop)
    return model


@pytest.fixture(scope="module")
def wang():
    return nlmegen.read_nonmem(nlmegen.datasets.load("wang2007"))


@pytest.mark.reference
@pytest.mark.parametrize("error,method", sorted(WANG_REFERENCE))
def test_wang2007_objective(wang, error, method):
    ofv = nlmegen.objective(wang_model(error), wang, WANG_PARAMS, method=method)
    assert ofv == pytest.approx(WANG_REFERENCE[(error, method)], abs=1e-3)


def test_laplace_is_close_to_focei_for_a_well_behaved_model(wang):
    laplace = nlmegen.objective(wang_model("additive"), wang, WANG_PARAMS, method="laplace")
    focei = WANG_REFERENCE[("additive", "focei")]
    assert abs(laplace - focei) < 0.5  # the FOCEI Hessian drops second derivatives of f only


@pytest.mark.parametrize("method", ["focei", "foce", "laplace", "fo"])
def test_gradient_matches_finite_differences(wang, method):
    model = wang_model("proportional")
    density = Density(model, discover(model, wang))
    obj = Objective(density, method)
    theta = density.theta_space.unconstrain({"ke": 0.45, "omega": 0.25, "sigma": 0.3})

    def ofv(th):
        eta, _ = obj.ebe_implicit(th, jnp.zeros((10, 1)), wang)
        return jnp.sum(obj.subject_ofv(th, eta, wang))

    grad = jax.jit(jax.grad(ofv))(theta)
    f = jax.jit(ofv)
    h = 1e-5
    fd = np.array([(f(theta.at[k].add(h)) - f(theta.at[k].add(-h))) / (2 * h) for k in range(theta.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)


def test_ebes_are_the_conditional_modes(wang):
    model = wang_model("additive")
    density = Density(model, discover(model, wang))
    obj = Objective(density, "focei")
    theta = density.theta_space.unconstrain(WANG_PARAMS)
    state = obj.ebe(theta, jnp.zeros((10, 1)), wang)
    assert bool(state.converged.all())
    grid = jnp.linspace(-1.0, 1.0, 4001)
    joint = jax.vmap(lambda e: density.subject_log_joint(theta, jnp.full((10, 1), e), wang))(grid)
    np.testing.assert_allclose(state.eta[:, 0], grid[jnp.argmax(joint, axis=0)], atol=1e-3)


@pytest.mark.parametrize("search", ["newton", "newton_local"])
def test_a_stalled_subject_is_not_reported_converged(search):
    """Subject 1's objective is finite only at its start (every trial step fails: it stalls) while
    subject 0 needs several Newton steps; the stalled subject must come out not converged."""
    from nlmegen.infer.laplace import objective as obj

    def objective(e):
        smooth = -jnp.sum(jnp.cosh(e - 3.0), axis=-1)
        at_start = jnp.all(e == 0.0, axis=-1)
        stuck = jnp.where(at_start, -jnp.sum((e - 3.0) ** 2, axis=-1), jnp.nan)
        return jnp.where(jnp.arange(e.shape[0]) == 0, smooth, stuck)

    def hessian(e):
        h = jax.vmap(jax.hessian(lambda x: jnp.sum(-jnp.cosh(x - 3.0))))(e)
        return -h + 1e-9 * jnp.eye(e.shape[-1])

    eta0 = jnp.zeros((2, 2))
    if search == "newton":
        state = obj._newton(objective, hessian, eta0, max_iter=50, gtol=1e-8, max_halvings=20)
    else:
        local = lambda e: (obj._columns(objective, e), hessian(e), jnp.zeros_like(e))  # noqa: E731
        state, _, _ = obj._newton_local(objective, local, local, eta0, max_iter=50, gtol=1e-8, max_halvings=20)
    assert bool(state.converged[0]) and np.allclose(state.eta[0], 3.0, atol=1e-6)
    assert int(state.iterations) > 2  # subject 0 kept searching after subject 1 stalled
    assert not bool(state.converged[1])


@pytest.mark.parametrize("max_iter", [50, 2])
def test_the_search_ends_with_the_exact_pieces_at_its_result(max_iter):
    """With ``final_exact`` the sensitivity engine's search returns ``exact``'s matrix and extra at the
    EBEs it returns (what the reverse engine's multipliers use), also when it stops at its iteration cap;
    the search itself is Fisher scoring with a matrix that is only approximately the Hessian."""
    from nlmegen.infer.laplace import objective as obj

    target = jnp.array([[1.0, -2.0], [0.5, 0.3], [-1.0, 2.0]])

    def objective(e):
        return -jnp.sum(jnp.cosh(e - target), axis=-1)

    def hessian(e):
        return jnp.einsum("sk,kl->skl", jnp.cosh(e - target), jnp.eye(2))

    def scoring(e):  # a matrix off by a factor 2: linear convergence
        return obj._columns(objective, e), 2.0 * hessian(e), jnp.zeros_like(e)

    def exact(e):
        return obj._columns(objective, e), hessian(e), 10.0 * e

    eta0 = jnp.zeros((3, 2))
    state, matrix, extra = obj._newton_local(objective, scoring, exact, eta0, max_iter=max_iter, gtol=1e-10,
                                             max_halvings=20, final_exact=True)
    np.testing.assert_allclose(matrix, hessian(state.eta), rtol=1e-12)
    np.testing.assert_allclose(extra, 10.0 * state.eta, rtol=1e-12)
    if max_iter == 2:
        assert int(state.iterations) == 2 and not bool(state.converged.any())
    else:
        assert bool(state.converged.all())
        np.testing.assert_allclose(state.eta, target, atol=1e-5)  # scoring at rate 1/2: decrement 1e-12
    plain, _, no_extra = obj._newton_local(objective, scoring, exact, eta0, max_iter=max_iter, gtol=1e-10,
                                           max_halvings=20)
    assert int(plain.iterations) == int(state.iterations)
