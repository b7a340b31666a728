"""Errors of the model code: a checkpoint that cannot be loaded names what to pass instead."""

from foresight.errors import ForesightError


class ModelError(ForesightError):
    """An unknown model family, or a checkpoint folder that cannot be loaded."""
