"""Placeholder until the ODE module lands (being written now)."""
