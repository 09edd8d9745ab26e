"""The vectorised build gives exactly the Population of the per-subject reference build.

Every field is compared (values, dtypes, shapes, padding and masks, static metadata), on random
tables mixing every record kind, and on one small table against arrays written out by hand.
"""

import dataclasses

import jax
import numpy as np
import pandas as pd
import pytest
from _random_tables import random_table
from _reference_build import reference_build

import nlmegen
from nlmegen.data import _read


def read_both(table, **options):
    """(vectorised, reference) Populations of one table: the reference gets the same records."""
    captured = {}
    build = _read._build

    def spy(records, *rest):
        captured["args"] = (records.copy(), *rest)
        return build(records, *rest)

    _read._build = spy
    try:
        new = nlmegen.read_nonmem(table, **options)
    finally:
        _read._build = build
    # units are metadata read_nonmem sets after the build (from attrs or units=): the reference gets the same
    return new, dataclasses.replace(reference_build(*captured["args"]), units=new.units)


def assert_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape) == (y.dtype, y.shape)
        np.testing.assert_array_equal(x, y)
    assert [type(i) for i in a.ids] == [type(i) for i in b.ids]


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_build_equals_reference_on_random_tables(seed):
    assert_identical(*read_both(random_table(seed)))


@pytest.mark.parametrize("name", ["theo_sd", "theo_md", "warfarin", "pheno", "wang2007"])
def test_vectorised_build_equals_reference_on_bundled_datasets(name):
    assert_identical(*read_both(nlmegen.datasets.load(name)))


def test_build_fixed_arrays_padding_and_masks():
    table = pd.DataFrame({
        "ID": [7, 7, 7, 7, 3, 3],
        "TIME": [0.0, 1.0, 2.0, 2.0, 0.0, 5.0],
        "DV": [".", 4.0, ".", 3.0, 1.5, "."],
        "AMT": [10.0, 0, 0, 5.0, 0, 0],
        "EVID": [1, 0, 3, 4, 0, 2],
        "CMT": [1, 2, 0, 1, 2, 0],
        "ADDL": [1, 0, 0, 0, 0, 0],
        "II": [1.0, 0, 0, 0, 0, 0],
        "WT": [70.0, 70.0, 70.0, 70.0, 60.0, 60.0],
        "CRCL": [90.0, ".", 80.0, ".", 50.0, 55.0],
    })
    pop = nlmegen.read_nonmem(table)
    # subject 7: dose@0, dose@1 (ADDL, after the obs@1), obs@1, reset@2, reset+dose@2
    assert pop.ids == (7, 3)
    np.testing.assert_array_equal(pop.times, [[1.0], [0.0]])
    np.testing.assert_array_equal(pop.dv, [[4.0], [1.5]])
    np.testing.assert_array_equal(pop.mask, [[True], [True]])
    np.testing.assert_array_equal(pop.obs_index, [[2], [0]])
    np.testing.assert_array_equal(pop.dose_times, [[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(pop.dose_amts, [[10.0, 10.0, 5.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(pop.dose_mask, [[True, True, True], [False, False, False]])
    np.testing.assert_array_equal(pop.dose_index, [[0, 4, 8], [2, 2, 2]])
    np.testing.assert_array_equal(pop.dose_cmts, [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(pop.reset_times, [[2.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(pop.reset_mask, [[True, True], [False, False]])
    np.testing.assert_array_equal(pop.reset_index, [[6, 7], [-1, -1]])
    np.testing.assert_array_equal(pop.cov_times, [[0.0, 1.0, 1.0, 2.0, 2.0], [0.0, 5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(pop.cov_mask, [[True] * 5, [True, True, False, False, False]])
    np.testing.assert_array_equal(pop.covariates["WT"], [70.0, 60.0])
    # CRCL by NOCB: the ADDL dose at 1 h takes the next value (80), the obs at 1 h too
    np.testing.assert_array_equal(pop.cov_values["CRCL"], [[90.0, 80.0, 80.0, 80.0, 80.0],
                                                           [50.0, 55.0, 55.0, 55.0, 55.0]])
    np.testing.assert_array_equal(pop.covariates["CRCL"], [[80.0], [50.0]])
    assert pop.features == frozenset({"reset"})
    assert_identical(*read_both(table))
