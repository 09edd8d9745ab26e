"""Units of a data set: from ``read_nonmem(..., units=)`` or the table's ``attrs["units"]``, kept through
edits, and on every plot axis (issue 18: "units and names on every axis")."""

import jax
import matplotlib
import pytest

import nlmegen
from nlmegen.diagnostics._labels import axis_label, plot_units

matplotlib.use("Agg")


def test_units_from_metadata_or_argument():
    table = nlmegen.datasets.load("warfarin")
    pop = nlmegen.read_nonmem(table)
    assert dict(pop.units)["cp"] == "mg/L" and dict(pop.units)["pca"] == "% of normal"
    assert dict(pop.units)["TIME"] == "h"  # the column is "time": roles get NONMEM's name
    given = nlmegen.read_nonmem(table, units={"time": "d", "CP": "ng/mL"})
    assert dict(given.units) == {"TIME": "d", "cp": "ng/mL"}  # an argument replaces the metadata
    with pytest.raises(nlmegen.DataError, match="'weight' is not a column role, an output or a covariate"):
        nlmegen.read_nonmem(table, units={"weight": "kg"})


def test_units_survive_edits_and_label_axes():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    edited = pop.subset([1, 2]).with_regimen([{"TIME": 0.0, "AMT": 100.0}])
    assert edited.units == pop.units
    units = plot_units(pop, {"DV": "ug/mL"})
    assert axis_label("IPRED", units) == "IPRED (ug/mL)" and axis_label("TAD", units) == "TAD (h)"
    assert axis_label("CWRES", units) == "CWRES" and axis_label("WT", units) == "WT (kg)"
    warf = plot_units(nlmegen.read_nonmem(nlmegen.datasets.load("warfarin")))
    assert axis_label("DV", warf, "pca") == "DV (% of normal)" and axis_label("PRED", warf, "cp") == "PRED (mg/L)"


def test_vpc_takes_the_data_units_without_being_told():
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    theta = {"tka": 0.45, "tcl": 1.0, "tv": 3.45, "omega": [0.6, 0.3, 0.1], "add_sd": 0.7}
    result = nlmegen.vpc(None, pop, model=nlmegen.examples.theo_model, params=theta, n_sim=20,
                         key=jax.random.key(0))
    ax = result.plot().axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("TIME (h)", "DV (mg/L)")


def test_units_from_a_filtered_tables_attrs_keep_what_applies():
    """A bundled table cut to one output (its DVID column dropped) keeps the units that still apply;
    a name given explicitly that the data lack is still an error."""
    table = nlmegen.datasets.load("warfarin")
    table = table[table["dvid"] == "cp"].drop(columns="dvid")
    pop = nlmegen.read_nonmem(table)
    assert dict(pop.units) == {"TIME": "h", "AMT": "mg", "wt": "kg", "age": "years"}
    with pytest.raises(nlmegen.DataError, match="'cp' is not"):
        nlmegen.read_nonmem(table, units={"cp": "mg/L"})
