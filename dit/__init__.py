"""Model code that the exporter and the runtime both run, as both run diffusers' models.

One module per model family (``latte``, ``cogvideox``, ``opensora``) defines ``FAMILY``, the
stem / layer / head modules whose stack equals the model's forward, ``load_transformer(folder)``
(a local ``transformer/`` folder, never the network) and ``part_modules(model, pipeline=None)``
(``pipeline``: the engines' pipeline facts, for options a model's pipeline sets, e.g. Wan 2.2
TI2V's per-token timesteps). Models that diffusers does not have live here too (Open-Sora 1.2's STDiT3, its VAE, the rectified-flow
sampler and the eager reference pipeline). Nothing here imports the exporter or the runtime.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from .errors import ModelError


def model_code(family: str) -> ModuleType:
    """The module of ``family``: every module of this package that defines ``FAMILY``."""
    for info in pkgutil.iter_modules(__path__):
        if info.name == family:
            module = importlib.import_module(f"{__name__}.{info.name}")
            if getattr(module, "FAMILY", None) == family:
                return module
    raise ModelError(f"no model code for family {family!r} in this version of foresight-dit; upgrade it")
