"""nlmegen.flow: flowjax distributions as random-effect distributions (log_prob, sample, sites, errors),
the two-stage route, the text embedding and the density plots."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest

import nlmegen
from nlmegen.infer.laplace.objective import Objective
from nlmegen.model import Density, discover

THEO = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


def _model(module, cond=None, prior=None):
    def model(pop):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        re = nlmegen.flow("re", module, condition=cond, prior=prior)
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", re)
            nlmegen.observe("y", dist.Normal(eta[..., :1] + 0.0 * pop.times, sigma), pop)

    return model


def test_flow_distribution_matches_flowjax():
    f = nlmegen.spline_flow(2, key=jax.random.key(0), layers=2, knots=4, width=8)
    d = nlmegen.FlowDistribution(f)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    np.testing.assert_allclose(d.log_prob(x), f.log_prob(x), rtol=1e-12)
    assert d.sample(jax.random.key(2), (7,)).shape == (7, 2)
    assert d.event_shape == (2,) and d.batch_shape == ()
    # a density: integrates to one on a grid (1-D flow)
    f1 = nlmegen.spline_flow(1, key=jax.random.key(3))
    grid = jnp.linspace(-10, 10, 4001)[:, None]
    mass = jnp.sum(jnp.exp(f1.log_prob(grid))) * (grid[1, 0] - grid[0, 0])
    assert abs(float(mass) - 1.0) < 1e-3


def test_conditional_flow_batches_over_subjects():
    f = nlmegen.spline_flow(2, key=jax.random.key(0), cond_dim=3)
    x = jax.random.normal(jax.random.key(1), (12, 3))
    d = nlmegen.FlowDistribution(f, x)
    assert d.batch_shape == (12,)
    s = d.sample(jax.random.key(2), (4,))
    assert s.shape == (4, 12, 2)
    np.testing.assert_allclose(d.log_prob(s[0]), jax.vmap(f.log_prob)(s[0], x), rtol=1e-12)


def test_covariate_gaussian_is_the_gaussian_of_its_network():
    g = nlmegen.CovariateGaussian(3, 2, key=jax.random.key(0), hidden=(5,), cov="full")
    g = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(9), a.shape) if eqx_inexact(a) else a, g)
    x, c = jax.random.normal(jax.random.key(1), (3,)), jnp.array([0.3, -1.0])
    mu, tril = g.mean_and_tril(c)
    assert np.all(np.asarray(jnp.diag(tril)) > 0) and np.allclose(np.triu(np.asarray(tril), 1), 0)
    ref = dist.MultivariateNormal(mu, scale_tril=tril).log_prob(x)
    np.testing.assert_allclose(g.log_prob(x, c), ref, rtol=1e-10)
    for cov in ("diag", "fixed"):
        h = nlmegen.CovariateGaussian(2, 1, key=jax.random.key(0), cov=cov, init_scale=0.5)
        _, t = h.mean_and_tril(jnp.array([1.0]))
        assert np.allclose(np.diag(np.asarray(t)), 0.5, atol=0.05)
    with pytest.raises(ValueError, match="cov must be"):
        nlmegen.CovariateGaussian(2, 1, key=jax.random.key(0), cov="banana")


def eqx_inexact(a):
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def test_flow_weights_are_one_population_site_and_eta_a_random_effect():
    f = nlmegen.spline_flow(2, key=jax.random.key(0), layers=1, knots=4, width=4)
    sites = discover(_model(f), THEO)
    names = [s.name for s in sites.population]
    assert names == ["sigma", "re$params"]
    weights = sites.population[1]
    assert weights.kind == "param" and weights.leaf_shapes is not None
    assert weights.size == sum(x.size for x in jax.tree.leaves(nlmegen.flow_values("re", f)))
    (eta,) = sites.random_effects
    assert eta.name == "eta" and eta.size == 2 and not eta.gaussian
    # the Bayesian variant: one flat sample site outside the plate
    sites = discover(_model(f, prior=0.5), THEO)
    assert [s.name for s in sites.population] == ["sigma", "re$weights"]
    assert sites.population[1].shape == (weights.size,)


def test_flow_values_substitute_back_to_the_same_density():
    f = nlmegen.spline_flow(2, key=jax.random.key(0), layers=1)
    g = nlmegen.spline_flow(2, key=jax.random.key(5), layers=1)  # another flow of the same structure
    x = jax.random.normal(jax.random.key(1), (4, 2))
    with numpyro.handlers.substitute(data=nlmegen.flow_values("re", g)):
        d = nlmegen.flow("re", f)
    np.testing.assert_allclose(d.log_prob(x), g.log_prob(x), rtol=1e-12)
    assert not np.allclose(d.log_prob(x), f.log_prob(x))


def test_focei_uses_the_exact_curvature_of_the_flow_prior():
    """FOCE's Gaussian shortcut (Omega^-1) would be wrong; the objective differentiates the flow twice."""
    f = nlmegen.spline_flow(2, key=jax.random.key(0), layers=1)
    model = _model(f)
    density = Density(model, discover(model, THEO))
    obj = Objective(density, "focei", 50, 1e-8)
    values = {"sigma": jnp.asarray(0.5), **nlmegen.flow_values("re", f)}
    theta = density.theta_space.unconstrain(values)
    eta = jax.random.normal(jax.random.key(2), (THEO.n_subjects, 2))
    got = obj.prior_curvature_static(theta, eta, THEO)
    want = -jax.vmap(jax.hessian(lambda e: f.log_prob(e)))(eta)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_bad_inputs_name_the_site():
    f = nlmegen.spline_flow(2, key=jax.random.key(0))
    fc = nlmegen.spline_flow(2, key=jax.random.key(0), cond_dim=2)
    with pytest.raises(nlmegen.ModelError, match="'re'.*flowjax distribution"):
        nlmegen.flow("re", dist.Normal(0.0, 1.0))
    with pytest.raises(nlmegen.ModelError, match="conditional"):
        nlmegen.flow("re", fc)
    with pytest.raises(nlmegen.ModelError, match="cond_dim"):
        nlmegen.flow("re", fc, condition=jnp.ones((12, 3)))
    with pytest.raises(nlmegen.ModelError, match="unconditional"):
        nlmegen.flow("re", f, condition=jnp.ones((12, 2)))
    with pytest.raises(nlmegen.ModelError, match="'re'.*positive scale"):
        with numpyro.handlers.seed(rng_seed=0):
            nlmegen.flow("re", f, prior=-1.0)

    def inside(pop):
        with nlmegen.subjects(pop):
            numpyro.sample("eta", nlmegen.flow("re", f, prior=1.0))

    with pytest.raises(nlmegen.ModelError, match="outside the subject plate"):
        with numpyro.handlers.seed(rng_seed=0):
            inside(THEO)
    with pytest.raises(nlmegen.ModelError, match=r"FO linearises.*\['eta'\]"):
        nlmegen.fit(_model(f), THEO, method="fo", progress=False)
    with pytest.raises(nlmegen.ModelError, match=r"re\$params.*numpyro.param"):
        nlmegen.fit(_model(f), THEO, method="nuts", key=jax.random.key(0))


def test_fit_flow_learns_a_bimodal_sample_and_a_conditional_one():
    key = jax.random.key(0)
    z = jax.random.normal(key, (1000, 1)) * 0.3
    x = jnp.where(jnp.arange(1000)[:, None] < 300, -2.0, 2.0) + z
    f = nlmegen.fit_flow(x, nlmegen.spline_flow(1, key=jax.random.key(1)), key=jax.random.key(2), steps=600)
    draws = f.sample(jax.random.key(3), (4000,))
    assert abs(float(jnp.mean(draws < 0)) - 0.3) < 0.05
    # conditional Gaussian: the covariate carries the mode
    c = (jnp.arange(1000) < 300).astype(float)[:, None]
    g = nlmegen.fit_flow(x, nlmegen.CovariateGaussian(1, 1, key=jax.random.key(4)), condition=c,
                         key=jax.random.key(5), steps=1500, learning_rate=0.02)
    mu1, _ = g.mean_and_tril(jnp.array([1.0]))
    mu0, _ = g.mean_and_tril(jnp.array([0.0]))
    assert abs(float(mu1[0]) + 2.0) < 0.2 and abs(float(mu0[0]) - 2.0) < 0.2
    with pytest.raises(nlmegen.ModelError, match="shape"):
        nlmegen.fit_flow(jnp.ones((10, 3)), f, key=key)


def test_eta_draws_from_a_laplace_fit_spread_like_the_conditional_covariance():
    fit = nlmegen.fit(nlmegen.examples.theo_model, THEO, covariance="none", progress=False)
    d = nlmegen.eta_draws(fit, key=jax.random.key(0), n=4000)
    assert d.shape == (4000, 12, 3)
    np.testing.assert_allclose(d.mean(axis=0), fit.ebes.to_numpy(), atol=0.05)
    np.testing.assert_allclose(np.cov(d[:, 0].T), fit.ebe_cov[0], rtol=0.15, atol=1e-4)


def test_text_embedding_separates_notes_and_applies_to_new_subjects():
    rng = np.random.default_rng(0)
    filler = ["tolerating well", "mild nausea", "no adverse events", "headache on day 2", "good adherence"]
    geno = np.arange(12) % 2
    notes = [f"{'responder genotype AA' if g else 'genotype BB non responder'}; {filler[rng.integers(5)]}"
             for g in geno]
    table = pd.DataFrame({"ID": np.repeat(np.arange(1, 13), 2), "TIME": np.tile([0.0, 1.0], 12), "DV": 1.0,
                          "NOTE": np.repeat(notes, 2)})
    emb = nlmegen.TextEmbedding(n_components=3).fit_table(table, "NOTE")
    out = emb.add_to(table, "NOTE")
    assert "NOTE" not in out and {"NOTE_0", "NOTE_1", "NOTE_2"} <= set(out.columns)
    first = out.groupby("ID")[["NOTE_0", "NOTE_1", "NOTE_2"]].first().to_numpy()
    aa, bb = first[geno == 1], first[geno == 0]
    split = [k for k in range(3) if aa[:, k].min() > bb[:, k].max() or aa[:, k].max() < bb[:, k].min()]
    assert split, first  # one component separates the genotypes
    k = split[0]
    pop = nlmegen.read_nonmem(out)
    assert pop.covariates["NOTE_0"].shape == (12,)
    new = emb.transform(["responder genotype AA; feels fine"])  # a new note, the fitted vocabulary
    assert new.shape == (1, 3)
    assert abs(new[0, k] - aa[:, k].mean()) < abs(new[0, k] - bb[:, k].mean())
    # any user embedding function
    custom = nlmegen.TextEmbedding(embed=lambda t: np.array([[len(s), s.count("AA")] for s in t], float),
                                   standardize=False).fit(notes[:3])
    np.testing.assert_allclose(custom.transform(["AA AA"]), [[5.0, 2.0]])
    with pytest.raises(nlmegen.DataError, match="no column 'TEXT'"):
        emb.add_to(table, "TEXT")
    with pytest.raises(nlmegen.DataError, match="returned shape"):
        nlmegen.TextEmbedding(embed=lambda t: np.ones(3)).fit(notes)


def test_eta_density_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    f = nlmegen.spline_flow(2, key=jax.random.key(0))
    fig = nlmegen.plot_eta_density({"flow": f.sample(jax.random.key(1), (500,)),
                                    "Gaussian": jax.random.normal(jax.random.key(2), (500, 2))},
                                   ebes=np.zeros((10, 2)), labels=["a", "b"])
    fig.savefig(tmp_path / "eta.png")
    assert len(fig.axes) == 4 and fig.axes[2].get_xlabel() == "a"
    fc = nlmegen.spline_flow(1, key=jax.random.key(0), cond_dim=1)
    fig = nlmegen.plot_eta_by_covariate(lambda v, n: fc.sample(jax.random.key(0), (n,), condition=jnp.array([v])),
                                        [0.0, 1.0], covariate="GENO")
    assert len(fig.axes[0].get_legend().get_texts()) == 2
    with pytest.raises(ValueError, match="same number"):
        nlmegen.plot_eta_density({"a": np.zeros((5, 2)), "b": np.zeros((5, 3))})
