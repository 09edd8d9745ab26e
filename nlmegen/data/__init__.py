"""The data layer: NONMEM-style event tables to padded, masked `Population` pytrees."""

from ._population import Population as Population
from ._read import read_nonmem as read_nonmem

__all__ = ["Population", "read_nonmem"]
