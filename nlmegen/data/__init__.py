"""The data layer: NONMEM-style event tables to padded, masked `Population` pytrees."""

from ._checks import check_observed as check_observed
from ._population import Population as Population
from ._read import read_nonmem as read_nonmem

__all__ = ["Population", "check_observed", "read_nonmem"]
