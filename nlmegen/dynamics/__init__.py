"""Dynamics, the decoder: closed-form compartment models (`pk`) and dosed ODEs (`ode`)."""

from . import ode as ode
from . import pk as pk

__all__ = ["ode", "pk"]
