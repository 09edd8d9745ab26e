"""ArviZ 1.x on FOCEI, SAEM, NUTS and SVI fits of theo_sd: loo (by subject and by observation),
compare across maximum-likelihood and Bayesian fits, plot_ppc_dist, summary (issue 18)."""

import math

import arviz as az
import jax
import numpy as np
import pytest

import nlmegen

N_DRAWS = 200  # asymptotic-normal draws of the maximum-likelihood fits


@pytest.fixture(scope="module")
def pop():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


@pytest.fixture(scope="module")
def fits(pop):
    model, key = nlmegen.examples.theo_model, jax.random.key(0)
    return {
        "focei": nlmegen.fit(model, pop, progress=False),
        "saem": nlmegen.fit(model, pop, "saem", key=key, n_explore=30, n_smooth=30, progress=False),
        "nuts": nlmegen.fit(model, pop, "nuts", key=key, num_warmup=150, num_samples=100, num_chains=2,
                            progress=False),
        "svi": nlmegen.fit(model, pop, "svi", key=key, num_steps=600, num_draws=N_DRAWS, progress=False),
    }


@pytest.fixture(scope="module")
def trees(fits):
    return {name: fit.to_arviz(n_draws=N_DRAWS) for name, fit in fits.items()}


@pytest.mark.parametrize("name", ["focei", "saem", "nuts", "svi"])
def test_groups(trees, fits, name):
    dt = trees[name]
    for group in ("posterior", "log_likelihood", "posterior_predictive", "observed_data"):
        assert group in dt.children, (name, group)
    ll = dt["log_likelihood"]
    assert ll["subject_marginal"].dims == ("chain", "draw", "subject")
    assert ll["DV"].dims == ("chain", "draw", "obs") and ll["DV"].shape[-1] == 132
    assert dt["posterior_predictive"]["DV"].shape == ll["DV"].shape
    assert np.all(np.isfinite(ll["subject_marginal"].values)) and np.all(np.isfinite(ll["DV"].values))
    assert "tcl" in az.summary(dt).index


@pytest.mark.parametrize("name", ["focei", "saem"])
def test_ml_subject_marginal_is_the_fit_likelihood(fits, trees, name):
    """At the estimate the subjects' marginals add up to the fit's (FOCEI) log-likelihood; the draws
    around it average lower (the estimate maximises it)."""
    fit, ll = fits[name], trees[name]["log_likelihood"]["subject_marginal"].values
    point = fit.to_arviz(n_draws=1, posterior_predictive=False)["log_likelihood"]["subject_marginal"].values
    reference = fit.loglik if name == "focei" else -(fit.settings["minus2ll_focei"]) / 2
    assert point.sum() == pytest.approx(reference, abs=1e-6)
    assert ll.sum(axis=-1).mean() < point.sum()


@pytest.mark.parametrize("name", ["focei", "saem", "nuts", "svi"])
def test_loo_by_subject_and_by_observation(fits, trees, name):
    with _quiet():
        by_subject = az.loo(trees[name], var_name="subject_marginal", pointwise=True)
        by_obs = az.loo(trees[name], var_name="DV")
    assert by_subject.n_data_points == 12 and by_obs.n_data_points == 132
    assert math.isfinite(by_subject.elpd) and math.isfinite(by_obs.elpd)
    assert by_subject.pareto_k.shape == (12,)


def test_loo_method_and_compare_across_backends(fits, trees):
    with _quiet():
        table = az.compare(trees, var_name="subject_marginal")
        own = fits["nuts"].loo()
    assert sorted(table.index) == ["focei", "nuts", "saem", "svi"]
    assert np.all(np.isfinite(table["elpd"].to_numpy(dtype=float)))
    assert own.n_data_points == 12
    with pytest.raises(ValueError, match="by must be"):
        fits["focei"].loo(by="record")


def test_plot_ppc_dist_renders(trees, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    for name in ("focei", "nuts"):
        pc = az.plot_ppc_dist(trees[name], num_samples=20)
        out = tmp_path / f"ppc_{name}.png"
        pc.savefig(out)
        assert out.stat().st_size > 5000


class _quiet:
    """Silence ArviZ's Pareto-k warnings (12 subjects: several are influential, as expected)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", UserWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
