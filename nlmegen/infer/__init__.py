"""Estimation backends behind one `fit`: FO, FOCE, FOCEI, Laplace (NONMEM's methods), SAEM, NUTS, SVI."""

from ._fit import fit as fit
from ._fit import objective as objective
from .bayes.nuts import NUTS as NUTS
from .bayes.svi import SVI as SVI
from .bayes.svi import Encoding as Encoding
from .bayes.svi import TrainedGuide as TrainedGuide
from .bayes.svi import encode as encode
from .bayes.svi import svi_guide as svi_guide
from .laplace.backend import FO as FO
from .laplace.backend import FOCE as FOCE
from .laplace.backend import FOCEI as FOCEI
from .laplace.backend import Laplace as Laplace
from .saem.backend import SAEM as SAEM
from .shared.checkpoint import resume as resume
from .shared.result import FitResult as FitResult

__all__ = ["FO", "FOCE", "FOCEI", "SAEM", "SVI", "Encoding", "FitResult", "Laplace", "NUTS", "TrainedGuide", "encode",
           "fit", "objective", "resume", "svi_guide"]
