"""Estimation backends behind one `fit`: FO, FOCE, FOCEI, Laplace (NONMEM's methods), SAEM, NUTS, SVI."""

from ._fit import fit as fit
from ._fit import objective as objective
from ._laplace import FO as FO
from ._laplace import FOCE as FOCE
from ._laplace import FOCEI as FOCEI
from ._laplace import Laplace as Laplace
from ._nuts import NUTS as NUTS
from ._result import FitResult as FitResult
from ._saem import SAEM as SAEM
from ._svi import SVI as SVI
from ._svi import Encoding as Encoding
from ._svi import TrainedGuide as TrainedGuide
from ._svi import encode as encode
from ._svi import svi_guide as svi_guide

__all__ = ["FO", "FOCE", "FOCEI", "SAEM", "SVI", "Encoding", "FitResult", "Laplace", "NUTS", "TrainedGuide", "encode",
           "fit", "objective", "svi_guide"]
