"""Reading real tables: shapes, codes, ADDL, resets, covariates, censoring, edits."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import nlmegen


def test_theo_sd_layout():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    assert pop.n_subjects == 12 and pop.n_obs == 11 and pop.n_doses == 1
    assert pop.dose_compartments == (1,)  # EVID 101 = dose into CMT 1
    assert pop.n_observations == 132
    np.testing.assert_allclose(pop.dose_amts[0, 0], 319.992)
    assert pop.covariates["WT"].shape == (12,)
    assert pop.ids == tuple(range(1, 13))
    # the dose record comes before the time-0 observation
    assert int(pop.dose_index[0, 0]) < int(pop.obs_index[0, 0])


def test_warfarin_outputs_and_text_covariate():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin"))
    assert pop.outputs == ("cp", "pca")
    assert dict(pop.categories)["sex"] == ("female", "male")
    n_cp = int(((pop.dvid == 0) & pop.mask).sum())
    n_pca = int(((pop.dvid == 1) & pop.mask).sum())
    assert (n_cp, n_pca) == (251, 232)
    assert pop.output_index("pca") == 1
    with pytest.raises(KeyError, match="outputs"):
        pop.output_index("pk")


def test_no_evid_column_uses_amt(tmp_path):
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("pheno"))
    raw = nlmegen.datasets.load("pheno")
    assert int(pop.dose_mask.sum()) == int((raw["AMT"] > 0).sum())
    assert pop.n_observations == int((raw["AMT"] == 0).sum())


def test_observations_only_table_is_valid():
    df = pd.DataFrame({"ID": [1, 1, 2], "TIME": [0.0, 1.0, 0.5], "DV": [1.0, 2.0, 3.0]})
    pop = nlmegen.read_nonmem(df)
    assert pop.n_doses == 1 and not bool(pop.dose_mask.any())
    assert pop.outputs == ("DV",)


def test_addl_expanded_after_same_time_records():
    df = pd.DataFrame({
        "ID": [1, 1, 1], "TIME": [0.0, 24.0, 30.0], "DV": [0, 1.5, 2.0], "AMT": [10.0, 0, 0],
        "EVID": [1, 0, 0], "ADDL": [3, 0, 0], "II": [12.0, 0, 0],
    })
    pop = nlmegen.read_nonmem(df)
    np.testing.assert_allclose(pop.dose_times[0], [0, 12, 24, 36])
    # the trough at 24 h is pre-dose: its record precedes the added dose at 24 h
    assert int(pop.obs_index[0, 0]) < int(pop.dose_index[0, 2])
    out = pop.to_pandas()
    assert (out["ADDL"] == 0).all() and int((out["EVID"] == 1).sum()) == 4


def test_reset_and_dose_records():
    df = pd.DataFrame({
        "ID": [1] * 5, "TIME": [0.0, 1.0, 10.0, 10.0, 11.0], "DV": [0, 1.0, 0, 0, 2.0],
        "AMT": [5.0, 0, 0, 7.0, 0], "EVID": [1, 0, 3, 4, 0],
    })
    pop = nlmegen.read_nonmem(df)
    assert int(pop.reset_mask.sum()) == 2 and int(pop.dose_mask.sum()) == 2
    reset_keys = sorted(int(k) for k, m in zip(pop.reset_index[0], pop.reset_mask[0], strict=True) if m)
    assert reset_keys == [4, 5] and int(pop.dose_index[0, 1]) == 6  # EVID 4: reset just before its dose
    back = pop.to_pandas()
    assert back["EVID"].tolist() == [1, 0, 3, 4, 0]


def test_time_varying_covariate_and_interpolation():
    df = pd.DataFrame({
        "ID": [1, 1, 1, 1], "TIME": [0.0, 1.0, 2.0, 3.0], "DV": [0, 1.0, np.nan, 3.0],
        "AMT": [10.0, 0, 0, 0], "EVID": [1, 0, 2, 0], "CRCL": [50.0, np.nan, 70.0, 80.0],
    })
    nocb = nlmegen.read_nonmem(df)
    locf = nlmegen.read_nonmem(df, interpolation="locf")
    assert nocb.covariates["CRCL"].shape == (1, 2)
    np.testing.assert_allclose(nocb.covariates["CRCL"][0], [70.0, 80.0])  # missing at t=1 filled backward
    np.testing.assert_allclose(locf.covariates["CRCL"][0], [50.0, 80.0])  # ... or forward
    # between records: NOCB gives the next record's value, LOCF the last one's
    np.testing.assert_allclose(nocb.covariate_at("CRCL", 2.5), [80.0])
    np.testing.assert_allclose(locf.covariate_at("CRCL", 2.5), [70.0])
    f = jax.jit(jax.vmap(lambda p, t: p.covariate_at("CRCL", t)))
    np.testing.assert_allclose(f(locf, jnp.array([2.5])), [70.0])


def test_constant_covariate_is_per_subject():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    np.testing.assert_allclose(pop.covariate_at("WT", 3.0)[:2], [79.6, 72.4])


def test_censoring_blq_and_lloq():
    df = pd.DataFrame({
        "ID": [1, 1, 1], "TIME": [0.0, 1.0, 2.0], "DV": [0, 5.0, np.nan], "AMT": [10.0, 0, 0],
        "EVID": [1, 0, 0], "BLQ": [0, 0, 1], "LLOQ": [0.5, 0.5, 0.5],
    })
    pop = nlmegen.read_nonmem(df)
    np.testing.assert_array_equal(pop.cens[0], [0, 1])
    np.testing.assert_allclose(pop.limit[0], [0.5, 0.5])
    cens = pd.DataFrame({"ID": [1, 1], "TIME": [1.0, 2.0], "DV": [0.1, 100.0], "CENS": [1, -1]})
    pop = nlmegen.read_nonmem(cens)
    np.testing.assert_array_equal(pop.cens[0], [1, -1])
    np.testing.assert_allclose(pop.limit[0], [0.1, 100.0])


def test_lloq_alone_flags_values_below_it():
    df = pd.DataFrame({"ID": [1, 1], "TIME": [1.0, 2.0], "DV": [0.2, 3.0], "LLOQ": [0.5, 0.5]})
    pop = nlmegen.read_nonmem(df)
    np.testing.assert_array_equal(pop.cens[0], [1, 0])


def test_subset_and_with_regimen():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    sub = pop.subset([3, 1])
    assert sub.ids == (3, 1)
    np.testing.assert_allclose(sub.dv[1], pop.dv[0])
    with pytest.raises(KeyError, match="unknown subject"):
        pop.subset([99])
    new = pop.with_regimen({"TIME": [0.0, 12.0], "AMT": [100.0, 100.0]}, ids=[2])
    assert new.n_subjects == 12
    np.testing.assert_allclose(new.dose_times[1], [0.0, 12.0])
    np.testing.assert_allclose(new.dose_amts[1], [100.0, 100.0])
    np.testing.assert_allclose(new.dose_amts[0, 0], pop.dose_amts[0, 0])  # others untouched
    np.testing.assert_allclose(new.dv, np.pad(np.asarray(pop.dv), ((0, 0), (0, 0))))
    daily = pop.with_regimen([{"TIME": 0.0, "AMT": 300.0, "ADDL": 4, "II": 24.0}])
    assert int(daily.dose_mask.sum()) == 12 * 5


def test_population_is_a_pytree_that_vmaps():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    leaves = jax.tree_util.tree_leaves(pop)
    assert all(leaf.shape[0] == 12 for leaf in leaves)
    last = jax.vmap(lambda p: jnp.max(jnp.where(p.mask, p.times, 0.0)))(pop)
    assert last.shape == (12,)
    assert "n_subjects=12" in repr(pop)
