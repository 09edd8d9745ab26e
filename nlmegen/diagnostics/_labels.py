"""Axis labels with units: ``NAME (unit)``, one convention for every figure.

Names are NONMEM's column names (``TIME``, ``TAD``, ``DV``, ``PRED``, ``IPRED``, ``CWRES``, ...),
covariates and random effects as the data and the model spell them. Units come from the data
(`Population.units`: ``read_nonmem(..., units=)`` or the table's ``attrs["units"]``), and a
plotting function's ``units=`` adds to or overrides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..data._units import unit_of

__all__ = ["axis_label", "plot_units"]


def plot_units(source: Any, units: Mapping[str, str] | None = None) -> dict:
    """The units for a figure of ``source`` (a fit, a population or None), updated by ``units``."""
    pop = getattr(source, "pop", source)
    out = dict(getattr(pop, "units", ()) or ())
    out.update({str(k): str(v) for k, v in (units or {}).items()})
    return out


def axis_label(name: str, units: Mapping[str, str], output: Any = None, *, text: str | None = None) -> str:
    """``text`` (default ``name``) with the unit of ``name`` (see `nlmegen.data._units.unit_of`) in brackets."""
    unit = unit_of(units, name, None if output is None else str(output))
    base = name if text is None else text
    return f"{base} ({unit})" if unit else base
