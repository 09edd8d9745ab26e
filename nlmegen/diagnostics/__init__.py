"""Diagnostics computed as arrays and tables: residuals (PRED, IPRED, IWRES, CWRES, NPDE)."""

from ._residuals import residuals as residuals

__all__ = ["residuals"]
