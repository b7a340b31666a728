"""One error path for the whole project.

Every error a user can cause derives from :class:`ForesightError`; its message says what
went wrong and what to do about it. The CLIs print the message and exit non-zero, without
a traceback. ``assert`` is used only for internal invariants.
"""


from foresight.errors import ConfigError, ForesightError
from dit.errors import ModelError

__all__ = ["ForesightError", "ConfigError", "ModelError", "ManifestError", "ShapeError", "OutputPathError",
           "NumericsError", "BackendError"]


class ManifestError(ForesightError):
    """The engines folder or its manifest is missing, corrupt, or from another version."""


class ShapeError(ForesightError):
    """A requested frames/height/width is outside what the engines were built for."""


class OutputPathError(ForesightError):
    """An output file cannot be written where the user asked."""


class NumericsError(ForesightError):
    """A layer produced NaN or Inf."""


class BackendError(ForesightError):
    """A backend is unavailable or failed to run a part."""
