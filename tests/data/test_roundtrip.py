"""Property: pandas -> Population -> pandas keeps every record; Population -> pandas -> Population is exact."""

import jax
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nlmegen

times = st.lists(st.integers(0, 200), min_size=1, max_size=8).map(lambda ts: sorted(t / 4 for t in ts))


@st.composite
def subject_records(draw, sid):
    ts = draw(times)
    wt = draw(st.floats(40, 120, allow_nan=False).map(lambda x: round(x, 2)))
    rows = []
    for t in ts:
        evid = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))
        row = {"ID": sid, "TIME": t, "DV": np.nan, "AMT": 0.0, "EVID": evid, "CMT": 2, "RATE": 0.0,
               "DVID": 1, "WT": wt, "CRCL": float(draw(st.integers(20, 120)))}
        if evid == 0:
            row["DV"] = round(draw(st.floats(-5, 50, allow_nan=False)), 3)
            row["DVID"] = draw(st.sampled_from([1, 2]))
        if evid == 1:
            row["AMT"] = round(draw(st.floats(0.5, 500, allow_nan=False)), 3)
            row["CMT"] = draw(st.sampled_from([1, 2]))
            row["RATE"] = draw(st.sampled_from([0.0, 0.0, 5.0, -2.0]))
        rows.append(row)
    if not any(r["EVID"] == 0 for r in rows):
        rows.append({**rows[-1], "EVID": 0, "DV": 1.0, "AMT": 0.0, "RATE": 0.0, "CMT": 2, "DVID": 1})
    return rows


@st.composite
def tables(draw):
    n = draw(st.integers(1, 4))
    ids = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True))
    rows = [r for sid in ids for r in draw(subject_records(sid))]
    return pd.DataFrame(rows)


def assert_same_population(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.ids == b.ids and a.outputs == b.outputs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_roundtrip(df):
    pop = nlmegen.read_nonmem(df)
    back = pop.to_pandas()
    assert len(back) == len(df)
    assert list(back.columns) == list(df.columns)
    for col in ("ID", "TIME", "EVID", "WT", "CRCL"):
        np.testing.assert_array_equal(back[col].to_numpy(), df[col].to_numpy(), err_msg=col)
    obs = df["EVID"] == 0
    dose = df["EVID"] == 1
    np.testing.assert_allclose(back.loc[obs, "DV"], df.loc[obs, "DV"])
    np.testing.assert_array_equal(back.loc[obs, "DVID"], df.loc[obs, "DVID"])
    for col in ("AMT", "CMT", "RATE"):
        np.testing.assert_allclose(back.loc[dose, col], df.loc[dose, col], err_msg=col)
    assert_same_population(pop, nlmegen.read_nonmem(back))


def test_roundtrip_bundled_datasets():
    for name in nlmegen.datasets.names():
        pop = nlmegen.read_nonmem(nlmegen.datasets.load(name))
        assert_same_population(pop, nlmegen.read_nonmem(pop.to_pandas()))
