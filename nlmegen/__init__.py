"""nlmegen: nonlinear mixed-effects models as conditional generative models, written in NumPyro.

Importing nlmegen turns on JAX's 64-bit mode (estimation needs float64: float32 gives percent-level
errors in ODE solutions and objective values). Set the environment variable ``NLMEGEN_X64=0``
before importing to leave JAX's setting alone.

It also turns on JAX's persistent compilation cache, so that a second Python process fitting the
same model loads its compiled code instead of compiling it again (every program is kept, however
quick to compile). The cache lives in
``$NLMEGEN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/nlmegen/jax``, i.e. ``~/.cache/nlmegen/jax``);
``NLMEGEN_CACHE_DIR=0`` (or ``off``) disables it, and a directory already set through
``jax.config.update("jax_compilation_cache_dir", ...)`` before the import is left alone.
"""

import os as _os

import jax as _jax

if _os.environ.get("NLMEGEN_X64", "1") != "0":
    _jax.config.update("jax_enable_x64", True)


def _enable_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at nlmegen's cache directory (see module docstring)."""
    setting = _os.environ.get("NLMEGEN_CACHE_DIR", "")
    if setting.strip().lower() in ("0", "off", "false", "no") or _jax.config.jax_compilation_cache_dir:
        return
    if not setting:
        base = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
        setting = _os.path.join(base, "nlmegen", "jax")
    try:
        _os.makedirs(setting, exist_ok=True)
    except OSError:  # read-only home: run without the cache rather than fail on import
        return
    _jax.config.update("jax_compilation_cache_dir", setting)
    # every compilation is kept, the small ones too: a fit's start values, result tables and
    # standard errors run ~100 small programs (10-30 ms each to compile); loading them from the cache
    # cut a second process's theo_sd fit from 8.8 s to 6.7 s end to end (about 1 MB on disk)
    _jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


_enable_compilation_cache()

from . import covariates as covariates  # noqa: E402
from . import datasets as datasets  # noqa: E402
from . import diagnostics as diagnostics  # noqa: E402
from . import examples as examples  # noqa: E402
from ._errors import DataError as DataError  # noqa: E402
from ._errors import ModelError as ModelError  # noqa: E402
from .covariates import scm as scm  # noqa: E402
from .data import Population as Population  # noqa: E402
from .data import read_nonmem as read_nonmem  # noqa: E402
from .data._text import TextEmbedding as TextEmbedding  # noqa: E402
from .diagnostics import gof as gof  # noqa: E402
from .diagnostics import plot_individuals as plot_individuals  # noqa: E402
from .diagnostics import vpc as vpc  # noqa: E402
from .diagnostics._eta_plots import plot_eta_by_covariate as plot_eta_by_covariate  # noqa: E402
from .diagnostics._eta_plots import plot_eta_density as plot_eta_density  # noqa: E402
from .dynamics import ode as ode  # noqa: E402
from .dynamics import pk as pk  # noqa: E402
from .infer import FO as FO  # noqa: E402
from .infer import FOCE as FOCE  # noqa: E402
from .infer import FOCEI as FOCEI  # noqa: E402
from .infer import NUTS as NUTS  # noqa: E402
from .infer import SAEM as SAEM  # noqa: E402
from .infer import SVI as SVI  # noqa: E402
from .infer import FitResult as FitResult  # noqa: E402
from .infer import Laplace as Laplace  # noqa: E402
from .infer import fit as fit  # noqa: E402
from .infer import objective as objective  # noqa: E402
from .infer import resume as resume  # noqa: E402
from .infer.shared.compare import compare as compare  # noqa: E402
from .io import load as load  # noqa: E402
from .model import additive as additive  # noqa: E402
from .model import combined as combined  # noqa: E402
from .model import nn as nn  # noqa: E402
from .model import observe as observe  # noqa: E402
from .model import proportional as proportional  # noqa: E402
from .model import subjects as subjects  # noqa: E402
from .model._flows import CovariateGaussian as CovariateGaussian  # noqa: E402
from .model._flows import FlowDistribution as FlowDistribution  # noqa: E402
from .model._flows import flow as flow  # noqa: E402
from .model._flows import flow_values as flow_values  # noqa: E402
from .model._flows import spline_flow as spline_flow  # noqa: E402
from .model._two_stage import eta_draws as eta_draws  # noqa: E402
from .model._two_stage import fit_flow as fit_flow  # noqa: E402
from .simulate import posterior_predictive as posterior_predictive  # noqa: E402
from .simulate import simulate as simulate  # noqa: E402
from .simulate import simulate_arrays as simulate_arrays  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FO", "FOCE", "FOCEI", "NUTS", "SAEM", "SVI", "DataError", "FitResult", "Laplace", "ModelError",
           "Population", "additive", "combined", "datasets", "diagnostics", "examples", "fit", "gof", "load", "nn",
           "objective", "observe", "ode", "pk", "plot_individuals", "posterior_predictive", "proportional",
           "read_nonmem", "resume", "simulate", "simulate_arrays", "subjects", "vpc"]
__all__ += ["CovariateGaussian", "FlowDistribution", "TextEmbedding", "eta_draws", "fit_flow", "flow", "flow_values",
            "plot_eta_by_covariate", "plot_eta_density", "spline_flow"]
__all__ += ["compare", "covariates", "scm"]
