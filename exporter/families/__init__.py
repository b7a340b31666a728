"""Per-model registry: one module per model family says how the model splits into parts.

Every module of this package (but ``base``) defines one :class:`~.base.Family` subclass, which
registers itself; :func:`get_family` imports them all once, so adding a model is adding a
module. Nothing else in the exporter is model-specific; the runtime sees only what the family
wrote to the manifest.
"""

from __future__ import annotations

import importlib
import pkgutil

from dit.errors import ModelError

from .base import Family


def families() -> dict[str, type[Family]]:
    """``{name: Family subclass}`` for every family module of this package."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(Family.registry.items()))


def get_family(name: str) -> Family:
    """The family object for ``name`` (e.g. ``"latte"``)."""
    registry = families()
    if name not in registry:
        raise ModelError(f"unknown model {name!r}: supported models are {', '.join(registry)}; "
                         f"pass one of them to --model")
    return registry[name]()
