"""ODE models with a neural network (DeepNLME: an MLP of the concentration and a random effect as the
drug effect of the seeds' IDR model), fitted end to end by FOCEI (reverse engine) and SAEM (Adam on
the network weights), and everything after the fit on the result."""

import jax
import numpy as np
import pytest
from flax import nnx

import nlmegen
from nlmegen.examples import idr_nn_model, simulate_idr

MODEL = idr_nn_model((3,), n_eta_nn=1)


def _init():
    return {"log_ka": 0.0, "log_cl": 0.7, "log_vc": 3.0, "log_kin": 2.3, "log_kout": -0.7,
            "omega": np.full(2, 0.3), "sigma_conc": 0.1, "sigma_resp": 1.0,
            "effect$params": nnx.to_pure_dict(nnx.state(MODEL.net, nnx.Param))}


@pytest.fixture(scope="module")
def pop():
    # data from the mechanistic (Hill) IDR model: the network has to learn the drug effect
    return nlmegen.read_nonmem(simulate_idr(8, key=jax.random.key(2), n_doses=2, times=(1, 2, 4, 8, 12, 24, 36, 48)))


@pytest.fixture(scope="module")
def focei_fit(pop):
    return nlmegen.fit(MODEL, pop, method=nlmegen.FOCEI(maxiter=60, covariance="none", progress=False),
                       init=_init())


def test_focei_fits_a_deepnlme_model(focei_fit, pop):
    fit = focei_fit
    start = nlmegen.objective(MODEL, pop, _init())
    assert np.isfinite(fit.ofv) and fit.ofv < start - 200.0, (start, fit.ofv)
    assert fit.status in ("converged", "not_converged") and fit.message
    if fit.status == "not_converged":  # said honestly: the iteration cap or the subjects are named
        assert "maximum number of iterations" in fit.message or "EBE" in fit.message
    assert fit.params["effect$params"].size == 2 * 3 + 3 + 3 + 1
    assert fit.ebe_converged.all()


def test_everything_after_the_fit_works_on_a_network_model(focei_fit, pop, tmp_path):
    fit = focei_fit
    sims = nlmegen.simulate(MODEL, fit, pop, key=jax.random.key(0))
    assert np.isfinite(sims["value"].to_numpy()).all()
    table = fit.residuals(n_sim=20)
    assert np.isfinite(table["CWRES"]).all() and np.isfinite(table["IWRES"]).all()
    assert nlmegen.vpc(fit, n_sim=20, key=jax.random.key(1)) is not None
    assert nlmegen.plot_individuals(fit) is not None
    # the natural-scale table differentiates the model forward (its ODE solves in forward mode)
    natural = fit.table("natural")
    assert "OMEGA(eta[0])" in natural.index and np.isfinite(natural["estimate"].to_numpy(float)).all()
    assert "natural-scale table unavailable" not in repr(fit)
    fit.save(tmp_path / "deepnlme.nc")
    loaded = nlmegen.load(tmp_path / "deepnlme.nc")
    np.testing.assert_allclose(loaded.params["effect$params"], fit.params["effect$params"])


def test_saem_moves_network_weights_by_adam(pop):
    settings = dict(n_explore=15, n_smooth=15, n_conditional=10, is_draws=0, focei=False, covariance="none",
                    progress=False, chunk=15)
    fit = nlmegen.fit(MODEL, pop, method=nlmegen.SAEM(**settings), init=_init(), key=jax.random.key(0))
    start = nlmegen.objective(MODEL, pop, _init())
    after = nlmegen.objective(MODEL, pop, fit.params)
    assert np.all(np.isfinite(fit.params["effect$params"]))
    assert not np.allclose(fit.params["effect$params"], _flat(_init()["effect$params"]))
    assert after < start, (start, after)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_joint_mode_warm_start_gives_conditional_modes(pop):
    """The joint-mode warm start (Pumas' JointMAP) holds omega (the observations do not depend on it
    given eta), lowers the joint objective, and its random effects are the conditional modes at its
    parameters (the EBEs FOCEI then starts from)."""
    import jax.numpy as jnp

    from nlmegen.infer.shared.joint import joint_mode
    from nlmegen.infer.shared.start import starting_point
    from nlmegen.model import discover

    sites = discover(MODEL, pop)
    density, _, _, theta0, labels, free = starting_point(MODEL, pop, sites, _init(), None)
    eta0 = jnp.zeros((pop.n_subjects, sites.n_eta))

    def minus2_joint(theta, eta):
        ll, prior = density.subject_terms(jnp.asarray(theta), eta, pop)
        return -2.0 * float(jnp.sum(ll + prior))

    free_labels = [lab for lab, f in zip(labels, free, strict=True) if f]
    res = joint_mode(density, pop, theta0, free, theta0[free], eta0, free_labels, steps=60, use_map=False)
    assert not any(lab.startswith("omega") for lab in res.moved)
    assert any(lab.startswith("log_kin") for lab in res.moved) and any("effect" in lab for lab in res.moved)
    theta = theta0.copy()
    theta[free] = res.x
    np.testing.assert_allclose(theta[[lab.startswith("omega") for lab in labels]],
                               theta0[[lab.startswith("omega") for lab in labels]])
    assert res.value < minus2_joint(theta0, eta0) - 100.0
    np.testing.assert_allclose(res.value, minus2_joint(theta, res.eta), rtol=1e-10)
    grad_eta = jax.grad(lambda e: jnp.sum(sum(density.subject_terms(jnp.asarray(theta), e, pop))))(res.eta)
    assert float(jnp.max(jnp.abs(grad_eta))) < 0.05 * float(jnp.max(jnp.abs(
        jax.grad(lambda e: jnp.sum(sum(density.subject_terms(jnp.asarray(theta0), e, pop))))(eta0))))


def test_bayesian_network_weights_by_map_focei(pop):
    """Weights with a prior (``nlmegen.nn(..., prior=...)``, sample sites) fitted by FOCEI with
    ``map=True``: DeepPumas' MAP(FOCE()), the marginal likelihood plus an L2 penalty on the weights."""
    model = idr_nn_model((3,), n_eta_nn=1, weight_prior=1.0)
    start = {k: v for k, v in _init().items() if k != "effect$params"}
    weights = nnx.to_pure_dict(nnx.state(model.net, nnx.Param))
    start.update({f"effect/layers.{i}.{leaf}": np.asarray(weights["layers"][i][leaf])
                  for i in (0, 1) for leaf in ("bias", "kernel")})
    fit = nlmegen.fit(model, pop, method=nlmegen.FOCEI(maxiter=15, covariance="none", progress=False, map=True),
                      init=start)
    names = sorted(k for k in fit.params if k.startswith("effect/"))
    assert names == ["effect/layers.0.bias", "effect/layers.0.kernel", "effect/layers.1.bias",
                     "effect/layers.1.kernel"]
    assert "effect$params" not in fit.params
    assert np.isfinite(fit.ofv)
    assert nlmegen.objective(model, pop, fit.params) < nlmegen.objective(model, pop, start) - 100.0
