"""nlmegen: nonlinear mixed-effects models as conditional generative models, written in NumPyro.

Importing nlmegen turns on JAX's 64-bit mode (estimation needs float64: float32 gives percent-level
errors in ODE solutions and objective values). Set the environment variable ``NLMEGEN_X64=0``
before importing to leave JAX's setting alone.
"""

import os as _os

import jax as _jax

if _os.environ.get("NLMEGEN_X64", "1") != "0":
    _jax.config.update("jax_enable_x64", True)

from . import datasets as datasets  # noqa: E402
from . import diagnostics as diagnostics  # noqa: E402
from . import examples as examples  # noqa: E402
from ._errors import DataError as DataError  # noqa: E402
from ._errors import ModelError as ModelError  # noqa: E402
from .data import Population as Population  # noqa: E402
from .data import read_nonmem as read_nonmem  # noqa: E402
from .diagnostics import gof as gof  # noqa: E402
from .diagnostics import plot_individuals as plot_individuals  # noqa: E402
from .diagnostics import vpc as vpc  # noqa: E402
from .dynamics import ode as ode  # noqa: E402
from .dynamics import pk as pk  # noqa: E402
from .infer import FO as FO  # noqa: E402
from .infer import FOCE as FOCE  # noqa: E402
from .infer import FOCEI as FOCEI  # noqa: E402
from .infer import NUTS as NUTS  # noqa: E402
from .infer import FitResult as FitResult  # noqa: E402
from .infer import Laplace as Laplace  # noqa: E402
from .infer import fit as fit  # noqa: E402
from .infer import objective as objective  # noqa: E402
from .io import load as load  # noqa: E402
from .model import additive as additive  # noqa: E402
from .model import combined as combined  # noqa: E402
from .model import nn as nn  # noqa: E402
from .model import observe as observe  # noqa: E402
from .model import proportional as proportional  # noqa: E402
from .model import subjects as subjects  # noqa: E402
from .simulate import simulate as simulate  # noqa: E402
from .simulate import simulate_arrays as simulate_arrays  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FO", "FOCE", "FOCEI", "DataError", "Laplace", "ModelError", "NUTS", "Population", "additive", "combined",
           "FitResult", "datasets", "examples", "fit", "load", "nn", "objective", "observe", "ode", "pk", "proportional", "read_nonmem",
           "simulate", "simulate_arrays", "subjects", "diagnostics", "gof", "plot_individuals", "vpc"]
