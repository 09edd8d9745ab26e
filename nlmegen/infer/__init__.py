"""Estimation backends: FO, FOCE, FOCEI and Laplace (NONMEM's methods) behind one `fit`."""

from ._fit import fit as fit
from ._fit import objective as objective
from ._laplace import FO as FO
from ._laplace import FOCE as FOCE
from ._laplace import FOCEI as FOCEI
from ._laplace import Laplace as Laplace
from ._result import FitResult as FitResult

__all__ = ["FO", "FOCE", "FOCEI", "FitResult", "Laplace", "fit", "objective"]
