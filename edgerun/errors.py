"""Exceptions raised by edgerun. The library never calls sys.exit; the CLI turns these into
one-line messages and a non-zero exit code."""


class EdgerunError(Exception):
    """Base class: every error a user can cause by input (file, flag, budget)."""


class FormatError(EdgerunError):
    """A .ebin file is truncated, corrupted, of a newer version, or not an .ebin at all."""


class UnsupportedModelError(EdgerunError):
    """An architecture, rope scaling or tensor type edgerun does not implement."""


class BudgetError(EdgerunError):
    """The --ram budget cannot hold what the model needs; the message says the minimum."""

    def __init__(self, message, minimum_bytes=None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class Cancelled(EdgerunError):
    """Generation or loading was cancelled by the caller."""
