"""Diagnostics computed as arrays and tables (residuals, VPC), drawn on request with matplotlib."""

from ._residuals import residuals as residuals
from ._vpc import VPC as VPC
from ._vpc import vpc as vpc

__all__ = ["VPC", "residuals", "vpc"]
