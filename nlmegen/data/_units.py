"""Units of a data set's quantities, kept on the `Population` and used to label every plot axis.

Keys are NONMEM roles (``TIME``, ``DV``, ``AMT``, ...; any spelling of the column), output names
(one DV unit per output, e.g. ``{"cp": "mg/L", "pca": "%"}``) and covariate names. A DataFrame
can carry them in ``table.attrs["units"]`` (the bundled data sets do), or ``read_nonmem(...,
units=...)`` gives them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .._errors import DataError
from ._columns import ROLES

__all__ = ["normalise_units", "unit_of"]


def normalise_units(units: Mapping[str, str] | None, columns: tuple, outputs: tuple, covariates: tuple,
                    strict: bool = True) -> tuple:
    """``((name, unit), ...)`` sorted: roles by their NONMEM name, outputs and covariates as spelled.

    ``strict=False`` drops names the data do not have (units carried by a table's ``attrs`` after
    its rows or columns were filtered, e.g. one output of several kept) instead of refusing them.
    """
    if not units:
        return ()
    if not isinstance(units, Mapping):
        raise DataError(f"units must be a mapping name -> unit, e.g. {{'TIME': 'h', 'DV': 'mg/L'}} (got {units!r})")
    names = {str(o).upper(): str(o) for o in outputs} | {str(c).upper(): str(c) for c in covariates}
    names |= {role: role for role in ROLES}
    out = {}
    for key, unit in units.items():
        upper = str(key).strip().upper()
        if upper not in names and not strict:
            continue
        if upper not in names:
            raise DataError(f"units: {key!r} is not a column role, an output or a covariate of the data "
                            f"(outputs {list(outputs)}, covariates {list(covariates)}, columns {list(columns)})")
        out[names[upper]] = str(unit)
    return tuple(sorted(out.items()))


def unit_of(units: Mapping[str, str], name: str, output: str | None = None) -> str | None:
    """The unit of ``name`` (a role, covariate or ``"PRED"``-like prediction); a DV-scale name takes its
    output's unit first. Case-insensitive."""
    lookup = {str(k).upper(): v for k, v in units.items()}
    key = str(name).upper()
    if key in ("DV", "PRED", "IPRED", "EPRED", "LLOQ", "RES"):
        if output is not None and str(output).upper() in lookup:
            return lookup[str(output).upper()]
        return lookup.get("DV")
    if key == "TAD":
        return lookup.get("TIME")
    return lookup.get(key)
