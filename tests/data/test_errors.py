"""Every bad-input case raises DataError naming the row and the column."""

import numpy as np
import pandas as pd
import pytest

import nlmegen
from nlmegen import DataError


def table(changes=None):
    """A small valid table (2 subjects, one oral dose each); ``changes`` maps (row, col) -> value."""
    df = pd.DataFrame({
        "ID": [1, 1, 1, 2, 2, 2],
        "TIME": [0.0, 1.0, 2.0, 0.0, 1.0, 4.0],
        "DV": [0.0, 5.0, 4.0, 0.0, 3.0, 2.0],
        "AMT": [100.0, 0, 0, 100.0, 0, 0],
        "EVID": [1, 0, 0, 1, 0, 0],
        "CMT": [1, 2, 2, 1, 2, 2],
        "WT": [70.0] * 3 + [80.0] * 3,
    })
    df = df.astype({"DV": object, "TIME": object, "AMT": object, "EVID": object, "WT": object, "CMT": object})
    for (row, col), value in (changes or {}).items():
        if col not in df.columns:
            df[col] = 0
            df[col] = df[col].astype(object)
        df.loc[row, col] = value
    return df


def expect(df, *fragments, **kwargs):
    with pytest.raises(DataError) as err:
        nlmegen.read_nonmem(df, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_valid_table_reads():
    pop = nlmegen.read_nonmem(table())
    assert pop.n_subjects == 2 and pop.n_obs == 2


@pytest.mark.parametrize("column", ["ID", "TIME", "DV"])
def test_missing_required_column(column):
    expect(table().drop(columns=[column]), f"missing required column {column}")


def test_missing_column_names_present_columns():
    msg = expect(table().drop(columns=["DV"]), "columns present")
    assert "TIME" in msg


def test_non_numeric_value_names_row_and_column():
    expect(table({(4, "DV"): "abc"}), "row 4", "column DV", "non-numeric", "'abc'")


def test_non_numeric_amount():
    expect(table({(0, "AMT"): "ten"}), "row 0", "column AMT", "non-numeric")


def test_non_numeric_time_in_csv_names_the_line(tmp_path):
    df = table({(2, "TIME"): "2h"})
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    expect(path, "row 2", "line 4 of", "column TIME", "non-numeric")


def test_unsorted_times_within_subject():
    expect(table({(2, "TIME"): 0.5}), "row 2", "column TIME", "backwards")


def test_negative_time():
    expect(table({(3, "TIME"): -1.0}), "row 3", "column TIME", "negative time")


def test_negative_amount():
    expect(table({(0, "AMT"): -5.0}), "row 0", "column AMT", "negative amount")


def test_dose_without_amount():
    expect(table({(3, "AMT"): np.nan}), "row 3", "column AMT", "without an amount")


def test_dose_with_zero_amount():
    expect(table({(3, "AMT"): 0.0}), "row 3", "column AMT", "without an amount")


def test_unknown_evid():
    expect(table({(1, "EVID"): 7}), "row 1", "column EVID", "unknown EVID")


def test_nan_dv_on_observation():
    expect(table({(5, "DV"): np.nan}), "row 5", "column DV", "missing (NaN) DV")


def test_nan_dv_allowed_for_designs():
    pop = nlmegen.read_nonmem(table({(5, "DV"): np.nan}), allow_missing_dv=True)
    assert bool(pop.mask[1, 1])


def test_subject_without_observations_when_fitting():
    df = table()
    df.loc[4, "EVID"] = 2
    df.loc[5, "EVID"] = 2
    nlmegen.read_nonmem(df)  # fine for simulation
    expect(df, "row 3", "subject 2", "no observation", require_observations=True)


def test_addl_without_ii():
    expect(table({(0, "ADDL"): 3}), "row 0", "ADDL", "II", "conflicting")


def test_ss_without_ii():
    expect(table({(0, "SS"): 1}), "row 0", "SS", "conflicting")


def test_rate_on_observation_record():
    expect(table({(1, "RATE"): 10.0}), "row 1", "column RATE", "conflicting")


def test_invalid_rate_code():
    expect(table({(0, "RATE"): -3.0}), "row 0", "column RATE")


def test_invalid_ss_value():
    expect(table({(0, "SS"): 99, (0, "II"): 24.0}), "row 0", "column SS", "0, 1 or 2")


def test_ids_not_contiguous():
    df = table()
    df.loc[5, "ID"] = 1
    df.loc[5, "TIME"] = 9.0
    expect(df, "row 5", "column ID", "appears again")


def test_columns_differing_only_in_case():
    df = table()
    df["time"] = df["TIME"]
    expect(df, "differ only in case")


def test_mixed_text_in_numeric_covariate():
    expect(table({(2, "WT"): "heavy"}), "row 2", "column WT", "non-numeric")


def test_covariate_missing_for_whole_subject():
    df = table()
    df.loc[3:5, "WT"] = np.nan
    expect(df, "column WT", "subject 2", "no value")


def test_bad_dose_compartment():
    expect(table({(0, "CMT"): 0}), "row 0", "column CMT", "positive whole number")


def test_censored_without_limit():
    expect(table({(1, "CENS"): 1, (1, "DV"): np.nan}), "row 1", "censored", "without a limit")


def test_unknown_interpolation_rule():
    with pytest.raises(DataError, match="interpolation"):
        nlmegen.read_nonmem(table(), interpolation="linear")


def test_unknown_covariate_requested():
    with pytest.raises(DataError, match="'HT'"):
        nlmegen.read_nonmem(table(), covariates=["HT"])


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_not_a_table():
    with pytest.raises(TypeError, match="CSV path or a pandas DataFrame"):
        nlmegen.read_nonmem(42)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        nlmegen.read_nonmem(tmp_path / "nope.csv")
