"""Diagnostics computed as arrays and tables (residuals, VPC, GOF), drawn on request with matplotlib."""

from ._gof import gof_table as gof_table
from ._residuals import residuals as residuals
from ._vpc import VPC as VPC
from ._vpc import time_after_dose as time_after_dose
from ._vpc import vpc as vpc
from .plots import gof as gof
from .plots import plot_individuals as plot_individuals
from .plots import plot_random_effects as plot_random_effects

__all__ = ["VPC", "gof", "gof_table", "plot_individuals", "plot_random_effects", "residuals", "time_after_dose", "vpc"]
