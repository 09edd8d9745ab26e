"""Property: random valid tables load; one random corruption of one row raises a DataError naming that row
(and, from a CSV file, its line), never any other exception."""

import re

import numpy as np
import pandas as pd
import pytest
from _random_tables import random_table
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nlmegen
from nlmegen import DataError


def _rows(df, keep) -> list[int]:
    return [int(i) for i in np.flatnonzero(keep)]


def _obs(df):
    return _rows(df, df["EVID"] == 0)


def _doses(df):
    return _rows(df, df["EVID"].isin((1, 4)))


def _set(column, value, rows_of):
    """Corruption: ``column`` := ``value`` on one row chosen from ``rows_of(df)``."""
    def corrupt(df, pick):
        rows = rows_of(df)
        if not rows:
            return None
        row = rows[pick % len(rows)]
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        return row
    return corrupt


def _time_backwards(df, pick):
    later = [i for i in range(1, len(df)) if df.loc[i, "ID"] == df.loc[i - 1, "ID"] and df.loc[i - 1, "TIME"] > 0]
    if not later:
        return None
    row = later[pick % len(later)]
    df.loc[row, "TIME"] = df.loc[row - 1, "TIME"] - 0.125 if df.loc[row - 1, "TIME"] >= 0.125 else None
    return row if df.loc[row, "TIME"] is not None and df.loc[row, "TIME"] >= 0 else None


def _blank_dvid(df, pick):
    obs = _obs(df)
    if len(obs) < 2:
        return None
    row = obs[pick % len(obs)]
    df["DVID"] = df["DVID"].astype(object)
    df.loc[row, "DVID"] = "."
    return row


CORRUPTIONS = {
    "text time": _set("TIME", "2h", lambda df: list(range(len(df)))),
    "negative time": _set("TIME", -1.0, lambda df: list(range(len(df)))),
    "text dv": _set("DV", "high", _obs),
    "absurd dv": _set("DV", 1e300, lambda df: list(range(len(df)))),
    "sentinel dv": _set("DV", -99.0, lambda df: _rows(df, (df["EVID"] == 0) & (df["BLQ"] == 0))),
    "missing dv": _set("DV", ".", lambda df: _rows(df, (df["EVID"] == 0) & (df["BLQ"] == 0))),
    "amount on observation": _set("AMT", 25.0, _obs),
    "negative amount": _set("AMT", -5.0, _doses),
    "dose without amount": _set("AMT", ".", _doses),
    "unknown evid": _set("EVID", 7, lambda df: list(range(len(df)))),
    "rate on observation": _set("RATE", 10.0, _obs),
    "bad rate code": _set("RATE", -3.0, _doses),
    "bad ss": _set("SS", 3, _doses),
    "bad mdv": _set("MDV", 5, lambda df: list(range(len(df)))),
    "dose cmt 0": _set("CMT", 0, _doses),
    "missing id": _set("ID", ".", lambda df: list(range(len(df)))),
    "infinite covariate": _set("WT", "inf", lambda df: list(range(len(df)))),
    "absurd covariate": _set("CRCL", -1e200, lambda df: list(range(len(df)))),
    # (a one-row table of text WT is a valid categorical covariate)
    "text in numeric covariate": _set("WT", "heavy", lambda df: list(range(len(df))) if len(df) > 1 else []),
    "time backwards": _time_backwards,
    "blank dvid": _blank_dvid,
}


_cmt_3 = _set("CMT", 3, lambda df: _rows(df, df["EVID"] == 1))


def _evid_101(df, pick):
    """A dose turned into EVID 101 (rxode2's dose into CMT 1) while its CMT says 3."""
    row = _cmt_3(df, pick)
    if row is None or df.loc[row, "CMT"] != 3:
        return None
    df["EVID"] = df["EVID"].astype(object)
    df.loc[row, "EVID"] = 101
    return row


CORRUPTIONS["evid 101 elsewhere"] = _evid_101


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000))
def test_valid_random_tables_load(seed):
    pop = nlmegen.read_nonmem(random_table(seed, max_subjects=6))
    assert pop.n_subjects >= 1


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(seed=st.integers(0, 100_000), pick=st.integers(0, 10**6))
def test_one_corruption_names_its_row(name, seed, pick):
    df = random_table(seed, max_subjects=6)
    row = CORRUPTIONS[name](df, pick)
    assume(row is not None)
    with pytest.raises(DataError) as err:
        nlmegen.read_nonmem(df)
    assert re.search(rf"\brow {row}\b", str(err.value)), (name, row, str(err.value))


@pytest.mark.parametrize("name", ["text dv", "amount on observation", "infinite covariate", "blank dvid"])
def test_corruption_in_a_csv_names_the_line(tmp_path, name):
    df = random_table(7, max_subjects=6)
    row = CORRUPTIONS[name](df, 3)
    assert row is not None
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        nlmegen.read_nonmem(path)
    assert f"line {row + 2} of" in str(err.value) and re.search(rf"\brow {row}\b", str(err.value))


def test_csv_of_a_valid_table_reads_like_the_dataframe(tmp_path):
    df = random_table(11)
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)
    a, b = nlmegen.read_nonmem(df), nlmegen.read_nonmem(path)
    assert a.ids == b.ids and a.outputs == b.outputs
    np.testing.assert_array_equal(a.dose_times, b.dose_times)
    np.testing.assert_array_equal(a.dv, b.dv)
    pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas())
