"""Reading and writing fit results: netCDF files and ArviZ `DataTree` conversion.

ArviZ and xarray are imported only when these functions run.
"""

from ._arviz import load as load
from ._arviz import save as save
from ._arviz import to_arviz as to_arviz

__all__ = ["load", "save", "to_arviz"]
