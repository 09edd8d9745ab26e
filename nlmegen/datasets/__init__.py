"""Classic public NLME data sets shipped with nlmegen (provenance in this folder's README.md)."""

from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["load", "names"]

_FILES = {"theo_sd": "theo_sd.csv", "theo_md": "theo_md.csv", "warfarin": "warfarin.csv",
          "wang2007": "wang2007.csv", "pheno": "pheno.csv"}

#: Units of each data set's quantities (README.md of this folder); `load` puts them in
#: ``table.attrs["units"]``, where `nlmegen.read_nonmem` finds them for the plot axes.
UNITS = {
    "theo_sd": {"TIME": "h", "DV": "mg/L", "AMT": "mg", "WT": "kg"},
    "theo_md": {"TIME": "h", "DV": "mg/L", "AMT": "mg", "WT": "kg"},
    "warfarin": {"TIME": "h", "AMT": "mg", "cp": "mg/L", "pca": "% of normal", "wt": "kg", "age": "years"},
    "pheno": {"TIME": "h", "WGT": "kg"},
    "wang2007": {},
}


def names() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(_FILES)


def load(name: str) -> pd.DataFrame:
    """A bundled data set as a NONMEM-style pandas DataFrame.

    Parameters
    ----------
    name
        One of ``"theo_sd"``, ``"theo_md"``, ``"warfarin"``, ``"wang2007"``, ``"pheno"``
        (case-insensitive).

    Examples
    --------
    >>> from nlmegen import datasets
    >>> datasets.load("theo_sd").shape
    (144, 7)
    >>> datasets.load("theo_sd").attrs["units"]["DV"]
    'mg/L'
    """
    key = str(name).strip().lower()
    if key not in _FILES:
        raise KeyError(f"unknown data set {name!r}; available: {names()}")
    with resources.files(__name__).joinpath(_FILES[key]).open("r") as fh:
        table = pd.read_csv(fh)
    if key == "wang2007":  # the paper's Y is the observation; there are no dose records
        table = table.rename(columns={"Y": "DV", "Time": "TIME"})
    table.attrs["units"] = dict(UNITS[key])
    return table
