"""Tables that used to be accepted silently and wrong (issue 19): each raises a DataError naming
row, file line and column, or is read the right way."""

import jax
import numpy as np
import pandas as pd
import pytest
from test_errors import expect, table

import nlmegen
from nlmegen import DataError


def write(tmp_path, text: str, name: str = "bad.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- missing DVs must not be fitted
def theo_with_missing_dv():
    df = nlmegen.datasets.load("theo_sd").astype({"DV": object})
    obs = df.index[df["EVID"] == 0]
    df.loc[obs[[3, 20, 40]], "DV"] = "."
    return df


def test_missing_dvs_are_marked_and_kept_missing_on_writing():
    pop = nlmegen.read_nonmem(theo_with_missing_dv(), allow_missing_dv=True)
    assert int(np.asarray(pop.dv_missing).sum()) == 3
    assert float(np.asarray(pop.dv)[np.asarray(pop.dv_missing)].max()) == 0.0
    out = pop.to_pandas()
    assert int(out.loc[out["EVID"] == 0, "DV"].isna().sum()) == 3
    again = nlmegen.read_nonmem(out, allow_missing_dv=True)
    np.testing.assert_array_equal(again.dv_missing, pop.dv_missing)
    sub = pop.subset([1, 2])
    assert sub.dv_missing.shape == (2, pop.n_obs)


def test_complete_data_have_no_missing_marks():
    assert nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd")).dv_missing is None


def test_check_observed_names_subject_and_time():
    pop = nlmegen.read_nonmem(theo_with_missing_dv(), allow_missing_dv=True)
    with pytest.raises(DataError) as err:
        pop.check_observed()
    msg = str(err.value)
    assert "3 observation record(s) have no DV" in msg and "column DV" in msg
    assert "subject 1 at TIME" in msg and "allow_missing_dv" in msg


@pytest.mark.parametrize("method", ["focei", "saem"])
def test_fit_refuses_missing_dvs(method):
    pop = nlmegen.read_nonmem(theo_with_missing_dv(), allow_missing_dv=True)
    with pytest.raises(DataError, match="have no DV"):
        nlmegen.fit(nlmegen.examples.theo_model, pop, method, key=jax.random.key(0))


def test_censored_observation_without_dv_is_not_missing():
    df = table({(1, "BLQ"): 1, (1, "DV"): ".", (1, "LLOQ"): 0.5})
    df["LLOQ"] = 0.5
    pop = nlmegen.read_nonmem(df)
    assert pop.dv_missing is None


# ---------------------------------------------------------------- file-level faults
def test_duplicate_column_names_in_csv(tmp_path):
    path = write(tmp_path, "ID,TIME,DV,AMT,DV\n1,0,.,100,.\n1,1,5,0,6\n")
    with pytest.raises(DataError) as err:
        nlmegen.read_nonmem(path)
    assert "line 1 of" in str(err.value) and "columns 3 and 5" in str(err.value) and "'DV'" in str(err.value)


def test_duplicate_covariate_names_in_csv(tmp_path):
    path = write(tmp_path, "ID,TIME,DV,WT,WT\n1,0,1,70,71\n")
    expect(path, "columns 4 and 5", "'WT'")


def test_duplicate_column_names_in_dataframe():
    df = table()
    df.columns = ["ID", "TIME", "DV", "AMT", "EVID", "CMT", "DV"]
    expect(df, "columns 3 and 7", "'DV'")


def test_empty_file(tmp_path):
    expect(write(tmp_path, ""), "is empty")
    expect(write(tmp_path, "\n\n", "blank.csv"), "is empty")


def test_header_only_file(tmp_path):
    expect(write(tmp_path, "ID,TIME,DV\n"), "no rows")


def test_stray_trailing_delimiter_is_ignored(tmp_path):
    clean = nlmegen.read_nonmem(write(tmp_path, "ID,TIME,DV,AMT\n1,0,.,100\n1,1,5,0\n2,0,.,100\n2,2,3,0\n", "a.csv"))
    stray = nlmegen.read_nonmem(write(tmp_path, "ID,TIME,DV,AMT\n1,0,.,100,\n1,1,5,0,\n2,0,.,100,\n2,2,3,0,\n",
                                      "b.csv"))
    assert stray.ids == clean.ids == (1, 2)
    for a, b in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(stray), strict=True):
        np.testing.assert_array_equal(a, b)


def test_more_values_than_column_names(tmp_path):
    path = write(tmp_path, "ID,TIME,DV\n1,0,1,7\n1,1,2,8\n")
    expect(path, "row 0", "line 2 of", "4 fields", "3 columns")


def test_stray_delimiter_on_some_rows_names_the_line(tmp_path):
    expect(write(tmp_path, "ID,TIME,DV\n1,0,1\n1,1,2,\n"), "line 3")


# ---------------------------------------------------------------- record-level faults
def test_amount_on_observation_record():
    expect(table({(1, "AMT"): 50.0}), "row 1", "column AMT", "not a dose", "EVID 0")


def test_amount_on_observation_record_names_the_file_line(tmp_path):
    path = tmp_path / "amt.csv"
    table({(4, "AMT"): 50.0}).to_csv(path, index=False)
    expect(path, "row 4", "line 6 of", "column AMT", "not a dose")


def test_amount_on_other_and_reset_records():
    expect(table({(2, "EVID"): 2, (2, "AMT"): 10.0}), "row 2", "column AMT", "not a dose")
    expect(table({(2, "EVID"): 3, (2, "AMT"): 10.0}), "row 2", "column AMT", "not a dose")


def test_amount_on_observation_marked_mdv():
    expect(table({(1, "MDV"): 1, (1, "AMT"): 10.0}), "row 1", "column AMT", "not a dose")


def test_no_evid_column_amount_still_means_dose():
    pop = nlmegen.read_nonmem(table().drop(columns=["EVID"]))
    assert int(pop.dose_mask.sum()) == 2 and pop.n_observations == 4


def test_evid_101_with_another_compartment():
    expect(table({(3, "EVID"): 101, (3, "CMT"): 2}), "row 3", "column CMT", "EVID 101")


def test_evid_101_with_compartment_1_or_none():
    pop = nlmegen.read_nonmem(table({(3, "EVID"): 101, (3, "CMT"): "."}))
    assert pop.dose_compartments == (1,)


def test_constant_infusion_steady_state_with_amount():
    df = table({(0, "SS"): 1, (0, "II"): 0.0, (0, "RATE"): 10.0})
    expect(df, "row 0", "columns SS/AMT", "AMT=0")
    df.loc[0, "AMT"] = 0.0
    pop = nlmegen.read_nonmem(df)
    assert "steady_state" in pop.features and float(pop.dose_rates[0, 0]) == 10.0


def test_dvid_blank_on_one_observation():
    df = table()
    df["DVID"] = [1, 1, 2, 1, ".", 2]
    expect(df, "row 4", "column DVID", "without a DVID")


def test_dvid_blank_on_a_dose_is_fine():
    df = table()
    df["DVID"] = [".", 1, 2, "", 1, 2]
    assert nlmegen.read_nonmem(df).outputs == ("1", "2")


def test_outputs_by_compartment_without_dvid():
    df = table({(2, "CMT"): 3, (5, "CMT"): 3})
    pop = nlmegen.read_nonmem(df)
    assert pop.outputs == ("2", "3")
    np.testing.assert_array_equal(pop.dvid, [[0, 1], [0, 1]])
    again = nlmegen.read_nonmem(pop.to_pandas())
    assert again.outputs == pop.outputs
    np.testing.assert_array_equal(again.dvid, pop.dvid)


def test_outputs_by_compartment_ask_the_model_which():
    def model(pop):
        import numpyro.distributions as dist

        nlmegen.observe("y", dist.Normal(np.zeros(pop.dv.shape), 1.0), pop)

    pop = nlmegen.read_nonmem(table({(5, "CMT"): 5}))
    assert pop.outputs == ("2", "5")
    with pytest.raises(nlmegen.ModelError, match="outputs"):
        nlmegen.simulate(model, {}, pop, key=jax.random.key(0))


def test_observation_without_compartment_among_several():
    df = table({(2, "CMT"): 3, (4, "CMT"): "."})
    expect(df, "row 4", "column CMT", "compartments 2, 3", "DVID")


def test_single_observation_compartment_is_one_output():
    assert nlmegen.read_nonmem(table({(1, "CMT"): "."})).outputs == ("DV",)


@pytest.mark.parametrize("column, value", [("DV", 1e300), ("DV", -1e120), ("AMT", 1e200), ("TIME", 1e101),
                                           ("WT", 1e150)])
def test_absurd_magnitudes(column, value):
    row = 0 if column == "AMT" else 2
    expect(table({(row, column): value}), f"row {row}", f"column {column}", "absurd magnitude")


@pytest.mark.parametrize("sentinel", [-99, -999, "-99", -9999.0])
def test_sentinel_dv(sentinel):
    expect(table({(4, "DV"): sentinel}), "row 4", "column DV", "missing-value code", "allow_sentinel_dv")


def test_sentinel_dv_allowed_explicitly():
    pop = nlmegen.read_nonmem(table({(4, "DV"): -99}), allow_sentinel_dv=True)
    assert float(pop.dv[1, 0]) == -99.0


def test_sentinel_on_a_dose_record_is_not_an_observation():
    nlmegen.read_nonmem(table({(0, "DV"): -99}))


@pytest.mark.parametrize("value", [np.inf, "inf", "-Infinity"])
def test_infinite_covariate(value):
    expect(table({(4, "WT"): value}), "row 4", "column WT", "infinite")


def test_infinite_covariate_in_csv_names_the_line(tmp_path):
    path = tmp_path / "inf.csv"
    table({(4, "WT"): "inf"}).to_csv(path, index=False)
    expect(path, "row 4", "line 6 of", "column WT", "infinite")


def test_addl_beyond_memory_is_refused():
    msg = expect(table({(3, "ADDL"): 100_000, (3, "II"): 24.0}), "row 3", "column ADDL", "100,001 doses",
                 "subject 2", "GiB")
    assert "SS=1" in msg
    msg = expect(table({(0, "ADDL"): 10_000_000, (0, "II"): 1.0}), "row 0", "column ADDL", "10,000,001 doses")


def test_addl_within_the_limit_is_expanded():
    pop = nlmegen.read_nonmem(table({(0, "ADDL"): 2_000, (0, "II"): 0.001}))
    assert pop.n_doses == 2_001


def test_every_new_error_is_a_data_error_not_a_crash(tmp_path):
    with pytest.raises(DataError):
        nlmegen.read_nonmem(write(tmp_path, "ID,TIME,DV,DV\n1,0,1,2\n"))
    with pytest.raises(DataError):
        nlmegen.read_nonmem(pd.DataFrame({"ID": [1], "TIME": [0.0], "DV": [-99.0]}))


def test_with_regimen_on_a_reset_and_dose_record_keeps_a_clean_reset():
    df = pd.DataFrame({"ID": [1] * 4, "TIME": [0.0, 1.0, 2.0, 3.0], "DV": [".", 1.0, ".", 2.0],
                       "AMT": [10.0, 0, 20.0, 0], "EVID": [1, 0, 4, 0], "RATE": [0.0, 0, 5.0, 0]})
    new = nlmegen.read_nonmem(df).with_regimen([{"TIME": 0.5, "AMT": 7.0}])
    out = new.to_pandas()
    assert out["EVID"].tolist() == [1, 0, 3, 0]
    assert out["AMT"].tolist() == [7.0, 0.0, 0.0, 0.0]


def test_observation_in_a_compartment_nothing_uses():
    df = table()
    df["DVID"] = [1, 1, 1, 1, 1, 1]
    df.loc[4, "CMT"] = 5
    expect(df, "row 4", "column CMT", "CMT 5", "no dose goes into", "observed in CMT 2")


def test_observation_compartments_of_two_outputs_and_doses_are_fine():
    df = table()
    df["DVID"] = [1, 1, 2, 1, 2, 1]
    df.loc[[2, 4], "CMT"] = 3
    df.loc[5, "CMT"] = 1  # dosed compartment: unusual, but something uses it
    assert nlmegen.read_nonmem(df).outputs == ("1", "2")
    df.loc[5, "CMT"] = 3  # the other output's compartment
    nlmegen.read_nonmem(df)


def test_observation_with_cmt_0_counts_as_no_cmt():
    assert nlmegen.read_nonmem(table({(1, "CMT"): 0})).outputs == ("DV",)
    expect(table({(1, "CMT"): 0, (2, "CMT"): 3}), "row 1", "column CMT", "without a CMT")
