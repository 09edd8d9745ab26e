"""Estimation backends behind one `fit`: FO, FOCE, FOCEI, Laplace (NONMEM's methods) and NUTS."""

from ._fit import fit as fit
from ._fit import objective as objective
from ._laplace import FO as FO
from ._laplace import FOCE as FOCE
from ._laplace import FOCEI as FOCEI
from ._laplace import Laplace as Laplace
from ._nuts import NUTS as NUTS
from ._result import FitResult as FitResult

__all__ = ["FO", "FOCE", "FOCEI", "FitResult", "Laplace", "NUTS", "fit", "objective"]
