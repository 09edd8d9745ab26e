"""Universal differential equations: the seeds' NN drug effect inside an ODE, trained by optax.

dR/dt = kin * (1 + NN(C/V)) - kout * R (UDE), and DeepNLME's NN(C/V, eta) with a random effect
fed to the network as an extra input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx

import nlmegen
from nlmegen.model import Density, discover

PK = {"ka": 1.0, "cl": 2.0, "vc": 20.0, "kin": 10.0, "kout": 0.5}


def hill(c):
    return 2.0 * c**1.5 / (1.0 + c**1.5)


class Effect(nnx.Module):
    """A small MLP c -> effect (inputs: concentration, plus optional random effects)."""

    def __init__(self, n_in: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(n_in, 8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))[..., 0]


def pkpd_rhs(effect):
    def rhs(t, y, p):
        c = y[1] / p["vc"]
        return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["cl"] / p["vc"] * y[1],
                          p["kin"] * (1.0 + effect(c, p)) - p["kout"] * y[2]])
    return rhs


def y0(p):
    return jnp.stack([0.0 * p["kin"], 0.0 * p["kin"], p["kin"] / p["kout"]])


@pytest.fixture(scope="module")
def study():
    table = nlmegen.examples.idr_population(6, n_doses=2, times=(1, 2, 4, 8, 12, 24, 36, 48))
    table = table[table["DVID"] != "conc"].reset_index(drop=True)
    table["DVID"] = "resp"
    pop = nlmegen.read_nonmem(table, allow_missing_dv=True)
    doses = jnp.linspace(0.5, 2.0, 6)  # different dose levels, so the effect curve is identifiable
    pop = pop.with_regimen({"TIME": [0.0, 24.0], "AMT": [100.0, 100.0]})
    params = {k: jnp.full(6, v) for k, v in PK.items()}
    params["scale"] = doses
    truth = nlmegen.ode.solve(pkpd_rhs(lambda c, p: hill(c)), _scaled(pop, doses), params, y0=y0)[..., 2]
    noise = 0.2 * jax.random.normal(jax.random.key(0), truth.shape)
    return _scaled(pop, doses), truth + noise


def _scaled(pop, scale):
    import dataclasses

    return dataclasses.replace(pop, dose_amts=pop.dose_amts * scale[:, None])


def test_ude_training_lowers_the_loss(study):
    pop, data = study
    import dataclasses

    pop = dataclasses.replace(pop, dv=jnp.where(pop.mask, data, 0.0))
    net = Effect(1, nnx.Rngs(0))

    def model(pop):
        f = nlmegen.nn("effect", net)
        sigma = numpyro.param("sigma", 0.5, constraint=dist.constraints.positive)
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, 0.1))  # a random effect on kout
            p = {k: jnp.full(pop.n_subjects, v) for k, v in PK.items()}
            p["kout"] = p["kout"] * jnp.exp(eta)
            states = nlmegen.ode.solve(pkpd_rhs(lambda c, p: f(jnp.atleast_1d(c))), pop, p, y0=y0)
            nlmegen.observe("resp", dist.Normal(states[..., 2], sigma), pop)

    density = Density(model, discover(model, pop))
    theta0 = density.theta_space.unconstrain(
        {"sigma": 0.5, "effect$params": nnx.to_pure_dict(nnx.state(net, nnx.Param))})
    eta = jnp.zeros((pop.n_subjects, 1))

    def loss(theta):
        return -jnp.sum(density.subject_log_joint(theta, eta, pop))

    opt = optax.adam(0.05)
    value_and_grad = jax.jit(jax.value_and_grad(loss))

    @jax.jit
    def step(theta, state):
        value, grad = value_and_grad(theta)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(theta, updates), state, value

    theta, state = theta0, opt.init(theta0)
    first, _ = value_and_grad(theta0)
    for _ in range(60):
        theta, state, value = step(theta, state)
    last = float(loss(theta))
    assert np.isfinite(last)
    assert last < 0.5 * float(first), (float(first), last)


def test_deepnlme_random_effect_is_an_nn_input(study):
    pop, data = study
    net = Effect(2, nnx.Rngs(1))

    def model(pop):
        f = nlmegen.nn("effect", net)
        omega = numpyro.sample("omega", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta_nn = numpyro.sample("eta_nn", dist.Normal(0.0, omega))
            p = {k: jnp.full(pop.n_subjects, v) for k, v in PK.items()}
            p["eta_nn"] = eta_nn
            rhs = pkpd_rhs(lambda c, p: f(jnp.stack([c, p["eta_nn"]])))
            states = nlmegen.ode.solve(rhs, pop, p, y0=y0)
            nlmegen.observe("resp", dist.Normal(states[..., 2], 0.2), pop)

    sites = discover(model, pop)
    assert [s.name for s in sites.random_effects] == ["eta_nn"]
    assert {s.name for s in sites.population} == {"omega", "effect$params"}
    density = Density(model, sites)
    theta = density.theta_space.unconstrain(
        {"omega": 0.5, "effect$params": nnx.to_pure_dict(nnx.state(net, nnx.Param))})
    eta = jnp.linspace(-1, 1, pop.n_subjects)[:, None]
    grad_eta = jax.grad(lambda e: density.subject_log_joint(theta, e, pop).sum())(eta)
    assert np.all(np.isfinite(grad_eta))
    assert np.count_nonzero(grad_eta) == pop.n_subjects  # each subject's eta moves its own response


def test_bayesian_nn_leaves_a_held_weight_dict_intact():
    """nn(..., prior=...) under substitute: NumPyro's random_nnx_module replaces the entries of its
    param site's value in place; the caller's dict (weights held by ``fixed=``) must stay arrays."""
    net = Effect(1, nnx.Rngs(0))
    held = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    before = jax.tree.map(np.asarray, held)

    def model():
        f = nlmegen.nn("effect", net, prior=dist.Normal(0.0, 1.0))
        return f(jnp.ones(1))

    for seed in range(2):
        tr = numpyro.handlers.trace(numpyro.handlers.seed(
            numpyro.handlers.substitute(model, data={"effect$params": held}), rng_seed=seed)).get_trace()
        assert "effect/hidden.kernel" in tr and tr["effect/hidden.kernel"]["type"] == "sample"
    assert jax.tree.structure(held) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
