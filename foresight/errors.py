"""The root of the project's one error tree.

Every error a user can cause derives from :class:`ForesightError`; its message says what went
wrong and what to do about it, and the CLIs print it as ``error: ...`` and exit 2. The root
lives here, in the bottom package (standard library only), so that every layer above it —
the model code in ``dit``, the runtime, the exporter — raises into the same tree.
"""


class ForesightError(Exception):
    """Base class of every error a user can cause; the message names the fix."""


class ConfigError(ForesightError, ValueError):
    """A policy name, option or value that cannot work; the message says what to pass instead."""
