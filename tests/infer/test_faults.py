"""Model faults (issue 19): each gives an error or a status that names the site, records, subject or
parameters at fault, instead of a bare NumPy/JAX error, a silent wrong fit or a fit that fails late."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen
from nlmegen import DataError, ModelError

QUICK = dict(progress=False, covariance="none")


@pytest.fixture(scope="module")
def theo():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


@pytest.fixture(scope="module")
def small(theo):
    return theo.subset(theo.ids[:4])


def one_cmt(pop, *, pred=None, error="additive", observe=True, cl_factor=None):
    """theo_model, with hooks to break it: ``pred(conc, pop)`` edits the prediction."""
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        cl = jnp.exp(tcl + eta[..., 1]) * (1.0 if cl_factor is None else cl_factor(pop))
        conc = nlmegen.pk.one_cmt(pop, ka=jnp.exp(tka + eta[..., 0]), cl=cl, v=jnp.exp(tv + eta[..., 2]))
        if pred is not None:
            conc = pred(conc, pop)
        if observe:
            d = dist.LogNormal(jnp.log(conc), sd) if error == "lognormal" else dist.Normal(conc, sd)
            nlmegen.observe("conc", d, pop)


def test_model_without_observe(small):
    with pytest.raises(ModelError, match="no observed site"):
        nlmegen.fit(lambda p: one_cmt(p, observe=False), small, **QUICK)


def test_prediction_of_the_wrong_shape_names_site_and_shapes(small):
    with pytest.raises(ModelError) as err:
        nlmegen.fit(lambda p: one_cmt(p, pred=lambda c, p: c[:, :5]), small, **QUICK)
    message = str(err.value)
    assert "observe('conc')" in message and "(4, 5)" in message and "(4, 11)" in message


@pytest.mark.parametrize("select", [lambda c: c[0], lambda c: c[:1]], ids=["[obs]", "[1, obs]"])
def test_prediction_without_subject_axis_is_refused(small, select):
    # subject 0's curve would silently be fitted to every subject
    with pytest.raises(ModelError, match="without the subject axis"):
        nlmegen.fit(lambda p: one_cmt(p, pred=lambda c, p: select(c)), small, **QUICK)


def test_per_subject_and_scalar_predictions_are_accepted(small):
    from nlmegen.model import discover

    for pred in (lambda c, p: c, lambda c, p: c[:, :1], lambda c, p: c.mean()):
        sites = discover(lambda p: one_cmt(p, pred=pred), small)  # noqa: B023
        assert [s.name for s in sites.observed] == ["conc"]


@pytest.mark.parametrize("method", ["laplace", "focei", "saem", "nuts", "svi"])
def test_dv_outside_the_error_model_support_names_the_records(small, method):
    dv, mask, times = (np.asarray(x) for x in (small.dv, small.mask, small.times))
    bad = np.argwhere(mask & (dv <= 0))
    assert bad.size  # theo_sd has DV = 0 at time 0
    with pytest.raises(DataError) as err:
        nlmegen.fit(lambda p: one_cmt(p, error="lognormal"), small, method, key=jax.random.key(0), progress=False)
    message = str(err.value)
    assert "'conc'" in message and "DV > 0" in message and f"{len(bad)} observation record(s)" in message
    for s, o in bad:
        assert f"ID {small.ids[s]} TIME {times[s, o]:g}" in message


def test_positive_dvs_under_a_lognormal_error_fit(small):
    keep = (np.asarray(small.dv) > 0) & (np.asarray(small.times) > 0)  # log(0) predictions at time 0
    import dataclasses

    positive = dataclasses.replace(small, mask=small.mask & jnp.asarray(keep))
    fit = nlmegen.fit(lambda p: one_cmt(p, error="lognormal"), positive, "laplace", **QUICK)
    assert np.isfinite(fit.ofv) and fit.status in ("converged", "not_converged")


def test_improper_prior_under_maximum_likelihood_needs_a_start(small):
    def model(pop):
        scale = numpyro.sample("log_scale", dist.ImproperUniform(dist.constraints.real, (), ()))
        one_cmt(pop, pred=lambda c, p: c * jnp.exp(scale))

    for method in ("focei", "saem"):
        with pytest.raises(ModelError, match=r"\['log_scale'\] have an improper prior.*init="):
            nlmegen.fit(model, small, method, key=jax.random.key(0), progress=False)
    fit = nlmegen.fit(model, small, init={"log_scale": 0.0}, fixed={"tv": 3.5}, **QUICK)
    assert np.isfinite(fit.ofv)


def _unidentified_model(pop):
    # CL = exp(tcl_a + tcl_b): only the sum is determined by the data
    a = numpyro.sample("tcl_a", dist.Normal(0.5, 1.0))
    b = numpyro.sample("tcl_b", dist.Normal(0.5, 1.0))
    one_cmt(pop, cl_factor=lambda p: jnp.exp(a + b - 1.0))


@pytest.mark.parametrize("covariance", ["none", "sandwich"])
def test_non_identifiable_parameters_are_named_and_estimates_kept(theo, covariance):
    # (tcl held: it would make a third of the pair; the check needs more subjects than parameters)
    fit = nlmegen.fit(_unidentified_model, theo, progress=False, covariance=covariance, fixed={"tcl": 1.0})
    assert fit.status in ("converged", "not_converged")
    assert "['tcl_a', 'tcl_b'] are not identifiable" in fit.message
    assert any("['tcl_a', 'tcl_b'] are not identifiable" in w for w in fit.warnings)
    assert all(np.all(np.isfinite(v)) for v in fit.params.values())
    if covariance == "sandwich":  # the covariance step names the pair too, and gives no false errors
        assert any("['tcl_a', 'tcl_b'] together" in w for w in fit.warnings)
        assert np.isnan(fit.se["tcl_a"])


def test_identifiable_model_has_no_such_note(small):
    fit = nlmegen.fit(one_cmt, small, **QUICK)
    assert "not identifiable" not in fit.message and not fit.warnings


def test_saem_fails_naming_a_subject_with_nan_predictions(theo):
    pop = theo.subset(theo.ids[:6])
    weights = np.asarray(pop.covariates["WT"])
    heaviest = pop.ids[int(np.argmax(weights))]

    def nan_for_heaviest(conc, p):
        return conc * jnp.where(p.covariates["WT"] >= weights.max(), jnp.nan, 1.0)[:, None]

    backend = nlmegen.SAEM(n_explore=20, n_smooth=20, n_conditional=10, is_draws=500, focei=False,
                           covariance="none", progress=False)
    fit = nlmegen.fit(lambda p: one_cmt(p, pred=nan_for_heaviest), pop, backend, key=jax.random.key(0))
    assert fit.status == "failed"
    assert re.search(rf"not finite for subject\(s\) \[{heaviest}\]", fit.message), fit.message


def test_unknown_covariate_lists_the_names(theo):
    with pytest.raises(KeyError, match=r"no covariate 'WGT'.*covariates \['WT'\]"):
        theo.covariates["WGT"]
    with pytest.raises(KeyError, match="did you mean 'WT'"):
        theo.covariates["wt"]


def test_time_varying_covariate_used_per_subject_is_named():
    table = nlmegen.datasets.load("theo_sd").copy()
    table["WTV"] = table["WT"] + 0.01 * np.arange(len(table))  # changes within each subject
    pop = nlmegen.read_nonmem(table)
    assert pop.covariates["WTV"].ndim == 2 and pop.covariates["WT"].ndim == 1
    with pytest.raises(ModelError) as err:
        nlmegen.fit(lambda p: one_cmt(p, cl_factor=lambda q: q.covariates["WTV"] / 70), pop, **QUICK)
    message = str(err.value)
    assert "['WTV']" in message and "one value per subject" in message and "covariate_at('WTV', 0.0)" in message
    # the suggested per-subject value works
    sites = nlmegen.model.discover(lambda p: one_cmt(p, cl_factor=lambda q: q.covariate_at("WTV", 0.0) / 70), pop)
    assert sites.n_eta == 3


# ------------------------------------------------------------------ one failure must not break the process
def _positive(pop):
    import dataclasses

    keep = (np.asarray(pop.dv) > 0) & (np.asarray(pop.times) > 0)
    return dataclasses.replace(pop, mask=pop.mask & jnp.asarray(keep))


def test_fit_after_a_failed_compile_fails_the_same_way(small):
    """FOCEI refuses a log-normal error while compiling; the compiled-function cache must not keep an empty
    entry for it (which made every later fit of that model raise KeyError: 'value_and_grad')."""
    model = lambda p: one_cmt(p, error="lognormal")  # noqa: E731
    pop = _positive(small)
    for _ in range(2):
        with pytest.raises(ModelError, match="needs Gaussian residuals"):
            nlmegen.fit(model, pop, **QUICK)
    assert np.isfinite(nlmegen.fit(model, pop, "laplace", **QUICK).ofv)


def test_fit_after_an_interrupted_compile_works(small, monkeypatch):
    from nlmegen.infer.laplace.objective import Objective

    model = lambda p: one_cmt(p)  # noqa: E731  (a new function: compiled afresh)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Objective, "ebe_implicit", ctrl_c)  # Ctrl-C while the objective is being traced
        with pytest.raises(KeyboardInterrupt):
            nlmegen.fit(model, small, **QUICK)
    fit = nlmegen.fit(model, small, **QUICK)
    assert fit.status == "converged"
    assert fit.ofv == pytest.approx(nlmegen.fit(one_cmt, small, **QUICK).ofv, abs=1e-8)


# ------------------------------------------------------------------ stiff ODE under an explicit solver
def _stiff_model(solver=None):
    def rhs(t, y, p):  # a fast exchange with a peripheral compartment (rate 1e4 per h): stiff
        fast = 1e4 * (y[1] - y[2])
        return jnp.stack([-p["ka"] * y[0], p["ka"] * y[0] - p["cl"] / p["v"] * y[1] - fast, fast])

    def model(pop):
        tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
        sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, 0.3))
            n = pop.n_subjects
            p = {"ka": jnp.full(n, 1.5), "cl": jnp.exp(tcl + eta), "v": jnp.full(n, 30.0)}
            y = nlmegen.ode.solve(rhs, pop, p, y0=jnp.zeros(3), max_steps=300, solver=solver)
            nlmegen.observe("conc", nlmegen.additive(y[..., 1] / 30.0, sd), pop)

    return model


def test_stiff_ode_reaching_max_steps_is_named(small):
    """The diagnosis a failed fit runs (Laplace family, non-finite objective): which subjects ran out of steps."""
    import diffrax

    from nlmegen.infer.shared.checks import ode_step_limit
    from nlmegen.model import Density, discover

    pop = small.subset(small.ids[:2])
    model = _stiff_model()
    density = Density(model, discover(model, pop))
    theta, eta = jnp.zeros(density.theta_space.size), jnp.zeros((2, 1))
    note = ode_step_limit(density, theta, eta, pop)
    assert note is not None and "Tsit5" in note and "max_steps=300" in note and "Kvaerno5" in note
    assert f"subject(s) {list(pop.ids)}" in note
    # no such note for a closed-form model, or for the same ODE under a stiff solver
    easy = Density(one_cmt, discover(one_cmt, pop))
    assert ode_step_limit(easy, jnp.zeros(easy.theta_space.size), jnp.zeros((2, 3)), pop) is None
    stiff_solver = _stiff_model(diffrax.Kvaerno5())
    density = Density(stiff_solver, discover(stiff_solver, pop))
    assert ode_step_limit(density, theta, eta, pop) is None
