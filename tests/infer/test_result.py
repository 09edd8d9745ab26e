"""`FitResult`: summary numbers, repr, ArviZ conversion and the netCDF round trip (built by hand)."""

import math

import numpy as np
import pandas as pd
import pytest
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from nlmegen.infer.shared.result import FitResult, element_labels
from nlmegen.io import load, to_arviz
from nlmegen.io._arviz import support_name, transform_from_name

Z = 1.959963984540054
N_DRAWS = 2000
# "tka" real, "omega" (3,) positive, "sigma" positive and fixed; one random-effect site "eta" (3,)
PARAMS = {"tka": np.array(0.45), "omega": np.array([0.6, 0.3, 0.1]), "sigma": np.array(0.7)}
THETA = np.array([0.45, *np.log([0.6, 0.3, 0.1]), np.log(0.7)])
NAMES = ("tka", "omega[0]", "omega[1]", "omega[2]", "sigma")
FREE = np.array([True, True, True, True, False])
COV = np.array([[0.04, 0.01, 0.0, 0.0], [0.01, 0.09, 0.0, 0.0], [0.0, 0.0, 0.16, 0.02], [0.0, 0.0, 0.02, 0.25]])
TRANSFORMS = {"tka": biject_to(constraints.real), "omega": biject_to(constraints.positive),
              "sigma": biject_to(constraints.positive), "eta": biject_to(constraints.real_vector)}


def _grid(n_subj: int, rng) -> dict:
    times = np.tile([0.5, 1.0, 2.0, 4.0], (n_subj, 1))
    mask = np.ones(times.shape, bool)
    mask[-1, -1] = False  # padding
    dvid = np.tile([0, 1, 0, 1], (n_subj, 1))
    dv = np.where(mask, rng.normal(5.0, 1.0, times.shape), 0.0)
    return {"times": times, "dv": dv, "mask": mask, "dvid": dvid, "pred": dv + 0.3, "ipred": dv + 0.1}


def make_fit(ids=(101, 205, 307), *, covariance=True, draws=None, method="focei") -> FitResult:
    """A three-subject FOCEI-like result with a real, a positive vector and a fixed positive site."""
    rng = np.random.default_rng(1)
    n = len(ids)
    sd_u = np.sqrt(np.diag(COV))
    se = {"tka": np.array(sd_u[0]), "omega": PARAMS["omega"] * sd_u[1:], "sigma": np.array(np.nan)}
    ebes = pd.DataFrame(rng.normal(0, 0.3, (n, 3)), columns=element_labels("eta", (3,)),
                        index=pd.Index(list(ids), name="ID"))
    ebe_cov = np.stack([np.diag([0.01, 0.04, 0.09]) * (i + 1) for i in range(n)])
    history = pd.DataFrame({"iteration": np.arange(3), "ofv": [120.0, 110.5, 110.2], "grad_norm": [5.0, 0.1, 1e-5],
                            **{lab: THETA[i] + np.array([0.1, 0.01, 0.0]) for i, lab in enumerate(NAMES[:4])}})
    return FitResult(
        method=method, params=dict(PARAMS), se=se, ofv=110.2, loglik=-(110.2 + 11 * math.log(2 * math.pi)) / 2,
        aic=118.2, bic=120.3, n_obs=11, n_params=4, n_subjects=n, status="converged", message="gtol reached",
        ebes=ebes, ebe_cov=ebe_cov, ebe_converged=np.array([True] * (n - 1) + [False]), ids=tuple(ids),
        **_grid(n, rng), outputs=("cp", "effect"), theta=THETA, theta_names=NAMES, free=FREE,
        covariance=COV if covariance else None, covariance_kind="sandwich" if covariance else "none",
        se_unconstrained=sd_u if covariance else None,
        shrinkage={"eta": np.array([10.0, 25.5, 40.0]), "eps": np.array([5.0, 7.5])}, history=history,
        timings={"compile_s": 1.5, "run_s": 2.0, "covariance_s": 0.5},
        settings={"maxiter": 500, "gtol": 1e-6, "bounds": (0, 1)}, warnings=("EBE search did not converge for 1 "
                                                                              "subject",),
        draws=draws, fixed=("sigma",), transforms=dict(TRANSFORMS))


@pytest.fixture(scope="module")
def fit():
    return make_fit()


def _bayes_draws(n_subj: int = 3, chains: int = 2, draws: int = 100) -> dict:
    rng = np.random.default_rng(3)
    return {"tka": rng.normal(0.45, 0.2, (chains, draws)),
            "omega": np.exp(rng.normal(np.log([0.6, 0.3, 0.1]), 0.2, (chains, draws, 3))),
            "sigma": np.full((chains, draws), 0.7), "eta": rng.normal(0, 0.3, (chains, draws, n_subj, 3)),
            "diverging": np.zeros((chains, draws), bool)}


# ---------------------------------------------------------------------- summary, repr
def test_summary_numbers(fit):
    table = fit.summary()
    assert list(table.index) == ["tka", "omega[0]", "omega[1]", "omega[2]", "sigma"]
    assert list(table.columns) == ["estimate", "SE", "RSE%", "CI95_lower", "CI95_upper", "fixed"]
    tka = table.loc["tka"]
    assert tka["SE"] == pytest.approx(0.2) and tka["RSE%"] == pytest.approx(100 * 0.2 / 0.45)
    assert (tka["CI95_lower"], tka["CI95_upper"]) == pytest.approx((0.45 - Z * 0.2, 0.45 + Z * 0.2))
    om = table.loc["omega[1]"]  # positive: interval on the log scale, SE/est = 0.4 there
    assert om["SE"] == pytest.approx(0.3 * 0.4) and om["RSE%"] == pytest.approx(40.0)
    assert (om["CI95_lower"], om["CI95_upper"]) == pytest.approx((0.3 * math.exp(-Z * 0.4), 0.3 * math.exp(Z * 0.4)))
    sigma = table.loc["sigma"]
    assert sigma["fixed"] and np.isnan(sigma["SE"]) and np.isnan(sigma["CI95_lower"])
    assert not table.loc[["tka", "omega[0]"], "fixed"].any()
    assert fit.estimates == {"tka": 0.45, "omega[0]": 0.6, "omega[1]": 0.3, "omega[2]": 0.1, "sigma": 0.7}


def test_summary_without_transforms_uses_delta_interval():
    fit = make_fit()
    plain = FitResult(**{f: getattr(fit, f) for f in fit.__dataclass_fields__ if f != "transforms"})
    om = plain.summary().loc["omega[1]"]
    assert (om["CI95_lower"], om["CI95_upper"]) == pytest.approx((0.3 - Z * 0.12, 0.3 + Z * 0.12))


def test_repr_and_correlation(fit):
    text = repr(fit)
    for piece in ("method='focei'", "status='converged'", "OFV 110.2000", "-2LL", "AIC 118.2000", "BIC 120.3000",
                  "3 subjects, 11 observations, 4 estimated parameters", "omega[2]", "RSE%", "warnings:",
                  "EBE search did not converge", "gtol reached", "eta shrinkage"):
        assert piece in text, piece
    corr = fit.correlation
    assert np.allclose(np.diag(corr), 1.0) and corr[0, 1] == pytest.approx(0.01 / (0.2 * 0.3))
    assert make_fit(covariance=False).correlation is None


def test_coercion_and_validation():
    import jax.numpy as jnp

    fit = make_fit()
    assert isinstance(fit.theta, np.ndarray) and fit.settings["bounds"] == [0, 1]
    again = FitResult(**{**_fields(fit), "theta": jnp.asarray(fit.theta)})
    assert type(again.theta) is np.ndarray and again == fit
    with pytest.raises(ValueError, match="status"):
        FitResult(**{**_fields(fit), "status": "ok"})
    with pytest.raises(ValueError, match="covariance"):
        FitResult(**{**_fields(fit), "covariance": np.eye(5)})
    with pytest.raises(ValueError, match="ipred"):
        FitResult(**{**_fields(fit), "ipred": np.zeros((3, 5))})
    with pytest.raises(TypeError):
        FitResult(method="focei")  # everything else is required or keyword-only


def _fields(fit: FitResult) -> dict:
    return {f: getattr(fit, f) for f in fit.__dataclass_fields__}


# ---------------------------------------------------------------------- ArviZ
def test_to_arviz_groups_dims_and_summary(fit):
    import arviz as az

    dt = fit.to_arviz(n_draws=N_DRAWS, seed=0)
    assert {"posterior", "sample_stats", "observed_data", "constant_data", "point_estimate"} <= set(dt.children)
    post = dt["posterior"]
    assert post["tka"].dims == ("chain", "draw") and post["tka"].shape == (1, N_DRAWS)
    assert post["omega"].dims == ("chain", "draw", "omega_dim_0") and post["omega"].shape == (1, N_DRAWS, 3)
    assert post["eta"].dims == ("chain", "draw", "subject", "eta_dim_0") and post["eta"].shape == (1, N_DRAWS, 3, 3)
    assert list(post["subject"].values) == [101, 205, 307]
    assert dt["sample_stats"]["log_q"].shape == (1, N_DRAWS)
    obs = dt["observed_data"]
    assert obs["DV"].dims == ("obs",) and obs["DV"].size == fit.mask.sum() == 11
    assert np.array_equal(obs["DV"].values, fit.dv[fit.mask])
    assert list(obs["ID"].values[-3:]) == [307] * 3 and list(obs["output"].values[:2]) == ["cp", "effect"]
    assert np.array_equal(dt["constant_data"]["TIME"].values, fit.times[fit.mask])
    point = dt["point_estimate"]
    assert float(point["tka"]) == 0.45 and point["eta"].dims == ("subject", "eta_dim_0")
    assert np.array_equal(point["IPRED"].values, fit.ipred[fit.mask])
    table = az.summary(dt)
    assert "tka" in table.index and table.loc["tka", "mean"] == pytest.approx(0.45, abs=0.02)


def test_to_arviz_draws_match_the_normal_approximation(fit):
    dt = to_arviz(fit, n_draws=N_DRAWS, seed=1)
    post = dt["posterior"]
    # real site: mean of N draws within 4 standard errors (sd 0.2 / sqrt(N) = 0.0045)
    assert float(post["tka"].mean()) == pytest.approx(0.45, abs=4 * 0.2 / math.sqrt(N_DRAWS))
    assert float(post["tka"].std()) == pytest.approx(0.2, rel=0.1)
    omega = post["omega"].values.reshape(-1, 3)
    assert (omega > 0).all()  # positive: log-normal draws, median at the estimate, log-sd 0.3/0.4/0.5
    assert np.allclose(np.median(omega, axis=0), [0.6, 0.3, 0.1], rtol=4 * 0.5 * 1.25 / math.sqrt(N_DRAWS))
    assert np.allclose(np.std(np.log(omega), axis=0), np.sqrt(np.diag(COV))[1:], rtol=0.1)
    assert np.all(post["sigma"].values == 0.7)  # fixed
    eta = post["eta"].values[0]  # [draw, subject, eta]
    assert np.allclose(eta.mean(axis=0), fit.ebes.to_numpy(), atol=4 * 0.9 / math.sqrt(N_DRAWS))
    assert np.allclose(eta[:, 2].std(axis=0), np.sqrt([0.03, 0.12, 0.27]), rtol=0.1)


def test_to_arviz_without_covariance_is_one_draw_at_the_estimate():
    fit = make_fit(covariance=False)
    dt = fit.to_arviz(n_draws=500)
    post = dt["posterior"]
    assert post.sizes["draw"] == 1 and "sample_stats" not in dt.children
    assert np.array_equal(post["omega"].values[0, 0], PARAMS["omega"])
    assert np.array_equal(post["eta"].values[0, 0], fit.ebes.to_numpy())
    assert dt.attrs["posterior_kind"] == "point_estimate"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # r_hat of the constant sigma
def test_bayesian_fit_converts():
    import arviz as az

    fit = make_fit(draws=_bayes_draws(), covariance=False, method="nuts")
    dt = fit.to_arviz()
    post = dt["posterior"]
    assert post.sizes == {"chain": 2, "draw": 100, "omega_dim_0": 3, "subject": 3, "eta_dim_0": 3}
    assert post["eta"].dims == ("chain", "draw", "subject", "eta_dim_0")
    assert "diverging" not in post and dt["sample_stats"]["diverging"].shape == (2, 100)
    assert np.array_equal(post["tka"].values, fit.draws["tka"])
    assert dt.attrs["posterior_kind"] == "draws"
    table = az.summary(dt)
    assert {"tka", "omega[0]"} <= set(table.index) and np.isfinite(table.loc["tka", "r_hat"])


# ---------------------------------------------------------------------- netCDF
def _assert_same(a: FitResult, b: FitResult) -> None:
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("model", "pop", "transforms", "tables"):  # not compared (tables: the file's ArviZ groups)
            continue
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y)
        elif isinstance(x, dict) and name not in ("settings", "timings"):
            assert list(x) == list(y), name
            for k in x:
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
        else:
            assert x == y and type(x) is type(y), name
    assert a == b


@pytest.mark.parametrize("ids", [(101, 205, 307), ("A-1", "B-2", "C-3")])
def test_save_load_round_trip(tmp_path, ids):
    fit = make_fit(ids=ids)
    path = tmp_path / "fit.nc"
    fit.save(path)
    back = load(path)
    _assert_same(fit, back)
    assert back.ebes.index.dtype == fit.ebes.index.dtype and back.ebes.index.name == "ID"
    assert [type(i) for i in back.ids] == [type(i) for i in fit.ids]
    assert {k: support_name(t) for k, t in back.transforms.items()} == {
        "tka": "real", "omega": "positive", "sigma": "positive", "eta": "independent(real,1)"}
    pd.testing.assert_frame_equal(back.summary(), fit.summary())
    assert back.model is None and back.pop is None


def test_round_trip_of_bayesian_and_minimal_results(tmp_path):
    fit = make_fit(draws=_bayes_draws(), covariance=False, method="nuts")
    fit.save(tmp_path / "nuts.nc")
    back = FitResult.load(tmp_path / "nuts.nc")
    _assert_same(fit, back)
    assert back.covariance is None and back.se_unconstrained is None
    bare = FitResult(**{**_fields(make_fit()), "se": {}, "shrinkage": {}, "settings": {}, "timings": {},
                        "warnings": (), "transforms": {}, "history": FitResult.__dataclass_fields__[
                            "history"].default_factory()})
    bare.save(tmp_path / "bare.nc")
    _assert_same(bare, load(tmp_path / "bare.nc"))


def test_no_overwrite_without_asking(tmp_path):
    fit = make_fit()
    path = tmp_path / "fit.nc"
    fit.save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="fit.nc"):
        make_fit(method="laplace").save(path)
    assert path.read_bytes() == before
    make_fit(method="laplace").save(path, overwrite=True)
    assert load(path).method == "laplace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.nc"]


def test_load_rejects_other_files(tmp_path):
    import xarray as xr

    xr.Dataset({"x": ("i", [1.0])}).to_netcdf(tmp_path / "other.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match="not a file written by FitResult.save"):
        load(tmp_path / "other.nc")


@pytest.mark.parametrize("support", [constraints.real, constraints.positive, constraints.unit_interval,
                                     constraints.corr_cholesky, constraints.softplus_positive,
                                     constraints.interval(0.0, 3.0), constraints.greater_than(2.0),
                                     constraints.positive_ordered_vector, constraints.lower_cholesky])
def test_support_names_rebuild_the_transform(support):
    transform = biject_to(support)
    name = support_name(transform)
    assert name is not None and transform_from_name(name) == transform
