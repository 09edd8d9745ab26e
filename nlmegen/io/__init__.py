"""Reading and writing fit results: netCDF files and ArviZ `DataTree` conversion.

ArviZ and xarray are imported only when these functions run.
"""

from ._arviz import to_arviz as to_arviz
from ._file import FileFormatError as FileFormatError
from ._file import load as load
from ._file import save as save

__all__ = ["FileFormatError", "load", "save", "to_arviz"]
