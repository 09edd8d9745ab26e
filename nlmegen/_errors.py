"""Exceptions raised at nlmegen's boundaries (data loading, model discovery, fitting)."""

__all__ = ["DataError", "ModelError"]


class DataError(ValueError):
    """The input table is not a valid NONMEM-style event table.

    The message names the offending row (the table's own row label, and the line of the CSV file
    when read from one) and the column.
    """


class ModelError(ValueError):
    """The NumPyro model does not follow nlmegen's model contract; the message names the site."""
