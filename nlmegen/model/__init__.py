"""The model contract: subject plate, observed sites, site discovery, the shared density."""

from ._density import Density as Density
from ._density import ParameterSpace as ParameterSpace
from ._handlers import resample_observed as resample_observed
from ._mixture import marginalised as marginalised
from ._mixture import mixture as mixture
from ._nn import nn as nn
from ._observe import Censored as Censored
from ._observe import additive as additive
from ._observe import combined as combined
from ._observe import observe as observe
from ._observe import proportional as proportional
from ._occasions import by_occasion as by_occasion
from ._occasions import occasion_index as occasion_index
from ._occasions import occasions as occasions
from ._plate import SUBJECT_PLATE as SUBJECT_PLATE
from ._plate import subjects as subjects
from ._sites import Site as Site
from ._sites import Sites as Sites
from ._sites import discover as discover

__all__ = ["SUBJECT_PLATE", "Censored", "Density", "ParameterSpace", "Site", "Sites", "additive", "by_occasion",
           "combined", "discover", "marginalised", "mixture", "nn", "observe", "occasion_index", "occasions",
           "proportional", "resample_observed", "subjects"]
