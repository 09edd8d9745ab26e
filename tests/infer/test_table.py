"""The natural-scale parameter table on theo_sd, checked against values computed by hand from the
estimation-scale estimates and their covariance (issue 18)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.transforms import biject_to

import nlmegen
from nlmegen.examples import theo_model_full

Z = 1.959963984540054


@pytest.fixture(scope="module")
def pop():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


@pytest.fixture(scope="module")
def named(pop):
    return nlmegen.fit(nlmegen.examples.theo_model_named, pop, progress=False)


@pytest.fixture(scope="module")
def table(named):
    return named.table()


def _free_index(fit, label):
    return [lab for lab, f in zip(fit.theta_names, fit.free, strict=True) if f].index(label)


def test_rows_and_kinds(named, table):
    assert named.status == "converged"
    assert list(table.index) == ["tka", "tcl", "tv", "add_sd", "thalf", "ka", "cl", "v",
                                 "OMEGA(eta[0]:ka)", "OMEGA(eta[1]:cl)", "OMEGA(eta[2]:v)"]
    assert set(table.loc[["tka", "add_sd"], "kind"]) == {"population"}
    assert set(table.loc[["ka", "thalf"], "kind"]) == {"derived"}
    assert "omega[0]" not in table.index  # reported as OMEGA, not as the SD the optimiser sees
    assert named.table("estimation").index.tolist() == list(named.summary().index)


def test_derived_typical_values_by_hand(named, table):
    cov = named.covariance
    for name, site in (("ka", "tka"), ("cl", "tcl"), ("v", "tv")):
        mu = float(named.params[site])
        se_mu = math.sqrt(cov[_free_index(named, site), _free_index(named, site)])
        row = table.loc[name]
        assert row["estimate"] == pytest.approx(math.exp(mu), rel=1e-12)
        assert row["SE"] == pytest.approx(math.exp(mu) * se_mu, rel=1e-9)  # d exp(mu) / d mu = exp(mu)
        assert row["RSE%"] == pytest.approx(100 * se_mu, rel=1e-9)
        assert (row["CI95_lower"], row["CI95_upper"]) == pytest.approx((math.exp(mu - Z * se_mu),
                                                                        math.exp(mu + Z * se_mu)), rel=1e-9)
    # t1/2 = log 2 exp(tv - tcl): gradient (-t, +t) in (tcl, tv)
    i, j = _free_index(named, "tcl"), _free_index(named, "tv")
    t = math.log(2) * math.exp(float(named.params["tv"]) - float(named.params["tcl"]))
    var = t**2 * (cov[i, i] + cov[j, j] - 2 * cov[i, j])
    assert table.loc["thalf", "estimate"] == pytest.approx(t, rel=1e-12)
    assert table.loc["thalf", "SE"] == pytest.approx(math.sqrt(var), rel=1e-9)


def test_omega_rows_by_hand(named, table):
    cov, shrink = named.covariance, named.shrinkage["eta"]
    for k, name in enumerate(("ka", "cl", "v")):
        w = float(named.params["omega"][k])  # an SD, estimated as log(w)
        se_u = math.sqrt(cov[_free_index(named, f"omega[{k}]"), _free_index(named, f"omega[{k}]")])
        row = table.loc[f"OMEGA(eta[{k}]:{name})"]
        assert row["estimate"] == pytest.approx(w**2, rel=1e-12)
        assert row["SE"] == pytest.approx(2 * w**2 * se_u, rel=1e-9)  # d exp(2u) / du = 2 w^2
        assert (row["CI95_lower"], row["CI95_upper"]) == pytest.approx((w**2 * math.exp(-2 * Z * se_u),
                                                                        w**2 * math.exp(2 * Z * se_u)), rel=1e-9)
        assert row["CV%"] == pytest.approx(100 * math.sqrt(math.exp(w**2) - 1), rel=1e-12)
        assert row["shrinkage%"] == pytest.approx(shrink[k])
    assert table.attrs["omega"].to_numpy() == pytest.approx(np.diag(np.asarray(named.params["omega"]) ** 2))


def test_population_intervals_are_mapped_from_the_estimation_scale(named, table):
    sd = float(named.params["add_sd"])
    se_u = math.sqrt(named.covariance[_free_index(named, "add_sd"), _free_index(named, "add_sd")])
    row = table.loc["add_sd"]
    assert (row["CI95_lower"], row["CI95_upper"]) == pytest.approx((sd * math.exp(-Z * se_u),
                                                                    sd * math.exp(Z * se_u)), rel=1e-9)
    assert row["SE"] == pytest.approx(named.summary().loc["add_sd", "SE"])


def test_condition_number_by_hand(named, table):
    sd = np.sqrt(np.diag(named.covariance))
    w = np.linalg.eigvalsh(named.covariance / np.outer(sd, sd))
    assert table.attrs["condition_number"] == pytest.approx(w[-1] / w[0], rel=1e-9)
    assert named.condition_number == pytest.approx(w[-1] / w[0], rel=1e-9)
    text = repr(named)
    assert "condition number" in text and "OMEGA(eta[1]:cl)" in text and "CV%" in text


def test_full_block_omega_is_a_variance_correlation_matrix(pop):
    fit = nlmegen.fit(theo_model_full, pop, progress=False)
    table = fit.table()
    assert not any(label.startswith("omega_corr") for label in table.index)  # no Cholesky entries
    corr_rows = [label for label in table.index if label.startswith("CORR(")]
    assert corr_rows == ["CORR(eta[0],eta[1])", "CORR(eta[0],eta[2])", "CORR(eta[1],eta[2])"]
    # by hand: Omega = diag(w) L L' diag(w) from the unconstrained estimate; SE of r by finite differences
    free = np.flatnonzero(fit.free)
    names = list(fit.theta_names)
    w_idx = [names.index(f"omega[{k}]") for k in range(3)]
    c_idx = [i for i, n in enumerate(names) if n.startswith("omega_corr")]
    chol = biject_to(dist.constraints.corr_cholesky)

    def omega(theta):
        w = np.exp(theta[w_idx])
        lower = np.asarray(chol(jnp.asarray(theta[c_idx])))
        return np.diag(w) @ lower @ lower.T @ np.diag(w)

    def r01(x):
        theta = fit.theta.copy()
        theta[free] = x
        m = omega(theta)
        return m[0, 1] / math.sqrt(m[0, 0] * m[1, 1])

    m = omega(fit.theta)
    x0, h = fit.theta[free], 1e-6
    grad = np.array([(r01(x0 + h * e) - r01(x0 - h * e)) / (2 * h) for e in np.eye(x0.size)])
    r = m[0, 1] / math.sqrt(m[0, 0] * m[1, 1])
    row = table.loc["CORR(eta[0],eta[1])"]
    assert row["estimate"] == pytest.approx(r, rel=1e-9)
    assert row["SE"] == pytest.approx(math.sqrt(grad @ fit.covariance @ grad), rel=1e-5)
    z, half = math.atanh(r), Z * row["SE"] / (1 - r**2)
    assert (row["CI95_lower"], row["CI95_upper"]) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    assert table.loc["OMEGA(eta[2])", "estimate"] == pytest.approx(m[2, 2], rel=1e-9)
    matrix = table.attrs["omega"].to_numpy()
    assert np.diag(matrix) == pytest.approx(np.diag(m)) and matrix[0, 1] == pytest.approx(r)


def test_one_omega_element_fixed(pop):
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, fixed={"omega[2]": 0.1}, progress=False)
    assert fit.fixed == ("omega[2]",) and fit.n_params == 6 and fit.free.tolist().count(False) == 1
    assert float(fit.params["omega"][2]) == pytest.approx(0.1, rel=1e-14)  # exp(log 0.1)
    assert fit.params["omega"][:2] == pytest.approx([0.63, 0.28], abs=0.02)  # the other two estimated
    est = fit.summary()
    assert est.loc["omega[2]", "fixed"] and np.isnan(est.loc["omega[2]", "SE"])
    assert not est.loc["omega[1]", "fixed"] and est.loc["omega[1]", "SE"] > 0
    row = fit.table().loc["OMEGA(eta[2])"]
    assert row["fixed"] and row["estimate"] == pytest.approx(0.01) and np.isnan(row["SE"])


def test_element_fix_errors(pop):
    with pytest.raises(nlmegen.ModelError, match=r"omega\[0\] \.\. omega\[2\]"):
        nlmegen.fit(nlmegen.examples.theo_model, pop, fixed={"omega[5]": 0.1}, progress=False)
    with pytest.raises(nlmegen.ModelError, match="not separate parameters"):
        nlmegen.fit(theo_model_full, pop, fixed={"omega_corr[3]": 0.1}, progress=False)
    with pytest.raises(nlmegen.ModelError, match="give the whole site 'omega'"):
        nlmegen.fit(nlmegen.examples.theo_model, pop, init={"omega[2]": 0.1}, progress=False)
    with pytest.raises(nlmegen.ModelError, match="maximum-likelihood"):
        nlmegen.fit(nlmegen.examples.theo_model, pop, "nuts", fixed={"omega[2]": 0.1}, key=jax.random.key(0))
