"""Occasions (inter-occasion variability): from an OCC column, from EVID 3/4 resets and from a rule;
per-record values; closed form and ODE switching parameters at occasion boundaries."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import nlmegen


def _table():
    # subject 1: occasions 1, 2 (reset at 24 by EVID 4); subject 2: occasion 2 only, then 3 (EVID 3 at 30)
    return pd.DataFrame({
        "ID": [1, 1, 1, 1, 1, 2, 2, 2, 2, 2],
        "TIME": [0, 1, 24, 25, 26, 0, 2, 30, 31, 32],
        "DV": [np.nan, 5.0, np.nan, 4.0, 3.0, np.nan, 6.0, np.nan, np.nan, 2.0],
        "AMT": [100, 0, 100, 0, 0, 100, 0, 0, 100, 0],
        "EVID": [1, 0, 4, 0, 0, 1, 0, 3, 1, 0],
        "OCC": [1, 1, 2, 2, 2, 2, 2, 3, 3, 3],
    })


def test_occ_column_is_read_as_occasions():
    pop = nlmegen.read_nonmem(_table())
    assert pop.occasions == (1, 2, 3) and pop.n_occasions == 3
    np.testing.assert_array_equal(pop.occ, [[0, 1, 1], [1, 2, 2]])
    np.testing.assert_array_equal(pop.dose_occ, [[0, 1], [1, 2]])
    np.testing.assert_array_equal(pop.occ_start, [[0, 24, np.inf], [np.inf, 0, 30]])
    assert "OCC" in pop.covariates  # still a covariate too
    assert nlmegen.read_nonmem(_table(), occasions=None).occ is None


def test_occasions_from_resets_and_from_a_rule():
    pop = nlmegen.read_nonmem(_table().drop(columns="OCC"), occasions="resets")
    assert pop.occasions == (1, 2)
    np.testing.assert_array_equal(pop.occ, [[0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(pop.occ_start, [[0, 24], [0, 30]])
    rule = nlmegen.read_nonmem(_table().drop(columns="OCC"), occasions=lambda t: 1 + (t["TIME"] >= 25))
    np.testing.assert_array_equal(rule.occ, [[0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(rule.occ_start, [[0, 25], [0, 30]])
    # occasion_at: the last occasion started at or before t, per subject
    np.testing.assert_array_equal(pop.occasion_at(24.0), [1, 0])
    full = nlmegen.read_nonmem(_table())  # subject 2 lacks occasion 1
    np.testing.assert_array_equal(full.occasion_at(jnp.array([[0.0, 29.0, 30.0]] * 2)), [[0, 1, 1], [1, 1, 2]])
    np.testing.assert_array_equal(pop.subset([2]).occ, [[0, 1, 1]])


def test_bad_occasion_inputs_are_named():
    with pytest.raises(nlmegen.DataError, match="no column 'VISIT'"):
        nlmegen.read_nonmem(_table(), occasions="VISIT")
    with pytest.raises(nlmegen.DataError, match="gave 3 labels for 10 records"):
        nlmegen.read_nonmem(_table(), occasions=lambda t: [1, 2, 3])
    pop = nlmegen.read_nonmem(_table(), occasions=None)
    with pytest.raises(nlmegen.ModelError, match="no occasions"):
        nlmegen.occasions(pop)


def test_by_occasion_and_closed_form_match_an_ode_that_switches_at_occasions():
    """Per-observation CL by occasion in the closed form equals an ODE whose right-hand side takes
    the occasion's CL (the occasions are separated by resets, so superposition is exact)."""
    pop = nlmegen.read_nonmem(_table())
    cl_occ = jnp.array([[2.0, 3.0, 9.0], [9.0, 1.5, 1.0]])
    v = jnp.array([20.0, 15.0])
    cl_obs = nlmegen.by_occasion(cl_occ, pop)
    np.testing.assert_array_equal(cl_obs, [[2.0, 3.0, 3.0], [1.5, 1.0, 1.0]])
    closed = nlmegen.pk.one_cmt(pop, cl=cl_obs, v=v)

    def rhs(t, y, p):
        return -p["cl"][nlmegen.occasion_index(t, p["start"])] / p["v"] * y

    ode = nlmegen.ode.solve(rhs, pop, {"cl": cl_occ, "v": v, "start": pop.occ_start}, y0=jnp.zeros(1))
    np.testing.assert_allclose(ode[..., 0] / v[:, None], closed, rtol=1e-5)
    # subject 2's first observation (t=2, occasion 2): 100 mg at 0 with CL 1.5
    np.testing.assert_allclose(closed[1, 0], 100 / 15 * np.exp(-1.5 / 15 * 2), rtol=1e-12)
