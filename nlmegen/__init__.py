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

``import nlmegen`` itself imports neither JAX nor the rest of the package: the settings above are
applied as soon as JAX is imported (see ``nlmegen/_jaxsetup.py``), and each public name is imported
on first use, so the command line's ``--help`` and ``--version`` answer at once.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from . import _jaxsetup

_jaxsetup.install()

__version__ = "0.1.0"

# public name -> (module, attribute); None: the submodule itself. Imported on first access (PEP 562).
_LAZY = {
    "datasets": (".datasets", None), "diagnostics": (".diagnostics", None), "examples": (".examples", None),
    "parallel": (".parallel", None), "covariates": (".covariates", None), "scm": (".covariates", "scm"),
    "compare": (".infer.shared.compare", "compare"),
    **{name: (".parallel", name) for name in ("bootstrap", "multistart", "sir")},
    "ode": (".dynamics.ode", None), "pk": (".dynamics.pk", None),
    "DataError": ("._errors", "DataError"), "ModelError": ("._errors", "ModelError"),
    "Population": (".data", "Population"), "read_nonmem": (".data", "read_nonmem"),
    "TextEmbedding": (".data._text", "TextEmbedding"),
    "design": (".data._design", "design"), "regimen": (".data._design", "regimen"),
    "gof": (".diagnostics", "gof"), "plot_individuals": (".diagnostics", "plot_individuals"),
    "plot_random_effects": (".diagnostics", "plot_random_effects"), "vpc": (".diagnostics", "vpc"),
    "plot_eta_by_covariate": (".diagnostics._eta_plots", "plot_eta_by_covariate"),
    "plot_eta_density": (".diagnostics._eta_plots", "plot_eta_density"),
    **{name: (".infer", name) for name in ("FO", "FOCE", "FOCEI", "NUTS", "SAEM", "SVI", "FitResult", "Laplace",
                                           "fit", "objective", "resume")},
    "load": (".io", "load"),
    **{name: (".model", name) for name in ("additive", "by_occasion", "combined", "mixture", "nn", "observe",
                                           "occasion_index", "occasions", "proportional", "subjects")},
    **{name: (".model._flows", name) for name in ("CovariateGaussian", "FlowDistribution", "flow", "flow_values",
                                                  "spline_flow")},
    **{name: (".infer.early_stopping", name) for name in ("EarlyStopping", "fit_early_stopping")},
    "eta_draws": (".model._two_stage", "eta_draws"), "fit_flow": (".model._two_stage", "fit_flow"),
    **{name: ("._simulate", name) for name in ("posterior_predictive", "simulate", "simulate_arrays")},
}

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from . import covariates as covariates
    from . import datasets as datasets
    from . import diagnostics as diagnostics
    from . import examples as examples
    from . import parallel as parallel
    from ._errors import DataError as DataError
    from ._errors import ModelError as ModelError
    from ._simulate import posterior_predictive as posterior_predictive
    from ._simulate import simulate as simulate
    from ._simulate import simulate_arrays as simulate_arrays
    from .covariates import scm as scm
    from .data import Population as Population
    from .data import read_nonmem as read_nonmem
    from .data._design import design as design
    from .data._design import regimen as regimen
    from .data._text import TextEmbedding as TextEmbedding
    from .diagnostics import gof as gof
    from .diagnostics import plot_individuals as plot_individuals
    from .diagnostics import plot_random_effects as plot_random_effects
    from .diagnostics import vpc as vpc
    from .diagnostics._eta_plots import plot_eta_by_covariate as plot_eta_by_covariate
    from .diagnostics._eta_plots import plot_eta_density as plot_eta_density
    from .dynamics import ode as ode
    from .dynamics import pk as pk
    from .infer import FO as FO
    from .infer import FOCE as FOCE
    from .infer import FOCEI as FOCEI
    from .infer import NUTS as NUTS
    from .infer import SAEM as SAEM
    from .infer import SVI as SVI
    from .infer import FitResult as FitResult
    from .infer import Laplace as Laplace
    from .infer import fit as fit
    from .infer import objective as objective
    from .infer import resume as resume
    from .infer.early_stopping import EarlyStopping as EarlyStopping
    from .infer.early_stopping import fit_early_stopping as fit_early_stopping
    from .infer.shared.compare import compare as compare
    from .io import load as load
    from .model import additive as additive
    from .model import by_occasion as by_occasion
    from .model import combined as combined
    from .model import mixture as mixture
    from .model import nn as nn
    from .model import observe as observe
    from .model import occasion_index as occasion_index
    from .model import occasions as occasions
    from .model import proportional as proportional
    from .model import subjects as subjects
    from .model._flows import CovariateGaussian as CovariateGaussian
    from .model._flows import FlowDistribution as FlowDistribution
    from .model._flows import flow as flow
    from .model._flows import flow_values as flow_values
    from .model._flows import spline_flow as spline_flow
    from .model._two_stage import eta_draws as eta_draws
    from .model._two_stage import fit_flow as fit_flow
    from .parallel import bootstrap as bootstrap
    from .parallel import multistart as multistart
    from .parallel import sir as sir

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'nlmegen' has no attribute {name!r}") from None
    value = _import_module(module, __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
